"""Functional batch normalization: the public functions without state.

Each function hands its arguments as they are to the executor (cbn/_core.pyx),
which converts what is not plain, checks every rule and runs the kernels; the
layers use the same executor. Per-channel statistics that are handed between
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

    Accumulated in float64 with a two-pass-per-block scheme, accurate even when
    |mean| is huge relative to the spread. Returned in ``x``'s dtype; NaN for
    channels with no values (an empty batch). ``out``: a pair of (C,) arrays
    of that dtype to write and return instead.
    """
    return kernels.stats(x, axis, out, mask)


def batch_norm(x: ArrayLike, running_mean: ArrayLike | None, running_var: ArrayLike | None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               axis: int = 1, out: NDArray[Any] | None = None,
               activation: Literal["relu"] | None = None,
               mask: ArrayLike | None = None) -> NDArray[Any]:
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

    Returns ``(y, save_mean, save_invstd)``: ``y`` in ``x``'s dtype, and the batch
    mean and ``1 / sqrt(var + eps)`` per channel as float64 arrays. Pass them
    to :func:`batch_norm_backward` with the same ``x``. No running statistics
    are involved; keep them with :func:`batch_norm` or a :class:`BatchNorm` layer.
    """
    return kernels.forward_stats(x, axis, weight, bias, eps, out, mask)


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None, *,
                        axis: int = 1, training: bool = True,
                        out: NDArray[Any] | None = None, mask: ArrayLike | None = None
                        ) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
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
    return kernels.backward(dy, x, axis, save_mean, save_invstd, weight, training, out, mask)
