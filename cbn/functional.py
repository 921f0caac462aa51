"""Functional batch normalization: the public functions without state.

Each function hands its arguments as they are to the executor (cbn/_core.pyx),
which converts what is not plain, checks every rule and runs the kernels; the
layers use the same executor. Arrays of other libraries (PyTorch CPU tensors,
JAX CPU arrays: anything with ``__dlpack__``) are read in place through
DLPack, and ``out=`` or running statistics given as tensors are written in
place; results are NumPy arrays. Per-channel statistics that are handed between
calls (``save_mean``, ``save_invstd``) are float64 whatever the data's dtype:
a float32 mean would already lose the accuracy the kernels keep at large means.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from . import _checks
from ._dispatch import kernels

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike, NDArray

__all__ = ["batch_norm", "batch_stats", "batch_norm_forward", "batch_norm_backward"]

_ANY_INPUT = kernels.Accepts()
_PROPAGATE = kernels.NONFINITE_MODES["propagate"]


def batch_stats(x: ArrayLike, *, axis: int = 1,
                out: tuple[NDArray[Any], NDArray[Any]] | None = None,
                mask: ArrayLike | None = None) -> tuple[NDArray[Any], NDArray[Any]]:
    """Per-channel mean and biased variance of ``x`` over every axis but ``axis``.

    Parameters
    ----------
    x : array_like
        Data of at least 2 dimensions, of a float dtype.
    axis : int, keyword-only
        The channel axis.
    out : pair of ndarray, keyword-only, optional
        Two (C,) arrays of ``x``'s dtype to write and return instead.
    mask : array_like of bool, keyword-only, optional
        Valid positions: a boolean array that broadcasts to ``x``'s shape
        with the channel axis removed ((N, L) or (N, 1) for (N, C, L) input,
        (N,) for (N, C)); True marks a valid position. Only valid positions count;
        none is an empty batch.

    Returns
    -------
    mean, var : ndarray of shape (C,)
        In ``x``'s dtype; NaN for channels with no values (an empty batch).

    Raises
    ------
    ValueError
        Fewer than 2 dimensions, ``axis`` out of range, a bad ``out`` or
        ``mask``.
    TypeError
        A dtype cbn does not take, or a non-boolean ``mask``.

    Notes
    -----
    Accumulated in float64 with a two-pass-per-block scheme, accurate even
    when |mean| is huge relative to the spread.

    Examples
    --------
    >>> mean, var = cbn.batch_stats(x)          # x of shape (N, C, H, W)
    """
    return kernels.stats(x, axis, out, mask)


def batch_norm(x: ArrayLike, running_mean: ArrayLike | None, running_var: ArrayLike | None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               axis: int = 1, out: NDArray[Any] | None = None,
               activation: Literal["relu"] | None = None,
               mask: ArrayLike | None = None) -> NDArray[Any]:
    """Batch normalization with the meaning of ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : array_like
        Input with channels on ``axis``, of a float dtype.
    running_mean, running_var : ndarray of shape (C,), or None
        Required when ``training=False``. With ``training=True``, both or
        neither; given, they are updated in place (writable float arrays or
        CPU tensors):
        ``running = (1 - momentum) * running + momentum * batch`` with the
        unbiased batch variance.
    weight, bias : array_like of shape (C,), optional
        Scale and shift after normalizing (1 and 0 when None).
    training : bool
        True: normalize with the batch statistics; False: with the running
        statistics.
    momentum : float
        In [0, 1]: the new batch's weight in the running update.
    eps : float
        Added to the variance before the square root (> 0).
    axis : int, keyword-only
        The channel axis.
    out : ndarray, keyword-only, optional
        A C-contiguous array of ``x``'s shape and dtype to write; ``out=x``
        works in place in eval mode, and raises ValueError in training
        (a backward would need the input).
    activation : None or "relu", keyword-only
        "relu" applies max(y, 0) in the same pass over memory.
    mask : array_like of bool, keyword-only, optional
        Valid positions: a boolean array that broadcasts to ``x``'s shape
        with the channel axis removed ((N, L) or (N, 1) for (N, C, L) input,
        (N,) for (N, C)); True marks a valid position. In training the batch
        statistics and the running update (its count too) use the valid
        positions only; the output is computed at every position. Checked
        but not used when ``training=False``.

    Returns
    -------
    ndarray
        ``y``, of ``x``'s shape and dtype.

    Raises
    ------
    ValueError
        Mismatched shapes, a missing running statistic, eps <= 0, momentum
        outside [0, 1], one value per channel in training, a bad ``out``.
    TypeError
        A dtype or kind cbn does not take.
    """
    relu = False if activation is None else _checks.activation(activation)
    if training is not True and training is not False:
        training = kernels.check_training_flag(training)
    if training:
        return kernels.train_forward(x, axis, _ANY_INPUT, weight, bias, eps, running_mean,
                                     running_var, momentum, None, relu, _PROPAGATE,
                                     out, False, 1, mask).output
    if mask is not None:  # not used, but held to the same rules
        kernels.check_mask(x, axis, mask)
    return kernels.eval_forward(x, axis, weight, bias, running_mean, running_var, eps,
                                momentum, relu, out)


def batch_norm_forward(x: ArrayLike, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, eps: float = 1e-5, *, axis: int = 1,
                       out: NDArray[Any] | None = None, mask: ArrayLike | None = None
                       ) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]:
    """Training-mode forward that returns what the backward pass needs.

    Parameters
    ----------
    x : array_like
        Input with channels on ``axis``, of a float dtype.
    weight, bias : array_like of shape (C,), optional
        Scale and shift after normalizing (1 and 0 when None).
    eps : float
        Added to the variance before the square root (> 0).
    axis : int, keyword-only
        The channel axis.
    out : ndarray, keyword-only, optional
        A C-contiguous array of ``x``'s shape and dtype to write (not ``x``).
    mask : array_like of bool, keyword-only, optional
        Valid positions: a boolean array that broadcasts to ``x``'s shape
        with the channel axis removed ((N, L) or (N, 1) for (N, C, L) input,
        (N,) for (N, C)); True marks a valid position. The statistics use the
        valid positions only; ``y`` is computed at every position.

    Returns
    -------
    y : ndarray
        Of ``x``'s shape and dtype.
    save_mean, save_invstd : ndarray of float64, shape (C,)
        The batch mean and ``1 / sqrt(var + eps)`` per channel. Pass them to
        :func:`batch_norm_backward` with the same ``x``.

    Raises
    ------
    ValueError
        Mismatched shapes, eps <= 0, one value per channel, a bad ``out``.
    TypeError
        A dtype or kind cbn does not take.

    Notes
    -----
    No running statistics are involved; keep them with :func:`batch_norm`
    or a :class:`BatchNorm` layer.
    """
    return kernels.forward_stats(x, axis, weight, bias, eps, out, mask)


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None, *,
                        axis: int = 1, training: bool = True,
                        out: NDArray[Any] | None = None, mask: ArrayLike | None = None
                        ) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Gradients of batch normalization.

    Parameters
    ----------
    dy : array_like
        The gradient of the forward's output, of ``x``'s shape.
    x : array_like
        The forward's input.
    save_mean, save_invstd : array_like of shape (C,)
        The per-channel statistics the forward normalized with: those
        returned by :func:`batch_norm_forward` when ``training=True``, or the
        running mean and ``1 / sqrt(running_var + eps)`` for an
        inference-mode forward (``training=False``).
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    axis : int, keyword-only
        The channel axis.
    training : bool, keyword-only
        True: the statistics depended on ``x`` (a training forward); False:
        they were constants.
    out : ndarray, keyword-only, optional
        A C-contiguous array of ``x``'s shape and dtype to write ``dx`` into
        (``dy`` itself works in place).
    mask : array_like of bool, keyword-only, optional
        Valid positions: a boolean array that broadcasts to ``x``'s shape
        with the channel axis removed ((N, L) or (N, 1) for (N, C, L) input,
        (N,) for (N, C)); True marks a valid position. The mask the forward used:
        ``dx`` is the exact gradient of the masked forward at every position,
        masked ones included.

    Returns
    -------
    dx, grad_weight, grad_bias : ndarray
        In ``x``'s dtype; ``grad_weight`` and ``grad_bias`` of shape (C,),
        computed whether or not ``weight`` is given (the gradients of an
        implicit weight 1 and bias 0).

    Raises
    ------
    ValueError
        Mismatched shapes or a bad ``out``.
    TypeError
        A dtype or kind cbn does not take.
    """
    return kernels.backward(dy, x, axis, save_mean, save_invstd, weight, training, out, mask)
