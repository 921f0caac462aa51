"""cbn's performance targets, checked against a run's results.

Each target comes back as a dict: what is required, the measured value, and
its status: PASS or FAIL; SKIP when the run has nothing to judge it by (a
filter, a runtime not installed); N/A in ``--quick`` for targets about the
full suite's cases, which the quick run's small arrays cannot stand in for,
and for the pipeline's, whose quick streams are too short to judge.
Each value says how many of the rows it judged were timed under load (the
rows marked * in the tables). Checks of the benchmark itself (kind "check")
are reported beside the targets but not counted among them.
"""
import statistics

from .cases import LAYOUT_AXIS, OPS, SCALING_TARGET
from .default_threads import LIMIT as DEFAULT_THREADS_LIMIT
from .default_threads import SCENARIOS as DEFAULT_THREADS_SCENARIOS
from .load import loaded
from .peers import names as peer_names

# cbn(out=) time / copy time, at most: on large arrays (beyond the L3) and on
# cache-resident ones (at one thread and at the run's thread count).
COPY_LIMITS = {"train forward": 1.7, "inference": 1.2, "backward": 2.8}
RESIDENT_LIMITS = {"train forward": 2.2, "inference": 1.3, "backward": 3.2}
# Median speed-up of cbn's default call over the suite, at least.
TORCH_MEDIAN = {"train forward": 2.0, "inference": 2.0, "backward": 2.0}
NUMPY_MEDIAN = {"train forward": 6.0, "inference": 3.0, "backward": 6.0}
# A masked training forward / the unmasked one, at most, on every case.
MASKED_LIMIT = 1.3
QUICK_NA = "N/A in --quick (needs the full suite's cases)"
QUICK_PIPELINE_NA = "N/A in --quick (streams of a few batches are too short to judge)"


def _target(requirement, status, value, kind="target"):
    return {"kind": kind, "requirement": requirement, "status": status, "value": value}


def _passes(ok):
    return "PASS" if ok else "FAIL"


def _loaded_note(rows):
    under = sum(loaded(row.get("machine_load")) for row in rows)
    return f"; {under} of {len(rows)} rows timed under load (*)" if under else ""


def _judged(requirement, rows, failed, worst, describe):
    """A target over ``rows``: FAIL when any row ``failed``; the value names
    the ``worst`` row (a key function) with ``describe(row)``."""
    if not rows:
        return _target(requirement, "SKIP", "no rows in this run")
    over = [row for row in rows if failed(row)]
    return _target(requirement, _passes(not over),
                   f"{len(over)} of {len(rows)} miss; worst {describe(max(rows, key=worst))}"
                   + _loaded_note(rows))


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


def _speedup(row, peer):
    return row["speedup_torch"] if peer == "torch" else row["speedup_peers"].get(peer)


def _faster_than(rows, op, peer, label, installed, what=None):
    requirement = f"{what or op}: faster than {label} on every case"
    if not installed:
        return _target(requirement, "SKIP", f"{label} not installed")
    of_op = [row for row in rows if row["op"] == op]
    timed = [row for row in of_op if _speedup(row, peer) is not None]
    target = _judged(requirement, timed, lambda row: _speedup(row, peer) < 1,
                     lambda row: -_speedup(row, peer),
                     lambda row: f"{_speedup(row, peer):.2f}x ({row['case']})")
    not_applicable = sum(peer in row["unsupported"] for row in of_op)
    if not_applicable:
        target["value"] += f"; n/a on {not_applicable} cases"
    return target


def _peer_targets(rows, installed):
    for peer, label in {"torch": "PyTorch", **peer_names()}.items():
        yield _faster_than(rows, "inference", peer, label, installed.get(peer, False))
    yield _faster_than(rows, "inference", "openvino_relu", "OpenVINO's fused BN+ReLU",
                       installed.get("openvino", False), what="inference + ReLU")
    for op in ("train forward", "backward"):
        yield _faster_than(rows, op, "torch", "PyTorch", installed.get("torch", False))


def _median_targets(rows, by_op, key, limits, label):
    for op, limit in limits.items():
        requirement = f"{op}: median speed-up over {label} >= {limit:g}x"
        median = by_op.get(op, {}).get(key)
        if median is None:
            yield _target(requirement, "SKIP", f"{label} not timed or op not run")
        else:
            of_op = [row for row in rows if row["op"] == op]
            yield _target(requirement, _passes(median >= limit),
                          f"{median:.2f}x" + _loaded_note(of_op))


def _copy_ratio_target(requirement, rows, key, limit):
    timed = [row for row in rows if row.get(key) is not None]
    return _judged(requirement, timed, lambda row: row[key] > limit, lambda row: row[key],
                   lambda row: f"{row[key]:.2f} ({row['case']})")


def _resident_targets(rows, threads):
    for op, limit in RESIDENT_LIMITS.items():
        resident = [row for row in rows if row["op"] == op and row["resident"]]
        for key, count in (("copy_ratio_1thread", 1), ("copy_ratio", threads)):
            yield _copy_ratio_target(
                f"{op}: cbn(out=) / copy <= {limit:g}, cache-resident, {count} "
                f"thread{'s' if count > 1 else ''}", resident, key, limit)


def _large_targets(rows):
    every = {(layout, dtype) for layout in LAYOUT_AXIS for dtype in ("float32", "float64")}
    for op, limit in COPY_LIMITS.items():
        large = [row for row in rows if row["op"] == op and row["large"]]
        target = _copy_ratio_target(f"{op}: cbn(out=) / copy <= {limit:g} on large arrays",
                                    large, "copy_ratio", limit)
        missing = every - {(row["layout"], row["dtype"]) for row in large}
        if large and missing:
            target["value"] += "; no large " + ", ".join(sorted(" ".join(m) for m in missing))
        yield target


def _default_thread_targets(rows):
    for scenario in DEFAULT_THREADS_SCENARIOS:
        of_scenario = [row for row in rows if row["scenario"] == scenario]
        yield _judged(
            f"default threads no more than {DEFAULT_THREADS_LIMIT - 1:.0%} slower than 1 "
            f"thread, {scenario}", of_scenario,
            lambda row: row["ratio"] > DEFAULT_THREADS_LIMIT, lambda row: row["ratio"],
            lambda row: f"{row['ratio']:.2f} ({row['case']} {row['op']})")


def _scaling_targets(scaling_rows):
    for row in scaling_rows:
        yield _target(f"{row['name']}: 2 threads >= {SCALING_TARGET:g}x 1 thread",
                      _passes(row["speedup"] >= SCALING_TARGET),
                      f"{row['speedup']:.2f}x" + _loaded_note([row]))
    if scaling_rows:
        different = [row["name"] for row in scaling_rows if not row["identical"]]
        yield _target("results bit-identical at 1 and 2 threads",
                      _passes(not different),
                      f"{len(scaling_rows) - len(different)} of {len(scaling_rows)} "
                      "calls identical" + (f"; differ: {', '.join(different)}"
                                            if different else ""))


PIPELINE_WAYS = ("fused", "frozen")
PIPELINE_BATCHES = (32, 256)


def _pipeline_targets(pipeline):
    """Per import order and scenario: the fused and frozen ways faster than
    PyTorch eager at batch 32 and 256."""
    for order, result in pipeline.items():
        scenarios = sorted({row["scenario"] for row in result.get("rows", [])}) or ["-"]
        for scenario in scenarios:
            requirement = (f"pipeline, {order}, {scenario}: fused and frozen faster than "
                           "PyTorch at batch 32 and 256")
            if "error" in result or "skipped" in result:
                yield _target(requirement, "SKIP" if "skipped" in result else "FAIL",
                              result.get("skipped") or result["error"])
                continue
            rows = [row for row in result["rows"] if row["scenario"] == scenario
                    and row["batch"] in PIPELINE_BATCHES and "PyTorch" in row["seconds"]]
            pairs = [(row, way, row["seconds"]["PyTorch"] / row["seconds"][way])
                     for row in rows for way in PIPELINE_WAYS]
            if not pairs:
                yield _target(requirement, "SKIP", "PyTorch or the batch sizes not run")
                continue
            slower = sum(speedup < 1 for _, _, speedup in pairs)
            row, way, lowest = min(pairs, key=lambda pair: pair[2])
            yield _target(requirement, _passes(not slower),
                          f"{slower} of {len(pairs)} slower; lowest {lowest:.2f}x "
                          f"({way}, batch {row['batch']})" + _loaded_note(rows))


def _small_call_targets(small_rows):
    for row in small_rows:
        microseconds = row["seconds"]["cbn"] * 1e6
        yield _target(f"{row['name']}: under {row['target_us']:g} us",
                      _passes(microseconds < row["target_us"]),
                      f"{microseconds:.2f} us" + _loaded_note([row]))


def masked_target(rows, quick=False):
    """The masked part's target over its rows (masked.py)."""
    target = _judged(f"masked training forward <= {MASKED_LIMIT:g}x unmasked on every case",
                     rows, lambda row: row["ratio"] > MASKED_LIMIT, lambda row: row["ratio"],
                     lambda row: f"{row['ratio']:.2f}x ({row['case']}, {row['mask']} mask)")
    if quick and rows:
        target.update(status="N/A", value=f"{QUICK_NA}; {target['value']}")
    return target


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


def _not_applicable(targets, reason):
    for target in targets:
        yield dict(target, status="N/A", value=reason)


def evaluate(results, quick=False, installed=None):
    """Every target (and check) of a run's ``results`` (the JSON dict's parts:
    suite, small_calls, thread_scaling, default_threads, pipeline, masked), in the
    order of the targets list. ``installed``: {peer key or "torch": bool}."""
    rows = results.get("suite", [])
    installed = installed or {}
    threads = results.get("options", {}).get("threads", 2)
    by_op = summary(rows)
    full_suite = [*_peer_targets(rows, installed),
                  *_median_targets(rows, by_op, "speedup_torch", TORCH_MEDIAN, "PyTorch"),
                  *_median_targets(rows, by_op, "speedup_numpy", NUMPY_MEDIAN, "NumPy"),
                  *_resident_targets(rows, threads), *_large_targets(rows),
                  *_default_thread_targets(results.get("default_threads", []))]
    pipeline = list(_pipeline_targets(results.get("pipeline", {})))
    if quick:
        full_suite = list(_not_applicable(full_suite, QUICK_NA))
        pipeline = list(_not_applicable(pipeline, QUICK_PIPELINE_NA))
    return [*full_suite, *_scaling_targets(results.get("thread_scaling", [])), *pipeline,
            *_small_call_targets(results.get("small_calls", [])),
            masked_target(results.get("masked", []), quick), *_copy_check(rows)]
