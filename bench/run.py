"""Benchmark cbn against the NumPy formula, PyTorch CPU and the copy limit.

    python bench/run.py               # the full suite: a few minutes
    python bench/run.py --quick       # small shapes, few repeats: seconds
    python bench/run.py --threads 1 --filter NHWC --json out.json --plot out.png

Times training forward, inference and backward on large arrays in every
layout ((N, C), (N, C, L), NCHW, NHWC) and dtype (float32, float64): cbn
with a preallocated output and with its default call, the vectorized NumPy
formula, PyTorch CPU (when installed, at the same thread count) and a copy of
the same bytes, all calls of a case interleaved round by round, the caches
flushed before each call on large arrays. Then small calls in microseconds,
thread scaling at 1 and 2 threads, and Python threads sharing one eval layer.
Prints the tables and the issue's
targets with PASS/FAIL, writes the results as JSON and, when matplotlib is
installed, a PNG chart.

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
from pathlib import Path

try:
    import cbn
except ImportError as error:
    sys.exit(f"cannot import cbn ({error}); install it (pip install .) or put an "
             "in-place build on PYTHONPATH")

from . import (
    environment,
    plot,
    python_threads,
    report,
    scaling,
    small_calls,
    suite,
    targets,
    torch_ops,
)
from .cases import (
    FULL_SUITE,
    OPS,
    PYTHON_THREADS,
    QUICK_PYTHON_THREADS,
    QUICK_SUITE,
    SCALING_CASES,
    SMALL_CALLS,
    scaling_name,
    small_call_name,
)

RESULTS = Path(__file__).resolve().parent / "results"

# (repeats of the large cases, samples of the small calls, seconds per sample)
FULL = (5, 15, 0.02)
QUICK = (3, 5, 0.002)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats (a smoke test)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads for cbn and PyTorch (default: cbn's default)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"timed rounds per large case (default {FULL[0]}, "
                             f"{QUICK[0]} with --quick)")
    parser.add_argument("--filter", metavar="SUBSTRING", default="",
                        help="only rows whose name contains SUBSTRING, ignoring case "
                             "(e.g. NHWC, float64, backward, 4096x4096, small, threads)")
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


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    repeats, samples, sample_seconds = QUICK if args.quick else FULL
    repeats = args.repeats or repeats
    if args.threads is not None:
        cbn.set_num_threads(args.threads)
    threads = cbn.get_num_threads()
    torch_ops.set_num_threads(threads)
    copy_threads = max(2, threads)

    def selected(name):
        return args.filter.lower() in name.lower()

    facts = environment.describe(threads)
    print(report.header(facts, repeats, copy_threads), flush=True)
    if torch_ops.torch is None:
        print("\nNote: PyTorch is not installed; its columns and targets are skipped.",
              flush=True)

    cpu_load = environment.CpuLoad()
    loads = {}
    cases = QUICK_SUITE if args.quick else FULL_SUITE
    rows = suite.run(cases, lambda case: [op for op in OPS if selected(f"{case.name} {op}")],
                     repeats, threads)
    loads["large arrays"] = cpu_load.lap()
    if rows:
        print("\n" + report.suite_table(rows, copy_threads), flush=True)

    chosen_calls = [call for call in SMALL_CALLS if selected(small_call_name(call))]
    log(f"small calls: {len(chosen_calls)}")
    small_rows = small_calls.run(chosen_calls, samples, sample_seconds)
    loads["small calls"] = cpu_load.lap()
    if small_rows:
        print("\n" + report.small_calls_table(small_rows, samples), flush=True)

    scaling_cases = [(case, [op for op in OPS if selected(scaling_name(case, op))])
                     for case in SCALING_CASES]
    log(f"thread scaling: {sum(len(ops) for _, ops in scaling_cases)} rows")
    scaling_rows = scaling.run(scaling_cases, samples, sample_seconds)
    loads["thread scaling"] = cpu_load.lap()
    if scaling_rows:
        print("\n" + report.scaling_table(scaling_rows, samples), flush=True)

    thread_cases = QUICK_PYTHON_THREADS if args.quick else PYTHON_THREADS
    thread_cases = [(form, shape) for form, shape in thread_cases
                    if selected(f"python threads {form} {'x'.join(map(str, shape))}")]
    log(f"python threads: {len(thread_cases)} rows")
    thread_rows = python_threads.run(thread_cases, samples)
    loads["python threads"] = cpu_load.lap()
    if thread_rows:
        print("\n" + report.python_threads_table(thread_rows, samples), flush=True)

    if not (rows or small_rows or scaling_rows or thread_rows):
        print(f"\nNo rows match --filter {args.filter!r}.")
        return 2
    by_op = targets.summary(rows)
    checked = targets.evaluate(rows, small_rows, scaling_rows)
    if by_op:
        print("\n" + report.summary_table(by_op))
    print("\n" + report.targets_list(checked))
    print("\n" + report.machine_load(loads))

    elapsed = time.perf_counter() - started
    results = {"facts": facts,
               "options": {"quick": args.quick, "threads": threads, "repeats": repeats,
                           "samples": samples, "filter": args.filter,
                           "copy_threads": copy_threads},
               "suite": rows, "small_calls": small_rows, "thread_scaling": scaling_rows,
               "python_threads": thread_rows,
               "summary": by_op, "targets": checked, "machine_load": loads,
               "elapsed_seconds": elapsed}
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
