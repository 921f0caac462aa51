"""An inference pipeline on NumPy arrays with cbn, run four ways.

The network is three blocks of dense -> batch norm -> ReLU (64 -> 256 -> 256
-> 128 features). Its weights come from a PyTorch model when torch is
installed (built with a fixed seed, its batch norms' running statistics
gathered over a few training batches, then imported with
``cbn.BatchNorm1d.from_torch``), otherwise from a seeded NumPy generator.

The four ways, from the most general to the fastest:

  plain   dense, then an eval-mode cbn.BatchNorm1d, then np.maximum(y, 0)
  fused   dense, then a BatchNorm1d with activation="relu": one pass
  frozen  dense, then layer.freeze() (activation="relu"), in place (out=)
  folded  the batch norms folded into the dense layers
          (cbn.fold_into_linear), then ReLU

The script checks that all four agree (and agree with PyTorch, when it is
installed), then times a stream of batches of 1, 32 and 256 rows through
each and prints microseconds per batch.

    python examples/inference_pipeline.py             # the whole run, seconds
    python examples/inference_pipeline.py --batches 20  # a shorter stream
"""
import argparse
import statistics
import time

import numpy as np

import cbn

SIZES = (64, 256, 256, 128)
BATCH_SIZES = (1, 32, 256)
SEED = 20261123

try:
    import torch
except ImportError:
    torch = None


# ---------------------------------------------------------------------------
# The network's weights: [(W, b, BatchNorm1d), ...] for the three blocks

def from_torch():
    """Dense weights and cbn layers from a seeded PyTorch model."""
    torch.manual_seed(SEED)
    blocks = []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        blocks += [torch.nn.Linear(n_in, n_out), torch.nn.BatchNorm1d(n_out),
                   torch.nn.ReLU()]
    model = torch.nn.Sequential(*blocks)
    with torch.no_grad():  # training-mode passes gather running statistics
        for _ in range(20):
            model(torch.randn(64, SIZES[0]) * 2 + 1)
    model.eval()
    network = []
    for k in range(0, len(blocks), 3):
        dense, norm = blocks[k], blocks[k + 1]
        network.append((dense.weight.detach().numpy().copy(),
                        dense.bias.detach().numpy().copy(),
                        cbn.BatchNorm1d.from_torch(norm)))
    return network, model


def from_generator():
    """Dense weights from a seeded generator; running statistics gathered by
    cbn itself over a few training batches."""
    rng = np.random.default_rng(SEED)
    network = []
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        weight = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        bias = rng.standard_normal(n_out).astype(np.float32) * 0.1
        norm = cbn.BatchNorm1d(n_out)
        norm.weight[...] = rng.uniform(0.5, 1.5, n_out)
        norm.bias[...] = rng.standard_normal(n_out) * 0.1
        network.append((weight, bias, norm))
    for _ in range(20):
        h = (rng.standard_normal((64, SIZES[0])) * 2 + 1).astype(np.float32)
        for weight, bias, norm in network:
            h = np.maximum(norm(h @ weight.T + bias), 0)
    for _, _, norm in network:
        norm.eval()
    return network


# ---------------------------------------------------------------------------
# The four ways. Each builds what it needs once and returns a function of a
# batch; the output buffers of the fast ways are made per batch size, once.

def plain(network):
    def run(x):
        for weight, bias, norm in network:
            x = np.maximum(norm(x @ weight.T + bias), 0)
        return x
    return run


def with_buffers(blocks, step):
    """run(x) through ``blocks`` with one preallocated buffer per block and
    batch size: step(block, x, buffer) fills the buffer."""
    buffers = {}

    def run(x):
        if x.shape[0] not in buffers:
            buffers[x.shape[0]] = [np.empty((x.shape[0], block[0].shape[0]), np.float32)
                                   for block in blocks]
        for block, buffer in zip(blocks, buffers[x.shape[0]]):
            step(block, x, buffer)
            x = buffer
        return x
    return run


def dense(weight, bias, x, out):
    np.matmul(x, weight.T, out=out)
    out += bias


def with_relu(norm):
    """An eval-mode copy of ``norm`` with the ReLU fused."""
    return cbn.BatchNorm1d.from_state_dict(norm.state_dict(), eps=norm.eps,
                                           activation="relu").eval()


def dense_then_norm(block, x, out):
    """One block into ``out``: the dense layer, then the batch norm in place."""
    weight, bias, norm = block
    dense(weight, bias, x, out)
    norm(out, out=out)


def fused(network):
    return with_buffers([(w, b, with_relu(norm)) for w, b, norm in network],
                        dense_then_norm)


def frozen(network):
    return with_buffers([(w, b, with_relu(norm).freeze()) for w, b, norm in network],
                        dense_then_norm)


def folded(network):
    blocks = [cbn.fold_into_linear(weight, bias, norm) for weight, bias, norm in network]

    def step(block, x, out):
        dense(*block, x, out)
        np.maximum(out, 0, out=out)
    return with_buffers(blocks, step)


WAYS = {"plain": plain, "fused": fused, "frozen": frozen, "folded": folded}


# ---------------------------------------------------------------------------

def check_agreement(runs, model, rng):
    """All ways (and PyTorch's model) give the same outputs, within float32
    rounding; returns the largest difference from the plain way."""
    x = (rng.standard_normal((256, SIZES[0])) * 2 + 1).astype(np.float32)
    expected = runs["plain"](x).copy()
    worst = 0.0
    others = {name: run(x) for name, run in runs.items() if name != "plain"}
    if model is not None:
        with torch.no_grad():
            others["PyTorch"] = model(torch.from_numpy(x)).numpy()
    for name, y in others.items():
        difference = float(np.max(np.abs(y - expected)))
        if not np.allclose(y, expected, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{name} disagrees with plain: max difference {difference:.3g}")
        worst = max(worst, difference)
    return worst


def time_streams(runs, batch_size, batches, rng, rounds=7):
    """{way: median over rounds of the seconds per batch} for one stream of
    batches; the ways take turns within each round, so drift hits all alike."""
    stream = [(rng.standard_normal((batch_size, SIZES[0])) * 2 + 1).astype(np.float32)
              for _ in range(batches)]
    times = {name: [] for name in runs}
    for run in runs.values():
        run(stream[0])  # warm-up: buffers, caches
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for x in stream:
                run(x)
            times[name].append((time.perf_counter() - start) / batches)
    return {name: statistics.median(kept) for name, kept in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200,
                        help="batches per timed stream (default %(default)s)")
    args = parser.parse_args(argv)
    if torch is not None:
        torch.set_num_threads(cbn.get_num_threads())
        network, model = from_torch()
        source = "a seeded PyTorch model (cbn.BatchNorm1d.from_torch)"
    else:
        network, model = from_generator(), None
        source = "a seeded NumPy generator (PyTorch is not installed)"
    runs = {name: make(network) for name, make in WAYS.items()}
    rng = np.random.default_rng(SEED)
    print(f"Network: {' -> '.join(map(str, SIZES))} features, dense -> batch norm -> "
          f"ReLU three times, weights from {source}.")
    worst = check_agreement(runs, model, rng)
    checked = ", ".join(list(WAYS) + (["PyTorch"] if model is not None else []))
    print(f"All ways agree ({checked}): largest difference from plain {worst:.2g}.")
    print(f"\nMicroseconds per batch, median of 7 rounds of {args.batches} batches "
          f"each way (ways interleaved), {cbn.get_num_threads()} cbn threads:")
    print(f"{'batch':>6}" + "".join(f"{name:>10}" for name in WAYS))
    for batch_size in BATCH_SIZES:
        times = time_streams(runs, batch_size, args.batches, rng)
        print(f"{batch_size:>6}" + "".join(f"{times[name] * 1e6:>10.1f}" for name in WAYS))


if __name__ == "__main__":
    main()
