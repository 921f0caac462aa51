"""The NumPy baseline: batch normalization as anyone would write it in NumPy.

Plain vectorized NumPy in the input's dtype, one whole-array expression per
step of the textbook formulas, no blocking and no ``out=`` tricks. This is
what cbn replaces, so it is the benchmark's baseline; ``cbn.reference``
computes in float64 for accuracy and is the test oracle instead.
"""
import numpy as np


def _axes(x, axis):
    """(reduction axes, shape a (C,) vector broadcasts from along ``axis``)."""
    axis %= x.ndim
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    return reduce, tuple(shape)


def _channel(vector, x, shape):
    # In x's dtype: a float64 vector would promote a float32 formula to float64.
    return np.asarray(vector, dtype=x.dtype).reshape(shape)


def train_forward(x, running_mean, running_var, weight, bias, *, axis=1,
                  momentum=0.1, eps=1e-5):
    """y with batch statistics; updates the running statistics in place.

    The running statistics are (C,) arrays of x's dtype (the update is tiny).
    """
    reduce, shape = _axes(x, axis)
    mean = x.mean(axis=reduce)
    var = x.var(axis=reduce)
    n = x.size // x.shape[axis]
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * var * (n / (n - 1))
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
            * _channel(weight, x, shape) + _channel(bias, x, shape))


def inference(x, running_mean, running_var, weight, bias, *, axis=1, eps=1e-5):
    """y with the running statistics."""
    _, shape = _axes(x, axis)
    mean = _channel(running_mean, x, shape)
    var = _channel(running_var, x, shape)
    return ((x - mean) / np.sqrt(var + eps)
            * _channel(weight, x, shape) + _channel(bias, x, shape))


def backward(dy, x, save_mean, save_invstd, weight, *, axis=1):
    """(dx, grad_weight, grad_bias) of a training-mode forward."""
    reduce, shape = _axes(x, axis)
    n = x.size // x.shape[axis]
    mean = _channel(save_mean, x, shape)
    invstd = _channel(save_invstd, x, shape)
    x_hat = (x - mean) * invstd
    grad_bias = dy.sum(axis=reduce)
    grad_weight = (dy * x_hat).sum(axis=reduce)
    dx = (_channel(weight, x, shape) * invstd / n
          * (n * dy - grad_bias.reshape(shape) - x_hat * grad_weight.reshape(shape)))
    return dx, grad_weight, grad_bias


def save_stats(x, *, axis=1, eps=1e-5):
    """(mean, 1 / sqrt(var + eps)) per channel, what a forward saves for backward."""
    reduce, _ = _axes(x, axis)
    return x.mean(axis=reduce), 1 / np.sqrt(x.var(axis=reduce) + eps)


def call(op, x, dy, params, axis):
    """The formula's call for ``op``; ``params`` as in ``cbn_calls.Params``."""
    if op == "train forward":
        running_mean, running_var = params.running_mean.copy(), params.running_var.copy()
        return lambda: train_forward(x, running_mean, running_var, params.weight,
                                     params.bias, axis=axis)
    if op == "inference":
        return lambda: inference(x, params.running_mean, params.running_var,
                                 params.weight, params.bias, axis=axis)
    save_mean, save_invstd = save_stats(x, axis=axis)
    return lambda: backward(dy, x, save_mean, save_invstd, params.weight, axis=axis)
