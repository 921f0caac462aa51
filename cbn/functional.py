"""Functional batch normalization: the public functions and the shared steps the
layer is built from.

Public functions validate, canonicalize to an (outer, C, inner) view and
allocate; the private ``_``-prefixed steps take validated views and float64
per-channel vectors and call the kernels.

Each public function first offers its arguments to a compiled fast entry
point (cbn/_entry.pxi), which handles the plain case (C-contiguous float32 or
float64 NumPy arrays, Python numbers) with all checks in C, and returns None
for anything else; the Python path below then converts and validates. Both
give the same bits.

Per-channel statistics that are handed between calls (``save_mean``,
``save_invstd``) are float64 whatever the data's dtype: a float32 mean would
already lose the accuracy the kernels keep at large means.
"""
import numpy as np

from . import _checks
from ._dispatch import kernels
from ._layout import (Output, as_array, channel_view, check_stats_out, like_view,
                      same_buffer)
from ._threads import threads_for

__all__ = ["batch_norm", "batch_stats", "batch_norm_forward", "batch_norm_backward"]


# ---------------------------------------------------------------------------
# Shared steps on validated views

def _stats(view):
    """(mean, biased var) in float64; NaN for channels with no values."""
    num_channels = view.num_channels
    mean = np.empty(num_channels)
    var = np.empty(num_channels)
    if view.values_per_channel == 0:
        mean.fill(np.nan)
        var.fill(np.nan)
    elif num_channels:
        kernels.batch_stats(view.data, mean, var, threads_for(view.size))
    return mean, var


def _check_training_size(view):
    # PyTorch's rule: one value per channel has no variance to normalize by.
    if view.values_per_channel == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {view.shape}"
        )


def _or_filled(vector, num_channels, fill):
    """A per-channel vector, or ``fill`` everywhere for None (weight 1, bias 0)."""
    return np.full(num_channels, fill) if vector is None else vector


def _train_forward(view, weight, bias, eps, output, relu=False):
    """Normalize with batch statistics (then ReLU when ``relu``); returns
    (y, mean, var, invstd), the statistics in float64."""
    num_channels = view.num_channels
    mean, var, invstd = (np.empty(num_channels) for _ in range(3))
    if view.size:
        kernels.forward(view.data, _or_filled(weight, num_channels, 1.0),
                        _or_filled(bias, num_channels, 0.0), eps, True, mean, var,
                        invstd, output.kernel_out, relu, threads_for(view.size))
    else:  # an empty batch: no statistics
        mean.fill(np.nan)
        var.fill(np.nan)
        invstd.fill(np.nan)
    return output.finish(), mean, var, invstd


def _eval_forward(view, running_mean, running_var, weight, bias, eps, output,
                  relu=False):
    """Normalize with given (running) statistics, all float64 vectors (then
    ReLU when ``relu``). Returns (y, invstd)."""
    num_channels = view.num_channels
    invstd = np.empty(num_channels)
    if view.size:
        kernels.forward(view.data, _or_filled(weight, num_channels, 1.0),
                        _or_filled(bias, num_channels, 0.0), eps, False,
                        np.array(running_mean), np.array(running_var), invstd,
                        output.kernel_out, relu, threads_for(view.size))
    else:
        invstd[...] = 1.0 / np.sqrt(running_var + eps)
    return output.finish(), invstd


def _normalize(view, params, relu, output):
    """Inference with ready parameters (a kernels.ChannelParams); returns y."""
    if view.size:
        kernels.normalize(view.data, params, relu, output.kernel_out,
                          threads_for(view.size))
    return output.finish()


def _scale_shift(params, dtype):
    """The eval computation of ``params`` as ``x * scale + shift``, in ``dtype``:
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale."""
    shift = params.bias - params.mean * params.scale
    return params.scale.astype(dtype), shift.astype(dtype)


def _relu_grad(dy, y, out=None):
    """The gradient through a fused ReLU: 0 where it clipped the output
    (``y <= 0``), ``dy`` elsewhere, NaN outputs included, as PyTorch's
    threshold_backward; in dy's dtype."""
    dy = as_array(dy, "dy")
    if dy.shape != y.shape:
        raise ValueError(
            f"dy has shape {dy.shape}, expected the output's shape {y.shape}"
        )
    # The masked copy is what the backward reads, so check out against the
    # caller's dy here: out may be dy itself, not a shifted window of it.
    if (isinstance(out, np.ndarray) and np.may_share_memory(out, dy)
            and not same_buffer(out, dy)):
        raise ValueError(
            "out partially overlaps dy; pass dy itself for an in-place call, or a "
            "separate array"
        )
    return np.where(y <= 0, dy.dtype.type(0), dy)


def _update_running(running_mean, running_var, mean, var, n, factor, keep=None):
    """PyTorch's update: running = (1 - factor) * running + factor * batch, with
    the unbiased variance. Computed in float64, stored in the buffers' dtype.

    NaN and inf are meant to propagate here, so NumPy's floating-point error
    settings (e.g. ``np.errstate(invalid="raise")``) must not interrupt the
    update half-way; both new values exist before either buffer is written.
    ``keep``: a boolean mask of channels whose running values stay as they are.
    """
    with np.errstate(all="ignore"):
        new_mean = (1.0 - factor) * running_mean.astype(np.float64) + factor * mean
        new_var = ((1.0 - factor) * running_var.astype(np.float64)
                   + factor * (var * (n / (n - 1))))
    if keep is not None:
        new_mean = np.where(keep, running_mean, new_mean)
        new_var = np.where(keep, running_var, new_var)
    running_mean[...] = new_mean
    running_var[...] = new_var


def _backward(dy, view, mean, invstd, weight, training, output):
    """Input gradient into ``output``; returns (dx, grad_weight, grad_bias) float64.

    training: the forward normalized with batch statistics, so mean and invstd
    depend on x; otherwise they were constants (running statistics).
    """
    num_channels = view.num_channels
    if view.size == 0:  # an empty batch: nothing flows back (stats are NaN)
        return output.finish(), np.zeros(num_channels), np.zeros(num_channels)
    sum_dy = np.empty(num_channels)
    dotp = np.empty(num_channels)
    kernels.backward(dy, view.data, mean, invstd, _or_filled(weight, num_channels, 1.0),
                     training, sum_dy, dotp, output.kernel_out, threads_for(view.size))
    return output.finish(), dotp * invstd, sum_dy


def _check_not_over_input(out, x):
    """A training forward may not write over its input: backward needs it."""
    if kernels.shares_memory(out, x):
        raise ValueError(
            "out overlaps the input: a training forward cannot write its output "
            "over its input, since backward needs the input; pass a separate out "
            "array"
        )


def _optional_vector(value, num_channels, name):
    if value is None:
        return None
    return _checks.channel_vector(value, num_channels, name)


# ---------------------------------------------------------------------------
# Public functions

def batch_stats(x, *, axis=1, out=None):
    """Per-channel mean and biased variance of ``x`` over every axis but ``axis``.

    Accumulated in float64 with a two-pass-per-block scheme, accurate even when
    |mean| is huge relative to the spread. Returned in ``x``'s dtype; NaN for
    channels with no values (an empty batch). ``out``: a pair of (C,) arrays
    of that dtype to write and return instead.
    """
    view = channel_view(x, axis)
    if out is not None:
        out = check_stats_out(out, view)
    mean, var = _stats(view)
    if out is None:
        return mean.astype(view.dtype), var.astype(view.dtype)
    out[0][...] = mean
    out[1][...] = var
    return out


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, activation=None):
    """Batch normalization with the meaning of ``torch.nn.functional.batch_norm``.

    training=False: normalize with ``running_mean`` / ``running_var`` (required).
    training=True: normalize with the batch statistics and, when running
    statistics are given (NumPy arrays, both or neither), update them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    batch variance. ``axis`` is the channel axis; ``out`` an optional
    C-contiguous array of ``x``'s shape and dtype (``out=x`` works in place in
    eval mode; a training forward raises ValueError for it, since a backward
    would need the input).
    ``activation="relu"`` applies max(y, 0) in the same pass over memory.
    Returns ``y`` in ``x``'s dtype.
    """
    relu = _checks.activation(activation)
    if training is True and out is not None:
        _check_not_over_input(out, x)
    y = kernels.fast_batch_norm(x, running_mean, running_var, weight, bias, training,
                                momentum, eps, axis, out, relu)
    if y is not None:
        return y
    view = channel_view(x, axis)
    num_channels = view.num_channels
    eps = _checks.eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together (or both None), "
            f"got running_mean={'None' if running_mean is None else 'an array'} and "
            f"running_var={'None' if running_var is None else 'an array'}"
        )
    has_running = running_mean is not None
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if training and out is not None:
        _check_not_over_input(out, x)
    if training and has_running:
        momentum = _checks.momentum(momentum, allow_none=False)
    elif momentum is not None:
        momentum = _checks.momentum(momentum)
    weight = _optional_vector(weight, num_channels, "weight")
    bias = _optional_vector(bias, num_channels, "bias")

    if not training:
        if not has_running:
            raise ValueError(
                "running_mean and running_var are required when training=False"
            )
        mean = _checks.channel_vector(running_mean, num_channels, "running_mean")
        var = _checks.channel_vector(running_var, num_channels, "running_var")
        return _eval_forward(view, mean, var, weight, bias, eps, Output(view, out),
                             relu)[0]

    if has_running:
        running_mean = _checks.running_buffer(running_mean, num_channels, "running_mean")
        running_var = _checks.running_buffer(running_var, num_channels, "running_var")
    _check_training_size(view)
    # The buffers are written after y: out must not overlap them either.
    output = Output(view, out, other_inputs=(running_mean, running_var) if has_running else ())
    y, mean, var, _ = _train_forward(view, weight, bias, eps, output, relu)
    if has_running and view.size:
        _update_running(running_mean, running_var, mean, var,
                        view.values_per_channel, momentum)
    return y


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Training-mode forward that returns what the backward pass needs.

    Returns ``(y, save_mean, save_invstd)``: ``y`` in ``x``'s dtype, and the batch
    mean and ``1 / sqrt(var + eps)`` per channel as float64 arrays. Pass them
    to :func:`batch_norm_backward` with the same ``x``. No running statistics
    are involved; keep them with :func:`batch_norm` or a :class:`BatchNorm` layer.
    """
    if out is not None:
        _check_not_over_input(out, x)
    result = kernels.fast_batch_norm_forward(x, weight, bias, eps, axis, out)
    if result is not None:
        return result
    view = channel_view(x, axis)
    eps = _checks.eps(eps)
    weight = _optional_vector(weight, view.num_channels, "weight")
    bias = _optional_vector(bias, view.num_channels, "bias")
    _check_training_size(view)
    y, mean, _, invstd = _train_forward(view, weight, bias, eps, Output(view, out))
    return y, mean, invstd


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, axis=1,
                        training=True, out=None):
    """Gradients of batch normalization.

    ``dy`` is the gradient of the output, ``x`` the forward's input, and
    ``save_mean`` / ``save_invstd`` the per-channel statistics the forward
    normalized with: those returned by :func:`batch_norm_forward` when
    ``training=True``, or the running mean and ``1 / sqrt(running_var + eps)``
    for an inference-mode forward (``training=False``, where the statistics are
    constants). Returns ``(dx, grad_weight, grad_bias)`` in ``x``'s dtype;
    ``grad_weight`` and ``grad_bias`` are computed whether or not ``weight`` is
    given (the gradients of an implicit weight 1 and bias 0).
    """
    result = kernels.fast_backward(dy, x, axis, save_mean, save_invstd, weight,
                                   training, out, None)
    if result is not None:
        return result
    view = channel_view(x, axis, name="x")
    dy_data = like_view(dy, view, "dy")
    num_channels = view.num_channels
    mean = _checks.channel_vector(save_mean, num_channels, "save_mean")
    invstd = _checks.channel_vector(save_invstd, num_channels, "save_invstd")
    weight = _optional_vector(weight, num_channels, "weight")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    dx, grad_weight, grad_bias = _backward(dy_data, view, mean, invstd, weight,
                                           bool(training),
                                           Output(view, out, other_inputs=(dy_data,)))
    return dx, grad_weight.astype(view.dtype), grad_bias.astype(view.dtype)
