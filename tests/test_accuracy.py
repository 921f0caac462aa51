"""Accuracy at large means: cbn's error bound for float32 data with
|mean| / std up to 1e6, in every layout, against float64 two-pass results."""
import numpy as np
import pytest

import cbn
from cbn import reference

from corpus import LAYOUTS

RATIOS = [1e2, 1e4, 1e6, -1e6]


def shifted_input(rng, shape, ratio):
    std = 0.37
    return (ratio * std + std * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_batch_stats_within_1e6_relative(rng, shape, axis, ratio):
    x = shifted_input(rng, shape, ratio)
    mean, var = cbn.batch_stats(x, axis=axis)
    ref_mean, ref_var = reference.batch_stats(x, axis=axis)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=0)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_outputs_within_bound(rng, shape, axis, ratio):
    x = shifted_input(rng, shape, ratio)
    num_channels = shape[axis]
    weight = rng.uniform(0.5, 2, num_channels)
    bias = rng.uniform(-1, 1, num_channels)
    y, _, _ = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(x, weight, bias, axis=axis)
    assert np.all(np.abs(y - ref_y) <= 1e-5 * (1 + np.abs(ref_y)))

    # Inference with running statistics at the same large mean.
    ref_var = 1 / ref_invstd ** 2 - 1e-5
    y_eval = cbn.batch_norm(x, ref_mean, ref_var, weight, bias, axis=axis)
    ref_eval = reference.batch_norm(x, ref_mean, ref_var, weight, bias, axis=axis)
    assert np.all(np.abs(y_eval - ref_eval) <= 1e-5 * (1 + np.abs(ref_eval)))


@pytest.mark.parametrize("ratio", [1e4, 1e6])
@pytest.mark.parametrize("shape, axis", [((64, 8), 1), ((4, 3, 16, 16), 1),
                                         ((4, 9, 9, 5), -1)])
def test_input_gradient_at_large_means(rng, shape, axis, ratio):
    x = shifted_input(rng, shape, ratio)
    dy = rng.standard_normal(shape).astype(np.float32)
    _, mean, invstd = cbn.batch_norm_forward(x, axis=axis)
    dx, _, _ = cbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    _, ref_mean, ref_invstd = reference.batch_norm_forward(x, axis=axis)
    ref_dx, _, _ = reference.batch_norm_backward(dy, x, ref_mean, ref_invstd, axis=axis)
    scale = np.abs(ref_dx).max()
    assert np.all(np.abs(dx - ref_dx) <= 1e-5 * (scale + np.abs(ref_dx)))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_outputs_within_bound_when_the_scaled_term_and_the_shift_cancel(
        rng, shape, axis, activation):
    # Large weights and biases that cancel: y = 300 * (x_hat + 1) is near 0
    # where x_hat is near -1. The bound is relative to |y|, not to the bias.
    x = (0.37 * rng.standard_normal(shape) + 5).astype(np.float32)
    num_channels = shape[axis]
    weight = np.full(num_channels, 300.0)
    bias = np.full(num_channels, 300.0) + rng.uniform(-1, 1, num_channels)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(x, weight, bias, axis=axis)
    y, _, _ = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    assert np.all(np.abs(y - ref_y) <= 1e-5 * (1 + np.abs(ref_y)))
    ref_var = 1 / ref_invstd ** 2 - 1e-5
    y_eval = cbn.batch_norm(x, ref_mean, ref_var, weight, bias, axis=axis,
                            activation=activation)
    ref_eval = reference.batch_norm(x, ref_mean, ref_var, weight, bias, axis=axis)
    if activation == "relu":
        ref_eval = np.maximum(ref_eval, 0)
    assert np.all(np.abs(y_eval - ref_eval) <= 1e-5 * (1 + np.abs(ref_eval)))


@pytest.mark.parametrize("shape, axis", [((64, 8), 1), ((4, 3, 16, 16), 1)])
def test_a_zero_weight_gives_the_bias(rng, shape, axis):
    # No offset form exists for a zero scale: the shift is added after it.
    x = rng.standard_normal(shape).astype(np.float32)
    num_channels = shape[axis]
    bias = rng.uniform(-3, 3, num_channels)
    y = cbn.batch_norm(x, np.zeros(num_channels), np.ones(num_channels),
                       np.zeros(num_channels), bias, axis=axis)
    expected = np.broadcast_to(bias.reshape((1, -1) + (1,) * (x.ndim - 2)), x.shape)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
