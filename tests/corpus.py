"""The shared corpus of the test suite: layouts, dtypes, data and tolerances.

Importable from every test module because pyproject.toml puts tests/ on
pytest's pythonpath (the repository root stays off it).
"""
import numpy as np
import pytest

import cbn

# (shape, channel axis). The small layouts: every documented layout, C=1
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
# With test ids; ALL_DTYPES adds float16 (data only: layers hold float32 or
# float64).
ALL_DTYPES = [pytest.param(np.float16, id="f16"), pytest.param(np.float32, id="f32"),
              pytest.param(np.float64, id="f64")]
LAYER_DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


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


# ---------------------------------------------------------------------------
# float64 oracles written out from the formulas, and layers to test

def layer_dtype_for(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def reduce_axes(ndim, axis):
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def moments(x, axis):
    """Per-channel float64 mean, biased variance and count (two-pass)."""
    x = np.asarray(x, np.float64)
    axes = reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    var = ((x - per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    return mean, var, x.size // x.shape[axis]


def affine_of(layer):
    c = layer.num_features
    if layer.weight is None:
        return np.ones(c), np.zeros(c)
    return layer.weight.astype(np.float64), layer.bias.astype(np.float64)


def oracle(x, axis, mean, var, weight, bias, eps, relu=False):
    """(x - mean) / sqrt(var + eps) * weight + bias, then max(., 0) (NaN kept)."""
    x = np.asarray(x, np.float64)
    nd = x.ndim
    y = ((x - per_channel(mean, nd, axis)) / np.sqrt(per_channel(var, nd, axis) + eps)
         * per_channel(weight, nd, axis) + per_channel(bias, nd, axis))
    return np.maximum(y, 0.0) if relu else y


def eval_oracle(layer, x, relu=None):
    """The eval output of ``layer`` from its current attributes."""
    weight, bias = affine_of(layer)
    relu = layer.activation == "relu" if relu is None else relu
    return oracle(x, layer.axis, layer.running_mean.astype(np.float64),
                  layer.running_var.astype(np.float64), weight, bias, layer.eps, relu)


def train_oracle(layer, x):
    weight, bias = affine_of(layer)
    mean, var, _ = moments(x, layer.axis)
    return oracle(x, layer.axis, mean, var, weight, bias, layer.eps,
                  layer.activation == "relu")


def grads_oracle(x, dy, axis, mean, invstd, weight, training, mask=None):
    """(dx, grad_weight, grad_bias) in float64; ``mask``: where the ReLU let
    the gradient through."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    if mask is not None:
        dy = np.where(mask, dy, 0.0)
    nd, axes = x.ndim, reduce_axes(x.ndim, axis)
    xhat = (x - per_channel(mean, nd, axis)) * per_channel(invstd, nd, axis)
    grad_weight = (dy * xhat).sum(axis=axes)
    grad_bias = dy.sum(axis=axes)
    if training:
        n = x.size // x.shape[axis]
        inner = (dy - per_channel(grad_bias / n, nd, axis)
                 - xhat * per_channel(grad_weight / n, nd, axis))
    else:
        inner = dy
    dx = inner * per_channel(np.asarray(invstd) * weight, nd, axis)
    return dx, grad_weight, grad_bias


def expected_scale_shift(weight, bias, mean, var, eps):
    scale = np.asarray(weight, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    return scale, np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * scale


def make_layer(num_features, rng, axis=1, dtype=np.float32, affine=True, relu=False,
               cls=cbn.BatchNorm, **kwargs):
    """A layer (in training mode) with non-trivial parameters and running
    statistics; weights of both signs."""
    layer = cls(num_features, axis=axis, dtype=dtype, affine=affine,
                activation="relu" if relu else None, **kwargs)
    if affine:
        layer.weight[...] = (rng.uniform(0.5, 2.0, num_features)
                             * rng.choice([-1, 1], num_features))
        layer.bias[...] = rng.uniform(-1.0, 1.0, num_features)
    if layer.running_mean is not None:
        layer.running_mean[...] = rng.uniform(-2.0, 2.0, num_features)
        layer.running_var[...] = rng.uniform(0.3, 3.0, num_features)
        layer.num_batches_tracked = 7
    return layer


# ---------------------------------------------------------------------------
# Tolerances: one table, one comparison

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

# (rtol, atol) by what is compared and the dtype of the result, against a
# float64 oracle or PyTorch: |actual - expected| <= rtol * |expected| +
# atol * scale, with scale the magnitude of the compared values (see
# assert_close). "output": normalized outputs, fold()'s scale and shift,
# folded weights; "stats": batch and running statistics, state dicts; "grad":
# dx, grad_weight, grad_bias; "finite-difference": float64 gradients against
# central differences, whose error is the step's, not the dtype's. float32
# outputs and statistics: the README's Accuracy bounds; float16: one ulp at 1.
# The suite's largest errors are below a third of these (float64's below 1e-2
# of them); test_properties.py builds its per-element bounds on the same
# numbers.
TOLERANCE = {
    "output": {F16: (2.0 ** -10, 2.0 ** -10), F32: (1e-5, 1e-5), F64: (1e-11, 1e-11)},
    "stats": {F16: (2.0 ** -10, 2.0 ** -10), F32: (1e-6, 1e-6), F64: (1e-11, 1e-11)},
    "grad": {F16: (2.0 ** -10, 2.0 ** -10), F32: (1e-5, 1e-5), F64: (1e-11, 1e-11)},
    "finite-difference": {F64: (1e-6, 1e-7)},
}


def tolerance(kind, dtype):
    """(rtol, atol) for comparing ``kind`` results in ``dtype``."""
    return TOLERANCE[kind][np.dtype(dtype)]


def coarser(*dtypes, kind="output"):
    """The dtype with the largest tolerance."""
    return max(dtypes, key=lambda dtype: tolerance(kind, dtype))


def assert_close(actual, expected, *, kind="output", dtype, scale=None, err_msg=""):
    """``actual`` (a result in ``dtype``) against ``expected`` (a float64
    oracle or PyTorch's result): ``|actual - expected| <= rtol * |expected| +
    atol * scale``, (rtol, atol) from TOLERANCE[kind][dtype]. ``scale``
    defaults to the largest finite |expected|, at least 1; pass it for sums,
    whose rounding grows with the number of terms. NaNs must sit at the same
    places."""
    rtol, atol = tolerance(kind, dtype)
    expected = np.asarray(expected, dtype=np.float64)
    if scale is None:
        finite = expected[np.isfinite(expected)]
        scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected,
                               rtol=rtol, atol=atol * scale, err_msg=err_msg)


class FakeTensor:
    """Duck-typed like a PyTorch CPU tensor (detach() and numpy())."""

    def __init__(self, array):
        self.array = array

    def detach(self):
        return self

    def numpy(self):
        return self.array
