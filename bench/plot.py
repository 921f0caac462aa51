"""A PNG chart of the large-array rows, when matplotlib is installed.

Left: cbn's speed-up over NumPy and over PyTorch per row (log scale).
Right: time against the copy limit, for cbn with out=, cbn's default call
and PyTorch, with each op's target marked.
"""
import importlib.util

from .targets import COPY_LIMITS


def available():
    return importlib.util.find_spec("matplotlib") is not None


def _log_axis(axes):
    """A log x axis labelled with plain numbers (0.5, 1, 2, 5, ...)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter
    axes.set_xscale("log")
    low, high = axes.get_xlim()
    ticks = [t * 10.0 ** e for e in range(-2, 4) for t in (1, 2, 5)]
    axes.xaxis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    axes.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def write(path, rows, title):
    """Draw the chart into ``path``; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [row["name"] for row in rows]
    positions = list(range(len(rows)))[::-1]  # first row on top
    figure, (speed, limit) = plt.subplots(
        1, 2, sharey=True, figsize=(14, 1.5 + 0.24 * len(rows)), constrained_layout=True)

    def bars(axes, values, offset, color, label):
        kept = [(p + offset, v) for p, v in zip(positions, values) if v is not None]
        if kept:
            axes.barh([p for p, _ in kept], [v for _, v in kept], height=0.25,
                      color=color, label=label)

    bars(speed, [row["speedup_numpy"] for row in rows], 0.15, "tab:blue", "over NumPy")
    bars(speed, [row["speedup_torch"] for row in rows], -0.15, "tab:orange", "over PyTorch")
    speed.axvline(1, color="black", linewidth=0.8)
    speed.set_xlabel("speed-up of cbn (default call), log scale")
    speed.set_yticks(positions, labels, fontsize=7)

    def over_copy(key):
        return [None if row["seconds"][key] is None
                else row["seconds"][key] / row["seconds"]["copy"] for row in rows]

    bars(limit, over_copy("cbn_out"), 0.25, "tab:green", "cbn(out=)")
    bars(limit, over_copy("cbn"), 0.0, "tab:olive", "cbn")
    bars(limit, over_copy("torch"), -0.25, "tab:orange", "PyTorch")
    targets = [(COPY_LIMITS[row["op"]], position)
               for row, position in zip(rows, positions) if row["large"]]
    if targets:
        limit.scatter(*zip(*targets), marker="|", s=120, color="red",
                      label="target (large arrays)", zorder=3)
    limit.axvline(1, color="black", linewidth=0.8)
    limit.set_xlabel("time / time of a copy of the same bytes, log scale")
    for axes in (speed, limit):
        _log_axis(axes)
        axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8,
                    frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
