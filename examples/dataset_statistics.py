"""Statistics of an on-disk dataset through Dask, a batch norm calibrated from
them, and inference block by block.

The script writes a synthetic NCHW float32 dataset to a temporary directory,
block by block through np.memmap (channel c drawn with a known mean and
standard deviation), then:

  1. opens the file as a Dask array (the memmap wrapped with da.from_array,
     blocks of --rows samples) and takes the per-channel moments in one pass
     with cbn.dask.moments: no more than a few blocks are read at a time;
  2. calibrates a cbn.BatchNorm2d from them:
     layer.calibrate(cbn.dask.moments(x)), the same running statistics as
     layer.calibrate over every batch;
  3. normalizes the dataset block by block with cbn.dask.apply(layer, x),
     checks one block against the layer called on it (the same bits), and
     takes the moments of the output: mean 0 and standard deviation 1 per
     channel, to rounding.

    python examples/dataset_statistics.py                  # 256 MB, seconds
    python examples/dataset_statistics.py --megabytes 4096  # a bigger file
"""
import argparse
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

import cbn
import cbn.dask

CHANNELS, HEIGHT, WIDTH = 16, 32, 32
SEED = 20261201


def write_dataset(path, samples, rows, rng):
    """``samples`` NCHW float32 images written ``rows`` at a time; returns the
    per-channel means and standard deviations they were drawn with."""
    means = np.linspace(-40.0, 120.0, CHANNELS)
    stds = np.linspace(0.5, 8.0, CHANNELS)
    shape = (samples, CHANNELS, HEIGHT, WIDTH)
    data = np.memmap(path, np.float32, "w+", shape=shape)
    for start in range(0, samples, rows):
        block = rng.standard_normal((min(rows, samples - start), *shape[1:]),
                                    dtype=np.float32)
        block *= stds[:, None, None].astype(np.float32)
        block += means[:, None, None].astype(np.float32)
        data[start:start + len(block)] = block
    data.flush()
    del data
    return means, stds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256,
                        help="size of the synthetic dataset (default %(default)s)")
    parser.add_argument("--rows", type=int, default=256,
                        help="samples per Dask block (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads of Dask's threaded scheduler (default %(default)s)")
    args = parser.parse_args(argv)
    sample_bytes = CHANNELS * HEIGHT * WIDTH * 4
    samples = max(2, args.megabytes * 10**6 // sample_bytes)
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="cbn-dataset-") as folder, \
            dask.config.set(scheduler="threads", num_workers=args.workers):
        path = Path(folder) / "images.f32"
        means, stds = write_dataset(path, samples, args.rows, rng)
        shape = (samples, CHANNELS, HEIGHT, WIDTH)
        x = da.from_array(np.memmap(path, np.float32, "r", shape=shape),
                          chunks=(args.rows, -1, -1, -1))
        print(f"Dataset: {shape} float32, {x.nbytes / 1e6:.0f} MB in {path.name}, "
              f"{x.numblocks[0]} Dask blocks of {args.rows} samples, "
              f"{args.workers} threads")

        # 1 and 2: one pass over the file, then the running statistics. (Dask's
        # first compute imports its scheduler machinery: not timed.)
        cbn.dask.moments(x.blocks[0])
        start = time.perf_counter()
        moments = cbn.dask.moments(x)
        seconds = time.perf_counter() - start
        print(f"\ncbn.dask.moments: {moments.count} values per channel in {seconds:.2f} s "
              f"({x.nbytes / seconds / 1e9:.2f} GB/s; the file was just written, so "
              "it is read from the page cache)")
        layer = cbn.BatchNorm2d(CHANNELS)
        layer.calibrate(moments)     # the same as layer.calibrate(cbn.dask.moments(x))
        layer.eval()

        # 3: the normalized dataset, block by block, and its moments
        y = cbn.dask.apply(layer, x)
        first = x.blocks[0].compute()
        same = y.blocks[0].compute().tobytes() == layer(first).tobytes()
        print(f"cbn.dask.apply on block 0 gives the bits of layer(block 0): {same}")
        start = time.perf_counter()
        normalized = cbn.dask.moments(y)
        seconds = time.perf_counter() - start
        print(f"cbn.dask.moments of cbn.dask.apply(layer, x): {seconds:.2f} s")
        del x, y, first    # the memmap, before its folder goes

    print(f"\n{'channel':>7} {'drawn mean':>11} {'data mean':>11} {'drawn std':>10} "
          f"{'data std':>10} {'output mean':>12} {'output std':>11}")
    data_std = np.sqrt(moments.var())
    out_std = np.sqrt(normalized.var())
    for c in range(CHANNELS):
        print(f"{c:>7} {means[c]:>11.3f} {moments.mean[c]:>11.3f} {stds[c]:>10.3f} "
              f"{data_std[c]:>10.3f} {normalized.mean[c]:>12.2e} {out_std[c]:>11.6f}")
    worst_mean = float(np.max(np.abs(normalized.mean)))
    worst_std = float(np.max(np.abs(out_std - 1)))
    print(f"\nOutput: largest |mean| {worst_mean:.2e}, largest |std - 1| {worst_std:.2e}")
    if not (same and worst_mean < 1e-3 and worst_std < 1e-3):
        raise SystemExit("the normalized dataset is not normalized")
    print("Normalized: every channel has mean 0 and standard deviation 1.")


if __name__ == "__main__":
    main()
