"""The fused ReLU (``activation="relu"``): the argument and attribute, refused
values everywhere, the layer's and the functions' forward and backward,
NaN propagation, switching the activation between calls, and PyTorch as a
second oracle when it is installed.

Expected values are written out with float64 NumPy from the formulas, or come
from PyTorch; never from cbn.
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
    grads_oracle,
    layer_dtype_for,
    make_input,
    make_layer,
    moments,
    oracle,
)


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
        assert_close(y, expected, dtype=dtype)
        if training:
            assert_close(layer.running_mean, 0.9 * stats[0] + 0.1 * mean, kind="stats",
                         dtype=ldtype)
            assert_close(layer.running_var, 0.9 * stats[1] + 0.1 * var * n / (n - 1),
                         kind="stats", dtype=coarser(ldtype, dtype, kind="stats"))
        else:
            np.testing.assert_array_equal(layer.running_mean, stats[0].astype(ldtype))
        dx = layer.backward(dy)
        assert dx.shape == shape and dx.dtype == np.dtype(dtype)
        dx_ref, gw_ref, gb_ref = grads_oracle(x, dy, axis, mean,
                                              1 / np.sqrt(var + layer.eps), weight,
                                              training, mask=expected > 0)
        assert_close(dx, dx_ref, kind="grad", dtype=dtype)
        assert layer.grad_weight.dtype == layer.grad_bias.dtype == np.dtype(ldtype)
        # sums over many float16 values are exact only to float16's precision
        gtol = np.float16 if (dtype == np.float16 and x.size > 1000) else ldtype
        assert_close(layer.grad_weight, gw_ref, kind="grad", dtype=gtol)
        assert_close(layer.grad_bias, gb_ref, kind="grad", dtype=gtol)


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
        assert_close(y, oracle(x, axis, mean, var, weight, bias, 1e-5, relu=True), dtype=dtype)
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
            assert_close(np.take(y, good, axis=axis), expected, dtype=dtype, err_msg=form)
        else:
            np.testing.assert_array_equal(np.isnan(y), np.isnan(x), err_msg=form)
            assert_close(y, eval_oracle(layer, x, relu=True), dtype=dtype, err_msg=form)


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
    assert_close(dx_relu, dx_ref, kind="grad", dtype=np.float64)
    layer.activation = None
    np.testing.assert_allclose(layer(x), y_plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), dx_plain, rtol=1e-12, atol=1e-12)


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


# ---------------------------------------------------------------------------
# Against PyTorch (each test skips when torch is not installed)

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
            assert_close(y, yt.detach().numpy(), dtype=dtype, scale=1, err_msg=what)
            assert_close(dx, xt.grad.numpy(), kind="grad", dtype=dtype, scale=10, err_msg=what)
            assert_close(layer.running_mean, rm.numpy(), kind="stats", dtype=dtype, scale=1,
                         err_msg=what)
            assert_close(layer.running_var, rv.numpy(), kind="stats", dtype=dtype, scale=1,
                         err_msg=what)
            if affine:
                assert_close(layer.grad_weight, w.grad.numpy(), kind="grad", dtype=dtype,
                             scale=terms, err_msg=what)
                assert_close(layer.grad_bias, b.grad.numpy(), kind="grad", dtype=dtype,
                             scale=terms, err_msg=what)
            else:
                assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("shape, axis", SMALL_LAYOUTS)
def test_relu_functional_against_torch(rng, shape, axis):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c = shape[axis]
    for dtype in (np.float32, np.float64):
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
            assert_close(y, _from_torch_layout(yt, axis).numpy(), dtype=dtype, scale=1)
            for mine, torch_buffer in zip(ours, theirs):
                assert_close(mine, torch_buffer.numpy(), kind="stats", dtype=dtype, scale=1)


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
