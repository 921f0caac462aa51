"""Plain-NumPy twins of cbn's functions, computed in float64.

Each function has the name and signature of its compiled counterpart in
``cbn.functional`` and follows the textbook formulas directly, with no
blocking or threads. They are the oracle of the test suite and the NumPy
baseline of the benchmark. Results are float64 whatever the input dtype.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["batch_stats", "batch_norm", "batch_norm_forward", "batch_norm_backward"]


def _reduce_axes(ndim: int, axis: int) -> tuple[int, tuple[int, ...]]:
    axis = axis % ndim
    return axis, tuple(i for i in range(ndim) if i != axis)


def _per_channel(vector: ArrayLike, ndim: int, axis: int) -> NDArray[np.float64]:
    """Reshape a (C,) vector to broadcast along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, dtype=np.float64).reshape(shape)


def batch_stats(x: ArrayLike, *, axis: int = 1
                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel mean and biased variance, two-pass in float64.

    Parameters
    ----------
    x : array_like
        Data of at least 2 dimensions.
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    mean, var : ndarray of float64, shape (C,)
        Over every axis but ``axis``.
    """
    x = np.asarray(x, dtype=np.float64)
    _, axes = _reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes)
    return mean.reshape(-1), var


def batch_norm_forward(x: ArrayLike, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, eps: float = 1e-5, *, axis: int = 1,
                       out: NDArray[Any] | None = None
                       ) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                  NDArray[np.float64]]:
    """Training-mode forward, in float64.

    Parameters
    ----------
    x : array_like
        Input with channels on ``axis``.
    weight, bias : array_like of shape (C,), optional
        Scale and shift after normalizing.
    eps : float
        Added to the variance before the square root.
    axis : int, keyword-only
        The channel axis.
    out : ndarray, keyword-only, optional
        Ignored: present so that the signature is the compiled function's.

    Returns
    -------
    y : ndarray of float64
        Of ``x``'s shape.
    mean, invstd : ndarray of float64, shape (C,)
        The batch mean and ``1 / sqrt(var + eps)``.
    """
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


def batch_norm(x: ArrayLike, running_mean: NDArray[Any] | None,
               running_var: NDArray[Any] | None, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: int = 1,
               out: NDArray[Any] | None = None) -> NDArray[np.float64]:
    """Batch normalization in float64; in training, updates the running
    statistics in place (unbiased variance).

    Parameters
    ----------
    x : array_like
        Input with channels on ``axis``.
    running_mean, running_var : ndarray of shape (C,), or None
        Required when ``training=False``; updated in place in training.
    weight, bias : array_like of shape (C,), optional
        Scale and shift after normalizing.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum : float
        The new batch's weight in the running update.
    eps : float
        Added to the variance before the square root.
    axis : int, keyword-only
        The channel axis.
    out : ndarray, keyword-only, optional
        Ignored: present so that the signature is the compiled function's.

    Returns
    -------
    ndarray of float64
        ``y``, of ``x``'s shape.

    Raises
    ------
    ValueError
        ``training=False`` without running statistics.
    """
    x = np.asarray(x, dtype=np.float64)
    axis, _ = _reduce_axes(x.ndim, axis)
    if training:
        y, mean, _ = batch_norm_forward(x, weight, bias, eps, axis=axis)
        if running_mean is not None and running_var is not None and x.size:
            n = x.size // x.shape[axis]
            _, var = batch_stats(x, axis=axis)
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean
            running_var[...] = (1 - momentum) * running_var + momentum * var * n / (n - 1)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    mean = _per_channel(running_mean, x.ndim, axis)
    invstd = 1.0 / np.sqrt(_per_channel(running_var, x.ndim, axis) + eps)
    y = (x - mean) * invstd
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, axis)
    return y


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None, *,
                        axis: int = 1, training: bool = True,
                        out: NDArray[Any] | None = None
                        ) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                   NDArray[np.float64]]:
    """Gradients of batch normalization in float64, from the textbook
    formulas.

    Parameters
    ----------
    dy : array_like
        The gradient of the output.
    x : array_like
        The forward's input.
    save_mean, save_invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    weight : array_like of shape (C,), optional
        The forward's weight.
    axis : int, keyword-only
        The channel axis.
    training : bool, keyword-only
        Whether the statistics depended on ``x``.
    out : ndarray, keyword-only, optional
        Ignored: present so that the signature is the compiled function's.

    Returns
    -------
    dx, grad_weight, grad_bias : ndarray of float64
        ``dx`` of ``x``'s shape, the others of shape (C,).
    """
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
