"""Inference features: FrozenBatchNorm and freeze(), fold() agreeing with both,
the fused ReLU, out= (in place, without allocating, and errors that change
nothing), the eval cache never serving stale parameters, and pickling and
deepcopy of layers and frozen layers.

Building layers from PyTorch modules and state dicts is in
test_torch_import.py. Expected values are written out with float64 NumPy from
the formulas, or come from PyTorch when it is installed; never from cbn.
"""
import copy
import pickle
import sys
import tracemalloc

import numpy as np
import pytest

import cbn

from corpus import LAYOUTS, SMALL_LAYOUTS, layer_state, make_input, per_channel

ALL_DTYPES = [pytest.param(np.float16, id="f16"), pytest.param(np.float32, id="f32"),
              pytest.param(np.float64, id="f64")]
LAYER_DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# A few layouts for tests whose subject is not the layout: the three common
# ones and one big enough for the parallel kernels.
OUT_LAYOUTS = [pytest.param((6, 4), 1, id="NC"), pytest.param((3, 4, 5, 6), 1, id="NCHW"),
               pytest.param((3, 5, 6, 4), -1, id="NHWC"),
               pytest.param((2, 3, 40000), 1, id="NCL-long")]


# ---------------------------------------------------------------------------
# Helpers: float64 oracles

def tol(dtype):
    return {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-5,
            np.dtype(np.float64): 1e-11}[np.dtype(dtype)]


def coarser(*dtypes):
    """The dtype with the largest tolerance."""
    return max(dtypes, key=tol)


def assert_close(actual, expected, dtype, err_msg=""):
    """``actual`` (rounded to ``dtype``) against a float64 oracle, relative to
    the oracle's scale; NaNs must sit at the same places."""
    t = tol(dtype)
    expected = np.asarray(expected, dtype=np.float64)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected,
                               rtol=t, atol=t * scale, err_msg=err_msg)


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
# 1. FrozenBatchNorm

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
def test_freeze_returns_a_frozen_layer_with_precomputed_scale_and_shift(rng, dtype, affine):
    layer = make_layer(5, rng, axis=-1, dtype=dtype, affine=affine, eps=0.01).eval()
    frozen = layer.freeze()
    assert type(frozen) is cbn.FrozenBatchNorm
    assert frozen.num_features == 5 and frozen.axis == -1 and frozen.eps == 0.01
    assert frozen.dtype == np.dtype(dtype) and frozen.activation is None
    assert frozen.training is False
    scale, shift = expected_scale_shift(*affine_of(layer), layer.running_mean,
                                        layer.running_var, 0.01)
    for name, value, expected in (("scale", frozen.scale, scale),
                                  ("shift", frozen.shift, shift)):
        assert isinstance(value, np.ndarray) and value.shape == (5,), name
        assert value.dtype == np.dtype(dtype), name
        assert not value.flags.writeable, name
        assert_close(value, expected, dtype, name)
        with pytest.raises(ValueError):
            value[0] = 123.0
        with pytest.raises(AttributeError):
            setattr(frozen, name, np.zeros(5))
    with pytest.raises(AttributeError):
        frozen.training = True
    assert frozen.training is False
    fold_scale, fold_shift = frozen.fold()
    np.testing.assert_array_equal(fold_scale, frozen.scale)
    np.testing.assert_array_equal(fold_shift, frozen.shift)
    fold_scale[...] = 0  # copies
    assert np.all(frozen.scale != 0)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_eval_equals_frozen_equals_fold(rng, shape, axis, dtype):
    """An eval call, its frozen form (the same kernel: the same bits) and
    x * scale + shift from fold() and from the frozen scale/shift (within
    rounding), with and without the ReLU."""
    nd = len(shape)
    for relu in (False, True):
        ldtype = layer_dtype_for(dtype)
        layer = make_layer(shape[axis], rng, axis=axis, dtype=ldtype, relu=relu).eval()
        x = make_input(rng, shape, axis, dtype)
        y_eval = layer(x)
        frozen = layer.freeze()
        y_frozen = frozen(x)
        assert y_frozen.dtype == y_eval.dtype == np.dtype(dtype)
        assert y_frozen.shape == y_eval.shape == shape
        np.testing.assert_array_equal(y_frozen, y_eval)
        np.testing.assert_array_equal(frozen.forward(x), y_eval)
        assert_close(y_eval, eval_oracle(layer, x), dtype)
        layer.activation = None  # fold() is for the layer without activation
        for scale, shift in (layer.fold(), (frozen.scale, frozen.shift)):
            assert scale.dtype == shift.dtype == np.dtype(ldtype)
            folded = (x.astype(np.float64) * per_channel(scale, nd, axis)
                      + per_channel(shift, nd, axis))
            if relu:
                folded = np.maximum(folded, 0)
            assert_close(y_eval, folded, coarser(dtype, ldtype))


def test_eval_equals_frozen_for_float64_data_in_a_float32_layer(rng):
    layer = make_layer(4, rng).eval()
    x = make_input(rng, (5, 4, 3), 1, np.float64)
    y = layer(x)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(layer.freeze()(x), y)
    assert_close(y, eval_oracle(layer, x), np.float64)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", SMALL_LAYOUTS)
def test_frozen_backward_is_dy_times_scale(rng, shape, axis, dtype):
    for relu in (False, True):
        layer = make_layer(shape[axis], rng, axis=axis, relu=relu)
        frozen = layer.freeze()
        x = make_input(rng, shape, axis, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y = frozen(x)
        dx = frozen.backward(dy)
        assert dx.shape == shape and dx.dtype == np.dtype(dtype)
        scale, _ = expected_scale_shift(*affine_of(layer), layer.running_mean,
                                        layer.running_var, layer.eps)
        expected = dy.astype(np.float64) * per_channel(scale, len(shape), axis)
        if relu:
            expected = np.where(eval_oracle(layer, x) > 0, expected, 0.0)
            assert np.all(dx[y == 0] == 0)
        assert_close(dx, expected, dtype)


def test_frozen_backward_with_relu_needs_a_forward(rng):
    frozen = make_layer(3, rng, relu=True).freeze()
    with pytest.raises(ValueError):
        frozen.backward(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_frozen_state_dict_has_the_layers_keys_and_values(rng, affine):
    layer = make_layer(4, rng, affine=affine, dtype=np.float64)
    frozen = layer.freeze()
    state, expected = frozen.state_dict(), layer.state_dict()
    assert list(state) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
        assert state[key].dtype == expected[key].dtype, key
    x = make_input(rng, (6, 4), 1, np.float64)
    y = frozen(x)
    assert_close(y, eval_oracle(layer, x), np.float64)
    state["running_mean"] += 10  # a copy: the frozen layer is unaffected
    np.testing.assert_array_equal(frozen(x), y)
    np.testing.assert_array_equal(frozen.state_dict()["running_mean"],
                                  expected["running_mean"])


FROZEN_BUILDERS = [
    pytest.param(lambda *a, **k: cbn.FrozenBatchNorm(*a, **k), id="constructor"),
    pytest.param(lambda *a, **k: cbn.FrozenBatchNorm.from_state_dict(*a, **k),
                 id="from_state_dict"),
]


@pytest.mark.parametrize("build", FROZEN_BUILDERS)
@pytest.mark.parametrize("keys", [
    pytest.param(STATE_KEYS, id="full"),
    pytest.param(("running_mean", "running_var"), id="stats-only"),
    pytest.param(("weight", "bias", "running_mean", "running_var"), id="no-count"),
])
def test_frozen_from_a_state_dict(rng, build, keys):
    c = 6
    full = {"weight": rng.uniform(0.5, 2, c), "bias": rng.uniform(-1, 1, c),
            "running_mean": rng.uniform(-2, 2, c), "running_var": rng.uniform(0.5, 2, c),
            "num_batches_tracked": np.array(3, np.int64)}
    state = {key: full[key] for key in keys}
    frozen = build(state, eps=0.05, axis=-1, activation="relu")
    assert type(frozen) is cbn.FrozenBatchNorm
    assert frozen.num_features == c and frozen.eps == 0.05 and frozen.axis == -1
    assert frozen.activation == "relu" and frozen.dtype == np.float64
    assert frozen.training is False
    assert list(frozen.state_dict()) == list(keys)
    weight = state.get("weight", np.ones(c))
    bias = state.get("bias", np.zeros(c))
    x = make_input(rng, (4, 5, c), -1, np.float64)
    expected = oracle(x, -1, state["running_mean"], state["running_var"], weight, bias,
                      0.05, relu=True)
    assert_close(frozen(x), expected, np.float64)
    state["running_mean"] += 5  # the arrays were copied
    assert_close(frozen(x), expected, np.float64)
    # defaults; float32 arrays, or dtype=float32, give a float32 layer
    default = build({k: v for k, v in full.items() if k in keys})
    assert (default.eps, default.axis, default.activation) == (1e-5, 1, None)
    f32 = build({k: v if k == "num_batches_tracked" else np.asarray(v, np.float32)
                 for k, v in full.items() if k in keys})
    assert f32.dtype == np.float32 and f32.scale.dtype == f32.shift.dtype == np.float32
    explicit = build(state, dtype=np.float32)
    assert explicit.dtype == np.float32 and explicit.shift.dtype == np.float32


@pytest.mark.parametrize("build", FROZEN_BUILDERS)
def test_frozen_from_a_model_state_dict_with_prefix(rng, build):
    c = 3
    inner = {"weight": rng.uniform(0.5, 2, c), "bias": rng.uniform(-1, 1, c),
             "running_mean": rng.uniform(-2, 2, c), "running_var": rng.uniform(0.5, 2, c)}
    model = {"0.weight": np.ones((c, 2)), "10.running_mean": np.zeros(5)}
    model.update({f"1.{k}": v for k, v in inner.items()})
    model["1.sub.weight"] = np.ones(7)   # a module nested under the prefix: ignored
    x = make_input(rng, (5, c), 1, np.float64)
    expected = oracle(x, 1, inner["running_mean"], inner["running_var"], inner["weight"],
                      inner["bias"], 1e-5)
    for prefix in ("1", "1."):
        frozen = build(model, prefix=prefix)
        assert frozen.num_features == c
        assert_close(frozen(x), expected, np.float64)
    with pytest.raises(ValueError):
        build(model, prefix="2")


@pytest.mark.parametrize("build", FROZEN_BUILDERS)
@pytest.mark.parametrize("state", [
    pytest.param({"weight": np.ones(3), "bias": np.zeros(3)}, id="no-running-stats"),
    pytest.param({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3)},
                 id="no-running-var"),
    pytest.param({}, id="empty"),
    pytest.param({"running_mean": np.zeros(3), "running_var": np.ones(4)}, id="lengths"),
    pytest.param({"running_mean": np.zeros(3), "running_var": np.ones(3),
                  "weight": np.ones(3)}, id="weight-without-bias"),
    pytest.param({"running_mean": np.zeros(3), "running_var": np.ones(3),
                  "momentum": np.ones(3)}, id="unknown-key"),
])
def test_frozen_rejects_incomplete_state_dicts(build, state):
    with pytest.raises(ValueError):
        build(state)


def test_freeze_copies_the_layer(rng):
    layer = make_layer(4, rng, dtype=np.float64).eval()
    x = make_input(rng, (6, 4, 3), 1, np.float64)
    frozen = layer.freeze()
    before = frozen(x)
    scale_before, shift_before = frozen.scale.copy(), frozen.shift.copy()
    layer.weight *= 3
    layer.bias += 1
    layer.running_mean[0] += 2
    layer.running_var[...] = 5
    layer.eps = 0.5
    layer.activation = "relu"
    layer.train()
    layer(x)
    np.testing.assert_array_equal(frozen(x), before)
    np.testing.assert_array_equal(frozen.scale, scale_before)
    np.testing.assert_array_equal(frozen.shift, shift_before)
    assert frozen.eps == 1e-5 and frozen.activation is None
    assert not np.allclose(layer.eval()(x), before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_freeze_works_in_either_mode_and_uses_running_stats(rng, training):
    layer = make_layer(3, rng, dtype=np.float64).train(training)
    x = make_input(rng, (8, 3), 1, np.float64, offset=4.0)
    frozen = layer.freeze()
    assert layer.training is training  # freeze() does not switch modes
    assert frozen.training is False
    assert_close(frozen(x), eval_oracle(layer, x), np.float64)


def test_freeze_needs_running_statistics():
    layer = cbn.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats"):
        layer.freeze()


def test_freeze_keeps_activation_eps_axis_dtype(rng):
    layer = make_layer(4, rng, axis=-1, dtype=np.float64, relu=True, eps=0.125)
    frozen = layer.freeze()
    assert (frozen.activation, frozen.eps, frozen.axis, frozen.dtype) == (
        "relu", 0.125, -1, np.dtype(np.float64))


# ---------------------------------------------------------------------------
# 2. fold() (its formula and mode checks are in test_folding.py)

def test_fold_follows_later_edits_and_returns_copies(rng):
    layer = make_layer(3, rng, dtype=np.float64).eval()
    layer.fold()
    layer.running_var[1] = 9.0
    layer.weight[2] = -4.0
    scale, shift = layer.fold()
    expected = expected_scale_shift(layer.weight, layer.bias, layer.running_mean,
                                    layer.running_var, layer.eps)
    assert_close(scale, expected[0], np.float64)
    assert_close(shift, expected[1], np.float64)
    scale[...] = 0
    shift[...] = 0
    assert_close(layer.fold()[0], expected[0], np.float64)
    assert_close(layer(np.ones((2, 3))), eval_oracle(layer, np.ones((2, 3))), np.float64)


# ---------------------------------------------------------------------------
# 3. The fused ReLU

def test_activation_argument_and_attribute():
    layer = cbn.BatchNorm(3)
    assert layer.activation is None
    assert cbn.BatchNorm(3, activation="relu").activation == "relu"
    assert cbn.BatchNorm2d(3, activation=None).activation is None
    with pytest.raises(TypeError):
        cbn.BatchNorm(3, 1e-5, 0.1, True, True, 1, np.float32, "relu")  # keyword-only
    layer.activation = "relu"
    assert layer.activation == "relu"
    layer.activation = None
    assert layer.activation is None
    stats = {"running_mean": np.zeros(2), "running_var": np.ones(2)}
    assert cbn.FrozenBatchNorm(stats, activation="relu").activation == "relu"
    assert cbn.FrozenBatchNorm(stats).activation is None


@pytest.mark.parametrize("value, error", [
    pytest.param("gelu", ValueError, id="gelu"),
    pytest.param("ReLU", ValueError, id="ReLU"),
    pytest.param("", ValueError, id="empty"),
    pytest.param("none", ValueError, id="none-string"),
    pytest.param(1, TypeError, id="int"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(b"relu", TypeError, id="bytes"),
    pytest.param(np.maximum, TypeError, id="function"),
])
def test_bad_activations_are_refused_everywhere(value, error):
    x = np.ones((4, 2), np.float32)
    stats = (np.zeros(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(error):
        cbn.BatchNorm(2, activation=value)
    with pytest.raises(error):
        cbn.BatchNorm1d(2, activation=value)
    layer = cbn.BatchNorm(2, activation="relu")
    with pytest.raises(error):
        layer.activation = value
    assert layer.activation == "relu"  # a refused value changes nothing
    with pytest.raises(error):
        cbn.FrozenBatchNorm({"running_mean": stats[0], "running_var": stats[1]},
                            activation=value)
    with pytest.raises(error):
        cbn.FrozenBatchNorm.from_state_dict(
            {"running_mean": stats[0], "running_var": stats[1]}, activation=value)
    running = (stats[0].copy(), stats[1].copy())
    with pytest.raises(error):
        cbn.batch_norm(x, *running, activation=value)
    with pytest.raises(error):
        cbn.batch_norm(x, *running, training=True, activation=value)
    np.testing.assert_array_equal(running[0], stats[0])  # nothing was updated
    np.testing.assert_array_equal(running[1], stats[1])
    with pytest.raises(error):
        cbn.batch_norm(x, None, None, training=True, activation=value)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_relu_layer_forward_and_backward(rng, shape, axis, dtype):
    ldtype = layer_dtype_for(dtype)
    for training in (True, False):
        layer = make_layer(shape[axis], rng, axis=axis, dtype=ldtype, relu=True)
        layer.train(training)
        x = make_input(rng, shape, axis, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        stats = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
        weight, bias = affine_of(layer)
        if training:
            mean, var, n = moments(x, axis)
        else:
            mean, var = stats
        expected = oracle(x, axis, mean, var, weight, bias, layer.eps, relu=True)
        y = layer(x)
        assert y.shape == shape and y.dtype == np.dtype(dtype)
        assert (y >= 0).all()
        if y.size >= 40 and shape[axis] > 1:
            assert (y == 0).any() and (y > 0).any()  # the ReLU did clip
        assert_close(y, expected, dtype)
        if training:
            assert_close(layer.running_mean, 0.9 * stats[0] + 0.1 * mean, ldtype)
            assert_close(layer.running_var, 0.9 * stats[1] + 0.1 * var * n / (n - 1),
                         coarser(ldtype, dtype))
        else:
            np.testing.assert_array_equal(layer.running_mean, stats[0].astype(ldtype))
        dx = layer.backward(dy)
        assert dx.shape == shape and dx.dtype == np.dtype(dtype)
        dx_ref, gw_ref, gb_ref = grads_oracle(x, dy, axis, mean,
                                              1 / np.sqrt(var + layer.eps), weight,
                                              training, mask=expected > 0)
        assert_close(dx, dx_ref, dtype)
        assert layer.grad_weight.dtype == layer.grad_bias.dtype == np.dtype(ldtype)
        # sums over many float16 values are exact only to float16's precision
        gtol = np.float16 if (dtype == np.float16 and x.size > 1000) else ldtype
        assert_close(layer.grad_weight, gw_ref, gtol)
        assert_close(layer.grad_bias, gb_ref, gtol)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_relu_functional(rng, shape, axis, dtype):
    c = shape[axis]
    for training in (True, False):
        weight, bias = rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c)
        rm, rv = rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c)
        x = make_input(rng, shape, axis, dtype)
        running = (rm.copy(), rv.copy())
        y = cbn.batch_norm(x, *running, weight, bias, training=training, axis=axis,
                           activation="relu")
        if training:
            mean, var, n = moments(x, axis)
            np.testing.assert_allclose(running[0], 0.9 * rm + 0.1 * mean,
                                       rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(running[1], 0.9 * rv + 0.1 * var * n / (n - 1),
                                       rtol=1e-10, atol=1e-12)
        else:
            mean, var = rm, rv
            np.testing.assert_array_equal(running[0], rm)
            np.testing.assert_array_equal(running[1], rv)
        assert y.dtype == np.dtype(dtype) and y.shape == shape
        assert (y >= 0).all()
        assert_close(y, oracle(x, axis, mean, var, weight, bias, 1e-5, relu=True), dtype)
        plain = cbn.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training=training,
                               axis=axis)
        np.testing.assert_array_equal(y, np.maximum(plain, 0))


NAN_FORMS = ["train", "eval", "frozen", "functional-train", "functional-eval"]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", [((6, 4), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)],
                         ids=["NC", "NCHW", "NHWC"])
def test_relu_keeps_nan(rng, shape, axis, dtype):
    c = shape[axis]
    index = [1] * len(shape)
    index[axis] = 2
    index = tuple(index)
    good = [0, 1, 3]
    for form in NAN_FORMS:
        x = make_input(rng, shape, axis, dtype)
        x[index] = np.nan
        layer = make_layer(c, rng, axis=axis, relu=True, dtype=np.float64)
        if form == "train":
            y = layer(x)
        elif form == "eval":
            y = layer.eval()(x)
        elif form == "frozen":
            y = layer.freeze()(x)
        else:
            y = cbn.batch_norm(x, layer.running_mean.copy(), layer.running_var.copy(),
                               layer.weight, layer.bias,
                               training=form == "functional-train", axis=axis,
                               activation="relu")
        assert np.isnan(y[index]), form
        if form.endswith("train"):
            # the NaN channel's batch statistics are NaN: the whole channel is
            assert np.isnan(np.take(y, [2], axis=axis)).all(), form
            xg = np.take(x, good, axis=axis)
            mean, var, _ = moments(xg, axis)
            weight, bias = affine_of(layer)
            expected = oracle(xg, axis, mean, var, weight[good], bias[good], 1e-5, relu=True)
            assert_close(np.take(y, good, axis=axis), expected, dtype, form)
        else:
            np.testing.assert_array_equal(np.isnan(y), np.isnan(x), err_msg=form)
            assert_close(y, eval_oracle(layer, x, relu=True), dtype, form)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_activation_can_be_switched_between_calls(rng, training):
    layer = make_layer(3, rng, dtype=np.float64).train(training)
    x = make_input(rng, (10, 3), 1, np.float64)
    dy = rng.standard_normal(x.shape)
    layer.momentum = 0.0  # the same statistics on every call
    y_plain = layer(x)
    dx_plain = layer.backward(dy)
    assert (y_plain < 0).any()
    layer.activation = "relu"
    y_relu = layer(x)
    np.testing.assert_allclose(y_relu, np.maximum(y_plain, 0), rtol=1e-12, atol=1e-12)
    dx_relu = layer.backward(dy)
    stats = ((moments(x, 1)[:2]) if training
             else (layer.running_mean, layer.running_var))
    dx_ref = grads_oracle(x, dy, 1, stats[0], 1 / np.sqrt(stats[1] + layer.eps),
                          layer.weight, training, mask=y_plain > 0)[0]
    assert_close(dx_relu, dx_ref, np.float64)
    layer.activation = None
    np.testing.assert_allclose(layer(x), y_plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), dx_plain, rtol=1e-12, atol=1e-12)


# -- against PyTorch

def _to_torch_layout(t, axis):
    return t if axis % t.dim() == 1 else t.movedim(axis, 1)


def _from_torch_layout(t, axis):
    return t if axis % t.dim() == 1 else t.movedim(1, axis)


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("shape, axis", SMALL_LAYOUTS)
def test_relu_layer_against_torch(rng, shape, axis, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c = shape[axis]
    t = 1e-5 if dtype == np.float32 else 1e-10
    terms = np.sqrt(int(np.prod(shape)) // c)
    for training in (True, False):
        for affine in (True, False):
            layer = make_layer(c, rng, axis=axis, dtype=dtype, affine=affine, relu=True)
            layer.train(training)
            x = make_input(rng, shape, axis, dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            rm = torch.from_numpy(layer.running_mean.copy())
            rv = torch.from_numpy(layer.running_var.copy())
            w = b = None
            if affine:
                w = torch.tensor(layer.weight.copy(), requires_grad=True)
                b = torch.tensor(layer.bias.copy(), requires_grad=True)
            xt = torch.tensor(x, requires_grad=True)
            yt = torch.relu(F.batch_norm(_to_torch_layout(xt, axis), rm, rv, w, b,
                                         training=training, momentum=0.1, eps=1e-5))
            yt = _from_torch_layout(yt, axis)
            yt.backward(torch.from_numpy(dy))
            what = f"training={training} affine={affine}"
            y = layer(x)
            dx = layer.backward(dy)
            np.testing.assert_allclose(y, yt.detach().numpy(), rtol=t, atol=t, err_msg=what)
            np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=t, atol=t * 10, err_msg=what)
            np.testing.assert_allclose(layer.running_mean, rm.numpy(), rtol=t, atol=t,
                                       err_msg=what)
            np.testing.assert_allclose(layer.running_var, rv.numpy(), rtol=t, atol=t,
                                       err_msg=what)
            if affine:
                np.testing.assert_allclose(layer.grad_weight, w.grad.numpy(), rtol=t,
                                           atol=t * terms, err_msg=what)
                np.testing.assert_allclose(layer.grad_bias, b.grad.numpy(), rtol=t,
                                           atol=t * terms, err_msg=what)
            else:
                assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("shape, axis", SMALL_LAYOUTS)
def test_relu_functional_against_torch(rng, shape, axis):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c = shape[axis]
    for dtype in (np.float32, np.float64):
        t = 1e-5 if dtype == np.float32 else 1e-10
        for training in (True, False):
            x = make_input(rng, shape, axis, dtype)
            w, b = rng.uniform(0.5, 2, c).astype(dtype), rng.uniform(-1, 1, c).astype(dtype)
            rm = rng.uniform(-1, 1, c).astype(dtype)
            rv = rng.uniform(0.5, 2, c).astype(dtype)
            ours = (rm.copy(), rv.copy())
            theirs = (torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()))
            y = cbn.batch_norm(x, *ours, w, b, training=training, momentum=0.2, eps=1e-3,
                               axis=axis, activation="relu")
            yt = torch.relu(F.batch_norm(_to_torch_layout(torch.from_numpy(x), axis),
                                         *theirs, torch.from_numpy(w), torch.from_numpy(b),
                                         training=training, momentum=0.2, eps=1e-3))
            np.testing.assert_allclose(y, _from_torch_layout(yt, axis).numpy(),
                                       rtol=t, atol=t)
            for mine, torch_buffer in zip(ours, theirs):
                np.testing.assert_allclose(mine, torch_buffer.numpy(), rtol=t, atol=t)


def test_frozen_relu_against_torch(rng):
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        module.weight.uniform_(-2, 2)
        module.bias.uniform_(-1, 1)
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    module.eval()
    frozen = cbn.FrozenBatchNorm(module.state_dict(), activation="relu")
    x = make_input(rng, (3, 4, 5, 6), 1, np.float64)
    dy = rng.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.relu(module(xt))
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(frozen(x), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(frozen.backward(dy), xt.grad.numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# 4. out=

OUT_FORMS = ["layer-call-train", "layer-forward-train", "layer-call-eval",
             "layer-forward-eval", "layer-relu-eval", "layer-eval-no-running-stats",
             "frozen-call", "frozen-forward", "frozen-relu", "batch_norm-train",
             "batch_norm-eval", "batch_norm-relu", "batch_norm_forward",
             "batch_norm_backward"]
IN_PLACE_FORMS = ["layer-call-eval", "layer-forward-eval", "layer-relu-eval",
                  "layer-eval-no-running-stats", "frozen-call", "frozen-forward",
                  "frozen-relu", "batch_norm-eval", "batch_norm-relu"]
# Training forwards refuse out=x: test_training_forward_with_out_x_raises_and_changes_nothing
# and test_functional.py.


def run_form(form, seed, x, axis, out):
    """Call ``form`` on x with ``out``, with parameters drawn from ``seed``;
    returns (result, float64 oracle computed before the call)."""
    rng = np.random.default_rng(seed)
    c = x.shape[axis]
    layer = make_layer(c, rng, axis=axis, dtype=np.float64,
                       track_running_stats=form != "layer-eval-no-running-stats")
    if "relu" in form:
        layer.activation = "relu"
    weight, bias = affine_of(layer)
    if form.startswith("layer"):
        layer.train(form.endswith("train"))
        call = layer.forward if "forward" in form else layer
        use_batch = layer.training or layer.running_mean is None
        expected = train_oracle(layer, x) if use_batch else eval_oracle(layer, x)
        return call(x, out=out), expected
    if form.startswith("frozen"):
        frozen = layer.freeze()
        call = frozen.forward if form == "frozen-forward" else frozen
        expected = eval_oracle(layer, x)
        return call(x, out=out), expected
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    if form.startswith("batch_norm-"):
        training = form == "batch_norm-train"
        expected = (train_oracle(layer, x) if training else eval_oracle(layer, x))
        return cbn.batch_norm(x, rm, rv, weight, bias, training=training, axis=axis,
                              out=out, activation=layer.activation), expected
    mean, var, _ = moments(x, axis)
    if form == "batch_norm_forward":
        expected = oracle(x, axis, mean, var, weight, bias, 1e-5)
        y, _, _ = cbn.batch_norm_forward(x, weight, bias, axis=axis, out=out)
        return y, expected
    assert form == "batch_norm_backward"
    dy = np.linspace(-1, 1, x.size).reshape(x.shape).astype(x.dtype)
    invstd = 1 / np.sqrt(var + 1e-5)
    expected = grads_oracle(x, dy, axis, mean, invstd, weight, True)[0]
    dx, _, _ = cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    return dx, expected


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", OUT_LAYOUTS)
def test_out_is_written_and_returned(rng, shape, axis, dtype):
    for form in OUT_FORMS:
        x = make_input(rng, shape, axis, dtype)
        x_before = x.copy()
        out = np.full(shape, 7.0, dtype)
        result, expected = run_form(form, 1, x, axis, out)
        assert result is out, form
        assert_close(out, expected, dtype, form)
        np.testing.assert_array_equal(x, x_before, err_msg=form)
        # the same bits as the allocating call
        y, _ = run_form(form, 1, x, axis, None)
        assert y is not out
        np.testing.assert_array_equal(out, y, err_msg=form)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", OUT_LAYOUTS)
def test_out_x_works_in_place_in_eval_and_frozen(rng, shape, axis, dtype):
    for form in IN_PLACE_FORMS:
        x = make_input(rng, shape, axis, dtype)
        y, _ = run_form(form, 2, x, axis, None)
        result, expected = run_form(form, 2, x, axis, x)
        assert result is x, form
        assert_close(x, expected, dtype, form)
        np.testing.assert_array_equal(x, y, err_msg=form)  # the bits of the allocating call


# -- the eval cache never serves stale parameters

def _assign_new(layer, name, factor):
    setattr(layer, name, getattr(layer, name) * factor + 0.25)


def _shared_then_edited(layer):
    array = np.full(layer.num_features, 2.5, layer.dtype)
    layer.running_var = array
    layer(np.ones((2, layer.num_features), layer.dtype))  # cache the new array
    array[0] = 0.125   # the layer may keep the caller's array: edit it behind its back


def _load(layer):
    state = layer.state_dict()
    state["running_mean"] = state["running_mean"] - 1.5
    state["weight"] = state["weight"][::-1].copy()
    layer.load_state_dict(state)


def _flip_sign_bit(layer):
    """Flip running_mean[0]'s sign through a uint8 view of its bytes."""
    raw = layer.running_mean.view(np.uint8)
    top = layer.running_mean.itemsize - 1 if sys.byteorder == "little" else 0
    raw[top] ^= 0x80


def _training_step(layer):
    layer.train()
    layer(np.random.default_rng(3).normal(4, 2, (5, layer.num_features)).astype(layer.dtype))
    layer.eval()


EDITS = [
    pytest.param(lambda l: l.running_mean.__setitem__(0, l.running_mean[0] + 1),
                 id="running_mean[0]+=1"),
    pytest.param(lambda l: l.running_var.__imul__(3), id="running_var*=3"),
    pytest.param(lambda l: l.weight.__imul__(2), id="weight*=2"),
    pytest.param(lambda l: l.bias.__iadd__(0.5), id="bias+=0.5"),
    pytest.param(lambda l: np.copyto(l.running_var, np.arange(1, l.num_features + 1)),
                 id="copyto"),
    pytest.param(lambda l: l.weight[1:].__setitem__(Ellipsis, -3.0), id="through-a-view"),
    pytest.param(lambda l: l.bias.reshape(1, -1)[0, -1:].__setitem__(Ellipsis, 9.0),
                 id="through-a-reshaped-view"),
    pytest.param(_flip_sign_bit, id="through-a-byte-view"),
    pytest.param(_load, id="load_state_dict"),
    pytest.param(lambda l: l.reset_running_stats(), id="reset_running_stats"),
    pytest.param(lambda l: l.reset_parameters(), id="reset_parameters"),
    pytest.param(lambda l: _assign_new(l, "running_mean", -1), id="assign-running_mean"),
    pytest.param(lambda l: _assign_new(l, "running_var", 2), id="assign-running_var"),
    pytest.param(lambda l: _assign_new(l, "weight", -2), id="assign-weight"),
    pytest.param(lambda l: _assign_new(l, "bias", 3), id="assign-bias"),
    pytest.param(lambda l: setattr(l, "running_var", l.running_var.tolist()[::-1]),
                 id="assign-list"),
    pytest.param(_shared_then_edited, id="assigned-array-edited-later"),
    pytest.param(lambda l: setattr(l, "eps", 0.5), id="eps"),
    pytest.param(_training_step, id="training-step"),
    pytest.param(lambda l: l.running_var.__setitem__(1, 0.0), id="var-to-zero"),
    pytest.param(lambda l: l.weight.__setitem__(0, -l.weight[0]), id="sign-flip"),
    pytest.param(lambda l: l.weight.__setitem__(slice(None), l.bias.copy()),
                 id="weight-becomes-bias"),
]


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("edit", EDITS)
def test_eval_cache_is_never_stale(rng, edit, dtype):
    c = 5
    for with_out in (False, True):
        layer = make_layer(c, rng, dtype=dtype).eval()
        x = make_input(rng, (7, c, 3), 1, dtype)
        out = np.empty_like(x) if with_out else None
        for _ in range(2):  # warm the cache
            before = layer(x, out=out).copy()
        assert_close(before, eval_oracle(layer, x), dtype)
        edit(layer)
        assert not layer.training
        expected = eval_oracle(layer, x)
        assert not np.allclose(expected, before)  # the edit matters
        y = layer(x, out=out)
        assert_close(y, expected, dtype)
        assert_close(layer(x), expected, dtype)  # and stays fresh
        # the frozen form and fold() see the edit too
        np.testing.assert_array_equal(layer.freeze()(x), y)
        scale, shift = layer.fold()
        ref = expected_scale_shift(*affine_of(layer), layer.running_mean,
                                   layer.running_var, layer.eps)
        assert_close(scale, ref[0], dtype)
        assert_close(shift, ref[1], dtype)


def test_eval_cache_sees_an_eps_change_in_the_last_bit():
    layer = cbn.BatchNorm(1, dtype=np.float64).eval()
    layer.running_var[0] = 0.0  # the output is x / sqrt(eps)
    x = np.ones((2, 1))
    old, new = 0.3, float(np.nextafter(0.3, 1.0))
    assert 1.0 / np.sqrt(old) != 1.0 / np.sqrt(new)  # visible in double
    layer.eps = old
    assert layer(x)[0, 0] == 1.0 / np.sqrt(old)
    assert layer.fold()[0][0] == 1.0 / np.sqrt(old)
    layer.eps = new
    assert layer(x)[0, 0] == 1.0 / np.sqrt(new)
    assert layer.fold()[0][0] == 1.0 / np.sqrt(new)


def test_switching_the_activation_reaches_the_next_eval_call(rng):
    """Switching the activation between warm eval calls takes effect at once."""
    layer = make_layer(3, rng, dtype=np.float64).eval()
    x = make_input(rng, (6, 3), 1, np.float64)
    y = layer(x)
    layer.activation = "relu"
    np.testing.assert_array_equal(layer(x), np.maximum(y, 0))
    layer.activation = None
    np.testing.assert_array_equal(layer(x), y)


def test_edits_after_freeze_reach_the_layer_not_the_frozen_copy(rng):
    layer = make_layer(3, rng, dtype=np.float64).eval()
    x = make_input(rng, (4, 3), 1, np.float64)
    layer(x)
    frozen = layer.freeze()
    y_frozen = frozen(x)
    layer.running_mean[...] = 0.0
    layer.running_var[...] = 1.0
    assert_close(layer(x), eval_oracle(layer, x), np.float64)
    np.testing.assert_array_equal(frozen(x), y_frozen)
    assert not np.allclose(frozen(x), layer(x))


# -- errors leave everything unchanged

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", SMALL_LAYOUTS)
def test_training_forward_with_out_x_raises_and_changes_nothing(rng, shape, axis, dtype):
    for relu in (False, True):
        for call in ("call", "forward"):
            layer = make_layer(shape[axis], rng, axis=axis, relu=relu)
            warm = make_input(rng, shape, axis, dtype)
            layer(warm)
            dy = rng.standard_normal(shape).astype(dtype)
            dx_warm = layer.backward(dy)
            before = layer_state(layer)
            x = make_input(rng, shape, axis, dtype)
            x_before = x.copy()
            fn = layer if call == "call" else layer.forward
            with pytest.raises(ValueError):
                fn(x, out=x)
            with pytest.raises(ValueError):
                fn(x, out=x.reshape(x.shape))  # another array over the same memory
            assert layer_state(layer) == before
            np.testing.assert_array_equal(x, x_before)
            assert layer.training
            # backward still differentiates the last successful forward
            np.testing.assert_array_equal(layer.backward(dy), dx_warm)


BAD_OUT_FORMS = ["layer-train", "layer-relu-train", "layer-eval", "layer-forward-eval",
                 "frozen", "batch_norm-train", "batch_norm-eval", "batch_norm_forward",
                 "batch_norm_backward"]


def _bad_outs(shape, dtype):
    """{kind: (out, exception, strings the message must contain)}."""
    other = np.float64 if np.dtype(dtype) != np.float64 else np.float32
    shape_str = str(tuple(shape))
    return {
        "shape": (np.zeros((4, 5, 3), dtype), ValueError, ["(4, 5, 3)", shape_str]),
        "flat": (np.zeros(60, dtype), ValueError, ["(60,)", shape_str]),
        "extra-dim": (np.zeros((1,) + shape, dtype), ValueError,
                      [str((1,) + shape), shape_str]),
        "dtype": (np.zeros(shape, other), TypeError,
                  [str(np.dtype(other)), str(np.dtype(dtype))]),
        "non-contiguous": (np.zeros((4, 3, 6), dtype)[..., :5], ValueError, []),
        "fortran": (np.asfortranarray(np.zeros(shape, dtype)), ValueError, []),
        "read-only": (np.broadcast_to(np.zeros((), dtype), shape), ValueError, []),
        "list": (np.zeros(shape, dtype).tolist(), TypeError, []),
    }


def _form_call(form, layer, shape, dtype):
    """A function (x, out) for ``form``, after a forward when the form is a
    layer (so that backward has something to lose)."""
    axis = 1
    if form.startswith("layer"):
        layer.activation = "relu" if "relu" in form else None
        layer.train(form.endswith("train"))
        layer(make_input(np.random.default_rng(9), shape, axis, dtype))
        return layer.forward if "forward" in form else layer
    if form == "frozen":
        return layer.freeze()
    if form == "batch_norm_forward":
        return lambda x, out: cbn.batch_norm_forward(x, layer.weight, axis=axis, out=out)
    if form == "batch_norm_backward":
        return lambda x, out: cbn.batch_norm_backward(
            np.ones(shape, dtype), x, np.zeros(3), np.ones(3), layer.weight, out=out)
    return lambda x, out: cbn.batch_norm(x, layer.running_mean, layer.running_var,
                                         layer.weight, layer.bias,
                                         training=form.endswith("train"), out=out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("form", BAD_OUT_FORMS)
def test_bad_out_raises_with_details_and_changes_nothing(rng, form, dtype):
    shape = (4, 3, 5)
    for kind, (out, error, words) in _bad_outs(shape, dtype).items():
        x = make_input(rng, shape, 1, dtype)
        x_before = x.copy()
        out_before = np.array(out, copy=True)
        layer = make_layer(3, rng)
        call = _form_call(form, layer, shape, dtype)
        dy = np.ones(shape, dtype)
        dx_before = layer.backward(dy) if form.startswith("layer") else None
        before = layer_state(layer)
        with pytest.raises(error) as info:
            call(x, out=out)
        message = str(info.value)
        for word in words:
            assert word in message, (kind, word, message)
        assert layer_state(layer) == before, kind
        np.testing.assert_array_equal(x, x_before, err_msg=kind)
        np.testing.assert_array_equal(np.asarray(out), out_before, err_msg=kind)
        if dx_before is not None:  # backward still differentiates the last good forward
            np.testing.assert_array_equal(layer.backward(dy), dx_before, err_msg=kind)


@pytest.mark.parametrize("source", [
    pytest.param((np.float16, False), id="f16"), pytest.param((np.float32, False), id="f32"),
    pytest.param((np.float64, False), id="f64"),
    pytest.param((np.float32, True), id="f32-strided-x"),
])
@pytest.mark.parametrize("shift", [1, -1, 7], ids=["shift+1", "shift-1", "shift+7"])
def test_partially_overlapping_out_raises_and_changes_nothing(rng, shift, source):
    """out and x are windows of one buffer, ``shift`` elements apart (x also
    as every other element of its window: an input that cbn must copy)."""
    dtype, strided = source
    shape = (4, 3, 5)
    n = int(np.prod(shape))
    step = 2 if strided else 1
    lo, hi = (0, shift) if shift > 0 else (-shift, 0)
    accepted = []
    for form in BAD_OUT_FORMS:
        buffer = rng.normal(0, 2, step * n + abs(shift)).astype(dtype)
        x = buffer[lo:lo + step * n:step].reshape(shape)
        out = buffer[hi:hi + n].reshape(shape)
        assert out.flags.c_contiguous and x.flags.c_contiguous != strided
        assert np.shares_memory(x, out)
        layer = make_layer(3, rng)
        call = _form_call(form, layer, shape, dtype)
        before = layer_state(layer)
        buffer_before = buffer.copy()
        try:
            call(x, out=out)
        except ValueError:
            pass
        else:
            accepted.append(form)
            continue
        assert layer_state(layer) == before, form
        np.testing.assert_array_equal(buffer, buffer_before, err_msg=form)
    assert not accepted, f"a partially overlapping out= was accepted by {accepted}"


# -- backward after an in-place call

@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_backward_after_in_place_eval_raises_but_frozen_backward_works(rng, dtype):
    for relu in (False, True):
        layer = make_layer(3, rng, relu=relu).eval()
        x = make_input(rng, (5, 3, 4), 1, dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        layer(x.copy())
        layer.backward(dy)  # fine after an ordinary eval call
        before = layer_state(layer)
        assert layer(x, out=x) is x
        with pytest.raises(ValueError):
            layer.backward(dy)
        with pytest.raises(ValueError):
            layer.backward(dy)
        assert layer_state(layer) == before
        # a forward that keeps its input makes backward work again
        x2 = make_input(rng, (5, 3, 4), 1, dtype)
        layer(x2)
        dx = layer.backward(dy)
        weight, _ = affine_of(layer)
        invstd = 1 / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
        mask = (eval_oracle(layer, x2) > 0) if relu else None
        assert_close(dx, grads_oracle(x2, dy, 1, layer.running_mean, invstd, weight, False,
                                      mask)[0], dtype)
        # a frozen layer's backward needs no input: it works after out=x
        frozen = layer.freeze()
        x3 = make_input(rng, (5, 3, 4), 1, dtype)
        x3_copy = x3.copy()
        assert frozen(x3, out=x3) is x3
        dx = frozen.backward(dy)
        expected = dy.astype(np.float64) * per_channel(weight * invstd, 3, 1)
        if relu:
            expected = np.where(eval_oracle(layer, x3_copy) > 0, expected, 0.0)
        assert_close(dx, expected, dtype)


def test_in_place_eval_without_running_stats_also_blocks_backward(rng):
    layer = make_layer(3, rng, track_running_stats=False).eval()
    x = make_input(rng, (5, 3), 1, np.float32)
    layer(x, out=x)
    with pytest.raises(ValueError):
        layer.backward(np.ones_like(x))


# -- no allocation

def _growth(fn, calls):
    """Bytes still allocated (tracemalloc) after ``calls`` more calls of fn."""
    fn()
    tracemalloc.start()
    try:
        fn()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(calls):
            fn()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return end - start


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_warm_eval_calls_with_out_do_not_allocate(rng, relu, dtype):
    layer = make_layer(8, rng, dtype=dtype, relu=relu).eval()
    frozen = layer.freeze()
    x = make_input(rng, (16, 8, 4), 1, dtype)
    expected = eval_oracle(layer, x)
    out = np.empty_like(x)
    rm, rv, w, b = layer.running_mean, layer.running_var, layer.weight, layer.bias
    activation = layer.activation
    calls = {
        "layer-call": lambda: layer(x, out=out),
        "layer-forward": lambda: layer.forward(x, out=out),
        "layer-in-place": lambda: layer(out, out=out),
        "frozen": lambda: frozen(x, out=out),
        "frozen-in-place": lambda: frozen.forward(out, out=out),
        "batch_norm-eval": lambda: cbn.batch_norm(x, rm, rv, w, b, out=out,
                                                  activation=activation),
    }
    for what, fn in calls.items():
        out[...] = x
        assert fn() is out, what
        if "in-place" not in what:
            assert_close(out, expected, dtype, what)
        growth = _growth(fn, 2000)
        assert growth < 64 * 1024, f"{what}: {growth} bytes after 2000 calls"
        assert fn() is out, what


def test_the_allocation_measure_can_fail():
    kept = []
    x = np.ones((16, 8, 4), np.float32)
    assert _growth(lambda: kept.append(x.copy()), 200) > 64 * 1024


# ---------------------------------------------------------------------------
# 6. Pickling and deepcopy (from_torch and from_state_dict: test_torch_import.py)

ROUND_TRIPS = [pytest.param(lambda o: pickle.loads(pickle.dumps(o)), id="pickle"),
               pytest.param(lambda o: pickle.loads(pickle.dumps(o, protocol=2)), id="pickle2"),
               pytest.param(copy.deepcopy, id="deepcopy")]

LAYER_CONFIGS = [
    pytest.param(cbn.BatchNorm, dict(eps=1e-3, momentum=0.3), (6, 4, 3), True,
                 id="default-train"),
    pytest.param(cbn.BatchNorm2d, dict(eps=0.25, momentum=None, activation="relu"),
                 (3, 4, 2, 5), False, id="2d-relu-cma-eval"),
    pytest.param(cbn.BatchNorm1d, dict(affine=False, axis=-1, dtype=np.float64), (6, 3, 4),
                 True, id="1d-noaffine-f64-channels-last"),
    pytest.param(cbn.BatchNorm3d, dict(track_running_stats=False, momentum=0.0),
                 (2, 4, 3, 2, 2), False, id="3d-notrack"),
]


def _trained(cls, kwargs, shape, training, rng):
    layer = cls(4, **kwargs)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, 4)
        layer.bias[...] = rng.uniform(-1, 1, 4)
    for k in range(3):
        layer(make_input(rng, shape, layer.axis, layer.dtype, offset=k))
        layer.backward(rng.standard_normal(shape).astype(layer.dtype))
    return layer.train(training)


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@pytest.mark.parametrize("cls, kwargs, shape, training", LAYER_CONFIGS)
def test_layer_round_trip_preserves_everything(rng, cls, kwargs, shape, training, round_trip):
    layer = _trained(cls, kwargs, shape, training, rng)
    x = make_input(rng, shape, layer.axis, layer.dtype, offset=0.5)
    if not layer.training:
        layer(x)  # warm the eval cache
    state = layer_state(layer)
    twin = round_trip(layer)
    assert type(twin) is type(layer) and twin is not layer
    assert layer_state(twin) == state
    assert (twin.dtype, twin.activation) == (layer.dtype, layer.activation)
    assert repr(twin) == repr(layer)
    for name in ("weight", "bias", "running_mean", "running_var", "grad_weight"):
        if getattr(layer, name) is not None:
            assert not np.shares_memory(getattr(twin, name), getattr(layer, name)), name
    # the same behaviour: forward (with the running-statistics update) and backward
    dy = rng.standard_normal(shape).astype(layer.dtype)
    for _ in range(2):
        np.testing.assert_array_equal(twin(x), layer(x))
        np.testing.assert_array_equal(twin.backward(dy), layer.backward(dy))
    assert layer_state(twin) == layer_state(layer)
    # independence both ways; the copy's eval cache follows the copy's arrays
    layer.eval()
    twin.eval()
    y_layer = layer(x)
    twin.eps = twin.eps * 4
    if twin.running_mean is not None:
        twin.running_mean[...] += 1.0
        twin.running_var[...] *= 2.0
        assert_close(twin(x), eval_oracle(twin, x), twin.dtype)
        assert not np.allclose(twin(x), y_layer)
    if twin.affine:
        twin.weight[...] = 3.0
    twin.activation = None if twin.activation else "relu"
    np.testing.assert_array_equal(layer(x), y_layer)
    assert layer_state(layer)["eps"] == state["eps"]
    twin_state = layer_state(twin)
    if layer.running_mean is not None:
        layer.running_mean[...] = -5.0
        layer.train()(x)
    if layer.affine:
        layer.bias[...] = 7.0
    assert layer_state(twin) == twin_state


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_copy_of_a_warm_eval_layer_has_a_fresh_cache(rng, round_trip):
    layer = make_layer(3, rng, dtype=np.float64).eval()
    x = make_input(rng, (5, 3), 1, np.float64)
    layer(x)
    twin = round_trip(layer)
    twin.running_mean[0] += 3.0
    assert_close(twin(x), eval_oracle(twin, x), np.float64)
    assert_close(layer(x), eval_oracle(layer, x), np.float64)
    assert not np.allclose(twin(x), layer(x))


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_copy_does_not_carry_the_last_forward(rng, round_trip):
    layer = make_layer(3, rng).eval()
    x = make_input(rng, (5, 3), 1, np.float32)
    layer(x.copy())
    twin = round_trip(layer)
    with pytest.raises(ValueError):
        twin.backward(np.ones_like(x))
    assert_close(twin(x), eval_oracle(twin, x), np.float32)
    twin.backward(np.ones_like(x))


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@pytest.mark.parametrize("source", ["freeze-2d", "state-dict"])
def test_frozen_round_trip(rng, source, round_trip):
    for relu in (False, True):
        if source == "freeze-2d":
            layer = make_layer(4, rng, cls=cbn.BatchNorm2d, relu=relu, eps=0.01)
            frozen = layer.freeze()
            x = make_input(rng, (2, 4, 3, 3), 1, np.float32)
        else:
            frozen = cbn.FrozenBatchNorm(
                {"running_mean": rng.normal(0, 1, 4), "running_var": rng.uniform(0.5, 2, 4)},
                axis=-1, eps=0.5, activation="relu" if relu else None)
            x = make_input(rng, (5, 3, 4), -1, np.float64)
        y = frozen(x)
        twin = round_trip(frozen)
        assert type(twin) is cbn.FrozenBatchNorm and twin is not frozen
        for name in ("num_features", "eps", "axis", "dtype", "activation", "training"):
            assert getattr(twin, name) == getattr(frozen, name), name
        np.testing.assert_array_equal(twin.scale, frozen.scale)
        np.testing.assert_array_equal(twin.shift, frozen.shift)
        assert not twin.scale.flags.writeable and not twin.shift.flags.writeable
        assert twin.scale.dtype == frozen.scale.dtype
        assert list(twin.state_dict()) == list(frozen.state_dict())
        for key, value in frozen.state_dict().items():
            np.testing.assert_array_equal(twin.state_dict()[key], value)
        np.testing.assert_array_equal(twin(x), y)
        dy = np.ones_like(x)
        np.testing.assert_array_equal(twin.backward(dy), frozen.backward(dy))
        assert repr(twin) == repr(frozen)
        if source == "freeze-2d":  # BatchNorm2d's rank check carries over
            for f in (frozen, twin):
                with pytest.raises(ValueError):
                    f(np.ones((2, 4), np.float32))


@pytest.mark.parametrize("frozen", [False, True])
def test_relu_backward_passes_the_gradient_at_nan_outputs_like_pytorch(rng, frozen):
    # PyTorch's threshold_backward zeroes where output <= 0 only: a NaN output
    # was not clipped, so its gradient passes (torch.relu(nan) has grad 1).
    layer = cbn.BatchNorm(3, activation="relu").eval()
    model = layer.freeze() if frozen else layer
    x = np.array([[np.nan, -5.0, 5.0], [1.0, np.nan, -1.0]], np.float32)
    y = model(x)
    dy = np.full_like(x, 2.0)
    dx = model.backward(dy)
    scale = 1 / np.sqrt(np.float32(1 + 1e-5))
    expected = np.where(np.isnan(y) | (y > 0), 2.0 * scale, 0.0)
    np.testing.assert_allclose(dx, expected, rtol=1e-6)
    torch = pytest.importorskip("torch")
    t = torch.tensor(y.copy(), requires_grad=True)
    torch.relu(t).backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(dx != 0, t.grad.numpy() != 0)


@pytest.mark.parametrize("shape, axis", [((64, 256), 1), ((8, 32, 8, 8), 1),
                                         ((8, 8, 8, 32), -1)])
def test_warm_eval_calls_with_out_allocate_nothing_even_temporarily(rng, shape, axis):
    # Peak, not growth: a temporary output or parameter array of a call would
    # raise the peak by at least its size (64 KiB input here).
    num_features = shape[axis]
    layer = cbn.BatchNorm(num_features, axis=axis, activation="relu").eval()
    layer.running_var[...] = rng.uniform(0.5, 2, num_features)
    frozen = layer.freeze()
    x = rng.standard_normal(shape).astype(np.float32)
    out = np.empty_like(x)
    for call in (lambda: layer(x, out=out), lambda: frozen(x, out=out)):
        call()
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            for _ in range(200):
                call()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - start < 1024
    tracemalloc.start()
    try:  # the measure sees a call that allocates its output
        start, _ = tracemalloc.get_traced_memory()
        layer(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start >= x.nbytes


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_backward_writes_into_out(rng, relu, dtype):
    layer = cbn.BatchNorm(4, activation="relu" if relu else None)
    layer.running_var[...] = rng.uniform(0.5, 2, 4)
    x = make_input(rng, (6, 4, 5), 1, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    for model in (layer, layer.eval().freeze(), layer.train()):
        model(x.copy())
        expected = model.backward(dy)
        out = np.full_like(dy, np.nan)
        assert model.backward(dy, out=out) is out
        np.testing.assert_array_equal(out, expected)
        in_place = dy.copy()
        assert model.backward(in_place, out=in_place) is in_place
        np.testing.assert_array_equal(in_place, expected)
        with pytest.raises(ValueError, match=r"\(6, 4\)"):
            model.backward(dy, out=np.empty((6, 4), dtype))
        with pytest.raises(TypeError, match="dtype"):
            model.backward(dy, out=np.empty(dy.shape, np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_stats_writes_into_out(rng, dtype):
    x = make_input(rng, (7, 3, 5), 1, dtype, offset=100.0)
    mean, var = cbn.batch_stats(x)
    out = (np.empty(3, dtype), np.empty(3, dtype))
    got = cbn.batch_stats(x, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(out[0], mean)
    np.testing.assert_array_equal(out[1], var)
    np.testing.assert_allclose(out[0], x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6)
    bad = [((np.empty(3, dtype),), TypeError, "pair"),
           ((np.empty(4, dtype), np.empty(3, dtype)), ValueError, r"\(4,\)"),
           ((np.empty(3, np.float16), np.empty(3, dtype)), TypeError, "float16"),
           ((out[0], out[0]), ValueError, "separate"),
           ([np.empty(3, dtype), [0.0, 0.0, 0.0]], TypeError, "list")]
    for value, error, words in bad:
        with pytest.raises(error, match=words):
            cbn.batch_stats(x, out=value)


def test_eval_cache_is_not_left_stale_by_reloads_racing_with_calls():
    # load_state_dict copies release the GIL, so a reload can land while the
    # cache reads the arrays; once the writer is done, the next call must use
    # the final values. (Before the cache built its parameters and snapshot
    # from one copy, this failed in about half of the runs.)
    import threading
    C = 2048
    layer = cbn.BatchNorm(C).eval()
    x = np.ones((1, C), np.float32)
    first = {key: value.copy() for key, value in layer.state_dict().items()}
    second = {**first, "running_var": np.full(C, 4, np.float32),
              "weight": np.full(C, 3, np.float32)}
    stop = threading.Event()

    def reader():
        out = np.empty_like(x)
        while not stop.is_set():
            layer(x, out=out)

    for final in range(3):
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        for i in range(400 + final):
            layer.load_state_dict(second if i % 2 == 0 else first)
        stop.set()
        for thread in readers:
            thread.join()
        stop.clear()
        expected = (1 - 0) / np.sqrt(layer.running_var.astype(np.float64) + 1e-5) \
            * layer.weight
        np.testing.assert_allclose(layer(x)[0], expected, rtol=1e-6)


def test_internal_inference_calls_refuse_missing_parameters():
    from cbn._dispatch import kernels
    x = np.ones((2, 4, 3))
    with pytest.raises(TypeError):
        kernels.fast_normalize(x, 1, 2, 64, None, False, None)
    with pytest.raises(TypeError):
        kernels.normalize(x, None, False, x.copy(), 1)
    with pytest.raises(TypeError, match="running_var"):
        kernels.inference_params(None, None, np.zeros(4), None, 1e-5)
    with pytest.raises(TypeError, match="cannot be changed"):
        params = kernels.inference_params(None, None, np.zeros(4), np.ones(4), 1e-5)
        params.__init__(np.zeros(4), np.ones(4), np.ones(4), np.zeros(4))


def test_relu_backward_with_a_non_array_out_raises_a_type_error(rng):
    layer = cbn.BatchNorm(4, activation="relu")
    x = make_input(rng, (8, 4), 1, np.float32)
    layer(x)
    for bad in (object(), [0.0] * 32, "out"):
        with pytest.raises(TypeError, match="out"):
            layer.backward(np.ones_like(x), out=bad)


def test_unaligned_parameter_arrays_are_copied_on_assignment(rng):
    layer = cbn.BatchNorm(4).eval()
    raw = np.zeros(4 * 4 + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, count=4, offset=1)
    assert not unaligned.flags.aligned
    layer.weight = unaligned + 0  # an aligned temporary...
    layer.weight = np.frombuffer(np.full(4, 2.0, np.float32).tobytes().rjust(17, b"\0"),
                                 np.float32, count=4, offset=1)  # ...and an unaligned one
    assert layer.weight.flags.aligned
    x = make_input(rng, (5, 4), 1, np.float32)
    np.testing.assert_allclose(layer(x), 2 * x / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(layer.fold()[0], 2 / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("count, error", [(np.array([2, 5]), TypeError),
                                          (np.array(2.7), TypeError),
                                          (np.array(-1), ValueError)])
def test_frozen_checks_num_batches_tracked(count, error):
    state = {"running_mean": np.zeros(3), "running_var": np.ones(3),
             "num_batches_tracked": count}
    with pytest.raises(error, match="num_batches_tracked"):
        cbn.FrozenBatchNorm(state)


def test_a_layer_pickled_before_activation_existed_loads(rng):
    layer = cbn.BatchNorm(3)
    state = layer.__getstate__()
    del state["_relu"]  # what a pickle made before activation= holds
    old = cbn.BatchNorm.__new__(cbn.BatchNorm)
    old.__setstate__(state)
    assert old.activation is None
    x = make_input(rng, (6, 3), 1, np.float32)
    np.testing.assert_array_equal(old(x), layer(x))
