"""Gradients against float64 central finite differences.

For a fixed random g, the scalar loss L = sum(y * g) is differentiated
numerically with respect to every element of x, weight and bias, and compared
with the analytic gradients from ``cbn.batch_norm_backward`` (after
``batch_norm_forward`` or an inference-mode ``batch_norm``) and from the
layer's ``backward``, whose upstream gradient is g.
"""
import numpy as np
import pytest

import cbn

from corpus import SMALL_LAYOUTS, assert_close, per_channel

STEP = 1e-6

LAYOUTS = SMALL_LAYOUTS


def numerical_gradient(loss, array):
    """Central differences of the scalar ``loss()`` w.r.t. each element of
    ``array``, perturbed in place and restored."""
    grad = np.empty(array.shape)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    assert np.shares_memory(flat, array)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + STEP
        plus = loss()
        flat[i] = original - STEP
        minus = loss()
        flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * STEP)
    return grad


def assert_gradient(analytic, numeric, name):
    assert analytic is not None, name
    assert_close(analytic, numeric, kind="finite-difference", dtype=np.float64, err_msg=name)


def make_case(rng, shape, axis):
    """x with distinct per-channel means and spreads, weight, bias and g, float64."""
    num_channels = shape[axis]
    ndim = len(shape)
    x = (per_channel(rng.uniform(-2, 2, num_channels), ndim, axis)
         + per_channel(rng.uniform(0.5, 2, num_channels), ndim, axis) * rng.standard_normal(shape))
    weight = rng.uniform(0.5, 2, num_channels)
    bias = rng.uniform(-1, 1, num_channels)
    g = rng.standard_normal(shape)
    return x, weight, bias, g


# ---------------------------------------------------------------------------
# Functions

@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_training_gradients_of_functions(rng, shape, axis, affine, eps):
    x, weight, bias, g = make_case(rng, shape, axis)
    if not affine:
        # grad_weight / grad_bias are those of an implicit weight 1 and bias 0
        weight, bias = np.ones_like(weight), np.zeros_like(bias)

    def loss():
        if affine:
            y = cbn.batch_norm_forward(x, weight, bias, eps, axis=axis)[0]
        else:
            y = cbn.batch_norm_forward(x, eps=eps, axis=axis)[0]
        return float(np.sum(y * g))

    if affine:
        y, mean, invstd = cbn.batch_norm_forward(x, weight, bias, eps, axis=axis)
        dx, grad_weight, grad_bias = cbn.batch_norm_backward(g, x, mean, invstd, weight,
                                                             axis=axis, training=True)
    else:
        y, mean, invstd = cbn.batch_norm_forward(x, eps=eps, axis=axis)
        dx, grad_weight, grad_bias = cbn.batch_norm_backward(g, x, mean, invstd,
                                                             axis=axis, training=True)
    assert dx.dtype == np.float64 and dx.shape == shape
    assert_gradient(dx, numerical_gradient(loss, x), "dx")
    # perturbing weight / bias through an explicit argument, which for the
    # plain case starts at the implicit 1 and 0
    affine_loss = lambda: float(np.sum(
        cbn.batch_norm_forward(x, weight, bias, eps, axis=axis)[0] * g))
    assert_gradient(grad_weight, numerical_gradient(affine_loss, weight), "grad_weight")
    assert_gradient(grad_bias, numerical_gradient(affine_loss, bias), "grad_bias")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_inference_gradients_of_functions(rng, shape, axis, affine):
    x, weight, bias, g = make_case(rng, shape, axis)
    num_channels, eps = shape[axis], 1e-3
    running_mean = rng.uniform(-1, 1, num_channels)
    running_var = rng.uniform(0.5, 2, num_channels)
    if not affine:
        weight, bias = np.ones_like(weight), np.zeros_like(bias)

    def loss(use_weight=affine):
        w, b = (weight, bias) if use_weight else (None, None)
        y = cbn.batch_norm(x, running_mean, running_var, w, b, training=False, eps=eps, axis=axis)
        return float(np.sum(y * g))

    invstd = 1.0 / np.sqrt(running_var + eps)
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(
        g, x, running_mean, invstd, weight if affine else None, axis=axis, training=False)
    assert_gradient(dx, numerical_gradient(loss, x), "dx")
    assert_gradient(grad_weight, numerical_gradient(lambda: loss(True), weight), "grad_weight")
    assert_gradient(grad_bias, numerical_gradient(lambda: loss(True), bias), "grad_bias")


# ---------------------------------------------------------------------------
# Layer

LAYER_MODES = [
    pytest.param(True, True, id="train"),
    pytest.param(False, True, id="eval"),
    pytest.param(False, False, id="eval-untracked"),  # eval with batch statistics
]


@pytest.mark.parametrize("training, track", LAYER_MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_layer_gradients(rng, shape, axis, affine, training, track):
    x, weight, bias, g = make_case(rng, shape, axis)
    num_channels = shape[axis]
    layer = cbn.BatchNorm(num_channels, eps=1e-3, affine=affine, track_running_stats=track,
                          axis=axis, dtype=np.float64)
    if affine:
        layer.weight[...] = weight
        layer.bias[...] = bias
    if track:
        layer.running_mean[...] = rng.uniform(-1, 1, num_channels)
        layer.running_var[...] = rng.uniform(0.5, 2, num_channels)
    layer.train(training)

    layer(x)
    dx = layer.backward(g)
    grad_weight, grad_bias = layer.grad_weight, layer.grad_bias

    def loss():
        return float(np.sum(layer(x) * g))

    assert dx.dtype == np.float64 and dx.shape == shape
    assert_gradient(dx, numerical_gradient(loss, x), "dx")
    if affine:
        assert grad_weight.dtype == np.float64 and grad_bias.dtype == np.float64
        assert_gradient(grad_weight, numerical_gradient(loss, layer.weight), "grad_weight")
        assert_gradient(grad_bias, numerical_gradient(loss, layer.bias), "grad_bias")
    else:
        assert grad_weight is None and grad_bias is None
