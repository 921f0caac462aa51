"""FrozenBatchNorm: a batch norm reduced to inference, with its per-channel
parameters computed once (the role of torchvision's FrozenBatchNorm2d)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _checks, _state
from ._base import ChannelLayer
from ._dispatch import kernels

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray
    from typing_extensions import Self

    from .layer import BatchNorm

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(ChannelLayer):
    """Inference-only batch normalization with fixed statistics.

    ``y = x * scale + shift`` per channel, with
    ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` computed once; the kernels compute
    it as ``(x - running_mean) * scale + bias``, the same bits as an eval-mode
    :class:`cbn.BatchNorm` call and without the cancellation of the folded form
    at large means. There is no training mode and nothing to update, so calls
    from any number of threads run in parallel. (With activation="relu",
    ``backward`` masks with the output of the last forward on this object, so
    it belongs with single-threaded use.)

    Built by :meth:`cbn.BatchNorm.freeze`, or from a state dict (a layer's, or
    a whole model's with ``prefix``): ``FrozenBatchNorm(state_dict)``, the same
    as ``FrozenBatchNorm.from_state_dict(state_dict)``. The state dict needs
    ``running_mean`` and ``running_var``; ``weight`` and ``bias`` are optional
    (1 and 0); ``bias=False`` (PyTorch 2.13's weight without a bias) refuses
    a ``bias`` entry.

    Parameters
    ----------
    state_dict : mapping of str to array_like
        ``running_mean`` and ``running_var`` (required), ``weight`` and
        ``bias`` (optional), ``num_batches_tracked`` (kept, unused).
    prefix : str, keyword-only
        Selects one batch norm in a whole model's state dict.
    eps : float, keyword-only
        Added to the variance before the square root (> 0).
    axis : int, keyword-only
        The channel axis.
    activation : None or "relu", keyword-only
        "relu" applies max(y, 0) in the same pass.
    dtype : float32, float64 or None, keyword-only
        None: float64 when all the arrays are, else float32.
    bias : bool, keyword-only
        False: a weight without a bias; a ``bias`` entry is then refused.

    Attributes
    ----------
    scale, shift : ndarray of shape (C,)
        Read-only, in ``dtype``.
    num_features, axis, eps, dtype, activation
        Read-only settings.
    training : bool
        Always False.

    Raises
    ------
    ValueError
        No running statistics, a ``bias`` entry with ``bias=False``, arrays
        of different lengths, or eps <= 0.
    """

    def __init__(self, state_dict: Mapping[str, ArrayLike], *, prefix: str = "",
                 eps: float = 1e-5, axis: int = 1,
                 activation: Literal["relu"] | None = None, dtype: DTypeLike | None = None,
                 bias: bool = True) -> None:
        owner = type(self).__name__
        found = _state.entries(state_dict, prefix, owner)
        num_features, _, has_bias, tracking, found_dtype = _state.layout(found, owner)
        if not tracking:
            raise ValueError(
                f"{owner} needs running_mean and running_var (the state dict has "
                f"{sorted(found)})"
            )
        if has_bias and not bias:
            raise ValueError(f"{owner}(bias=False) takes no 'bias' entry (the state dict "
                             f"has {sorted(found)})")
        self._bias_enabled = bool(bias)
        self._eps = kernels.check_eps(eps)
        self._set_channels(num_features, axis)
        self._relu = _checks.activation(activation)
        self._dtype = found_dtype if dtype is None else _checks.layer_dtype(dtype)
        self._state = {}
        for key, value in found.items():
            if key == "num_batches_tracked":
                self._state[key] = np.array(_state.batch_count(value), dtype=np.int64)
            else:
                self._state[key] = kernels.channel_vector(value, num_features, key,
                                                          dtype=self._dtype)
            self._state[key].flags.writeable = False
        self._build()

    def _build(self) -> None:
        state = self._state
        self._params = kernels.inference_params(state.get("weight"), state.get("bias"),
                                                state["running_mean"],
                                                state["running_var"], self._eps)
        self._scale, self._shift = self._params.scale_shift(self._dtype)
        self._scale.flags.writeable = False
        self._shift.flags.writeable = False
        # backward is dy * scale: an inference call on dy with mean 0 and bias 0
        zeros, ones = np.zeros(self.num_features), np.ones(self.num_features)
        self._grad_params = kernels.ChannelParams(zeros, ones, self._params.scale, zeros)
        # dy may have any rank >= 2 with the right channel count
        self._accepts_dy = kernels.Accepts(2, 64, None, self.num_features,
                                           type(self).__name__)
        self._saved_output: NDArray[Any] | None = None

    @classmethod
    def of_layer(cls, layer: BatchNorm) -> Self:
        """The frozen form of a :class:`cbn.BatchNorm` (what its ``freeze()``
        returns).

        Parameters
        ----------
        layer : BatchNorm
            A layer with running statistics, in either mode.

        Returns
        -------
        FrozenBatchNorm
            With the layer's current state, eps, axis, activation, dtype,
            bias setting and accepted ranks.
        """
        frozen = cls(layer.state_dict(), eps=layer.eps, axis=layer.axis,
                     activation=layer.activation, dtype=layer.dtype,
                     bias=layer._bias_enabled)
        frozen._set_channels(frozen.num_features, frozen.axis, layer._ranks,
                             layer._ranks_text)
        return frozen

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, ArrayLike], *, prefix: str = "",
                        eps: float = 1e-5, axis: int = 1,
                        activation: Literal["relu"] | None = None,
                        dtype: DTypeLike | None = None, bias: bool = True) -> Self:
        """The same as ``FrozenBatchNorm(state_dict, ...)``, named like
        :meth:`cbn.BatchNorm.from_state_dict`.

        Parameters
        ----------
        state_dict, prefix, eps, axis, activation, dtype, bias
            As in :class:`FrozenBatchNorm`.

        Returns
        -------
        FrozenBatchNorm
            The frozen layer.
        """
        return cls(state_dict, prefix=prefix, eps=eps, axis=axis, activation=activation,
                   dtype=dtype, bias=bias)

    # -- read-only attributes

    @property
    def eps(self) -> float:
        """Added to the variance before the square root (read-only)."""
        return self._eps

    @property
    def dtype(self) -> np.dtype[np.floating[Any]]:
        """float32 or float64: the dtype of scale, shift and the state."""
        return self._dtype

    @property
    def activation(self) -> Literal["relu"] | None:
        """None, or "relu" when a ReLU is fused after the normalization."""
        return "relu" if self._relu else None

    @property
    def scale(self) -> NDArray[np.floating[Any]]:
        """weight / sqrt(running_var + eps), read-only, in dtype"""
        return self._scale

    @property
    def shift(self) -> NDArray[np.floating[Any]]:
        """bias - running_mean * scale, read-only, in dtype"""
        return self._shift

    @property
    def training(self) -> Literal[False]:
        """always False: frozen layers only infer"""
        return False

    # -- calls

    def forward(self, x: ArrayLike, out: NDArray[Any] | None = None) -> NDArray[Any]:
        """``x * scale + shift`` along the channel axis (then ReLU with
        activation="relu"), computed as ``(x - running_mean) * scale + bias``.

        Parameters
        ----------
        x : array_like
            Input with ``num_features`` channels on ``axis``.
        out : ndarray, optional
            A C-contiguous array of x's shape and dtype to write instead of
            allocating; ``x`` itself works in place.

        Returns
        -------
        ndarray
            ``y``, of ``x``'s shape and dtype.

        Raises
        ------
        ValueError
            Wrong rank or channel count, or a bad ``out``.
        TypeError
            A dtype or kind cbn does not take.
        """
        y = kernels.normalize(x, self.axis, self._accepts, self._params, self._relu,
                              out).output
        if self._relu:
            self._saved_output = y
        return y

    __call__ = forward   # the same function, hence the same docstring

    def backward(self, dy: ArrayLike, out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Gradient of the output -> gradient of the input: ``dy * scale``,
        and 0 where the fused ReLU clipped the last forward's output.

        Parameters
        ----------
        dy : array_like
            The gradient of the output, channels on ``axis``.
        out : ndarray, optional
            Where to write ``dx``; ``dy`` itself works in place.

        Returns
        -------
        ndarray
            ``dx``, of ``dy``'s shape and dtype.

        Raises
        ------
        ValueError
            Wrong channel count, a bad ``out``, or with activation="relu" no
            forward yet (or ``dy`` not of the last output's shape).
        """
        if self._relu and self._saved_output is None:
            raise ValueError(
                f"{type(self).__name__}.backward with activation='relu' needs "
                "the output of a forward first"
            )
        return kernels.normalize(dy, self.axis, self._accepts_dy, self._grad_params, False,
                                 out, "dy", self._saved_output if self._relu else None).output

    # -- state

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the arrays it was built from.

        Returns
        -------
        dict of str to ndarray
            With the keys of the layer it came from (no prefix).
        """
        return {key: value.copy() for key, value in self._state.items()}

    def fold(self) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]]:
        """The per-channel affine map, as :meth:`cbn.BatchNorm.fold`.

        Returns
        -------
        scale, shift : ndarray of shape (C,)
            Writable copies in ``dtype`` (the affine part: a fused ReLU is
            not included).
        """
        return self._scale.copy(), self._shift.copy()

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self._state, "eps": self._eps, "axis": self.axis,
                "relu": self._relu, "dtype": self._dtype, "bias": self._bias_enabled,
                "ranks": (self._ranks, self._ranks_text)}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self._state = saved["state"]
        self._eps, self._relu = saved["eps"], saved["relu"]
        self._dtype = saved["dtype"]
        self._bias_enabled = saved.get("bias", True)  # pickled before bias= existed
        self._ranks, self._ranks_text = saved["ranks"]
        self._set_channels(len(self._state["running_mean"]), saved["axis"])
        for value in self._state.values():
            value.flags.writeable = False
        self._build()

    def __repr__(self) -> str:
        text = self._repr_head()
        if not self._bias_enabled:
            text += ", bias=False"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self._dtype != np.float32:
            text += f", dtype={self._dtype}"
        if self._relu:
            text += ", activation='relu'"
        return text + ")"
