"""cbn's calls as the benchmark times them.

The default calls allocate their output, as NumPy and PyTorch do; with
``out=`` a preallocated array is written, which is what the copy-limit ratio
measures. Training forwards keep running statistics (updated in place, as a
training step does); the backward takes the statistics of cbn's own forward.
"""
from collections import namedtuple

import cbn

# (C,) arrays of the data's dtype shared by all implementations; each keeps
# its own copies of the running statistics, which training updates.
Params = namedtuple("Params", "weight bias running_mean running_var")


def call(op, x, dy, params, axis, out=None, activation=None):
    """cbn's call for ``op`` ("train forward", "inference" or "backward");
    ``activation="relu"`` fuses a ReLU into inference."""
    weight, bias = params.weight, params.bias
    if op == "train forward":
        running_mean, running_var = params.running_mean.copy(), params.running_var.copy()
        return lambda: cbn.batch_norm(x, running_mean, running_var, weight, bias,
                                      training=True, axis=axis, out=out)
    if op == "inference":
        return lambda: cbn.batch_norm(x, params.running_mean, params.running_var,
                                      weight, bias, axis=axis, out=out,
                                      activation=activation)
    _, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    return lambda: cbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight,
                                           axis=axis, out=out)


def layer_call(op, x, dy, params):
    """The BatchNorm layer's call for ``op``: a call in training or eval mode,
    or its backward after a training forward. Channels on axis 1."""
    layer = cbn.BatchNorm(x.shape[1], dtype=x.dtype).train(op != "inference")
    layer.weight[...] = params.weight
    layer.bias[...] = params.bias
    layer.running_mean[...] = params.running_mean
    layer.running_var[...] = params.running_var
    if op == "backward":
        layer(x)
        return lambda: layer.backward(dy)
    return lambda: layer(x)
