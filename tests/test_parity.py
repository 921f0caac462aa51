"""PyTorch parity: bias=False, the bfloat16 rule, to_torch,
and what the mutation run found untested (variance overflow with nonfinite,
state dict dtype inference, old pickles). The empty-batch count is in
test_layer_semantics.py, the shadowing source folder in test_install.py."""
import copy
import pickle

import numpy as np
import pytest

import cbn
from cbn import _convert

from corpus import assert_close, make_input

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is optional
    ml_dtypes = None


# ---------------------------------------------------------------------------
# bias=False: a learned weight and no bias (PyTorch 2.13)

@pytest.mark.parametrize("cls", [cbn.BatchNorm, cbn.BatchNorm1d])
def test_bias_false_has_a_weight_and_no_bias(rng, cls):
    layer = cls(4, bias=False)
    assert layer.bias is None and layer.weight is not None
    assert list(layer.state_dict()) == ["weight", "running_mean", "running_var",
                                        "num_batches_tracked"]
    assert "affine=True, bias=False, track_running_stats=True" in repr(layer)
    assert "bias" not in repr(cls(4))
    layer.weight[...] = [1.0, 2.0, 3.0, 4.0]
    x = make_input(rng, (16, 4), 1, np.float32)
    y = layer(x)
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    expected = (x - mean) / np.sqrt(var + 1e-5) * layer.weight
    assert_close(y, expected, kind="output", dtype=np.float32)
    layer.backward(np.ones_like(y))
    assert layer.grad_weight is not None and layer.grad_bias is None
    with pytest.raises(ValueError, match="bias"):
        layer.bias = np.zeros(4)


@needs_torch
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d"])
def test_bias_false_matches_torch(rng, name):
    module = getattr(torch.nn, name)(3, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    layer = cbn.BatchNorm.from_torch(module)
    assert type(layer).__name__ == name and layer.bias is None
    assert repr(layer) == repr(module)
    shape = (8, 3) if name == "BatchNorm1d" else (4, 3, 5, 5)
    x = make_input(rng, shape, 1, np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = module(xt)
    yt.backward(torch.ones_like(yt))
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    assert_close(y, yt.detach().numpy(), kind="output", dtype=np.float32)
    assert_close(dx, xt.grad.numpy(), kind="grad", dtype=np.float32)
    assert_close(layer.grad_weight, module.weight.grad.numpy(), kind="grad",
                 dtype=np.float32, scale=np.sqrt(x.size))
    assert_close(layer.running_mean, module.running_mean.numpy(), kind="stats",
                 dtype=np.float32)


def test_bias_false_through_state_dicts_freeze_fold_and_pickle(rng):
    layer = cbn.BatchNorm1d(3, bias=False)
    layer.weight[...] = [2.0, 3.0, 4.0]
    layer(make_input(rng, (10, 3), 1, np.float32))
    state = layer.state_dict()
    rebuilt = cbn.BatchNorm1d.from_state_dict(state)
    assert rebuilt.bias is None and repr(rebuilt) == repr(layer)
    other = cbn.BatchNorm1d(3, bias=False)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected keys \\['bias'\\]"):
        other.load_state_dict(dict(state, bias=np.zeros(3)))
    with pytest.raises(ValueError, match="missing keys \\['bias'\\]"):
        cbn.BatchNorm1d(3).load_state_dict(state)
    layer.eval()
    x = make_input(rng, (5, 3), 1, np.float32)
    frozen = layer.freeze()
    assert "bias=False" in repr(frozen) and "bias" not in frozen.state_dict()
    assert frozen(x).tobytes() == layer(x).tobytes()
    scale, shift = layer.fold()
    expected_shift = -layer.running_mean.astype(np.float64) * scale
    assert_close(shift, expected_shift, kind="output", dtype=np.float32)
    weight, bias = cbn.fold_into_linear(np.eye(3, dtype=np.float32), None, layer)
    assert_close(x @ weight.T + bias, layer(x), kind="output", dtype=np.float32)
    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer),
                 pickle.loads(pickle.dumps(frozen))):
        assert twin.state_dict().keys() == (state.keys() if twin is not frozen else
                                            frozen.state_dict().keys())
        assert "bias=False" in repr(twin)
        assert twin(x).tobytes() == layer(x).tobytes()
    with pytest.raises(ValueError, match="bias=False"):
        cbn.FrozenBatchNorm(dict(state, bias=np.zeros(3)), bias=False)


# ---------------------------------------------------------------------------
# bfloat16: computed in float32, returned as bfloat16 where ml_dtypes is
# installed (float32 otherwise); every other dtype comes back as itself

@needs_torch
def test_a_bfloat16_tensor_comes_back_as_bfloat16_or_float32(rng, monkeypatch):
    x = torch.from_numpy(make_input(rng, (8, 3), 1, np.float32)).bfloat16()
    exact = x.float().numpy()
    layer = cbn.BatchNorm1d(3)
    y = layer(x)
    expected = cbn.BatchNorm1d(3)(exact)
    if ml_dtypes is not None:
        assert y.dtype == np.dtype(ml_dtypes.bfloat16)
    else:
        assert y.dtype == np.float32
    assert y.astype(np.float32).tobytes() == expected.astype(y.dtype).astype(
        np.float32).tobytes()
    monkeypatch.setattr(_convert, "_bfloat16", lambda: None)   # without ml_dtypes
    assert cbn.BatchNorm1d(3)(x).dtype == np.float32


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_bfloat16_arrays_keep_their_dtype_everywhere(rng):
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = make_input(rng, (6, 3, 4), 1, np.float32).astype(bf16)
    exact = x.astype(np.float32)
    mean, var = cbn.batch_stats(x)
    assert mean.dtype == var.dtype == bf16
    y = cbn.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    assert y.dtype == bf16
    assert y.astype(np.float32).tobytes() == cbn.batch_norm(
        exact, np.zeros(3), np.ones(3), training=True).astype(bf16).astype(
        np.float32).tobytes()
    out = np.empty_like(x)
    assert cbn.batch_norm(x, np.zeros(3), np.ones(3), out=out) is out
    y, save_mean, save_invstd = cbn.batch_norm_forward(x)
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(x, x, save_mean, save_invstd)
    assert dx.dtype == grad_weight.dtype == grad_bias.dtype == bf16
    frozen = cbn.BatchNorm1d(3).eval().freeze()
    assert frozen(x).dtype == bf16


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4", ">f8"])
def test_every_other_input_dtype_comes_back_as_itself(rng, dtype):
    x = make_input(rng, (6, 3), 1, np.float64).astype(dtype)
    expected = np.dtype(dtype).newbyteorder("=")
    for y in (cbn.BatchNorm1d(3)(x), cbn.batch_norm(x, np.zeros(3), np.ones(3)),
              *cbn.batch_stats(x), *cbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3))):
        assert y.dtype == expected


# ---------------------------------------------------------------------------
# to_torch, the inverse of from_torch

@needs_torch
@pytest.mark.parametrize("name, kwargs", [
    ("BatchNorm1d", {}),
    ("BatchNorm2d", {"momentum": None}),
    ("BatchNorm3d", {"affine": False}),
    ("BatchNorm2d", {"bias": False}),
    ("BatchNorm1d", {"track_running_stats": False}),
    ("BatchNorm2d", {"eps": 1e-3, "dtype": torch.float64}),
])
def test_torch_to_cbn_to_torch_gives_identical_state_dicts(rng, name, kwargs):
    module = getattr(torch.nn, name)(4, **kwargs)
    shape = {"BatchNorm1d": (6, 4), "BatchNorm2d": (3, 4, 2, 2),
             "BatchNorm3d": (2, 4, 2, 2, 2)}[name]
    dtype = module.weight.dtype if module.affine else torch.float32
    if "dtype" in kwargs:
        dtype = kwargs["dtype"]
    with torch.no_grad():
        for _ in range(2):
            module(torch.from_numpy(make_input(rng, shape, 1, np.float64)).to(dtype))
        if module.affine:
            module.weight.uniform_(0.5, 2)
    module.eval()
    back = cbn.BatchNorm.from_torch(module).to_torch()
    assert type(back) is type(module)
    assert repr(back) == repr(module)
    assert back.training is module.training is False
    assert back.track_running_stats == module.track_running_stats
    assert (back.eps, back.momentum, back.affine) == (module.eps, module.momentum,
                                                     module.affine)
    mine, theirs = back.state_dict(), module.state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype, key
        assert torch.equal(mine[key], theirs[key]), key


@needs_torch
def test_to_torch_refuses_what_has_no_counterpart():
    with pytest.raises(ValueError, match="BatchNorm1d, BatchNorm2d or BatchNorm3d"):
        cbn.BatchNorm(3).to_torch()
    with pytest.raises(ValueError, match="activation='relu'"):
        cbn.BatchNorm2d(3, activation="relu").to_torch()


@needs_torch
def test_a_torch_module_loads_what_to_torch_made(rng):
    layer = cbn.BatchNorm2d(3)
    layer(make_input(rng, (4, 3, 2, 2), 1, np.float32))
    module = torch.nn.BatchNorm2d(3)
    module.load_state_dict(layer.to_torch().state_dict())
    assert torch.equal(module.running_var, torch.from_numpy(layer.running_var))


# ---------------------------------------------------------------------------
# Found untested by the mutation run

@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_catches_a_variance_that_overflows_on_finite_data(mode):
    """Finite data whose variance is inf (1e200 squared): the variance half of
    the finiteness check, not only the mean's."""
    layer = cbn.BatchNorm1d(2, nonfinite=mode, dtype=np.float64)
    x = np.array([[1e200, 1.0], [-1e200, 3.0]])
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"1 channel\(s\) \[0\]"):
            layer(x)
        assert layer.num_batches_tracked == 0
        assert layer.running_var.tolist() == [1.0, 1.0]
    else:
        layer(x)
        assert layer.running_mean[0] == 0.0 and layer.running_var[0] == 1.0
        assert layer.running_mean[1] == pytest.approx(0.2)
        assert layer.num_batches_tracked == 1


def test_state_dict_dtype_is_float64_only_when_every_array_is():
    mixed = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
             "running_var": np.ones(3, np.float32)}
    assert cbn.BatchNorm.from_state_dict(mixed).dtype == np.float32
    assert cbn.FrozenBatchNorm(mixed).dtype == np.float32
    wide = {key: value.astype(np.float64) for key, value in mixed.items()}
    assert cbn.BatchNorm.from_state_dict(wide).dtype == np.float64
    assert cbn.FrozenBatchNorm(wide).dtype == np.float64


def test_a_layer_pickled_before_nonfinite_and_bias_existed_loads(rng):
    layer = cbn.BatchNorm(3)
    state = layer.__getstate__()
    del state["_nonfinite"], state["_bias_enabled"]
    old = cbn.BatchNorm.__new__(cbn.BatchNorm)
    old.__setstate__(state)
    assert old.nonfinite == "propagate" and old.bias is not None
    assert "bias" not in repr(old)
    x = make_input(rng, (6, 3), 1, np.float32)
    np.testing.assert_array_equal(old(x), layer(x))


def test_a_layer_pickled_with_plain_num_features_and_axis_loads(rng):
    """Older pickles hold the channel count and axis as plain attributes."""
    layer = cbn.BatchNorm(3, axis=-1)
    state = layer.__getstate__()
    state["num_features"], state["axis"] = state.pop("_num_features"), state.pop("_axis")
    old = cbn.BatchNorm.__new__(cbn.BatchNorm)
    old.__setstate__(state)
    assert (old.num_features, old.axis) == (3, -1)
    x = make_input(rng, (6, 3), 1, np.float32)
    np.testing.assert_array_equal(old(x), layer(x))


@pytest.mark.parametrize("make", [lambda: cbn.BatchNorm(3),
                                  lambda: cbn.BatchNorm(3).eval().freeze()])
def test_channel_count_and_axis_are_read_only(make):
    layer = make()
    with pytest.raises(AttributeError):
        layer.num_features = 4
    with pytest.raises(AttributeError):
        layer.axis = 0
    assert (layer.num_features, layer.axis) == (3, 1)


@needs_torch
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_an_empty_batch_counts_as_in_torch(rng, momentum):
    module = torch.nn.BatchNorm1d(3, momentum=momentum)
    layer = cbn.BatchNorm1d.from_torch(module)
    batches = [np.empty((0, 3), np.float32), make_input(rng, (8, 3), 1, np.float32),
               np.empty((0, 3), np.float32), make_input(rng, (5, 3), 1, np.float32)]
    for x in batches:
        module(torch.from_numpy(x))
        layer(x)
        assert layer.num_batches_tracked == int(module.num_batches_tracked)
        assert_close(layer.running_mean, module.running_mean.numpy(), kind="stats",
                     dtype=np.float32)
        assert_close(layer.running_var, module.running_var.numpy(), kind="stats",
                     dtype=np.float32)
