"""Plain-NumPy twins of cbn's functions, computed in float64.

Each function has the name and signature of its compiled counterpart in
``cbn.functional`` and follows the textbook formulas directly, with no
blocking or threads. They are the oracle of the test suite and the NumPy
baseline of the benchmark. Results are float64 whatever the input dtype.
"""
import numpy as np

__all__ = ["batch_stats", "batch_norm", "batch_norm_forward", "batch_norm_backward"]


def _reduce_axes(ndim, axis):
    axis = axis % ndim
    return axis, tuple(i for i in range(ndim) if i != axis)


def _per_channel(vector, ndim, axis):
    """Reshape a (C,) vector to broadcast along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, dtype=np.float64).reshape(shape)


def batch_stats(x, *, axis=1):
    """Per-channel mean and biased variance, two-pass in float64."""
    x = np.asarray(x, dtype=np.float64)
    _, axes = _reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes)
    return mean.reshape(-1), var


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Training-mode forward: (y, mean, invstd), all float64."""
    x = np.asarray(x, dtype=np.float64)
    axis, _ = _reduce_axes(x.ndim, axis)
    mean, var = batch_stats(x, axis=axis)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, axis)
    return y, mean, invstd


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """PyTorch's batch_norm in float64; updates the running stats in place."""
    x = np.asarray(x, dtype=np.float64)
    axis, _ = _reduce_axes(x.ndim, axis)
    if training:
        y, mean, _ = batch_norm_forward(x, weight, bias, eps, axis=axis)
        if running_mean is not None and x.size:
            n = x.size // x.shape[axis]
            _, var = batch_stats(x, axis=axis)
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean
            running_var[...] = (1 - momentum) * running_var + momentum * var * n / (n - 1)
        return y
    mean = _per_channel(running_mean, x.ndim, axis)
    invstd = 1.0 / np.sqrt(_per_channel(running_var, x.ndim, axis) + eps)
    y = (x - mean) * invstd
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, axis)
    return y


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, axis=1,
                        training=True, out=None):
    """(dx, grad_weight, grad_bias) in float64, from the textbook formulas."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axis, axes = _reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis] if x.shape[axis] else 0
    mean = _per_channel(save_mean, x.ndim, axis)
    invstd = _per_channel(save_invstd, x.ndim, axis)
    gamma = 1.0 if weight is None else _per_channel(weight, x.ndim, axis)
    centered = x - mean
    sum_dy = dy.sum(axis=axes)
    dotp = (centered * dy).sum(axis=axes)
    if training:
        dx = (dy - _per_channel(sum_dy, x.ndim, axis) / n
              - centered * _per_channel(dotp, x.ndim, axis) * invstd ** 2 / n
              ) * invstd * gamma
    else:
        dx = dy * invstd * gamma
    return dx, dotp * np.asarray(save_invstd, dtype=np.float64), sum_dy
