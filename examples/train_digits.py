"""Training a small NumPy network with and without batch norm, over a sweep of
learning rates.

    python examples/train_digits.py             # 4 rates x 3 seeds x 300 steps, a PNG
    python examples/train_digits.py --quick     # 1 seed, 150 steps, no PNG
    python examples/train_digits.py --synthetic # the synthetic data even with scikit-learn

The data are scikit-learn's handwritten digits (1797 images of 8 x 8 pixels
valued 0 to 16, ten classes) as ``load_digits`` returns them, split 75/25
into training and test rows; without scikit-learn, a synthetic data set of
the same shape and value range (the output says which). The pixels are not
rescaled, as a first attempt would have them; ``--standardize`` scales each
pixel to mean 0 and standard deviation 1 instead.

Two networks, trained with plain SGD on mini-batches of 32 rows and softmax
cross-entropy, from the same initial weights for a given seed:

  plain       dense (64 -> 64, with bias) -> ReLU -> dense (64 -> 10)
  batch norm  dense (64 -> 64, no bias)  -> cbn.BatchNorm1d(64) with a fused
              ReLU -> dense (64 -> 10)

For each learning rate the table gives, as mean +- standard deviation over
the seeds: the steps until the training loss (the mean over the last 10
mini-batches) first falls below 0.5, "never" when it does not within the
run; the final training loss (mean over the last 20 mini-batches); and the
accuracy on the test rows (the batch norm in eval mode, with its running
statistics). A verdict line per rate says which network ended with the lower
loss, including where batch norm does worse ("no clear difference" when the
means are closer than the seeds' standard deviations added). With matplotlib
installed, the loss curves are drawn to a PNG (--plot).

What to expect: on raw pixels (mean 4.9, input rows of norm about 60 on the
digits) the plain network's first-layer gradients, and so its steps, are
large. At the larger rates it blows up and ends with dead ReLUs (loss
ln 10 = 2.30, chance accuracy), while the batch-normalized one, whose output
does not change with the scale of W1, trains fast. At the smallest rate the
plain network is ahead: the input scale that breaks its large steps makes
its small ones effective. With --standardize the plain network's trouble at
the large rates goes away and batch norm's advantage with it.
"""
import argparse
import sys

import numpy as np

import cbn

LEARNING_RATES = (0.01, 0.1, 0.5, 1.0)
HIDDEN, CLASSES, BATCH = 64, 10, 32
THRESHOLD = 0.5     # the loss the "steps to" column waits for
SMOOTHING = 10      # mini-batches averaged for that column
FINAL_WINDOW = 20   # mini-batches averaged for the final loss
NETWORKS = ("plain", "batch norm")


# ---------------------------------------------------------------------------
# Data

def synthetic_digits(rng, rows=1797):
    """Ten classes of 8 x 8 integer images valued 0 to 16, like the digits:
    each class a random stroke pattern, each image its pattern with pixel
    noise, a random brightness and a one-pixel shift."""
    patterns = np.where(rng.random((CLASSES, 8, 8)) < 0.4, rng.uniform(8, 16, (CLASSES, 8, 8)),
                        0.0)
    labels = rng.integers(0, CLASSES, rows)
    images = patterns[labels] * rng.uniform(0.7, 1.1, (rows, 1, 1))
    shifts = rng.integers(-1, 2, (rows, 2))
    for row, (down, right) in enumerate(shifts):
        images[row] = np.roll(images[row], (down, right), axis=(0, 1))
    images += rng.normal(0, 3, images.shape)
    return np.clip(np.rint(images), 0, 16).reshape(rows, 64), labels


def load_data(synthetic=False, standardize=False):
    """(x_train, y_train, x_test, y_test, description)."""
    rng = np.random.default_rng(20261201)
    source = None
    if not synthetic:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            source = "synthetic digits (scikit-learn is not installed)"
        else:
            x, y = load_digits(return_X_y=True)
            source = "scikit-learn's digits"
    if synthetic or source.startswith("synthetic"):
        x, y = synthetic_digits(rng)
        source = source or "synthetic digits (--synthetic)"
    x = x.astype(np.float64)
    order = rng.permutation(len(x))
    split = len(x) * 3 // 4
    train, test = order[:split], order[split:]
    if standardize:   # with the training rows' statistics
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        x = (x - mean) / np.where(std > 0, std, 1)
        source += ", standardized pixels"
    else:
        source += ", raw pixels 0-16"
    return x[train], y[train], x[test], y[test], source


# ---------------------------------------------------------------------------
# The networks

class Network:
    """dense -> (batch norm and) ReLU -> dense, with plain SGD."""

    def __init__(self, use_batch_norm, rng, features):
        # He initialization; both networks draw the same weights for a seed.
        self.W1 = rng.standard_normal((features, HIDDEN)) * np.sqrt(2 / features)
        self.W2 = rng.standard_normal((HIDDEN, CLASSES)) * np.sqrt(1 / HIDDEN)
        self.b2 = np.zeros(CLASSES)
        # batch norm's bias takes the place of the first dense layer's
        self.norm = (cbn.BatchNorm1d(HIDDEN, activation="relu", dtype=np.float64)
                     if use_batch_norm else None)
        self.b1 = None if use_batch_norm else np.zeros(HIDDEN)

    def forward(self, x):
        self.x = x
        h = x @ self.W1
        if self.norm is not None:
            self.a = self.norm(h)   # batch statistics in training mode
        else:
            self.a = np.maximum(h + self.b1, 0)
        return self.a @ self.W2 + self.b2

    def sgd_step(self, dlogits, lr):
        da = dlogits @ self.W2.T
        if self.norm is not None:
            dh = self.norm.backward(da)  # through the fused ReLU and the statistics
            self.norm.weight[...] -= lr * self.norm.grad_weight
            self.norm.bias[...] -= lr * self.norm.grad_bias
        else:
            dh = da * (self.a > 0)
            self.b1 -= lr * dh.sum(axis=0)
        self.W2 -= lr * (self.a.T @ dlogits)
        self.b2 -= lr * dlogits.sum(axis=0)
        self.W1 -= lr * (self.x.T @ dh)

    def predict(self, x):
        if self.norm is not None:
            self.norm.eval()   # running statistics
        try:
            return np.argmax(self.forward(x), axis=1)
        finally:
            if self.norm is not None:
                self.norm.train()


def cross_entropy(logits, labels):
    """(mean loss, its gradient with respect to the logits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    dlogits = np.exp(log_p)
    dlogits[rows, labels] -= 1
    return -log_p[rows, labels].mean(), dlogits / len(labels)


def train(use_batch_norm, data, lr, seed, steps):
    """(losses per step, test accuracy) of one run."""
    x_train, y_train, x_test, y_test, _ = data
    rng = np.random.default_rng(seed)
    network = Network(use_batch_norm, rng, x_train.shape[1])
    losses = np.empty(steps)
    # a diverging run may overflow on its way to NaN: that is its result
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps):
            rows = rng.choice(len(x_train), BATCH, replace=False)
            loss, dlogits = cross_entropy(network.forward(x_train[rows]), y_train[rows])
            losses[step] = loss
            network.sgd_step(dlogits, lr)
        accuracy = float(np.mean(network.predict(x_test) == y_test))
    return losses, accuracy


# ---------------------------------------------------------------------------
# The sweep and its report

def steps_to_threshold(losses):
    """The first step at which the mean of the last SMOOTHING losses is below
    THRESHOLD, or None."""
    smoothed = np.convolve(losses, np.ones(SMOOTHING) / SMOOTHING, mode="valid")
    below = np.flatnonzero(smoothed < THRESHOLD)
    return int(below[0]) + SMOOTHING if below.size else None


def sweep(data, learning_rates, seeds, steps):
    """{(lr, network name): {"losses": (seeds, steps), "steps_to": [...],
    "final": [...], "accuracy": [...]}}."""
    results = {}
    for lr in learning_rates:
        for name in NETWORKS:
            runs = [train(name == "batch norm", data, lr, seed, steps) for seed in seeds]
            losses = np.array([run[0] for run in runs])
            results[lr, name] = {
                "losses": losses,
                "steps_to": [steps_to_threshold(row) for row in losses],
                "final": losses[:, -FINAL_WINDOW:].mean(axis=1),
                "accuracy": np.array([run[1] for run in runs]),
            }
    return results


def mean_spread(values, digits):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.{digits}f} +- {values.std():.{digits}f}"


def steps_text(steps_to):
    reached = [s for s in steps_to if s is not None]
    if not reached:
        return "never"
    text = mean_spread(reached, 0)
    if len(reached) < len(steps_to):
        text += f" ({len(reached)}/{len(steps_to)} seeds)"
    return text


def report(results, learning_rates):
    print(f"{'lr':<6}{'network':<12}{'steps to loss < 0.5':<24}{'final loss':<20}"
          "test accuracy")
    for lr in learning_rates:
        for name in NETWORKS:
            r = results[lr, name]
            print(f"{lr!s:<6}{name:<12}{steps_text(r['steps_to']):<24}"
                  f"{mean_spread(r['final'], 3):<20}{mean_spread(r['accuracy'], 3)}")
    print()
    for lr in learning_rates:
        plain, normed = (results[lr, name]["final"] for name in NETWORKS)
        print(f"lr {lr}: {verdict(plain, normed)} (final loss {normed.mean():.3f} with batch "
              f"norm, {plain.mean():.3f} without)")


def verdict(plain, normed):
    """Which network ended with the lower mean final loss; no clear
    difference when the means are closer than the seeds' spreads added."""
    difference = normed.mean() - plain.mean()
    if not np.isfinite(difference):
        return "batch norm better" if np.isfinite(normed.mean()) else "batch norm WORSE"
    if abs(difference) <= plain.std() + normed.std():
        return "no clear difference"
    return "batch norm better" if difference < 0 else "batch norm WORSE"

def plot(results, learning_rates, path, source):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(learning_rates), figsize=(3 * len(learning_rates), 2.8),
                                sharey=True, squeeze=False)
    lowest = np.inf
    for ax, lr in zip(axes[0], learning_rates):
        for name, color in zip(NETWORKS, ("tab:red", "tab:blue")):
            losses = results[lr, name]["losses"]
            kernel = np.ones(SMOOTHING) / SMOOTHING
            smoothed = np.array([np.convolve(row, kernel, mode="valid") for row in losses])
            steps = np.arange(SMOOTHING, losses.shape[1] + 1)
            ax.plot(steps, smoothed.mean(axis=0), color=color, label=name, lw=1.2)
            ax.fill_between(steps, smoothed.min(axis=0), smoothed.max(axis=0), color=color,
                            alpha=0.2, lw=0)
            lowest = min(lowest, np.nanmin(smoothed))
        ax.axhline(THRESHOLD, color="gray", lw=0.6, ls=":")
        ax.set_title(f"lr {lr}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    # shared y axis; a diverging start (losses of 1000) would squash the rest
    axes[0][0].set_ylim(0.8 * lowest, 10)
    axes[0][0].set_ylabel("training loss", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower left")
    figure.suptitle(f"{source}: mean over seeds, band min to max "
                    f"(loss averaged over {SMOOTHING} steps)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 150 steps, no PNG unless --plot is given")
    parser.add_argument("--steps", type=int, help="steps per run (default 300, 150 quick)")
    parser.add_argument("--seeds", type=int, help="seeds per rate (default 3, 1 quick)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use the synthetic data set even when scikit-learn is installed")
    parser.add_argument("--standardize", action="store_true",
                        help="scale each pixel to mean 0 and standard deviation 1")
    parser.add_argument("--plot", metavar="PNG",
                        help="where to draw the loss curves (default train_digits.png, "
                             "none with --quick)")
    parser.add_argument("--no-plot", action="store_true", help="draw no PNG")
    args = parser.parse_args()
    args.steps = args.steps or (150 if args.quick else 300)
    args.seeds = args.seeds or (1 if args.quick else 3)
    if args.steps < FINAL_WINDOW:
        parser.error(f"--steps must be at least {FINAL_WINDOW}")
    if args.plot is None and not args.quick:
        args.plot = "train_digits.png"
    if args.no_plot:
        args.plot = None
    return args


def main():
    args = parse_args()
    data = load_data(args.synthetic, args.standardize)
    source = data[-1]
    print(f"Data: {source}; {len(data[0])} training rows, {len(data[2])} test rows")
    seeds = "seed 0" if args.seeds == 1 else f"seeds 0-{args.seeds - 1}"
    print(f"SGD, batch {BATCH}, {args.steps} steps, {seeds}; "
          "mean +- standard deviation over the seeds")
    print()
    results = sweep(data, LEARNING_RATES, range(args.seeds), args.steps)
    report(results, LEARNING_RATES)
    if args.plot:
        try:
            plot(results, LEARNING_RATES, args.plot, source)
        except ImportError:
            print("matplotlib is not installed: no loss curves drawn")
        else:
            print(f"Loss curves: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
