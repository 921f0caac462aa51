"""From any array and channel axis to the kernels' (outer, C, inner) view, and back.

The kernels take a C-contiguous, native-byte-order float32 or float64 array of
shape (outer, C, inner): outer is the product of the dimensions before the
channel axis and inner of those after it. A C-contiguous input of a supported
dtype is viewed without a copy; anything else (Fortran order, strided,
byte-swapped, float16) is copied once. The caller's array is never written.
"""
import math

import numpy as np

from . import _checks


class ChannelView:
    """An input seen as (outer, C, inner), with what is needed to shape results."""

    __slots__ = ("data", "shape", "dtype", "source")

    def __init__(self, data, shape, dtype, source):
        self.data = data      # (outer, C, inner) C-contiguous, compute dtype
        self.shape = shape    # the caller's shape
        self.dtype = dtype    # the caller's dtype: results come back in it
        self.source = source  # the caller's array (data, or what data copies)

    @property
    def num_channels(self):
        return self.data.shape[1]

    @property
    def values_per_channel(self):
        return self.data.shape[0] * self.data.shape[2]

    @property
    def size(self):
        return self.data.size


def channel_axis(axis, ndim, shape):
    axis = _checks.integer(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of bounds for input of shape {shape} ({ndim}D)"
        )
    return axis % ndim


def as_array(x, name="input"):
    """``x`` as an ndarray of a supported float dtype (TypeError otherwise)."""
    array = _checks.to_numpy(x)
    _checks.compute_dtype(array.dtype, name)
    return array


# dtypes the kernels take as they are: C-contiguous arrays of these skip every
# conversion (the common case, and the one small calls must keep cheap).
_NATIVE_DTYPES = frozenset([np.dtype(np.float32), np.dtype(np.float64)])


def checked_array(x, axis, name="input"):
    """``(array, axis)``: ``x`` as an ndarray of a supported float dtype with at
    least 2 dimensions, and its channel axis made non-negative. Nothing is
    copied yet, so callers can check the channel count of a huge input first."""
    array = as_array(x, name)
    if array.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and channels), "
            f"got shape {array.shape}"
        )
    return array, channel_axis(axis, array.ndim, array.shape)


def channel_view(x, axis, name="input"):
    """Validate ``x`` (rank >= 2, float dtype) and view it as (outer, C, inner)."""
    if (type(x) is np.ndarray and x.dtype in _NATIVE_DTYPES and x.ndim >= 2
            and x.flags.c_contiguous and x.flags.aligned and type(axis) is int
            and -x.ndim <= axis < x.ndim):
        return _view_of(x, x, axis % x.ndim)
    array, axis = checked_array(x, axis, name)
    data = kernel_layout(array, _checks.compute_dtype(array.dtype, name))
    return _view_of(array, data, axis)


def kernel_layout(array, dtype):
    """``array`` as the kernels read it: C-contiguous, aligned, of ``dtype``
    (itself when it already is; misaligned loads are undefined behaviour)."""
    data = np.ascontiguousarray(array, dtype=dtype)
    return data if data.flags.aligned else data.copy()


def _view_of(array, data, axis):
    """The view of ``data`` (C-contiguous copy of ``array``, or itself)."""
    shape = array.shape
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    return ChannelView(data.reshape(outer, shape[axis], inner), shape,
                       array.dtype.newbyteorder("="), array)


def like_view(x, view, name):
    """``x`` (e.g. a gradient) checked to match ``view``'s shape, viewed the same way."""
    array = as_array(x, name)
    if array.shape != view.shape:
        raise ValueError(
            f"{name} has shape {array.shape}, expected the input's shape {view.shape}"
        )
    return kernel_layout(array, view.data.dtype).reshape(view.data.shape)


class Output:
    """Where a kernel writes, and what the caller gets back.

    The kernel writes ``kernel_out`` (compute dtype, (outer, C, inner)), which is
    the caller's array itself except for float16, converted by ``finish()``.
    """

    __slots__ = ("result", "kernel_out", "_convert")

    def __init__(self, view, out=None, name="out", other_inputs=()):
        if out is None:
            self.result = np.empty(view.shape, dtype=view.dtype)
        else:
            self.result = check_out(out, view, name, other_inputs)
        self._convert = (self.result.dtype != view.data.dtype
                         or not self.result.flags.aligned)
        if self._convert:  # float16 or a misaligned out: compute aside, copy at the end
            self.kernel_out = np.empty(view.data.shape, dtype=view.data.dtype)
        else:
            self.kernel_out = self.result.reshape(view.data.shape)

    def finish(self):
        if self._convert:
            self.result[...] = self.kernel_out.reshape(self.result.shape)
        return self.result


def check_out(out, view, name="out", other_inputs=()):
    """``out`` must match the input and overlap each input wholly or not at all:
    the kernels are elementwise, so writing over the very element just read is
    safe, but a shifted overlap would read already-written values. The rule
    holds for the caller's array even where the kernel reads a copy of it."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.shape != view.shape:
        raise ValueError(
            f"{name} has shape {out.shape}, expected the input's shape {view.shape}"
        )
    if out.dtype != view.dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected the input's dtype {view.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for data in (view.source, view.data, *other_inputs):
        if np.may_share_memory(out, data) and not same_buffer(out, data):
            raise ValueError(
                f"{name} partially overlaps an input; pass that input itself for "
                "an in-place call, or a separate array"
            )
    return out


def check_stats_out(out, view):
    """``out`` of batch_stats: a pair of separate writable (C,) arrays of the
    input's dtype. Returned as a tuple."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(
            "out must be a pair (mean, var) of arrays, got "
            f"{type(out).__name__}{'' if not isinstance(out, (tuple, list)) else f' of {len(out)}'}"
        )
    for name, array in zip(("out[0] (mean)", "out[1] (var)"), out):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(array).__name__}")
        if array.shape != (view.num_channels,):
            raise ValueError(f"{name} has shape {array.shape}, expected "
                             f"({view.num_channels},) for {view.num_channels} channels")
        if array.dtype != view.dtype:
            raise TypeError(f"{name} has dtype {array.dtype}, expected the input's dtype "
                            f"{view.dtype}")
        if not array.flags.writeable:
            raise ValueError(f"{name} is read-only")
    if np.may_share_memory(out[0], out[1]):
        raise ValueError("out[0] (mean) and out[1] (var) must be separate arrays")
    return tuple(out)


def same_buffer(a, b):
    """True when two arrays are C-contiguous and cover exactly the same bytes."""
    return (a.flags.c_contiguous and b.flags.c_contiguous
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.nbytes == b.nbytes)
