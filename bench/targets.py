"""The performance targets of the issue, checked against a run's results.

Each target comes back as a dict: what is required, the measured value, and
its status: PASS, FAIL, or SKIP when the run has nothing to judge it by
(e.g. no large arrays in ``--quick``, PyTorch not installed, a filter).
Checks of the benchmark itself (kind "check") are reported beside the
targets but not counted among them.
"""
import statistics

from .cases import OPS, SCALING_TARGET

# cbn(out=) time / copy time on large arrays, at most.
COPY_LIMITS = {"train forward": 1.7, "inference": 1.2, "backward": 2.8}
# Median speed-up of cbn's default call over the suite, at least.
TORCH_MEDIAN = {"train forward": 2.0, "inference": 2.0, "backward": 2.0}
NUMPY_MEDIAN = {"train forward": 6.0, "inference": 3.0, "backward": 6.0}


def _target(requirement, status, value, kind="target"):
    return {"kind": kind, "requirement": requirement, "status": status, "value": value}


def _passes(ok):
    return "PASS" if ok else "FAIL"


def median_of(rows, key):
    values = [row[key] for row in rows if row[key] is not None]
    return statistics.median(values) if values else None


def summary(rows):
    """{op: {cases, speedup_numpy, speedup_torch, copy_ratio, worst_large_copy_ratio}}:
    medians over the suite's rows of each op."""
    result = {}
    for op in OPS:
        of_op = [row for row in rows if row["op"] == op]
        if not of_op:
            continue
        large = [row["copy_ratio"] for row in of_op if row["large"]]
        result[op] = {
            "cases": len(of_op),
            "speedup_numpy": median_of(of_op, "speedup_numpy"),
            "speedup_torch": median_of(of_op, "speedup_torch"),
            "copy_ratio": median_of(of_op, "copy_ratio"),
            "worst_large_copy_ratio": max(large) if large else None,
        }
    return result


def _copy_targets(rows):
    for op, limit in COPY_LIMITS.items():
        requirement = f"{op}: cbn(out=) / copy <= {limit} on large arrays"
        large = [row for row in rows if row["op"] == op and row["large"]]
        if not large:
            yield _target(requirement, "SKIP", "no large arrays in this run")
            continue
        worst = max(large, key=lambda row: row["copy_ratio"])
        over = sum(row["copy_ratio"] > limit for row in large)
        yield _target(requirement, _passes(not over),
                      f"worst {worst['copy_ratio']:.2f} ({worst['name']}); "
                      f"{over} of {len(large)} over")


def _torch_targets(rows, by_op):
    requirement = "faster than PyTorch on every case"
    timed = [row for row in rows if row["speedup_torch"] is not None]
    if not timed:
        yield _target(requirement, "SKIP", "PyTorch not timed")
    else:
        slowest = min(timed, key=lambda row: row["speedup_torch"])
        slower = sum(row["speedup_torch"] < 1 for row in timed)
        yield _target(requirement, _passes(not slower),
                      f"{slower} of {len(timed)} slower; lowest "
                      f"{slowest['speedup_torch']:.2f}x ({slowest['name']})")
    for op, limit in TORCH_MEDIAN.items():
        requirement = f"{op}: median speed-up over PyTorch >= {limit:g}x"
        median = by_op.get(op, {}).get("speedup_torch")
        if median is None:
            yield _target(requirement, "SKIP", "not run" if timed else "PyTorch not timed")
        else:
            yield _target(requirement, _passes(median >= limit), f"{median:.2f}x")


def _numpy_targets(by_op):
    for op, limit in NUMPY_MEDIAN.items():
        requirement = f"{op}: median speed-up over NumPy >= {limit:g}x"
        median = by_op.get(op, {}).get("speedup_numpy")
        if median is None:
            yield _target(requirement, "SKIP", "not run")
        else:
            yield _target(requirement, _passes(median >= limit), f"{median:.2f}x")


def _small_call_targets(small_rows):
    for row in small_rows:
        microseconds = row["seconds"]["cbn"] * 1e6
        yield _target(f"{row['name']}: under {row['target_us']:g} us",
                      _passes(microseconds < row["target_us"]), f"{microseconds:.2f} us")


def _scaling_targets(scaling_rows):
    for row in scaling_rows:
        yield _target(f"{row['name']}: 2 threads >= {SCALING_TARGET:g}x 1 thread",
                      _passes(row["speedup"] >= SCALING_TARGET), f"{row['speedup']:.2f}x")
    if scaling_rows:
        different = [row["name"] for row in scaling_rows if not row["identical"]]
        yield _target("results bit-identical at 1 and 2 threads",
                      _passes(not different),
                      f"{len(scaling_rows) - len(different)} of {len(scaling_rows)} "
                      "calls identical" + (f"; differ: {', '.join(different)}"
                                            if different else ""))


def _copy_check(rows):
    """On large arrays the split copy should beat a one-thread copy; where it
    does not, one core already saturates memory (the copy limit is then the
    one-thread copy's)."""
    cases = {row["case"]: row["copy_split_speedup"] for row in rows if row["large"]}
    if not cases:
        return []
    faster = sum(speedup > 1 for speedup in cases.values())
    return [_target("split copy faster than a one-thread copy on large arrays",
                    "ok" if faster == len(cases) else "WARN",
                    f"{faster} of {len(cases)} cases; median speed-up "
                    f"{statistics.median(cases.values()):.2f}x", kind="check")]


def evaluate(rows, small_rows, scaling_rows):
    """Every target (and check), in the issue's order."""
    by_op = summary(rows)
    return [*_copy_targets(rows), *_torch_targets(rows, by_op), *_numpy_targets(by_op),
            *_small_call_targets(small_rows), *_scaling_targets(scaling_rows),
            *_copy_check(rows)]
