"""SyncBatchNorm's training step against the local BatchNorm step, over MPI.

At 2 and 4 ranks (``mpiexec -n P python -m mpi4py bench/sync_worker.py``,
one thread per rank) and each shape per rank, the worker times a training
step (forward + backward into preallocated outputs) of a local
cbn.BatchNorm and of a cbn.SyncBatchNorm per reduction path ("auto", the
layer's default, then "allgather" and "allreduce" forced) on the same
per-rank data: medians over repeats of the slowest rank's step, each step
after a barrier. The synchronized step's extra cost is one collective of
2C + 2 doubles in the forward and one of 2C + 1 in the backward (see
cbn/sync.py), so it shows as added microseconds at (32, 256) and as a ratio
at (32, 64, 56, 56), where the step itself takes milliseconds.

The ranks share this machine's cores: with more ranks than cores (4 ranks
here on 2 cores) ranks wait for a core as well as for each other, and the
rows measure that; the targets are judged at 2 ranks.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cbn

from . import load as machine
from .cache import cache_sizes
from .report import mib
from .tables import _table, _us

RANKS = (2, 4)
SHAPES = ((32, 256), (32, 64, 56, 56))
REDUCTIONS = ("auto", "allgather", "allreduce")
# (timed repeats, warm-up repeats) per shape: the small step takes tens of
# microseconds, the large one tens of milliseconds.
REPEATS = {(32, 256): (3000, 100), (32, 64, 56, 56): (40, 3)}
QUICK_REPEATS = {(32, 256): (300, 20), (32, 64, 56, 56): (5, 1)}
# At most this long per shape and rank count (fewer repeats when the warm-up
# says more would not fit; see sync_worker.py).
BUDGET_SECONDS, QUICK_BUDGET_SECONDS = 10.0, 2.0
TIMEOUT = 900   # seconds per launch; the job is killed after it
QUICK_TIMEOUT = 300

# The targets, judged at 2 ranks.
TARGET_RANKS = 2
RATIO_SHAPE, RATIO_LIMIT = (32, 64, 56, 56), 1.15
ADDED_SHAPE, ADDED_LIMIT_US = (32, 256), 30.0
QUICK_NA = "N/A in --quick (too few repeats to judge)"

WORKER = Path(__file__).resolve().parent / "sync_worker.py"


def row_name(ranks, shape):
    return f"sync {ranks} ranks {'x'.join(map(str, shape))} float32"


def mpi_missing():
    """Why the part cannot run, or None."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'cbn[mpi]')"
    if mpiexec() is None:
        return "no mpiexec beside this Python or on PATH"
    return None


def mpiexec():
    """mpi4py's MPICH wheels put mpiexec beside the interpreter."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def launch(ranks, arguments, timeout):
    """The worker's JSON result at ``ranks`` ranks, or {"error": message}.
    It runs in a temporary directory with the cbn this process imported
    first on its path, OMP_NUM_THREADS=1 and no CBN_NUM_THREADS."""
    cbn_parent = str(Path(cbn.__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [cbn_parent,
                                                        os.environ.get("PYTHONPATH")])))
    env.pop("CBN_NUM_THREADS", None)
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", str(WORKER),
               json.dumps(arguments)]
    with tempfile.TemporaryDirectory() as directory:
        # its own session: on a timeout, mpiexec and every rank go together
        process = subprocess.Popen(command, cwd=directory, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"error": f"timed out after {timeout:g} s"}
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {process.returncode}: {last}"}
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": "no JSON result on the last line of its output"}


def run(selected, quick, progress=sys.stderr, *, ranks_list=RANKS, shapes=SHAPES,
        repeats=None):
    """One row per (ranks, shape) whose name ``selected`` keeps; rows carry
    "error" or "skipped" instead of times when the launch failed or MPI is
    missing. [] when the filter keeps none. ``repeats``: {shape: (timed,
    warm-up)}, by default REPEATS (QUICK_REPEATS with ``quick``)."""
    todo = {ranks: [shape for shape in shapes if selected(row_name(ranks, shape))]
            for ranks in ranks_list}
    todo = {ranks: shapes for ranks, shapes in todo.items() if shapes}
    if not todo:
        return []
    why = mpi_missing()
    if why is not None:
        return [{"name": row_name(ranks, shape), "ranks": ranks, "shape": list(shape),
                 "skipped": why} for ranks, shapes in todo.items() for shape in shapes]
    repeats = repeats or (QUICK_REPEATS if quick else REPEATS)
    rows = []
    for ranks, shapes in todo.items():
        print(f"sync: {ranks} ranks, {len(shapes)} shapes (mpiexec)", file=progress, flush=True)
        arguments = {"shapes": [list(shape) for shape in shapes],
                     "repeats": [repeats[shape][0] for shape in shapes],
                     "warmup": [repeats[shape][1] for shape in shapes],
                     "reductions": list(REDUCTIONS),
                     "budget_seconds": QUICK_BUDGET_SECONDS if quick else BUDGET_SECONDS}
        cpu_load = machine.CpuLoad()
        result = launch(ranks, arguments, QUICK_TIMEOUT if quick else TIMEOUT)
        load = cpu_load.lap()
        by_shape = {tuple(row["shape"]): row for row in result.get("rows", [])}
        for shape in shapes:
            row = {"name": row_name(ranks, shape), "ranks": ranks, "shape": list(shape),
                   "dtype": "float32", "bytes_per_rank": 4 * _size(shape),
                   "threads_per_rank": result.get("threads"), "machine_load": load}
            if shape not in by_shape:
                row["error"] = result.get("error", "no result for this shape")
            else:
                row.update(_times(by_shape[shape]["seconds"]))
            rows.append(row)
    return rows


def _size(shape):
    size = 1
    for extent in shape:
        size *= extent
    return size


def _times(seconds):
    local = seconds["local"]["median"]
    return {"seconds": {name: value["median"] for name, value in seconds.items()},
            "fastest_rank_seconds": {name: value["fastest_rank_median"]
                                     for name, value in seconds.items()},
            "repeats": seconds["local"]["repeats"],
            "ratio": {name: seconds[name]["median"] / local for name in REDUCTIONS},
            "added_us": {name: (seconds[name]["median"] - local) * 1e6
                         for name in REDUCTIONS}}


# ---------------------------------------------------------------------------
# Report

def _row_for(rows, ranks, shape):
    found = [row for row in rows if row["ranks"] == ranks and tuple(row["shape"]) == shape]
    return found[0] if found else None


def targets(rows, quick):
    """The two sync targets as target dicts (see targets.py)."""
    specs = [
        (RATIO_SHAPE, f"sync, {TARGET_RANKS} ranks, {RATIO_SHAPE}: SyncBatchNorm step <= "
                      f"{RATIO_LIMIT}x the local step",
         lambda row, name: row["ratio"][name] <= RATIO_LIMIT,
         lambda row, name: f"{row['ratio'][name]:.2f}x"),
        (ADDED_SHAPE, f"sync, {TARGET_RANKS} ranks, {ADDED_SHAPE}: SyncBatchNorm step adds "
                      f"< {ADDED_LIMIT_US:g} us",
         lambda row, name: row["added_us"][name] < ADDED_LIMIT_US,
         lambda row, name: f"+{row['added_us'][name]:.1f} us"),
    ]
    checked = []
    for shape, requirement, passes, show in specs:
        row = _row_for(rows, TARGET_RANKS, shape)
        if row is None or "seconds" not in row:
            reason = "no row in this run" if row is None else row.get("skipped") or row["error"]
            checked.append(_target(requirement, "SKIP", reason))
            continue
        value = (f"{show(row, 'auto')} (allgather {show(row, 'allgather')}, allreduce "
                 f"{show(row, 'allreduce')})"
                 + (" (*)" if machine.loaded(row["machine_load"]) else ""))
        status = "N/A" if quick else ("PASS" if passes(row, "auto") else "FAIL")
        checked.append(_target(requirement, status, value if not quick
                               else f"{QUICK_NA}; {value}"))
    return checked


def _target(requirement, status, value):
    return {"kind": "target", "requirement": requirement, "status": status, "value": value}


def report(rows, quick):
    """The part's table, its caches line and its targets (met / not met)."""
    caches = cache_sizes()
    lines = ["SyncBatchNorm training step vs the local BatchNorm step (forward + backward, "
             "out=), float32, one thread per rank",
             f"    {os.cpu_count()} logical CPUs; caches (per core where private): "
             + (", ".join(f"{name} {mib(size)}" for name, size in caches.items())
                or "unknown"),
             "    times: medians over repeats of the slowest rank's step, each step after a "
             "barrier; x: synchronized / local; +us: added time"]
    body, timed = [], []
    for row in rows:
        label = [str(row["ranks"]), str(tuple(row["shape"])), mib(row.get("bytes_per_rank"))]
        if "seconds" not in row:
            body.append(label + [row.get("skipped") or f"error: {row['error']}"])
            continue
        seconds = row["seconds"]
        cells = [str(row["repeats"]), _us(seconds["local"])]
        for name in REDUCTIONS:
            added = row["added_us"][name]
            cells += [_us(seconds[name]), f"{row['ratio'][name]:.2f}x",
                      f"{added:+.0f}" if abs(added) >= 1000 else f"{added:+.1f}"]
        star = "*" if machine.loaded(row["machine_load"]) else ""
        body.append(label + cells + [star])
        timed.append(row)
    headers = ["ranks", "shape per rank", "per rank", "repeats", "local us"]
    for name in REDUCTIONS:
        headers += [f"{name} us", "x", "+us"]
    width = len(headers) + 1
    lines.append(_table(headers + [""], [cells + [""] * (width - len(cells))
                                         for cells in body], left=3))
    if any(machine.loaded(row["machine_load"]) for row in timed):
        lines.append("  * timed while other processes or the hypervisor took more than "
                     f"{machine.BUSY_CPUS:g} CPUs")
    for row in {id(row["machine_load"]): row for row in timed}.values():
        lines.append(f"  load during the {row['ranks']}-rank launch: "
                     f"{machine.describe(row['machine_load'])}")
    lines.append("  Targets (at 2 ranks, the layer's default reduction; "
                 + ("not judged in --quick)" if quick else "met / not met)"))
    for target in targets(rows, quick):
        verdict = {"PASS": "met", "FAIL": "NOT MET"}.get(target["status"], target["status"])
        lines.append(f"    [{verdict}] {target['requirement']}: {target['value']}")
    return "\n".join(lines)
