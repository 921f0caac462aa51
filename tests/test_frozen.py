"""FrozenBatchNorm and freeze(): the frozen layer gives the eval call's bits
and agrees with fold(); its backward, state_dict, construction from (model)
state dicts, refused state dicts, and independence from the layer it was
frozen from.

Expected values are written out with float64 NumPy from the formulas, never
computed by cbn.
"""
import numpy as np
import pytest

import cbn

from corpus import (
    ALL_DTYPES,
    LAYER_DTYPES,
    LAYOUTS,
    SMALL_LAYOUTS,
    affine_of,
    assert_close,
    coarser,
    eval_oracle,
    expected_scale_shift,
    layer_dtype_for,
    make_input,
    make_layer,
    oracle,
    per_channel,
)

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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
        assert_close(value, expected, dtype=dtype, err_msg=name)
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
        assert_close(y_eval, eval_oracle(layer, x), dtype=dtype)
        layer.activation = None  # fold() is for the layer without activation
        for scale, shift in (layer.fold(), (frozen.scale, frozen.shift)):
            assert scale.dtype == shift.dtype == np.dtype(ldtype)
            folded = (x.astype(np.float64) * per_channel(scale, nd, axis)
                      + per_channel(shift, nd, axis))
            if relu:
                folded = np.maximum(folded, 0)
            assert_close(y_eval, folded, dtype=coarser(dtype, ldtype))


def test_eval_equals_frozen_for_float64_data_in_a_float32_layer(rng):
    layer = make_layer(4, rng).eval()
    x = make_input(rng, (5, 4, 3), 1, np.float64)
    y = layer(x)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(layer.freeze()(x), y)
    assert_close(y, eval_oracle(layer, x), dtype=np.float64)


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
        assert_close(dx, expected, kind="grad", dtype=dtype)


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
    assert_close(y, eval_oracle(layer, x), dtype=np.float64)
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
    assert_close(frozen(x), expected, dtype=np.float64)
    state["running_mean"] += 5  # the arrays were copied
    assert_close(frozen(x), expected, dtype=np.float64)
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
        assert_close(frozen(x), expected, dtype=np.float64)
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
                  "bias": np.ones(3)}, id="bias-without-weight"),
    pytest.param({"running_mean": np.zeros(3), "running_var": np.ones(3),
                  "momentum": np.ones(3)}, id="unknown-key"),
])
def test_frozen_rejects_incomplete_state_dicts(build, state):
    with pytest.raises(ValueError):
        build(state)


@pytest.mark.parametrize("count, error", [(np.array([2, 5]), TypeError),
                                          (np.array(2.7), TypeError),
                                          (np.array(-1), ValueError)])
def test_frozen_checks_num_batches_tracked(count, error):
    state = {"running_mean": np.zeros(3), "running_var": np.ones(3),
             "num_batches_tracked": count}
    with pytest.raises(error, match="num_batches_tracked"):
        cbn.FrozenBatchNorm(state)


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
    assert_close(frozen(x), eval_oracle(layer, x), dtype=np.float64)


def test_freeze_needs_running_statistics():
    layer = cbn.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats"):
        layer.freeze()


def test_freeze_keeps_activation_eps_axis_dtype(rng):
    layer = make_layer(4, rng, axis=-1, dtype=np.float64, relu=True, eps=0.125)
    frozen = layer.freeze()
    assert (frozen.activation, frozen.eps, frozen.axis, frozen.dtype) == (
        "relu", 0.125, -1, np.dtype(np.float64))
