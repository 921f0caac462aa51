"""Data-parallel training of a small NumPy network with cbn.SyncBatchNorm.

    mpiexec -n 4 python examples/sync_training.py             # 4 processes
    python examples/sync_training.py                          # one process
    mpiexec -n 2 python examples/sync_training.py --steps 3   # a short run

The network is dense (20 -> 64, no bias: the batch norm removes it) ->
SyncBatchNorm(64) with a fused ReLU -> dense (64 -> 4), trained with softmax
cross-entropy and plain SGD. Every step draws one global batch of B rows and
each rank takes its slice (uneven when the rank count does not divide B, as
a distributed sampler would). The loss is the mean over the global batch, so
each rank's output gradient is scaled by 1 / B; the gradients of the dense
layers and of the batch norm's weight and bias (each rank's contribution)
are summed over the ranks with one ``comm.Allreduce``, and every rank takes
the same SGD step.

SyncBatchNorm normalizes with the statistics of the global batch, and its
backward uses global sums, so this is exactly one process training on the
whole batch. Rank 0 checks that: it then trains the same network with a
plain cbn.BatchNorm on the whole batches and prints the largest difference
of the losses and of the parameters. Needs mpi4py (pip install "cbn[mpi]");
without mpiexec it runs as a world of one process.
"""
import argparse
import sys
import traceback

import numpy as np

import cbn

try:
    from mpi4py import MPI
except ImportError:
    sys.exit('This example needs mpi4py: pip install "cbn[mpi]"')

FEATURES, HIDDEN, CLASSES = 20, 64, 4
SEED = 20261201
# float64 runs agree to rounding; float32 ones drift apart a little over the
# steps (the sums are taken in another order across processes).
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


class Network:
    """dense -> batch norm (+ ReLU) -> dense, with its gradients."""

    PARAMETERS = ("W1", "W2", "b2", "weight", "bias")

    def __init__(self, norm, rng, dtype):
        self.norm = norm
        self.W1 = (rng.standard_normal((FEATURES, HIDDEN)) * np.sqrt(2 / FEATURES)).astype(dtype)
        self.W2 = (rng.standard_normal((HIDDEN, CLASSES)) * np.sqrt(1 / HIDDEN)).astype(dtype)
        self.b2 = np.zeros(CLASSES, dtype)

    def forward(self, x):
        self.x = x
        self.a = self.norm(x @ self.W1)   # training mode: batch statistics
        return self.a @ self.W2 + self.b2

    def backward(self, dlogits):
        """{name: gradient}: of this process's rows (sum them over ranks)."""
        da = dlogits @ self.W2.T
        dh = self.norm.backward(da)
        return {"W1": self.x.T @ dh, "W2": self.a.T @ dlogits, "b2": dlogits.sum(axis=0),
                "weight": self.norm.grad_weight, "bias": self.norm.grad_bias}

    def parameter(self, name):
        return getattr(self.norm, name) if name in ("weight", "bias") else getattr(self, name)

    def sgd(self, grads, lr):
        for name in self.PARAMETERS:
            self.parameter(name)[...] -= lr * grads[name]


def loss_and_gradient(logits, labels, batch_size):
    """(sum of the rows' cross-entropy, d(mean loss over the global batch)/d logits)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    dlogits = np.exp(log_p)
    dlogits[rows, labels] -= 1
    return -log_p[rows, labels].sum(), dlogits / batch_size


def global_batch(step, batch_size, dtype):
    """The step's batch: features and labels of a fixed random teacher."""
    rng = np.random.default_rng((SEED, step))
    x = rng.standard_normal((batch_size, FEATURES)) * 1.5 + 0.5
    teacher = np.random.default_rng(SEED).standard_normal((FEATURES, CLASSES))
    labels = np.argmax(x @ teacher + rng.standard_normal((batch_size, CLASSES)), axis=1)
    return x.astype(dtype), labels


def rows_of(rank, size, batch_size):
    """This rank's slice of the global batch (np.array_split's)."""
    bounds = np.linspace(0, batch_size, size + 1).round().astype(int)
    return slice(bounds[rank], bounds[rank + 1])


def allreduce_sum(comm, grads, dtype):
    """Every gradient summed over the ranks, in one Allreduce."""
    names = list(grads)
    flat = np.concatenate([grads[name].ravel() for name in names]).astype(dtype)
    total = np.empty_like(flat)
    comm.Allreduce(flat, total, op=MPI.SUM)
    summed, start = {}, 0
    for name in names:
        size = grads[name].size
        summed[name] = total[start:start + size].reshape(grads[name].shape)
        start += size
    return summed


def train(network, steps, batch_size, lr, dtype, comm=None):
    """Losses per step. With ``comm``, each rank trains on its slice and the
    gradients are summed over the ranks; without, on the whole batch."""
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    losses = []
    for step in range(steps):
        x, labels = global_batch(step, batch_size, dtype)
        mine = rows_of(rank, size, batch_size)
        logits = network.forward(x[mine])
        loss_sum, dlogits = loss_and_gradient(logits, labels[mine], batch_size)
        grads = network.backward(dlogits.astype(dtype))
        if comm is not None:
            grads["loss"] = np.array([loss_sum])
            grads = allreduce_sum(comm, grads, np.float64 if dtype == "float64" else dtype)
            loss_sum = float(grads.pop("loss")[0])
        network.sgd(grads, lr)
        losses.append(loss_sum / batch_size)
    return np.array(losses)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=30, help="global batch size (rows)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
    return parser.parse_args()


def main():
    args = parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = args.dtype

    # every rank starts from the same parameters (the same seed)
    norm = cbn.SyncBatchNorm(HIDDEN, comm=comm, activation="relu", dtype=dtype)
    network = Network(norm, np.random.default_rng(SEED), dtype)
    losses = train(network, args.steps, args.batch, args.lr, dtype, comm)

    # the parameters are the same bits on every rank
    mine = np.concatenate([network.parameter(name).ravel() for name in Network.PARAMETERS])
    identical = all(np.array_equal(mine, other) for other in comm.allgather(mine))

    if rank == 0:
        slices = [rows_of(k, size, args.batch) for k in range(size)]
        print(f"SyncBatchNorm training on {size} rank{'s' if size > 1 else ''}: global batch "
              f"{args.batch} (rows per rank: {', '.join(str(s.stop - s.start) for s in slices)}),"
              f" {args.steps} steps, {dtype}")
        for step in sorted({0, args.steps // 2, args.steps - 1}):
            print(f"  step {step + 1:3d}  loss {losses[step]:.6f}")

        single = Network(cbn.BatchNorm(HIDDEN, activation="relu", dtype=dtype),
                         np.random.default_rng(SEED), dtype)
        single_losses = train(single, args.steps, args.batch, args.lr, dtype)
        loss_diff = float(np.max(np.abs(losses - single_losses)))
        param_diff = max(float(np.max(np.abs(network.parameter(name) - single.parameter(name))))
                         for name in Network.PARAMETERS)
        stats_diff = max(float(np.max(np.abs(getattr(norm, key) - getattr(single.norm, key))))
                         for key in ("running_mean", "running_var"))
        print(f"One process on the whole batches: largest difference of the losses "
              f"{loss_diff:.2e}, of the parameters {param_diff:.2e}, of the running "
              f"statistics {stats_diff:.2e}")
        worst = max(loss_diff, param_diff, stats_diff)
        if worst <= TOLERANCE[dtype] and identical:
            print(f"The synchronized run matches the single-process run (within "
                  f"{TOLERANCE[dtype]:g}); the parameters are identical on every rank.")
        else:
            print(f"MISMATCH: largest difference {worst:.2e} (tolerance "
                  f"{TOLERANCE[dtype]:g}); parameters identical on every rank: {identical}")
            return 1
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except Exception:
        # one rank's error must not leave the others waiting in a collective
        traceback.print_exc()
        sys.stdout.flush()
        MPI.COMM_WORLD.Abort(1)
    sys.exit(status)
