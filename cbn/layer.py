"""The BatchNorm layer: parameters, running statistics and train/eval switching
around the executor's calls, with PyTorch's semantics."""
from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import numpy as np

from . import _checks, _state
from ._base import ChannelLayer
from ._dispatch import kernels

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray
    from typing_extensions import Self

    from .frozen import FrozenBatchNorm
    from .moments import Moments

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

class IncompatibleKeys(NamedTuple):
    """What load_state_dict returns, as PyTorch's."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _ChannelArray:
    """A per-channel array attribute (weight, bias, running stats).

    Assigning validates the shape and converts to the layer's dtype; an
    attribute that is None (affine=False, bias=False, track_running_stats=False)
    stays None.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_" + name

    @overload
    def __get__(self, layer: None, owner: type | None = None) -> _ChannelArray: ...
    @overload
    def __get__(self, layer: BatchNorm,
                owner: type | None = None) -> NDArray[np.floating[Any]] | None: ...
    def __get__(self, layer: BatchNorm | None,
                owner: type | None = None) -> _ChannelArray | NDArray[np.floating[Any]] | None:
        if layer is None:
            return self
        return getattr(layer, self.slot)

    def __set__(self, layer: BatchNorm, value: ArrayLike | None) -> None:
        current = getattr(layer, self.slot)
        if current is None or value is None:
            if current is None and value is None:
                return
            raise ValueError(
                f"{type(layer).__name__}.{self.name} is "
                f"{'None' if current is None else 'an array'} on this layer and "
                f"cannot be set to {'None' if value is None else 'an array'}"
            )
        array = kernels.channel_vector(value, layer.num_features, self.name,
                                       dtype=layer.dtype, copy=False)
        # The layer updates its arrays in place, and the kernels read them as
        # aligned C arrays.
        if not (array.flags.writeable and array.flags.aligned):
            array = array.copy()
        setattr(layer, self.slot, array)


class BatchNorm(ChannelLayer):
    """Batch normalization over any channel axis of NumPy arrays.

    y = (x - mean) / sqrt(var + eps) * weight + bias, per channel, where in
    training mean and var are the batch's (biased) statistics and running
    averages of them are kept; in eval mode the running averages are used.
    Semantics follow ``torch.nn.BatchNorm*d``; every rule is in the
    repository's docs/semantics.md.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance before the square root (> 0).
    momentum : float in [0, 1] or None
        Weight of the new batch in the running averages; None for a cumulative
        average over all batches seen.
    affine : bool
        Learn a per-channel ``weight`` (init 1) and ``bias`` (init 0).
    track_running_stats : bool
        Keep ``running_mean`` (init 0) and ``running_var`` (init 1); without
        them, eval mode normalizes with batch statistics too.
    bias : bool, keyword-only
        With ``affine=True``, False learns a weight and no bias (``bias`` is
        None, no ``bias`` key in the state dict), as PyTorch 2.13's ``bias=``.
    axis : int, keyword-only
        The channel axis of the input (1 for NCHW and (N, C); -1 for
        channels-last).
    dtype : float32 or float64, keyword-only
        dtype of the parameters and buffers. Inputs of any float dtype are
        computed natively and keep their own dtype.
    activation : None or "relu", keyword-only
        "relu" applies max(y, 0) in the same pass over memory; backward then
        zeroes the gradient where the output was clipped (y <= 0).
    nonfinite : "propagate", "raise" or "skip", keyword-only
        What a forward with batch statistics does when a channel's statistics
        are not finite (NaN or inf in the input): "propagate" them into the
        running statistics (PyTorch's behaviour); "raise" FloatingPointError
        naming the channels before any of the layer's state changes; or
        "skip" those channels' running-statistics update (the output is
        computed, NaN where the input was).
    running_var_ddof : 0 or 1, keyword-only
        The variance the running average keeps: 1 (default) the unbiased
        batch variance, as PyTorch; 0 the biased one (the convention Keras,
        Flax and ONNX document). Normalization always uses the biased batch
        variance.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,), or None
        The learned scale (init 1) and shift (init 0), in ``dtype``; None
        when ``affine=False`` (``bias`` also with ``bias=False``). Assigning
        checks the shape and converts to ``dtype``.
    running_mean, running_var : ndarray of shape (C,), or None
        The running averages used in eval mode (init 0 and 1), in ``dtype``;
        None when built with ``track_running_stats=False``. Assignable as
        ``weight``.
    num_batches_tracked : int or None
        Batches counted by the running-statistics update (empty ones
        included); None without running statistics.
    training : bool
        True in training mode (the default), False after :meth:`eval`.
    grad_weight, grad_bias : ndarray of shape (C,), or None
        Gradients of the last :meth:`backward`, in ``dtype``; None before
        one and when the layer has no weight (or no bias).
    affine : bool
        Whether the layer has a weight (and, unless ``bias=False``, a bias).
    track_running_stats : bool
        Whether training updates the running statistics. Setting it to False
        later freezes them in training; eval mode still uses them.
    dtype : numpy.dtype
        float32 or float64: the dtype of the parameters and buffers.
    num_features, axis : int
        The channel count C and the channel axis, read-only.
    eps, momentum, activation, nonfinite, running_var_ddof
        The hyper-parameters above, checked when assigned.

    Notes
    -----
    Calls from several Python threads are safe: eval calls run in parallel
    (kernels release the GIL) and training calls take a per-layer lock, so the
    running statistics are updated whole.

    Examples
    --------
    >>> layer = cbn.BatchNorm2d(16)
    >>> y = layer(x)                     # training: batch statistics
    >>> dx = layer.backward(dy)          # sets grad_weight, grad_bias
    >>> y_eval = layer.eval()(x)         # inference: running statistics
    """

    weight = _ChannelArray()
    bias = _ChannelArray()
    running_mean = _ChannelArray()
    running_var = _ChannelArray()

    affine: bool
    track_running_stats: bool
    dtype: np.dtype[np.floating[Any]]
    training: bool
    num_batches_tracked: int | None
    grad_weight: NDArray[np.floating[Any]] | None
    grad_bias: NDArray[np.floating[Any]] | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 bias: bool = True, axis: int = 1, dtype: DTypeLike = np.float32,
                 activation: Literal["relu"] | None = None,
                 nonfinite: Literal["propagate", "raise", "skip"] = "propagate",
                 running_var_ddof: int = 1) -> None:
        self._set_channels(num_features, axis)
        self.running_var_ddof = running_var_ddof
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.nonfinite = nonfinite
        self.affine = bool(affine)
        self._bias_enabled = bool(bias)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _checks.layer_dtype(dtype)
        self.training = True
        shape, dt = (self.num_features,), self.dtype
        try:
            self._weight = np.ones(shape, dt) if self.affine else None
            self._bias = np.zeros(shape, dt) if self.affine and self._bias_enabled else None
            self._running_mean = np.zeros(shape, dt) if self.track_running_stats else None
            self._running_var = np.ones(shape, dt) if self.track_running_stats else None
        except (MemoryError, ValueError) as error:  # NumPy's "too big" is a ValueError
            raise ValueError(
                f"num_features={self.num_features}: cannot allocate the per-channel "
                f"arrays ({error})"
            ) from None
        self._init_call_state()
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.grad_weight = None
        self.grad_bias = None

    def _init_call_state(self) -> None:
        """What calls keep, never pickled or copied: the training lock, the
        eval parameters' cache, and the last forward's record (what its
        backward needs, replaced whole by each forward)."""
        self._lock = threading.Lock()
        self._eval_cache = kernels.EvalCache()
        self._last = None

    # -- hyper-parameters, validated on assignment by the executor's rules

    @property
    def eps(self) -> float:
        """Added to the variance before the square root: a finite float > 0."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = kernels.check_eps(value)

    @property
    def momentum(self) -> float | None:
        """Weight of a new batch in the running averages, in [0, 1]; None
        for the cumulative average (weight ``1 / num_batches_tracked``)."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        self._momentum = kernels.check_momentum(value)

    @property
    def activation(self) -> Literal["relu"] | None:
        """None, or "relu" when a ReLU is fused after the normalization."""
        return "relu" if self._relu else None

    @activation.setter
    def activation(self, value: Literal["relu"] | None) -> None:
        self._relu = _checks.activation(value)

    @property
    def running_var_ddof(self) -> int:
        """0 or 1: the variance the running average keeps (see the class
        docstring)."""
        return self._running_var_ddof

    @running_var_ddof.setter
    def running_var_ddof(self, value: int) -> None:
        self._running_var_ddof = _checks.var_ddof(value)

    @property
    def nonfinite(self) -> Literal["propagate", "raise", "skip"]:
        """"propagate", "raise" or "skip": see the class docstring."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: Literal["propagate", "raise", "skip"]) -> None:
        self._nonfinite = _checks.nonfinite(value)

    # -- modes

    def train(self, mode: bool = True) -> Self:
        """Switch to training mode (or to eval mode with ``mode=False``).

        Parameters
        ----------
        mode : bool
            True for training (batch statistics, running update), False for
            eval (running statistics, no state change).

        Returns
        -------
        Self
            The layer itself, so that ``layer.train()(x)`` chains.

        Raises
        ------
        TypeError
            ``mode`` is not a bool.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"training mode is expected to be a bool, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self) -> Self:
        """Switch to eval mode: the same as ``train(False)``.

        Returns
        -------
        Self
            The layer itself.
        """
        return self.train(False)

    # -- forward and backward

    def forward(self, x: ArrayLike, out: NDArray[Any] | None = None, *,
                mask: ArrayLike | None = None) -> NDArray[Any]:
        """Normalize ``x`` with batch statistics (training) or the running
        statistics (eval).

        Parameters
        ----------
        x : array_like
            Input with ``num_features`` channels on ``axis``, of a rank the
            class accepts, float16, bfloat16, float32 or float64.
        out : ndarray, optional
            A C-contiguous array of ``x``'s shape and dtype to write instead
            of allocating. In eval mode it may be ``x`` itself (in place); in
            training mode it may not, since backward needs the input.
        mask : array_like of bool, keyword-only, optional
            Valid positions: a boolean array that broadcasts to ``x``'s
            shape with the channel axis removed ((N, L) or (N, 1) for
            (N, C, L) input, (N,) for (N, C)); True marks a valid position.
            In training the batch statistics and the running update (its
            count too) use the valid positions only; the output is computed
            at every position with those statistics. No valid position is
            an empty batch. Eval mode checks it and otherwise ignores it.

        Returns
        -------
        ndarray
            ``y``, of ``x``'s shape and dtype (``out`` when given).

        Raises
        ------
        ValueError
            Wrong rank or channel count, a bad ``out``, a ``mask`` that does
            not broadcast to ``x``'s shape without the channel axis, or one
            value per channel in training.
        TypeError
            A dtype or kind of input cbn does not take, or a non-boolean
            ``mask``.
        FloatingPointError
            With ``nonfinite="raise"``, when batch statistics are not finite.

        Notes
        -----
        In training the running statistics are updated with ``momentum``
        and ``num_batches_tracked`` counts the batch; a call that raises
        changes no state.
        """
        if self.training or self._running_mean is None:
            record = self._forward_batch_stats(x, out, mask)
        else:
            if mask is not None:  # not used, but held to the same rules
                kernels.check_mask(x, self.axis, mask)
            record = kernels.normalize(x, self.axis, self._accepts, self._current_params(),
                                       self._relu, out)
        self._last = record
        return record.output

    def _forward_batch_stats(self, x, out, mask=None):
        """forward with the batch's statistics: training mode, or eval mode
        without running statistics. An update of the running statistics
        counts the batch, empty ones included (as PyTorch 2.13)."""
        update = (self.training and self.track_running_stats
                  and self._running_mean is not None)
        with self._lock:  # the running statistics change whole or not at all
            record = kernels.train_forward(x, *self._batch_stats_arguments(update), out,
                                           not self.training, self._running_var_ddof, mask)
            if update:
                self.num_batches_tracked += 1
        return record

    def _batch_stats_arguments(self, update: bool) -> tuple[Any, ...]:
        """The executor's arguments of a forward with batch statistics after
        the input and before ``out`` (train_forward's, train_begin's): the
        running statistics only when ``update``."""
        return (self.axis, self._accepts, self._weight, self._bias, self._eps,
                self._running_mean if update else None,
                self._running_var if update else None, self._momentum,
                self.num_batches_tracked if update else None, self._relu,
                kernels.NONFINITE_MODES[self._nonfinite])

    def __call__(self, x: ArrayLike, out: NDArray[Any] | None = None, *,
                 mask: ArrayLike | None = None) -> NDArray[Any]:
        """``layer(x)``: the same as :meth:`forward`.

        Parameters
        ----------
        x : array_like
            The input, as in :meth:`forward`.
        out : ndarray, optional
            Where to write the output, as in :meth:`forward`.
        mask : array_like of bool, keyword-only, optional
            Valid positions: a boolean array that broadcasts to ``x``'s
            shape with the channel axis removed ((N, L) or (N, 1) for
            (N, C, L) input, (N,) for (N, C)); True marks a valid position.
            In training the batch statistics and the running update (its
            count too) use the valid positions only; the output is computed
            at every position with those statistics. No valid position is
            an empty batch. Eval mode checks it and otherwise ignores it.

        Returns
        -------
        ndarray
            ``y``, of ``x``'s shape and dtype.
        """
        return self.forward(x, out, mask=mask)

    def backward(self, dy: ArrayLike, out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Gradient of the last forward's output -> gradient of its input.

        Parameters
        ----------
        dy : array_like
            The gradient of the loss with respect to the last forward's
            output, of its shape.
        out : ndarray, optional
            A C-contiguous array of that shape and the input's dtype to
            write instead of allocating; ``dy`` itself works in place.

        Returns
        -------
        ndarray
            ``dx``, the gradient with respect to the last forward's input,
            in its dtype.

        Raises
        ------
        ValueError
            No forward yet, ``dy`` of the wrong shape, a bad ``out``, or the
            last forward wrote over its input (``out=x``).

        Notes
        -----
        Also sets ``grad_weight`` and ``grad_bias`` (None when affine=False;
        grad_bias None when bias=False). After a training-mode forward the
        batch statistics' dependence on the input is included (with a mask,
        the exact gradient of the masked forward, masked positions
        included); after an eval-mode forward they are constants. The
        forward's input is kept by reference: changing it in place before
        the backward changes the gradient.
        """
        if self._last is None:
            raise ValueError(f"{type(self).__name__}.backward called before any forward")
        dx, grad_weight, grad_bias = kernels.record_backward(
            self._last, dy, out, self.dtype, type(self).__name__)
        if self.affine:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias if self._bias is not None else None
        return dx

    # -- statistics over a data set

    def calibrate(self, data: Iterable[ArrayLike] | Moments, *,
                  mode: Literal["population", "batch_average"] = "population",
                  comm: Any = None, progress: bool = False,
                  mask: ArrayLike | None = None) -> Moments:
        """Re-estimate the running statistics over a whole data set ("precise
        BN", BN adaptation after training, pruning or quantization).

        Parameters
        ----------
        data : iterable of arrays or of (array, mask) pairs, or Moments
            Batches in the layer's layout (any float dtype), or the moments
            of the data (e.g. from :func:`cbn.dask.moments`). A batch given
            as a tuple ``(x, mask)`` counts only the positions its mask marks
            True (the mask as :meth:`forward`'s).
        mode : "population" or "batch_average"
            "population": ``running_mean`` and ``running_var`` become the
            mean and the unbiased variance (count - 1; the biased one with
            ``running_var_ddof=0``) of all the data, as if it were one
            batch. "batch_average": the equal-weight average of the
            per-batch means and of the per-batch variances (unbiased, or
            biased with ``running_var_ddof=0``)
            (what fvcore's PreciseBN and PyTorch's ``momentum=None`` after
            :meth:`reset_running_stats` compute); empty batches are skipped.
        comm : MPI communicator, optional
            Merge over the ranks of ``comm`` (every rank calls calibrate):
            every rank ends with the same running statistics, those of all
            ranks' data.
        progress : bool
            Show a progress bar (tqdm when installed, else a counter on
            stderr).
        mask : array_like of bool, optional
            One mask for every batch given without its own (a batch given as
            an ``(x, mask)`` pair and ``mask=`` as well raise ValueError);
            not allowed with a Moments object.

        Returns
        -------
        Moments
            The moments of all the data (over all ranks with ``comm``).

        Raises
        ------
        ValueError, TypeError, FloatingPointError
            A bad batch (wrong shape or dtype, non-finite data with
            ``nonfinite="raise"``), named by its index; a layer without
            running statistics; a bad ``mode``. Over ``comm``, every rank
            raises :class:`cbn.distributed.DistributedError`.

        Notes
        -----
        Weight, bias, mode, momentum and ``num_batches_tracked`` are
        unchanged. All or nothing: when anything raises, the layer is as
        before.
        """
        from .calibration import calibrate
        with self._lock:
            return calibrate(self, data, mode=mode, comm=comm, progress=progress,
                             mask=mask)

    # -- inference forms

    def fold(self) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]]:
        """The eval-mode computation as one per-channel affine map.

        Returns
        -------
        scale, shift : ndarray of shape (C,)
            In the layer's dtype, with
            ``scale = weight / sqrt(running_var + eps)`` and
            ``shift = bias - running_mean * scale``, so that the eval output
            is ``x * scale + shift`` broadcast along the channel axis
            (weight 1 and bias 0 when absent).

        Raises
        ------
        ValueError
            In training mode (the batch's statistics, not the running
            ones, normalize) or without running statistics.

        Notes
        -----
        A fused activation is not part of it: apply it after.
        """
        self._check_foldable("fold")
        return self._current_params().scale_shift(self.dtype)

    def freeze(self) -> FrozenBatchNorm:
        """The fastest inference form of this layer, which never changes.

        Returns
        -------
        FrozenBatchNorm
            With copies of this layer's current parameters, running
            statistics, eps, axis, activation and accepted ranks. Works in
            either mode: the running statistics are what it freezes.

        Raises
        ------
        ValueError
            The layer has no running statistics.
        """
        from .frozen import FrozenBatchNorm
        if self._running_mean is None:
            raise ValueError(
                f"{type(self).__name__}.freeze() needs running statistics; this layer "
                "has track_running_stats=False"
            )
        return FrozenBatchNorm.of_layer(self)

    def to_torch(self) -> Any:
        """An equivalent PyTorch module (imports torch).

        Returns
        -------
        torch.nn.BatchNorm1d, BatchNorm2d or BatchNorm3d
            With the same parameters, buffers, hyper-parameters and mode;
            the inverse of :meth:`from_torch`.

        Raises
        ------
        ValueError
            The layer has no PyTorch counterpart: a plain ``BatchNorm`` (any
            rank), ``activation="relu"``, or ``running_var_ddof=0``.
        ImportError
            torch is not installed.
        """
        return _state.layer_to_torch(self)

    def _current_params(self):
        return self._eval_cache.current(self._weight, self._bias, self._running_mean,
                                        self._running_var, self._eps)

    def _check_foldable(self, what):
        if self.training:
            raise ValueError(
                f"{type(self).__name__}.{what}() needs eval mode: in training mode "
                "the batch statistics normalize; call .eval() first"
            )
        if self._running_mean is None:
            raise ValueError(
                f"{type(self).__name__}.{what}() needs running statistics; this "
                "layer has track_running_stats=False and always normalizes with "
                "batch statistics"
            )

    # -- state

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and
        ``num_batches_tracked`` to 0 (nothing without running statistics)."""
        mean, var = self._running_mean, self._running_var
        if mean is not None and var is not None:
            mean.fill(0)
            var.fill(1)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, and ``weight`` to 1, ``bias`` to 0."""
        self.reset_running_stats()
        if self._weight is not None:
            self._weight.fill(1)
        if self._bias is not None:
            self._bias.fill(0)

    def _state_keys(self):
        return [key for key in _state.STATE_KEYS if getattr(self, key) is not None]

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the parameters and buffers.

        Returns
        -------
        dict of str to ndarray
            With PyTorch's keys and order: ``weight``, ``bias``,
            ``running_mean``, ``running_var``, ``num_batches_tracked`` (an
            int64 0-d array), each present when the layer has it.
        """
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                state[key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[key] = getattr(self, key).copy()
        return state

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike],
                        strict: bool = True) -> IncompatibleKeys:
        """Copy values from a mapping of array-likes (PyTorch tensors included).

        Parameters
        ----------
        state_dict : mapping of str to array_like
            Values for the keys of :meth:`state_dict`.
        strict : bool
            True: every key of :meth:`state_dict` must be present (a missing
            ``num_batches_tracked`` is tolerated, as in PyTorch) and no other
            key. False: missing and unexpected keys are reported only.

        Returns
        -------
        IncompatibleKeys
            The named tuple ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        ValueError
            Missing or unexpected keys with ``strict=True``, or a value of
            the wrong shape.
        TypeError
            ``state_dict`` is not a mapping, or a value is not numeric.

        Notes
        -----
        Values are checked before anything is copied, so a failed load
        changes nothing.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        keys = self._state_keys()
        unexpected = [key for key in state_dict if key not in keys]
        # Like PyTorch, a missing batch count keeps the layer's own and is not
        # reported (checkpoints from before it existed lack it).
        missing = [key for key in keys
                   if key not in state_dict and key != "num_batches_tracked"]
        if strict and (unexpected or missing):
            raise ValueError(
                f"error loading state_dict into {self!r}: missing keys "
                f"{missing}, unexpected keys {unexpected}"
            )
        staged = {}
        for key in keys:
            if key not in state_dict:
                continue
            if key == "num_batches_tracked":
                staged[key] = _state.batch_count(state_dict[key])
            else:
                staged[key] = kernels.channel_vector(
                    state_dict[key], self.num_features, key, dtype=self.dtype)
        for key, value in staged.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value
        return IncompatibleKeys(missing, unexpected)

    # -- construction from elsewhere, copies

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, ArrayLike], *, prefix: str = "",
                        eps: float = 1e-5, momentum: float | None = 0.1, axis: int = 1,
                        dtype: DTypeLike | None = None,
                        activation: Literal["relu"] | None = None) -> Self:
        """A layer built from a state dict (PyTorch's included) alone.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            A layer's state dict, or a whole model's with ``prefix``.
        prefix : str, keyword-only
            Selects one batch norm in a whole model's state dict, e.g.
            "layer1.0.bn1" (a trailing "." is optional).
        eps, momentum, axis : keyword-only
            As in :class:`BatchNorm` (a state dict does not hold them).
        dtype : float32, float64 or None, keyword-only
            None: float64 when all the per-channel arrays are, else float32.
        activation : None or "relu", keyword-only
            As in :class:`BatchNorm`.

        Returns
        -------
        BatchNorm
            An instance of the class it is called on, in training mode like
            any new layer (call ``.eval()`` for inference).

        Raises
        ------
        ValueError
            No batch norm under ``prefix``, unknown keys directly under it,
            or arrays of different lengths.

        Notes
        -----
        ``num_features`` is inferred from the arrays, ``affine`` from the
        presence of weight, ``bias`` from that of bias (a weight without a
        bias is PyTorch's ``bias=False``), ``track_running_stats`` from that
        of the running statistics.
        """
        return _state.layer_from_state_dict(cls, state_dict, prefix=prefix, eps=eps,
                                            momentum=momentum, axis=axis, dtype=dtype,
                                            activation=activation)

    @classmethod
    def from_torch(cls, module: Any, *, axis: int = 1, dtype: DTypeLike | None = None,
                   activation: Literal["relu"] | None = None) -> Self:
        """A layer with the configuration, state and mode of a PyTorch module.

        Parameters
        ----------
        module : torch.nn.BatchNorm1d, BatchNorm2d or BatchNorm3d
            Or any object with their attributes: num_features, eps,
            momentum, affine, track_running_stats, training and
            state_dict(); cbn never imports torch here.
        axis : int, keyword-only
            The channel axis of the inputs the layer will take.
        dtype : float32, float64 or None, keyword-only
            None: float64 for a double-precision module, else float32.
        activation : None or "relu", keyword-only
            As in :class:`BatchNorm`.

        Returns
        -------
        BatchNorm
            Called on :class:`BatchNorm` itself, the cbn class of the same
            name when the module's class is one of PyTorch's, so that its
            rank checks carry over; else the class it is called on.
        """
        return _state.layer_from_torch(cls, module, axis=axis, dtype=dtype,
                                       activation=activation)

    @classmethod
    def from_keras(cls, layer: Any) -> Self:
        """A layer computing what a built Keras ``BatchNormalization`` computes.

        Parameters
        ----------
        layer : keras.layers.BatchNormalization
            A built layer, or any object with its attributes (cbn never
            imports keras): ``axis``, ``momentum``, ``epsilon``, ``center``,
            ``scale``, ``gamma``, ``beta``, ``moving_mean``,
            ``moving_variance``.

        Returns
        -------
        BatchNorm
            An instance of the class it is called on, in eval mode (a Keras
            call runs inference unless told ``training=True``), with
            ``momentum = 1 - layer.momentum``, ``eps = layer.epsilon``, the
            same ``axis`` and ``running_var_ddof=0`` (Keras 3 keeps the biased
            variance; a tf.keras 2 layer with ``fused=True`` keeps the
            unbiased one, and gets 1). ``center=True, scale=False`` becomes a weight of ones
            (keep it out of the optimizer: cbn computes its gradient).

        Raises
        ------
        ValueError
            Options cbn cannot reproduce (``renorm``, ``virtual_batch_size``,
            ``adjustment``, several axes, ``synchronized`` on a class other
            than SyncBatchNorm) or an unbuilt layer, saying why.
        TypeError
            Attributes of the wrong kind.

        Notes
        -----
        Checked against Keras 3 in inference and training
        (tests/test_keras.py); docs/conventions.md has the mapping.
        """
        from ._keras import layer_from_keras
        return layer_from_keras(cls, layer)

    def __getstate__(self) -> dict[str, Any]:
        # Parameters, buffers, hyper-parameters and gradients; not the lock,
        # the cache or the last forward's record.
        return {key: value for key, value in self.__dict__.items()
                if key not in ("_lock", "_eval_cache", "_last", "_accepts")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_relu", False)  # pickled before activation= existed
        state.setdefault("_nonfinite", "propagate")  # ... and before nonfinite=
        state.setdefault("_bias_enabled", True)  # ... and before bias=
        state.setdefault("_running_var_ddof", 1)  # ... and before running_var_ddof=
        for name in ("num_features", "axis"):  # ... and before they were read-only
            if name in state:
                state["_" + name] = state.pop(name)
        self.__dict__.update(state)
        self._build_accepts()
        self._init_call_state()

    def __repr__(self) -> str:
        text = f"{self._repr_head()}, momentum={self.momentum}, affine={self.affine}"
        if not self._bias_enabled:
            text += ", bias=False"
        text += f", track_running_stats={self.track_running_stats}"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        if self._relu:
            text += ", activation='relu'"
        if self._nonfinite != "propagate":
            text += f", nonfinite={self._nonfinite!r}"
        if self._running_var_ddof != 1:
            text += f", running_var_ddof={self._running_var_ddof}"
        return text + ")"


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) input; other ranks raise
    ValueError (``expected 2D or 3D input (got 4D input)``). The parameters
    and attributes are :class:`BatchNorm`'s."""

    _ranks = range(2, 4)
    _ranks_text = "2D or 3D"


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for (N, C, H, W) input; other ranks raise
    ValueError. The parameters and attributes are :class:`BatchNorm`'s."""

    _ranks = range(4, 5)
    _ranks_text = "4D"


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for (N, C, D, H, W) input; other ranks raise
    ValueError. The parameters and attributes are :class:`BatchNorm`'s."""

    _ranks = range(5, 6)
    _ranks_text = "5D"
