"""Batch norm over padded variable-length sequences, with and without ``mask=``.

    python examples/padded_sequences.py           # the whole run
    python examples/padded_sequences.py --quick   # fewer training batches
    python examples/padded_sequences.py --plot padded_sequences.png

Sequences of different lengths are batched by padding them with zeros to one
length L: an (N, C, L) array, with a boolean (N, L) mask that is True at the
real positions. Batch norm without the mask counts the padding as data.
With a fraction p of the positions padded, it sees the moments of a mixture
of the data and a point mass at 0:

    mean' = (1 - p) * mean
    var'  = (1 - p) * var + p * (1 - p) * mean**2

so the statistics drift further from the data's as padding grows, wherever
a channel's mean is not 0. ``mask=`` takes the statistics over the real
positions only. The script shows:

  1. per padded length, how far the unmasked statistics are from NumPy's over
     the real positions (and that they are the mixture's above), and that
     ``cbn.batch_stats(x, mask=mask)`` gives NumPy's (differences of means
     in the data's standard deviations, of variances relative);
  2. a BatchNorm1d trained on padded batches, with and without the mask, then
     used in eval mode on the real positions: what its output's per-channel
     mean and standard deviation come out as (0 and 1 are the goal);
  3. a masked training forward and backward against the same layer run on the
     real positions alone, packed into an (M, C) array: the same output and
     the same gradients, and no gradient into the padding.

All in float64, so that agreement means agreement to rounding.
"""
import argparse
import sys

import numpy as np

import cbn

CHANNELS, SEQUENCES = 8, 16
SHORTEST, LONGEST = 50, 100
PADDED_LENGTHS = (100, 150, 200, 400, 800)   # 100: padded to the longest only
TRAINING_LENGTH = 200
SEED = 20261201


def channel_moments(rng):
    """The per-channel mean and standard deviation the data are drawn with:
    means away from 0, where padding with zeros does harm."""
    return rng.uniform(-3, 5, CHANNELS), rng.uniform(0.5, 2, CHANNELS)


def padded_batch(rng, moments, padded_length):
    """(x, mask): SEQUENCES sequences of random lengths (the first the longest),
    zero-padded to ``padded_length``; mask (N, L) is True at real positions."""
    means, stds = moments
    lengths = rng.integers(SHORTEST, LONGEST + 1, SEQUENCES)
    lengths[0] = LONGEST
    x = np.zeros((SEQUENCES, CHANNELS, padded_length))
    mask = np.arange(padded_length) < lengths[:, None]
    for row, length in enumerate(lengths):
        x[row, :, :length] = (means[:, None]
                              + stds[:, None] * rng.standard_normal((CHANNELS, length)))
    return x, mask


def real_positions(a, mask):
    """The real positions of an (N, C, L) array, packed into (M, C)."""
    return a.transpose(0, 2, 1)[mask]


# ---------------------------------------------------------------------------
# 1. The statistics as padding grows

def distance(mean, var, true_mean, true_var):
    """The largest difference of the means in true standard deviations, or of
    the variances relative to the true ones, over the channels."""
    return max(np.max(np.abs(mean - true_mean) / np.sqrt(true_var)),
               np.max(np.abs(var - true_var) / true_var))


def statistics_drift(rng, moments):
    """One row per padded length: the padding fraction, the unmasked and the
    masked statistics' distances from NumPy's over the real positions."""
    rows = []
    for padded_length in PADDED_LENGTHS:
        x, mask = padded_batch(rng, moments, padded_length)
        real = real_positions(x, mask)
        mean, var = real.mean(axis=0), real.var(axis=0)
        p = 1 - mask.mean()
        unmasked_mean, unmasked_var = cbn.batch_stats(x)
        masked_mean, masked_var = cbn.batch_stats(x, mask=mask)
        mixture_mean = (1 - p) * mean
        mixture_var = (1 - p) * var + p * (1 - p) * mean ** 2
        rows.append({
            "padding": p,
            # how far the unmasked mean is, in the data's standard deviations
            "mean_shift": np.max(np.abs(unmasked_mean - mean) / np.sqrt(var)),
            "std_ratio": np.sqrt(unmasked_var / var),
            "mixture_error": distance(unmasked_mean, unmasked_var, mixture_mean, mixture_var),
            "masked_error": distance(masked_mean, masked_var, mean, var),
        })
    return rows


# ---------------------------------------------------------------------------
# 2. Running statistics learned from padded batches, used in eval mode

def trained_layer(rng, moments, batches, use_mask):
    # momentum=None: the running statistics are the plain average over the
    # batches, so a short run already shows where they settle
    layer = cbn.BatchNorm1d(CHANNELS, momentum=None, dtype=np.float64)
    for _ in range(batches):
        x, mask = padded_batch(rng, moments, TRAINING_LENGTH)
        layer(x, mask=mask if use_mask else None)
    return layer.eval()


def eval_output_moments(layer, rng, moments):
    """Per-channel mean and standard deviation of the eval-mode output over
    the real positions of a fresh batch."""
    x, mask = padded_batch(rng, moments, TRAINING_LENGTH)
    y = real_positions(layer(x), mask)
    return y.mean(axis=0), y.std(axis=0)


# ---------------------------------------------------------------------------
# 3. The masked forward and backward against the packed real positions

def gradient_check(rng, moments):
    """Largest differences between a masked training forward/backward on the
    padded batch and the same on the real positions packed into (M, C)."""
    x, mask = padded_batch(rng, moments, TRAINING_LENGTH)
    # a loss over the real positions only: its gradient is 0 in the padding
    dy = rng.standard_normal(x.shape) * mask[:, None, :]
    weight, bias = rng.uniform(0.5, 2, CHANNELS), rng.uniform(-1, 1, CHANNELS)

    padded = cbn.BatchNorm1d(CHANNELS, dtype=np.float64)
    packed = cbn.BatchNorm1d(CHANNELS, dtype=np.float64)
    for layer in (padded, packed):
        layer.weight[...], layer.bias[...] = weight, bias
    y = padded(x, mask=mask)
    dx = padded.backward(dy)
    y_packed = packed(real_positions(x, mask))
    dx_packed = packed.backward(real_positions(dy, mask))
    return {
        "output": np.max(np.abs(real_positions(y, mask) - y_packed)),
        "input gradient": np.max(np.abs(real_positions(dx, mask) - dx_packed)),
        "input gradient in the padding": np.max(np.abs(dx.transpose(0, 2, 1)[~mask])),
        "weight gradient": np.max(np.abs(padded.grad_weight - packed.grad_weight)),
        "bias gradient": np.max(np.abs(padded.grad_bias - packed.grad_bias)),
        "running statistics": max(np.max(np.abs(padded.running_mean - packed.running_mean)),
                                  np.max(np.abs(padded.running_var - packed.running_var))),
    }


# ---------------------------------------------------------------------------

def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    padding = [100 * row["padding"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(7.5, 2.8))
    left.plot(padding, [row["mean_shift"] for row in rows], "o-", color="tab:red",
              label="without mask")
    masked = [row["masked_error"] for row in rows]
    left.plot(padding, masked, "o-", color="tab:blue",
              label=f"mask= (mean and variance: at most {max(masked):.0e})")
    left.set_yscale("symlog", linthresh=1e-3)
    left.set_ylabel("largest error of the mean\n(data standard deviations)", fontsize=8)
    left.legend(fontsize=7)
    low = [row["std_ratio"].min() for row in rows]
    high = [row["std_ratio"].max() for row in rows]
    right.fill_between(padding, low, high, color="tab:red", alpha=0.3,
                       label="without mask (range over channels)")
    right.axhline(1, color="tab:blue", label="mask= (1 to rounding)")
    right.set_ylabel("batch std / data std", fontsize=8)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xlabel("padded positions (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    figure.suptitle(f"Batch statistics of {SEQUENCES} zero-padded sequences "
                    f"({SHORTEST}-{LONGEST} steps, {CHANNELS} channels)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 training batches, not 200")
    parser.add_argument("--plot", metavar="PNG",
                        help="draw the drift of the statistics to this PNG (needs matplotlib)")
    return parser.parse_args()


def main():
    args = parse_args()
    rng = np.random.default_rng(SEED)
    moments = channel_moments(rng)
    print(f"{SEQUENCES} sequences of {SHORTEST}-{LONGEST} steps, {CHANNELS} channels "
          f"(means {moments[0].min():.1f} to {moments[0].max():.1f}), zero-padded; float64")
    print()
    print("1. Batch statistics against NumPy's over the real positions")
    print(f"{'padded to':<11}{'padding':<9}{'unmasked: mean off by':<23}{'std ratio':<13}"
          f"{'vs mixture':<12}mask=: largest difference")
    rows = statistics_drift(rng, moments)
    for length, row in zip(PADDED_LENGTHS, rows):
        ratio = row["std_ratio"]
        shift, ratios = f"{row['mean_shift']:.2f} std", f"{ratio.min():.2f}-{ratio.max():.2f}"
        print(f"{length:<11}{row['padding']:<9.1%}{shift:<23}{ratios:<13}"
              f"{row['mixture_error']:<12.1e}{row['masked_error']:.1e}")
    worst = max(row["masked_error"] for row in rows)
    print(f"mask=: the statistics of the real positions (largest difference from NumPy "
          f"{worst:.1e}); without it, the mixture's with the padding")
    print()

    batches = 20 if args.quick else 200
    print(f"2. Eval mode after {batches} training batches padded to {TRAINING_LENGTH}: "
          "output over real positions")
    for use_mask in (False, True):
        layer = trained_layer(rng, moments, batches, use_mask)
        mean, std = eval_output_moments(layer, rng, moments)
        print(f"   {'mask=' if use_mask else 'without mask':<13} per-channel mean "
              f"{mean.min():+.2f} to {mean.max():+.2f}, std {std.min():.2f} to {std.max():.2f}")
    print()

    print("3. Masked training forward and backward against the real positions packed "
          "into (M, C)")
    for name, difference in gradient_check(rng, moments).items():
        print(f"   largest difference, {name}: {difference:.1e}")

    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError:
            print("matplotlib is not installed: nothing drawn")
        else:
            print(f"Drawn: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
