"""Folding an eval-mode batch norm into the dense or convolution layer next to it.

In eval mode a batch norm is a fixed per-channel affine map ``x * scale + shift``
(:meth:`BatchNorm.fold`), so it can be absorbed into the weight and bias of an
adjacent linear layer, leaving one layer to run at inference. The formulas are
those of ``torch.nn.utils.fusion`` (``fuse_linear_bn_weights`` and
``fuse_conv_bn_weights``), extended to a batch norm *before* a dense layer and
to grouped transposed convolutions; this module works on NumPy arrays and never
imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from . import _convert

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    class _Foldable(Protocol):
        """What the folds need of a layer: cbn's ``fold() -> (scale, shift)``."""

        def fold(self) -> tuple[ArrayLike, ArrayLike]: ...

__all__ = ["fold_into_linear", "fold_into_conv"]

# Design: the result dtype is the dtype of the weight passed in (float16,
# float32 or float64), for the bias as well, so a folded layer can replace the
# original one without changing the model's dtype. The arithmetic is done in
# float64 and rounded once at the end; scale and shift come from the layer's
# fold() and so are already rounded to the layer's dtype, which is what the
# layer itself computes with in eval mode. Other float dtypes (longdouble) are
# refused rather than silently computed in float64.
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_POSITIONS = ("after", "before")


def fold_into_linear(weight: ArrayLike, bias: ArrayLike | None, layer: _Foldable, *,
                     position: Literal["after", "before"] = "after"
                     ) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]]:
    """Fold an eval-mode batch norm into a dense layer ``y = x @ weight.T + bias``.

    Parameters
    ----------
    weight : array-like of shape (out, in)
        The dense layer's weight (NumPy array, PyTorch tensor or other
        array-like of float16, float32 or float64).
    bias : array-like of shape (out,) or None
        The dense layer's bias; None for no bias.
    layer : BatchNorm or any object with ``fold() -> (scale, shift)``
        The batch norm, in eval mode with running statistics.
    position : {"after", "before"}, keyword-only
        "after": ``layer(x @ weight.T + bias)``, the batch norm normalizes the
        ``out`` features. "before": ``layer(x) @ weight.T + bias``, it
        normalizes the ``in`` features.

    Returns
    -------
    weight, bias : ndarray
        New arrays of shapes (out, in) and (out,), in the dtype of
        ``weight``; the bias is an array even when ``bias`` is None. The
        inputs are not modified.

    Raises
    ------
    ValueError
        The layer is in training mode or has no running statistics or has a
        fused activation, ``weight`` is not 2D, or the channel counts differ.
    TypeError
        A weight or bias of a dtype other than float16, float32, float64.

    Notes
    -----
    With ``(scale, shift) = layer.fold()``: "after" gives
    ``weight * scale[:, None]`` and ``bias * scale + shift``; "before" gives
    ``weight * scale[None, :]`` and ``bias + weight @ shift``.
    """
    fold = _fold_method(layer)
    if not isinstance(position, str) or position not in _POSITIONS:
        raise ValueError(f'position must be "after" or "before", got {position!r}')
    w = _float_array(weight, "weight")
    if w.ndim != 2:
        raise ValueError(
            f"a dense layer's weight must be 2D (out, in), got shape {w.shape}"
        )
    out_features, in_features = w.shape
    b = _bias_array(bias, out_features, w.shape)
    scale, shift = _scale_shift(fold, layer)
    # Design: the channel count of the batch norm is checked against the side of
    # the dense layer it touches; unlike torch's fuse_linear_bn_eval, a single
    # channel is not broadcast over all features, since a cbn layer with one
    # channel would refuse such an input anyway.
    features = out_features if position == "after" else in_features
    if scale.shape[0] != features:
        side = "output" if position == "after" else "input"
        raise ValueError(
            f"weight of shape {w.shape} has {features} {side} features but the "
            f"batch norm {position} it has num_features={scale.shape[0]}"
        )

    w64 = w.astype(np.float64)
    b64 = np.zeros(out_features) if b is None else b.astype(np.float64)
    if position == "after":
        # bn(x W^T + b) = (x W^T + b) * s + t = x (s[:, None] W)^T + (b s + t)
        new_w = w64 * scale[:, None]
        new_b = b64 * scale + shift
    else:
        # (x * s + t) W^T + b = x (W s[None, :])^T + (b + W t)
        new_w = w64 * scale[None, :]
        new_b = b64 + w64 @ shift
    dtype = _result_dtype(w)
    return new_w.astype(dtype), new_b.astype(dtype)


def fold_into_conv(weight: ArrayLike, bias: ArrayLike | None, layer: _Foldable, *,
                   transposed: bool = False, groups: int = 1
                   ) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]]:
    """Fold an eval-mode batch norm that follows a convolution into it.

    Parameters
    ----------
    weight : array-like of shape (out, in/groups, *kernel), or
        (in, out/groups, *kernel) when ``transposed``
        The convolution's weight, in PyTorch's layout, of any kernel rank
        (1d, 2d, 3d, ...: at least 3 dimensions); float16, float32 or float64.
    bias : array-like of shape (out,) or None
        The convolution's bias; None for no bias.
    layer : BatchNorm or any object with ``fold() -> (scale, shift)``
        The batch norm on the convolution's output channels, in eval mode with
        running statistics.
    transposed : bool, keyword-only
        The weight is a transposed convolution's (ConvTranspose).
    groups : int, keyword-only
        The convolution's groups. Only a transposed convolution's fold depends
        on it (its output channels are ``weight.shape[1] * groups``); for an
        ordinary convolution it is only checked to divide ``weight.shape[0]``.

    Returns
    -------
    weight, bias : ndarray
        New arrays of the weight's shape and (out,), in the dtype of
        ``weight``; the bias is an array even when ``bias`` is None. The
        inputs are not modified.

    Raises
    ------
    ValueError
        The layer is in training mode or has no running statistics or has a
        fused activation, the weight has fewer than 3 dimensions, ``groups``
        does not divide it, or the channel counts differ.
    TypeError
        A weight or bias of a dtype other than float16, float32, float64, or
        a non-bool ``transposed``.

    Notes
    -----
    Output channel ``o`` of the convolution is scaled by ``scale[o]`` and its
    bias becomes ``bias[o] * scale[o] + shift[o]``, with
    ``(scale, shift) = layer.fold()``. Stride, padding and dilation do not
    matter. There is no fold for a batch norm *before* a convolution: with zero
    padding the shift would reach the border outputs only in part, so no conv
    weight and bias reproduce it exactly.
    """
    fold = _fold_method(layer)
    if not isinstance(transposed, (bool, np.bool_)):
        raise TypeError(f"transposed must be a bool, got {type(transposed).__name__}")
    groups = _convert.integer(groups, "groups", "a positive integer")
    if groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    w = _float_array(weight, "weight")
    layout = "(in, out/groups, *kernel)" if transposed else "(out, in/groups, *kernel)"
    if w.ndim < 3:
        raise ValueError(
            f"a convolution's weight must have at least 3 dimensions {layout}, "
            f"got shape {w.shape}"
        )
    # Both layouts put a channel count divisible by groups first: out for a
    # convolution, in for a transposed one.
    if w.shape[0] % groups:
        what = "input" if transposed else "output"
        raise ValueError(
            f"groups={groups} does not divide the {w.shape[0]} {what} channels "
            f"of weight of shape {w.shape} {layout}"
        )
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    b = _bias_array(bias, out_channels, w.shape)
    scale, shift = _scale_shift(fold, layer)
    if scale.shape[0] != out_channels:
        raise ValueError(
            f"weight of shape {w.shape} {layout} with groups={groups} has "
            f"{out_channels} output channels but the batch norm after it has "
            f"num_features={scale.shape[0]}"
        )

    w64 = w.astype(np.float64)
    kernel_ones = (1,) * (w.ndim - 2)
    if transposed:
        # Design: a transposed convolution's weight is (in, out/groups, *k) with
        # the groups stacked along the *first* axis: output channel
        # o = g * (out/groups) + j is produced by weight[g*(in/groups):
        # (g+1)*(in/groups), j]. So the weight is viewed as
        # (groups, in/groups, out/groups, *k) and scaled by the scale viewed as
        # (groups, 1, out/groups, 1...). torch.nn.utils.fusion (2.13) reshapes
        # the scale to (1, out, 1...) instead, which is right only for
        # groups=1: for other groups it raises a size mismatch, or, when
        # out/groups == 1, broadcasts to a weight of the wrong shape.
        in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
        grouped = w64.reshape((groups, in_per_group, out_per_group) + w.shape[2:])
        grouped = grouped * scale.reshape((groups, 1, out_per_group) + kernel_ones)
        new_w = grouped.reshape(w.shape)
    else:
        new_w = w64 * scale.reshape((out_channels, 1) + kernel_ones)
    b64 = np.zeros(out_channels) if b is None else b.astype(np.float64)
    new_b = b64 * scale + shift
    dtype = _result_dtype(w)
    return new_w.astype(dtype), new_b.astype(dtype)


# -- helpers


def _fold_method(layer):
    # Design: duck-typed, so that any layer with cbn's fold() contract (a
    # frozen batch norm, a user's own eval-only layer) can be folded too.
    fold = getattr(layer, "fold", None)
    if not callable(fold):
        raise TypeError(
            "layer must be a batch norm with a fold() method (such as "
            f"cbn.BatchNorm), got {type(layer).__name__}"
        )
    return fold


def _float_array(value, name):
    # PyTorch tensors too, without importing torch; subclasses (np.matrix)
    # dropped so that the arithmetic below is plain ndarray arithmetic.
    array = np.asarray(_convert.to_numpy(value))
    if array.dtype.newbyteorder("=") not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float16, float32 or float64 array, got dtype "
            f"{array.dtype}"
        )
    return array


def _bias_array(bias, out_channels, weight_shape):
    if bias is None:
        return None
    b = _float_array(bias, "bias")
    if b.shape != (out_channels,):
        raise ValueError(
            f"bias has shape {b.shape}, expected ({out_channels},) for weight of "
            f"shape {weight_shape}"
        )
    return b


def _scale_shift(fold, layer):
    # Design: a layer with an activation (cbn.FrozenBatchNorm(activation=
    # "relu")) still returns its affine part from fold(), but relu(x * scale +
    # shift) is not affine: folded "after", the relu would be silently dropped,
    # and "before", it would sit between the batch norm and the dense layer.
    activation = getattr(layer, "activation", None)
    if activation is not None:
        raise ValueError(
            f"{type(layer).__name__} has activation={activation!r}, which cannot "
            "be folded into the weights; fold a batch norm without activation "
            "and apply the activation after the folded layer"
        )
    # The layer's own checks (eval mode, running statistics) raise here.
    result = fold()
    try:
        scale, shift = result
    except (TypeError, ValueError):
        raise TypeError(
            f"{type(layer).__name__}.fold() must return (scale, shift), got "
            f"{type(result).__name__}"
        ) from None
    scale, shift = _convert.to_numpy(scale), _convert.to_numpy(shift)
    for name, array in (("scale", scale), ("shift", shift)):
        if array.dtype.kind != "f":
            raise TypeError(
                f"{type(layer).__name__}.fold() returned a {name} of dtype "
                f"{array.dtype}, expected floats"
            )
    if scale.ndim != 1 or shift.shape != scale.shape:
        raise ValueError(
            f"{type(layer).__name__}.fold() must return two (C,) arrays, got "
            f"scale of shape {scale.shape} and shift of shape {shift.shape}"
        )
    return scale.astype(np.float64), shift.astype(np.float64)


def _result_dtype(array):
    return array.dtype.newbyteorder("=")
