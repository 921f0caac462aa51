"""FrozenBatchNorm: a batch norm reduced to inference, with its per-channel
parameters computed once (the role of torchvision's FrozenBatchNorm2d)."""
import numpy as np

from . import _checks, _state
from . import functional as F
from ._dispatch import kernels
from ._layout import Output, as_array, channel_view, checked_array

__all__ = ["FrozenBatchNorm"]

_ANY_RANK = range(2, 65)


class FrozenBatchNorm:
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
    (1 and 0). The dtype (unless given) is float64 when the arrays are, else
    float32.
    """

    # Input ranks accepted (None: any rank >= 2); freeze() keeps its layer's.
    _ranks = None
    _ranks_text = "at least 2D"

    def __init__(self, state_dict, *, prefix="", eps=1e-5, axis=1, activation=None,
                 dtype=None):
        owner = type(self).__name__
        found = _state.entries(state_dict, prefix, owner)
        num_features, _, tracking, found_dtype = _state.layout(found, owner)
        if not tracking:
            raise ValueError(
                f"{owner} needs running_mean and running_var (the state dict has "
                f"{sorted(found)})"
            )
        self._num_features = num_features
        self._eps = _checks.eps(eps)
        self._axis = _checks.integer(axis, "axis")
        self._relu = _checks.activation(activation)
        self._dtype = found_dtype if dtype is None else _checks.layer_dtype(dtype)
        self._state = {}
        for key, value in found.items():
            if key == "num_batches_tracked":
                self._state[key] = np.array(_state.batch_count(value), dtype=np.int64)
            else:
                self._state[key] = _checks.channel_vector(value, num_features, key,
                                                          dtype=self._dtype)
            self._state[key].flags.writeable = False
        self._build()

    def _build(self):
        state = self._state
        self._params = kernels.inference_params(state.get("weight"), state.get("bias"),
                                                state["running_mean"],
                                                state["running_var"], self._eps)
        self._scale, self._shift = F._scale_shift(self._params, self._dtype)
        self._scale.flags.writeable = False
        self._shift.flags.writeable = False
        # backward is dy * scale: an inference call on dy with mean 0 and bias 0
        zeros, ones = np.zeros(self._num_features), np.ones(self._num_features)
        self._grad_params = kernels.ChannelParams(zeros, ones, self._params.scale, zeros)
        self._saved_output = None

    @classmethod
    def from_state_dict(cls, state_dict, *, prefix="", eps=1e-5, axis=1,
                        activation=None, dtype=None):
        """The same as ``FrozenBatchNorm(state_dict, ...)``, named like
        :meth:`cbn.BatchNorm.from_state_dict`."""
        return cls(state_dict, prefix=prefix, eps=eps, axis=axis, activation=activation,
                   dtype=dtype)

    # -- read-only attributes

    num_features = property(lambda self: self._num_features)
    eps = property(lambda self: self._eps)
    axis = property(lambda self: self._axis)
    dtype = property(lambda self: self._dtype)
    activation = property(lambda self: "relu" if self._relu else None)
    scale = property(lambda self: self._scale,
                     doc="weight / sqrt(running_var + eps), read-only, in dtype")
    shift = property(lambda self: self._shift,
                     doc="bias - running_mean * scale, read-only, in dtype")
    training = property(lambda self: False, doc="always False: frozen layers only infer")

    # -- calls

    def forward(self, x, out=None):
        """``x * scale + shift`` along the channel axis (then ReLU with
        activation="relu"). ``out``: a C-contiguous array of x's shape and
        dtype to write instead of allocating; ``x`` itself works in place."""
        ranks = self._ranks or _ANY_RANK
        y = kernels.fast_normalize(x, self._axis, ranks.start, ranks.stop - 1,
                                   self._params, self._relu, out)
        if y is None:
            view = self._view(x)
            y = F._normalize(view, self._params, self._relu, Output(view, out))
        if self._relu:
            self._saved_output = y
        return y

    __call__ = forward

    def backward(self, dy, out=None):
        """Gradient of the output -> gradient of the input: ``dy * scale``,
        and 0 where the fused ReLU clipped the last forward's output (written
        into ``out`` when given; ``dy`` itself works in place)."""
        if self._relu:
            if self._saved_output is None:
                raise ValueError(
                    f"{type(self).__name__}.backward with activation='relu' needs "
                    "the output of a forward first"
                )
            dy = F._relu_grad(dy, self._saved_output, out)
        dx = kernels.fast_normalize(dy, self._axis, 2, 64, self._grad_params, False,
                                    out)
        if dx is None:
            array, axis = checked_array(dy, self._axis, name="dy")
            self._check_channels(array.shape, array.shape[axis], "dy")
            view = channel_view(array, axis, name="dy")
            dx = F._normalize(view, self._grad_params, False, Output(view, out))
        return dx

    def _view(self, x):
        array = as_array(x)
        if self._ranks is not None and array.ndim not in self._ranks:
            raise ValueError(f"expected {self._ranks_text} input (got {array.ndim}D input)")
        array, axis = checked_array(array, self._axis)
        self._check_channels(array.shape, array.shape[axis], "input")  # before any copy
        return channel_view(array, axis)

    def _check_channels(self, shape, channels, name):
        if channels != self._num_features:
            raise ValueError(
                f"{type(self).__name__}({self._num_features}) expects "
                f"{self._num_features} channels on axis {self._axis}, got {name} of "
                f"shape {shape} with {channels}"
            )

    # -- state

    def state_dict(self):
        """Copies of the arrays it was built from, with the keys of the layer
        it came from."""
        return {key: value.copy() for key, value in self._state.items()}

    def fold(self):
        """``(scale, shift)``, copies in dtype, as :meth:`cbn.BatchNorm.fold`
        (the affine part: a fused ReLU is not included)."""
        return self._scale.copy(), self._shift.copy()

    def __getstate__(self):
        return {"state": self._state, "eps": self._eps, "axis": self._axis,
                "relu": self._relu, "dtype": self._dtype,
                "ranks": (self._ranks, self._ranks_text)}

    def __setstate__(self, saved):
        self._state = saved["state"]
        self._num_features = len(self._state["running_mean"])
        self._eps, self._axis, self._relu = saved["eps"], saved["axis"], saved["relu"]
        self._dtype = saved["dtype"]
        self._ranks, self._ranks_text = saved["ranks"]
        for value in self._state.values():
            value.flags.writeable = False
        self._build()

    def __repr__(self):
        text = f"{type(self).__name__}({self._num_features}, eps={self._eps}"
        if self._axis != 1:
            text += f", axis={self._axis}"
        if self._dtype != np.float32:
            text += f", dtype={self._dtype}"
        if self._relu:
            text += ", activation='relu'"
        return text + ")"
