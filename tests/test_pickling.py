"""Pickling and deepcopy of layers and frozen layers: the copy has the same
state and behaviour, is independent of the original both ways and has a fresh
eval cache; pickles made before ``activation`` existed still load.

Building layers from PyTorch modules and state dicts is in
test_torch_import.py.
"""
import copy
import pickle

import numpy as np
import pytest

import cbn

from corpus import assert_close, eval_oracle, layer_state, make_input, make_layer

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
        assert_close(twin(x), eval_oracle(twin, x), dtype=twin.dtype)
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
    assert_close(twin(x), eval_oracle(twin, x), dtype=np.float64)
    assert_close(layer(x), eval_oracle(layer, x), dtype=np.float64)
    assert not np.allclose(twin(x), layer(x))


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_copy_does_not_carry_the_last_forward(rng, round_trip):
    layer = make_layer(3, rng).eval()
    x = make_input(rng, (5, 3), 1, np.float32)
    layer(x.copy())
    twin = round_trip(layer)
    with pytest.raises(ValueError):
        twin.backward(np.ones_like(x))
    assert_close(twin(x), eval_oracle(twin, x), dtype=np.float32)
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


def test_a_layer_pickled_before_activation_existed_loads(rng):
    layer = cbn.BatchNorm(3)
    state = layer.__getstate__()
    del state["_relu"]  # what a pickle made before activation= holds
    old = cbn.BatchNorm.__new__(cbn.BatchNorm)
    old.__setstate__(state)
    assert old.activation is None
    x = make_input(rng, (6, 3), 1, np.float32)
    np.testing.assert_array_equal(old(x), layer(x))
