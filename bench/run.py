"""cbn against the plain-NumPy formula: median times and speed-ups.

    python bench/run.py            # the default suite
    python bench/run.py --quick    # small shapes, a few repeats (smoke test)
    python bench/run.py --threads 1

Each case times cbn and the NumPy reference (cbn.reference, the obvious
vectorized float64 formulas) interleaved, so drift in the machine's speed hits
both alike, and reports the median of the repeats after a warm-up call.
"""
import argparse
import platform
import statistics
import sys
import time

import numpy as np

import cbn
from cbn import reference

FULL_CASES = [((4096, 1024), 1), ((32, 64, 56, 56), 1), ((32, 56, 56, 64), -1),
              ((256, 128, 64), 1)]
QUICK_CASES = [((256, 64), 1), ((4, 16, 16, 16), 1), ((4, 16, 16, 16), -1)]


def operations(x, dy, axis):
    """(name, cbn call, NumPy call) for training forward, inference and backward."""
    num_channels = x.shape[axis]
    weight = np.ones(num_channels, x.dtype)
    bias = np.zeros(num_channels, x.dtype)
    mean = np.zeros(num_channels, x.dtype)
    var = np.ones(num_channels, x.dtype)
    _, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    return [
        ("train forward",
         lambda: cbn.batch_norm(x, mean, var, weight, bias, training=True, axis=axis),
         lambda: reference.batch_norm(x, mean.copy(), var.copy(), weight, bias,
                                      training=True, axis=axis)),
        ("inference",
         lambda: cbn.batch_norm(x, mean, var, weight, bias, axis=axis),
         lambda: reference.batch_norm(x, mean, var, weight, bias, axis=axis)),
        ("backward",
         lambda: cbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight, axis=axis),
         lambda: reference.batch_norm_backward(dy, x, save_mean, save_invstd, weight,
                                               axis=axis)),
    ]


def median_times(functions, repeats):
    """Median seconds of each function, calls interleaved round by round."""
    for function in functions:  # warm-up: first-touch pages, caches
        function()
    samples = [[] for _ in functions]
    for _ in range(repeats):
        for function, times in zip(functions, samples):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in samples]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        cbn.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (3 if args.quick else 11)

    print(f"cbn {cbn.__version__}, NumPy {np.__version__}, Python {platform.python_version()}"
          f", {platform.machine()}, {cbn.get_num_threads()} threads, median of {repeats}")
    print(f"{'shape':>20} {'axis':>4} {'dtype':>7} {'operation':>14} "
          f"{'cbn ms':>9} {'NumPy ms':>9} {'speed-up':>8}")
    rng = np.random.default_rng(0)
    for shape, axis in cases:
        for dtype in (np.float32, np.float64):
            x = (5 + rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            for name, fast, slow in operations(x, dy, axis):
                t_cbn, t_numpy = median_times([fast, slow], repeats)
                print(f"{str(shape):>20} {axis:>4} {np.dtype(dtype).name:>7} {name:>14} "
                      f"{t_cbn * 1e3:9.3f} {t_numpy * 1e3:9.3f} {t_numpy / t_cbn:7.1f}x",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
