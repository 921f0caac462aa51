"""What the MPI worker scripts share: deterministic global batches, the
single-process reference, tolerance checks, and per-rank verdict files.

The scripts in this folder run under ``mpiexec -n N python -m mpi4py
SCRIPT --out DIR`` (tests/test_mpi.py launches them; they are not test
modules, so pytest never collects or imports them). Every rank builds the
*whole* global batch from a seed, runs a plain ``cbn.BatchNorm`` on its
concatenation (the single-process reference) and compares its own rows of
the distributed result with it. Each rank appends one JSON line per case to
``DIR/rank<K>.jsonl`` (a "start" line first, so that a launch that hangs
still says where), then a final ``{"done": true}``.

Collectives of the harness itself (gathering values to compare them across
ranks) go through the real communicator and run on every rank whatever
happened before them, so that a failing case cannot leave the ranks out of
step for the next one.
"""
import argparse
import json
import os
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

import cbn

# layout: (channel axis, shape of one row after the batch axis, with C at "C")
LAYOUTS = {"NC": (1, ("C",)), "NCL": (1, ("C", 5)), "NCHW": (1, ("C", 3, 4)),
           "NHWC": (-1, (3, 4, "C"))}

# Local batch sizes (rows) per rank count: uneven ones, ones with an empty
# rank (first, middle or last in the merge order), all empty, one row each.
SIZES = {
    "uneven": {1: [9], 2: [2, 7], 3: [4, 1, 6], 4: [3, 5, 1, 6]},
    "empty": {1: [9], 2: [0, 9], 3: [4, 0, 7], 4: [5, 1, 0, 8]},
    "empty_last": {1: [9], 2: [6, 0], 3: [2, 5, 0], 4: [2, 0, 3, 0]},
    "all_empty": {1: [0], 2: [0, 0], 3: [0, 0, 0], 4: [0, 0, 0, 0]},
    "one_row_each": {2: [1, 1], 3: [1, 1, 1], 4: [1, 1, 1, 1]},
}

# The contract's bounds: output and input gradient relative to 1 + |value|;
# running statistics within one float32 rounding, or 1e-12 relative in float64.
Y_TOL = {np.float32: 1e-6, np.float64: 1e-12}
DX_TOL = {np.float32: 1e-5, np.float64: 1e-10}
STATS_REL64 = 1e-12


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    return parser.parse_args()


def comm_world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


# ---------------------------------------------------------------------------
# Verdicts

class Verdicts:
    """One rank's JSON-lines file of case verdicts."""

    def __init__(self, out, comm, only=""):
        out.mkdir(parents=True, exist_ok=True)
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.only = only
        self._file = open(out / f"rank{self.rank}.jsonl", "w")

    def wanted(self, name):
        return self.only in name

    def write(self, record):
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()

    def done(self):
        self.write({"done": True})
        self._file.close()


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


class Case:
    """A case's checks on one rank: ``check(ok, message)`` collects problems,
    ``values`` numbers worth reporting. As a context manager it writes the
    verdict; an exception inside counts as a problem (with its traceback)."""

    def __init__(self, verdicts, name):
        self.verdicts = verdicts
        self.name = name
        self.problems = []
        self.values = {}

    def __enter__(self):
        self.verdicts.write({"start": self.name})
        return self

    def check(self, ok, message):
        if not ok:
            self.problems.append(message)
        return bool(ok)

    def __exit__(self, kind, error, tb):
        if error is not None:
            self.problems.append("unexpected " + "".join(
                traceback.format_exception(kind, error, tb)).strip()[-2000:])
        self.verdicts.write({"case": self.name, "rank": self.verdicts.rank,
                             "ok": not self.problems, "problems": self.problems,
                             "values": self.values})
        return True   # the next case runs; its collectives still match


def capture(function, *args, **kwargs):
    """(result, None) or (None, exception)."""
    try:
        return function(*args, **kwargs), None
    except Exception as error:  # reported by the caller
        return None, error


def describe(error):
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------
# A duck-typed communicator

class CountingComm:
    """Exactly the four methods the contract names, forwarded to a real
    communicator, counting the collective calls. ``armed``: the collectives
    raise instead (eval mode must not communicate)."""

    def __init__(self, comm):
        self._comm = comm
        self.calls = Counter()
        self.armed = False

    def Get_rank(self):
        return self._comm.Get_rank()

    def Get_size(self):
        return self._comm.Get_size()

    def _collective(self, name):
        self.calls[name] += 1
        if self.armed:
            raise RuntimeError(f"{name} called where no communication is allowed")

    def Allgather(self, *args, **kwargs):
        self._collective("Allgather")
        return self._comm.Allgather(*args, **kwargs)

    def Allreduce(self, *args, **kwargs):
        self._collective("Allreduce")
        return self._comm.Allreduce(*args, **kwargs)

    def take(self):
        """The counts since the last take, as a plain dict."""
        counts = dict(self.calls)
        self.calls.clear()
        return counts


# ---------------------------------------------------------------------------
# Data

def batch_shape(layout, rows, channels):
    return (rows, *(channels if d == "C" else d for d in LAYOUTS[layout][1]))


def channel_axis(layout, ndim):
    axis = LAYOUTS[layout][0]
    return axis % ndim


def per_channel(vector, layout, ndim):
    """``vector`` (C,) shaped to broadcast along the layout's channel axis."""
    shape = [1] * ndim
    shape[channel_axis(layout, ndim)] = -1
    return np.reshape(vector, shape)


def global_batches(seed, layout, sizes, channels, dtype, offset=3.0, spread=1.0):
    """Each rank's batch (a list, rank order), drawn from one generator:
    channel c has mean about ``offset + c`` and std about ``spread * (0.5 + c / 2)``."""
    rng = np.random.default_rng(seed)
    shape = batch_shape(layout, sum(sizes), channels)
    full = rng.standard_normal(shape)
    c = np.arange(channels, dtype=np.float64)
    full = full * per_channel(spread * (0.5 + c / 2), layout, len(shape))
    full = (full + per_channel(offset + c, layout, len(shape))).astype(dtype)
    return split(full, sizes)


def split(full, sizes):
    bounds = np.cumsum([0, *sizes])
    return [full[lo:hi].copy() for lo, hi in zip(bounds[:-1], bounds[1:])]


def rows_of(rank, sizes):
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def random_state(layer, seed):
    """A state dict of random weight, bias and running statistics for ``layer``."""
    rng = np.random.default_rng(seed)
    state = layer.state_dict()
    C = layer.num_features
    draws = {"weight": 0.5 + rng.random(C), "bias": rng.standard_normal(C),
             "running_mean": rng.standard_normal(C), "running_var": 0.5 + rng.random(C)}
    for key in state:
        if key in draws:
            state[key] = draws[key].astype(layer.dtype)
    return state


def state_bits(layer):
    """The layer's state as bytes per key (num_batches_tracked as an int)."""
    return {key: (int(value) if key == "num_batches_tracked" else
                  (value.dtype.str, value.tobytes()))
            for key, value in layer.state_dict().items()}


# ---------------------------------------------------------------------------
# Tolerances

def excess(actual, expected, rel):
    """max |actual - expected| / (rel * (1 + |expected|)): <= 1 passes. NaN
    where the other is not NaN (or a shape mismatch) counts as infinite."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if (nan_a != nan_e).any():
        return float("inf")
    keep = ~nan_e
    if not keep.any():
        return 0.0
    a, e = actual[keep], expected[keep]
    with np.errstate(invalid="ignore"):   # inf - inf: equal infinities are exact
        ratio = np.where(a == e, 0.0, np.abs(a - e) / (rel * (1 + np.abs(e))))
    return float(np.nan_to_num(ratio, nan=np.inf).max())


def excess_scaled(actual, expected, rel, magnitude):
    """max |actual - expected| / (rel * (1 + magnitude)) with NaN positions
    agreeing: for sums, ``magnitude`` the sum of the terms' absolute values
    (which bounds the rounding of any order of summation)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if (np.isnan(actual) != np.isnan(expected)).any():
        return float("inf")
    keep = ~np.isnan(expected)
    if not keep.any():
        return 0.0
    a, e = actual[keep], expected[keep]
    with np.errstate(invalid="ignore"):
        ratio = np.where(a == e, 0.0,
                         np.abs(a - e) / (rel * (1 + np.asarray(magnitude)[keep])))
    return float(np.nan_to_num(ratio, nan=np.inf).max())


def stats_excess(actual, expected):
    """Running statistics against the reference: in units of one float32
    rounding (spacing of the reference), or of 1e-12 relative in float64."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return float("inf")
    if (np.isnan(actual) != np.isnan(expected)).any():
        return float("inf")
    keep = ~np.isnan(expected)
    if not keep.any():
        return 0.0
    a, e = actual[keep].astype(np.float64), expected[keep].astype(np.float64)
    if expected.dtype == np.float32:
        unit = np.spacing(np.abs(expected[keep])).astype(np.float64)
    else:
        unit = STATS_REL64 * np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore"):   # inf - inf: equal infinities are exact
        ratio = np.where(a == e, 0.0, np.abs(a - e) / unit)
    return float(np.nan_to_num(ratio, nan=np.inf).max())


def same_on_all_ranks(comm, value):
    """(True, None) when every rank's ``value`` equals rank 0's, else
    (False, the ranks that differ)."""
    values = comm.allgather(value)
    differ = [k for k, v in enumerate(values) if not _equal(v, values[0])]
    return not differ, differ


def _equal(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    return a == b


def reference_grads(x, dy, mean, var, eps, mask, axes):
    """(sum of dy*mask*xhat, its terms' |.| sum, sum of dy*mask, its |.| sum),
    per channel in float64 over ``axes``; mean and var broadcast already."""
    dy = dy.astype(np.float64) * mask
    with np.errstate(invalid="ignore"):   # non-finite cases: NaN, as the layer's
        xhat = (x.astype(np.float64) - mean) / np.sqrt(var + eps)
        terms = dy * xhat
    return (terms.sum(axis=axes), np.abs(terms).sum(axis=axes),
            dy.sum(axis=axes), np.abs(dy).sum(axis=axes))


def global_moments(full, layout):
    """Biased mean and var of ``full`` in float64, broadcast shapes, and the
    reduced axes."""
    axis = channel_axis(layout, full.ndim)
    axes = tuple(d for d in range(full.ndim) if d != axis)
    x64 = full.astype(np.float64)
    with warnings.catch_warnings():   # an empty global batch: NaN, as expected
        warnings.simplefilter("ignore", RuntimeWarning)
        return x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True), axes


def run_cases(cases):
    """The scripts' main: ``cases`` is a list of (name, function(verdicts, name))."""
    args = parse_args()
    comm = comm_world()
    cbn_env = os.environ.get("CBN_NUM_THREADS")
    verdicts = Verdicts(args.out, comm, args.only)
    verdicts.write({"info": {"size": comm.Get_size(), "python": sys.version.split()[0],
                             "cbn": cbn.__file__, "CBN_NUM_THREADS": cbn_env}})
    for name, function in cases:
        if verdicts.wanted(name):
            function(verdicts, name)
    comm.Barrier()
    verdicts.done()
