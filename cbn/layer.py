"""The BatchNorm layer: parameters, running statistics and train/eval switching
around the functional steps, with PyTorch's semantics."""
import threading
from collections import namedtuple
from collections.abc import Mapping

import numpy as np

from . import _checks, _state
from . import functional as F
from ._dispatch import kernels
from ._layout import ChannelView, Output, as_array, channel_view, checked_array, like_view

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

IncompatibleKeys = namedtuple("IncompatibleKeys", "missing_keys unexpected_keys")

_ANY_RANK = range(2, 65)  # NumPy's maximum is 64 dimensions

_STATE_KEYS = _state.STATE_KEYS

# What backward finds when the last forward wrote its output over its input.
_OVERWRITTEN = object()

# torch.nn classes (by name, cbn never imports torch) and their cbn counterparts,
# filled in below the classes.
_TORCH_NAMES = {}


class _ChannelArray:
    """A per-channel array attribute (weight, bias, running stats).

    Assigning validates the shape and converts to the layer's dtype; an
    attribute that is None (affine=False, track_running_stats=False) stays None.
    """

    def __set_name__(self, owner, name):
        self.name = name
        self.slot = "_" + name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        return getattr(layer, self.slot)

    def __set__(self, layer, value):
        current = getattr(layer, self.slot)
        if current is None or value is None:
            if current is None and value is None:
                return
            raise ValueError(
                f"{type(layer).__name__}.{self.name} is "
                f"{'None' if current is None else 'an array'} on this layer and "
                f"cannot be set to {'None' if value is None else 'an array'}"
            )
        array = _checks.channel_vector(value, layer.num_features, self.name,
                                       dtype=layer.dtype, copy=False)
        # The layer updates its arrays in place, and the kernels read them as
        # aligned C arrays.
        if not (array.flags.writeable and array.flags.aligned):
            array = array.copy()
        setattr(layer, self.slot, array)


class BatchNorm:
    """Batch normalization over any channel axis of NumPy arrays.

    y = (x - mean) / sqrt(var + eps) * weight + bias, per channel, where in
    training mean and var are the batch's (biased) statistics and running
    averages of them are kept; in eval mode the running averages are used.
    Semantics follow ``torch.nn.BatchNorm*d``; see the README.

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

    Calls from several Python threads are safe: eval calls run in parallel
    (kernels release the GIL) and training calls take a per-layer lock, so the
    running statistics are updated whole.
    """

    # Input ranks the layer accepts (None: any rank >= 2) and how to name them.
    _ranks = None
    _ranks_text = "at least 2D"

    weight = _ChannelArray()
    bias = _ChannelArray()
    running_mean = _ChannelArray()
    running_var = _ChannelArray()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, activation=None,
                 nonfinite="propagate"):
        self.num_features = _checks.num_features(num_features)
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.nonfinite = nonfinite
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = _checks.integer(axis, "axis")
        self.dtype = _checks.layer_dtype(dtype)
        self.training = True
        shape, dt = (self.num_features,), self.dtype
        try:
            self._weight = np.ones(shape, dt) if self.affine else None
            self._bias = np.zeros(shape, dt) if self.affine else None
            self._running_mean = np.zeros(shape, dt) if self.track_running_stats else None
            self._running_var = np.ones(shape, dt) if self.track_running_stats else None
            self._init_call_state()
        except (MemoryError, ValueError) as error:  # NumPy's "too big" is a ValueError
            raise ValueError(
                f"num_features={self.num_features}: cannot allocate the per-channel "
                f"arrays ({error})"
            ) from None
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.grad_weight = None
        self.grad_bias = None

    def _init_call_state(self):
        """What calls keep, never pickled or copied: the training lock, the
        eval parameters' cache, and what backward needs from the last forward.
        That is its input (the caller's array on the fast path, a ChannelView
        otherwise), whether it normalized with the batch's own statistics
        (which then depend on the input), the (mean, invstd, weight) it used,
        and its output when a ReLU was fused (backward masks with it). A
        batch-statistics forward writes its statistics into the _save_*
        buffers, once nothing can fail any more; an eval forward refers to its
        cached parameters' arrays."""
        shape = (self.num_features,)
        self._lock = threading.Lock()
        self._eval_cache = kernels.EvalCache()
        self._save_mean = np.zeros(shape)
        self._save_invstd = np.zeros(shape)
        self._save_weight = np.zeros(shape)
        self._batch_stats_saved = (self._save_mean, self._save_invstd, self._save_weight)
        self._saved_input = None
        self._saved_batch_stats = False
        self._saved_stats = self._batch_stats_saved
        self._saved_output = None

    # -- hyper-parameters, validated on assignment so calls need not re-check

    @property
    def eps(self):
        return self._eps

    @eps.setter
    def eps(self, value):
        self._eps = _checks.eps(value)

    @property
    def momentum(self):
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        self._momentum = _checks.momentum(value)

    @property
    def activation(self):
        """None, or "relu" when a ReLU is fused after the normalization."""
        return "relu" if self._relu else None

    @activation.setter
    def activation(self, value):
        self._relu = _checks.activation(value)

    @property
    def nonfinite(self):
        """"propagate", "raise" or "skip": see the class docstring."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value):
        self._nonfinite = _checks.nonfinite(value)

    # -- modes

    def train(self, mode=True):
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"training mode is expected to be a bool, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- forward and backward

    def _view(self, x):
        array = as_array(x)
        if self._ranks is not None and array.ndim not in self._ranks:
            raise ValueError(f"expected {self._ranks_text} input (got {array.ndim}D input)")
        array, axis = checked_array(array, self.axis)
        if array.shape[axis] != self.num_features:  # before any copy of x
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects "
                f"{self.num_features} channels on axis {self.axis}, got input of "
                f"shape {array.shape} with {array.shape[axis]}"
            )
        return channel_view(array, axis)

    def forward(self, x, out=None):
        """Normalize ``x``; returns an array of ``x``'s shape and dtype.

        ``out``: a C-contiguous array of that shape and dtype to write instead
        of allocating. In eval mode it may be ``x`` itself (in place); in
        training mode it may not, since backward needs the input.
        """
        if self.training or self._running_mean is None:
            return self._forward_batch_stats(x, out)
        params = self._current_params()
        ranks = self._ranks or _ANY_RANK
        y = kernels.fast_normalize(x, self.axis, ranks.start, ranks.stop - 1, params,
                                   self._relu, out)
        source = x
        if y is None:
            source = self._view(x)
            y = F._normalize(source, params, self._relu, Output(source, out))
        self._save_source(x, out, source)
        self._saved_batch_stats = False
        self._saved_stats = params.stats
        self._saved_output = y if self._relu else None
        return y

    def _forward_batch_stats(self, x, out):
        """forward with the batch's statistics: training mode, or eval mode
        without running statistics."""
        if out is not None and self.training:
            F._check_not_over_input(out, x)
        update = (self.training and self.track_running_stats
                  and self._running_mean is not None)
        ranks = self._ranks or _ANY_RANK
        with self._lock:  # the running statistics change whole or not at all
            if update and self._momentum is None:  # the cumulative moving average
                factor = 1.0 / (self.num_batches_tracked + 1)
            else:
                factor = self._momentum or 0.0
            y = kernels.fast_layer_forward(
                x, self.axis, ranks.start, ranks.stop - 1, self.num_features,
                self._weight, self._bias, self._running_mean, self._running_var,
                self._eps, True, update, factor, self._relu,
                kernels.NONFINITE_MODES[self._nonfinite], out,
                self._save_mean, self._save_invstd, self._save_weight)
            source = x
            if y is None:
                y, source = self._forward_general(x, out, update, factor)
            elif update:
                self.num_batches_tracked += 1
            self._save_source(x, out, source)
            self._saved_batch_stats = True
            self._saved_stats = self._batch_stats_saved
            self._saved_output = y if self._relu else None
        return y

    def _save_source(self, x, out, source):
        """Keep the forward's input (``source``: x or its view) for backward,
        unless ``out`` was written over it."""
        overwritten = out is not None and kernels.shares_memory(out, x)
        self._saved_input = _OVERWRITTEN if overwritten else source

    def _forward_general(self, x, out, update, factor):
        """_forward_batch_stats for what the fast path does not take; returns
        (y, view)."""
        view = self._view(x)
        weight = bias = None
        if self.affine:
            weight = np.array(self.weight, dtype=np.float64)
            bias = np.array(self.bias, dtype=np.float64)
        output = Output(view, out)
        F._check_training_size(view)
        y, mean, var, invstd = F._train_forward(view, weight, bias, self.eps, output,
                                                self._relu)
        bad = ~(np.isfinite(mean) & np.isfinite(var)) if view.size else None
        if self._nonfinite == "raise" and view.size and bad.any():
            raise kernels.nonfinite_error(np.flatnonzero(bad).tolist())
        if update and view.size:  # an empty batch changes nothing
            F._update_running(self.running_mean, self.running_var, mean, var,
                              view.values_per_channel, factor,
                              keep=bad if self._nonfinite == "skip" else None)
            self.num_batches_tracked += 1
        self._save_mean[...] = mean
        self._save_invstd[...] = invstd
        self._save_weight[...] = 1.0 if weight is None else weight
        return y, view

    def __call__(self, x, out=None):
        return self.forward(x, out)

    def backward(self, dy, out=None):
        """Gradient of the last forward's output -> gradient of its input
        (written into ``out`` when given, as in forward).

        Also sets ``grad_weight`` and ``grad_bias`` (None when affine=False).
        After a training-mode forward the batch statistics' dependence on the
        input is included; after an eval-mode forward they are constants.
        """
        source = self._saved_input
        if source is None:
            raise ValueError(
                f"{type(self).__name__}.backward called before any forward"
            )
        if source is _OVERWRITTEN:
            raise ValueError(
                f"{type(self).__name__}.backward: the last forward wrote its output "
                "over its input (out=x), and backward needs the input"
            )
        mean, invstd, weight = self._saved_stats
        relu_output = self._saved_output  # None without a fused ReLU
        result = None
        if not isinstance(source, ChannelView):
            result = kernels.fast_backward(dy, source, self.axis, mean, invstd, weight,
                                           self._saved_batch_stats, out, self.dtype,
                                           relu_output)
        if result is None:
            if relu_output is not None:
                dy = F._relu_grad(dy, relu_output, out)
            view = source if isinstance(source, ChannelView) else self._view(source)
            dy_data = like_view(dy, view, "dy")
            dx, grad_weight, grad_bias = F._backward(
                dy_data, view, mean, invstd, weight, self._saved_batch_stats,
                Output(view, out, other_inputs=(dy_data,)))
            grad_weight = grad_weight.astype(self.dtype)
            grad_bias = grad_bias.astype(self.dtype)
        else:
            dx, grad_weight, grad_bias = result
        if self.affine:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias
        return dx

    # -- inference forms

    def fold(self):
        """The eval-mode computation as one per-channel affine map.

        Returns ``(scale, shift)`` in the layer's dtype, with
        ``scale = weight / sqrt(running_var + eps)`` and
        ``shift = bias - running_mean * scale``, so that the eval output is
        ``x * scale + shift`` broadcast along the channel axis (weight 1 and
        bias 0 when affine=False). Eval mode only: in training mode the
        batch's statistics, not the running ones, normalize. A fused
        activation is not part of it: apply it after.
        """
        self._check_foldable("fold")
        return F._scale_shift(self._current_params(), self.dtype)

    def freeze(self):
        """A :class:`cbn.FrozenBatchNorm` with copies of this layer's current
        parameters, running statistics, eps, axis and activation: the fastest
        inference form, which never changes. Needs running statistics."""
        from .frozen import FrozenBatchNorm
        if self._running_mean is None:
            raise ValueError(
                f"{type(self).__name__}.freeze() needs running statistics; this layer "
                "has track_running_stats=False"
            )
        frozen = FrozenBatchNorm(self.state_dict(), eps=self.eps, axis=self.axis,
                                 activation=self.activation, dtype=self.dtype)
        frozen._ranks, frozen._ranks_text = self._ranks, self._ranks_text
        return frozen

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

    def reset_running_stats(self):
        if self.running_mean is not None:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight.fill(1)
            self.bias.fill(0)

    def _state_keys(self):
        return [key for key in _STATE_KEYS if getattr(self, key) is not None]

    def state_dict(self):
        """Copies of the parameters and buffers, with PyTorch's keys and order."""
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                state[key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[key] = getattr(self, key).copy()
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from a mapping of array-likes (PyTorch tensors included).

        strict=True: every key of :meth:`state_dict` must be present (a missing
        ``num_batches_tracked`` is tolerated, as in PyTorch) and no other key.
        Values are checked before anything is copied, so a failed load changes
        nothing. Returns ``(missing_keys, unexpected_keys)``.
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
                staged[key] = _checks.channel_vector(
                    state_dict[key], self.num_features, key, dtype=self.dtype)
        for key, value in staged.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value
        return IncompatibleKeys(missing, unexpected)

    # -- construction from elsewhere, copies

    @classmethod
    def from_state_dict(cls, state_dict, *, prefix="", eps=1e-5, momentum=0.1, axis=1,
                        dtype=None, activation=None):
        """A layer built from a state dict (PyTorch's included) alone.

        ``num_features`` is inferred from the arrays, ``affine`` from the
        presence of weight and bias, ``track_running_stats`` from that of the
        running statistics, and the dtype (unless given) is float64 when the
        arrays are, else float32. ``prefix`` selects one batch norm in a whole
        model's state dict, e.g. "layer1.0.bn1". The layer starts in training
        mode, like any new layer; call ``.eval()`` for inference.
        """
        owner = f"{cls.__name__}.from_state_dict"
        found = _state.entries(state_dict, prefix, owner)
        num_features, affine, tracking, found_dtype = _state.layout(found, owner)
        layer = cls(num_features, eps=eps, momentum=momentum, affine=affine,
                    track_running_stats=tracking, axis=axis,
                    dtype=found_dtype if dtype is None else dtype, activation=activation)
        layer.load_state_dict(found)
        return layer

    @classmethod
    def from_torch(cls, module, *, axis=1, dtype=None, activation=None):
        """A layer with the configuration, state and mode of a
        ``torch.nn.BatchNorm1d/2d/3d`` (any object with its attributes:
        num_features, eps, momentum, affine, track_running_stats, training and
        state_dict(); cbn never imports torch).

        Called on :class:`BatchNorm` itself, the result is the cbn class of
        the same name when the module's class is one of PyTorch's, so that
        its rank checks carry over. The dtype (unless given) is float64 for a
        double-precision module, else float32.
        """
        missing = [name for name in ("num_features", "eps", "momentum", "affine",
                                     "track_running_stats", "training", "state_dict")
                   if not hasattr(module, name)]
        if missing:
            raise TypeError(
                f"{cls.__name__}.from_torch expects a torch.nn.BatchNorm*d-like "
                f"module; {type(module).__name__} has no attribute(s) {missing}"
            )
        if cls is BatchNorm:
            cls = _TORCH_NAMES.get(type(module).__name__, BatchNorm)
        owner = f"{cls.__name__}.from_torch"
        # affine=False with track_running_stats=False has an empty state dict
        found = _state.entries(module.state_dict(), "", owner, allow_empty=True)
        found_dtype = np.float32
        if set(found) - {"num_batches_tracked"}:
            found_dtype = _state.layout(found, owner)[3]
        # A module keeps its buffers when track_running_stats is switched off
        # after construction (eval then still uses them); so does the layer.
        layer = cls(module.num_features, eps=float(module.eps),
                    momentum=None if module.momentum is None else float(module.momentum),
                    affine=module.affine, track_running_stats="running_mean" in found,
                    axis=axis, dtype=found_dtype if dtype is None else dtype,
                    activation=activation)
        layer.load_state_dict(found)
        layer.track_running_stats = bool(module.track_running_stats)
        return layer.train(bool(module.training))

    def __getstate__(self):
        # Parameters, buffers, hyper-parameters and gradients; not the lock,
        # the cache or the last forward's context.
        call_state = {"_lock", "_eval_cache", "_save_mean", "_save_invstd", "_save_weight",
                      "_batch_stats_saved", "_saved_input", "_saved_batch_stats",
                      "_saved_stats", "_saved_output"}
        return {key: value for key, value in self.__dict__.items()
                if key not in call_state}

    def __setstate__(self, state):
        state.setdefault("_relu", False)  # pickled before activation= existed
        state.setdefault("_nonfinite", "propagate")  # ... and before nonfinite=
        self.__dict__.update(state)
        self._init_call_state()

    def __repr__(self):
        text = (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        if self._relu:
            text += ", activation='relu'"
        if self._nonfinite != "propagate":
            text += f", nonfinite={self._nonfinite!r}"
        return text + ")"


class BatchNorm1d(BatchNorm):
    """BatchNorm for (N, C) or (N, C, L) input."""

    _ranks = range(2, 4)
    _ranks_text = "2D or 3D"


class BatchNorm2d(BatchNorm):
    """BatchNorm for (N, C, H, W) input."""

    _ranks = range(4, 5)
    _ranks_text = "4D"


class BatchNorm3d(BatchNorm):
    """BatchNorm for (N, C, D, H, W) input."""

    _ranks = range(5, 6)
    _ranks_text = "5D"


_TORCH_NAMES.update(BatchNorm1d=BatchNorm1d, BatchNorm2d=BatchNorm2d, BatchNorm3d=BatchNorm3d)
