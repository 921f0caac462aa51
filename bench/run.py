"""Benchmark cbn against the NumPy formula, PyTorch, ONNX Runtime, OpenVINO,
oneDNN and the copy limit.

    python bench/run.py               # everything: about five minutes
    python bench/run.py --quick       # small shapes, few samples: a smoke test
    python bench/run.py --threads 1 --filter NHWC --json out.json --plot out.png

The suite times training forward, inference and backward on cache-resident,
medium and large arrays (at least twice the L3) in every layout ((N, C),
(N, C, L), NCHW, NHWC) and dtype (float32, float64): cbn with a preallocated
output (also at one thread on cache-resident arrays) and with its default
call, the vectorized NumPy formula, PyTorch CPU, for inference ONNX Runtime,
OpenVINO and oneDNN (each optional, at the same thread count), and a copy of
the same bytes. Then small calls, thread scaling at 1 and 2 threads, the
default thread setting against one thread (quiet, between matrix products,
with a busy core), Python threads sharing one eval layer, and a dense ->
batch norm -> ReLU pipeline against PyTorch, ONNX Runtime and OpenVINO in a
child process per import order of torch and cbn, and SyncBatchNorm's training
step against the local one at 2 and 4 MPI ranks (--filter sync; needs
mpi4py), and cbn.dask.moments of a 1 GiB memmapped file against reading it
through Dask (--filter dask; needs Dask; left out of --quick unless --filter
selects it), and a masked training forward (layer(x, out, mask=mask), with
padding and random masks) against the unmasked one on the suite's training
cases and padded-sequence (N, C, L) cases (--filter masked). Every row
records the load of other processes while it was timed; loaded rows are
marked *. Prints the tables and the performance targets with PASS/FAIL
(targets about the full suite's cases are N/A in --quick), writes the
results as JSON and, when matplotlib is installed, a PNG chart.

Measures the cbn that Python imports, never the source tree's cbn/ (which
is not on the path): install it, or put an in-place build on PYTHONPATH.
"""
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: Python put bench/ itself first on sys.path. Drop it and
    # import this directory as the package ``bench`` (so its modules import
    # each other as usual) without the repository root on sys.path, where the
    # source tree's cbn/ would shadow the installed package.
    import importlib.util
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == _here:
        del sys.path[0]
    _spec = importlib.util.spec_from_file_location(
        "bench", _here / "__init__.py", submodule_search_locations=[str(_here)])
    sys.modules["bench"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["bench"])
    __package__ = "bench"

import argparse
import json
import time
from collections import namedtuple
from pathlib import Path

try:
    import cbn
except ImportError as error:
    sys.exit(f"cannot import cbn ({error}); install it (pip install .) or put an "
             "in-place build on PYTHONPATH")

from . import (
    dask_moments,
    default_threads,
    environment,
    import_order,
    masked,
    peers,
    plot,
    python_threads,
    report,
    scaling,
    small_calls,
    suite,
    sync,
    tables,
    targets,
    torch_ops,
)
from .cases import (
    DEFAULT_THREAD_CASES,
    FULL_SUITE,
    OPS,
    PYTHON_THREADS,
    QUICK_DEFAULT_THREAD_CASES,
    QUICK_PYTHON_THREADS,
    QUICK_SUITE,
    SCALING_CASES,
    SMALL_CALLS,
    scaling_name,
    small_call_name,
)
from .load import CpuLoad
from .pipeline import SCENARIOS as PIPELINE_SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results"

# How long each part runs: rounds of the large cases; (samples, seconds per
# sample) of the per-call timings of the small calls and scaling rows, of
# the suite's other cases and of the default-thread rows; the pipeline's
# rounds and batches per stream of each batch size (fewer large batches, so
# that each stream takes a similar time), and its child processes' time limit.
Effort = namedtuple("Effort", "repeats small suite default_threads pipeline child_timeout")
FULL = Effort(5, (15, 0.02), (7, 0.01), (9, 0.01), (5, {1: 100, 32: 40, 256: 15}), 600)
QUICK = Effort(3, (5, 0.002), (3, 0.002), (3, 0.002), (3, {1: 10, 32: 4, 256: 2}), 300)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few samples (a smoke test)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads for cbn and every runtime (default: cbn's default)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"timed rounds per large case (default {FULL.repeats}, "
                             f"{QUICK.repeats} with --quick)")
    parser.add_argument("--filter", metavar="SUBSTRING", default="",
                        help="only rows whose name contains SUBSTRING, ignoring case "
                             "(e.g. NHWC, float64, backward, 4096x4096, small, threads, "
                             "default threads, pipeline, busy core, masked)")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        default=RESULTS / "latest.json",
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--plot", metavar="PATH", type=Path, default=None,
                        help="PNG chart, when matplotlib is installed (default: the "
                             "JSON path with .png)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


class Parts:
    """Runs the parts of the benchmark in turn, keeping each one's load."""

    def __init__(self):
        self.loads = {}
        self._load = CpuLoad()

    def run(self, name, function, *args, **kwargs):
        self._load.lap()
        result = function(*args, **kwargs)
        if result:  # a part the filter left empty has no load to speak of
            self.loads[name] = self._load.lap()
        return result


def pipeline_runs(selected, effort, cbn_threads):
    """{import order: the child's result, or {"skipped": why}}."""
    results = {}
    rounds, batches = effort.pipeline
    for order in import_order.ORDERS:
        def chosen(batch, scenario, order=order):
            return selected(f"pipeline {order} batch {batch} {scenario}")
        batch_sizes = [batch for batch in batches
                       if any(chosen(batch, scenario) for scenario in PIPELINE_SCENARIOS)]
        scenarios = [scenario for scenario in PIPELINE_SCENARIOS
                     if any(chosen(batch, scenario) for batch in batches)]
        if not batch_sizes:
            continue
        if order == "torch first" and torch_ops.torch is None:
            results[order] = {"skipped": "skipped: PyTorch is not installed"}
            continue
        log(f"pipeline, {order}: child process")
        results[order] = import_order.run(
            order, dict(batches=[[batch, batches[batch]] for batch in batch_sizes],
                        rounds=rounds, threads=cbn_threads, scenarios=scenarios),
            effort.child_timeout)
    return results


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    effort = QUICK if args.quick else FULL
    repeats = args.repeats or effort.repeats
    cbn.set_num_threads(args.threads)  # None: cbn's default
    threads = cbn.get_num_threads()
    torch_ops.set_num_threads(threads)
    copy_threads = max(2, threads)

    def selected(name):
        return args.filter.lower() in name.lower()

    facts = environment.describe(threads)
    print(report.header(facts, repeats, copy_threads, args.quick), flush=True)
    missing = (["PyTorch"] if torch_ops.torch is None else []) + peers.missing()
    if missing:
        print(f"\nNote: not installed, their columns and targets are skipped: "
              f"{', '.join(missing)}.", flush=True)

    parts = Parts()
    cases = QUICK_SUITE if args.quick else FULL_SUITE
    rows = parts.run("suite", suite.run, cases,
                     lambda case: [op for op in case.ops if selected(f"{case.name} {op}")],
                     repeats, effort.suite, threads, args.threads)
    if rows:
        print("\n" + tables.suite_table(rows, copy_threads), flush=True)
        if any(row["op"] == "inference" for row in rows):
            print("\n" + tables.peers_table(rows), flush=True)
        if any(row["resident"] for row in rows):
            print("\n" + tables.resident_table(rows, threads), flush=True)

    samples, sample_seconds = effort.small
    chosen_calls = [call for call in SMALL_CALLS if selected(small_call_name(call))]
    log(f"small calls: {len(chosen_calls)}")
    small_rows = parts.run("small calls", small_calls.run, chosen_calls, samples,
                           sample_seconds)
    if small_rows:
        print("\n" + tables.small_calls_table(small_rows, samples), flush=True)

    scaling_cases = [(case, [op for op in OPS if selected(scaling_name(case, op))])
                     for case in SCALING_CASES]
    log(f"thread scaling: {sum(len(ops) for _, ops in scaling_cases)} rows")
    scaling_rows = parts.run("thread scaling", scaling.run, scaling_cases, samples,
                             sample_seconds, args.threads)
    if scaling_rows:
        print("\n" + tables.scaling_table(scaling_rows, samples), flush=True)

    default_cases = QUICK_DEFAULT_THREAD_CASES if args.quick else DEFAULT_THREAD_CASES
    default_rows = parts.run("default threads", default_threads.run, default_cases,
                             *effort.default_threads, selected=selected,
                             cbn_threads=args.threads)
    if default_rows:
        print("\n" + tables.default_threads_table(default_rows, effort.default_threads[0]),
              flush=True)

    thread_cases = QUICK_PYTHON_THREADS if args.quick else PYTHON_THREADS
    thread_cases = [(form, shape) for form, shape in thread_cases
                    if selected(f"python threads {form} {'x'.join(map(str, shape))}")]
    log(f"python threads: {len(thread_cases)} rows")
    thread_rows = parts.run("python threads", python_threads.run, thread_cases, samples,
                            args.threads)
    if thread_rows:
        print("\n" + tables.python_threads_table(thread_rows, samples), flush=True)

    pipeline = parts.run("pipeline", pipeline_runs, selected, effort, args.threads)
    if pipeline:
        print("\n" + tables.pipeline_table(pipeline), flush=True)

    sync_rows = parts.run("sync", sync.run, selected, args.quick)
    if sync_rows:
        print("\n" + sync.report(sync_rows, args.quick), flush=True)

    dask_rows = (parts.run("dask moments", dask_moments.run, selected, args.quick,
                           threads=threads) if not args.quick or args.filter else [])
    if dask_rows:
        print("\n" + dask_moments.report(dask_rows), flush=True)

    masked_rows = parts.run("masked", masked.run, selected, args.quick)
    if masked_rows:
        print("\n" + masked.report(masked_rows, args.quick), flush=True)

    if not (rows or small_rows or scaling_rows or default_rows or thread_rows or pipeline
            or sync_rows or dask_rows or masked_rows):
        print(f"\nNo rows match --filter {args.filter!r}.")
        return 2
    results = {"facts": facts,
               "options": {"quick": args.quick, "threads": threads,
                           "threads_option": args.threads, "repeats": repeats,
                           "effort": effort._asdict(), "filter": args.filter,
                           "copy_threads": copy_threads},
               "suite": rows, "small_calls": small_rows, "thread_scaling": scaling_rows,
               "default_threads": default_rows, "python_threads": thread_rows,
               "pipeline": pipeline, "sync": sync_rows, "dask_moments": dask_rows,
               "masked": masked_rows, "machine_load": parts.loads}
    installed = {"torch": torch_ops.torch is not None,
                 **{key: version is not None for key, version in peers.versions().items()}}
    results["summary"] = by_op = targets.summary(rows)
    results["targets"] = checked = (targets.evaluate(results, args.quick, installed)
                                    + sync.targets(sync_rows, args.quick))
    if by_op:
        print("\n" + tables.summary_table(by_op))
    print("\n" + report.targets_list(checked))
    print("\n" + report.machine_load(parts.loads))

    results["elapsed_seconds"] = elapsed = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nResults written to {args.json}")
    plot_path = args.plot or args.json.with_suffix(".png")
    if rows and plot.available():
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot.write(plot_path, rows, f"cbn {facts['cbn']}, {threads} threads, {facts['cpu']}")
        print(f"Chart written to {plot_path}")
    elif rows:
        print("No chart: matplotlib is not installed.")
    print(f"Run time: {elapsed:.0f} s")
    return 0


def log(message):
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
