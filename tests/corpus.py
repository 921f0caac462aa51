"""The shared corpus of the test suite: layouts, dtypes, data and tolerances.

Importable from every test module because pyproject.toml puts tests/ on
pytest's pythonpath (the repository root stays off it).
"""
import numpy as np
import pytest

# (shape, channel axis). The small layouts: every layout the issue names, C=1
# and N=2; cheap enough for tests that loop in Python (finite differences).
SMALL_LAYOUTS = [
    pytest.param((6, 5), 1, id="NC"),
    pytest.param((4, 3, 7), 1, id="NCL"),
    pytest.param((3, 4, 5, 6), 1, id="NCHW"),
    pytest.param((3, 5, 6, 4), -1, id="NHWC"),
    pytest.param((2, 3, 4, 5, 3), 1, id="NCDHW"),
    pytest.param((5, 1, 3, 3), 1, id="C1"),
    pytest.param((2, 3), 1, id="N2"),
]

# The full corpus adds awkward sizes. Shapes with inner >= 32 exercise the
# kernels' planar walk, the others the interleaved walk; the larger ones span
# several parallel work units; short planar runs over enough rows are swept
# row by row.
LAYOUTS = SMALL_LAYOUTS + [
    pytest.param((7, 4, 1, 1), 1, id="HW1"),
    pytest.param((3, 7, 11, 13), 1, id="primes"),
    pytest.param((4, 3, 8, 8), 1, id="NCHW-planar"),
    pytest.param((5, 4, 3, 2), 2, id="axis2"),
    pytest.param((2, 3, 40000), 1, id="NCL-long"),
    pytest.param((300, 700), 1, id="NC-wide"),
    pytest.param((2000, 3), -1, id="NC-tall"),
    pytest.param((2, 700, 5), 1, id="few-rows-short-runs"),
    pytest.param((40, 3), 0, id="axis0"),
    pytest.param((2, 20000, 4), 1, id="few-wide-rows"),
    pytest.param((9, 5, 40), 1, id="NCL-rows-swept"),
    pytest.param((20, 40, 100), 1, id="NCL-rows-swept-chunks"),
]

DTYPES = [np.float32, np.float64]


def channel_shape(ndim, axis, size):
    """Shape that broadcasts a (C,) vector along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def per_channel(vector, ndim, axis):
    """A (C,) vector as float64, shaped to broadcast along ``axis``."""
    return np.asarray(vector, dtype=np.float64).reshape(channel_shape(ndim, axis, -1))


def layer_state(layer):
    """Every piece of a layer's state; arrays as (dtype, shape, bytes) copies,
    so two snapshots compare bit for bit."""
    state = {}
    for name in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        value = getattr(layer, name)
        state[name] = None if value is None else (value.dtype.str, value.shape, value.tobytes())
    for name in ("num_batches_tracked", "training", "eps", "momentum", "affine",
                 "track_running_stats", "num_features", "axis"):
        state[name] = getattr(layer, name)
    return state


def make_input(rng, shape, axis, dtype, offset=0.0, scale=1.0):
    """Random data whose channels have distinct means and spreads."""
    num_channels = shape[axis]
    channel_mean = rng.uniform(-3, 3, num_channels).reshape(
        channel_shape(len(shape), axis, num_channels))
    channel_std = rng.uniform(0.5, 2, num_channels).reshape(
        channel_shape(len(shape), axis, num_channels))
    x = offset + scale * (channel_mean + channel_std * rng.standard_normal(shape))
    return x.astype(dtype)


def tolerance(dtype):
    """(rtol, atol) for comparing a result in ``dtype`` with the float64 oracle."""
    return (2e-5, 2e-5) if np.dtype(dtype) == np.float32 else (1e-11, 1e-11)


class FakeTensor:
    """Duck-typed like a PyTorch CPU tensor (detach() and numpy())."""

    def __init__(self, array):
        self.array = array

    def detach(self):
        return self

    def numpy(self):
        return self.array
