"""Validation of everything but the input array: dtypes, hyper-parameters and
per-channel vectors. Each check raises TypeError for a wrong kind of value and
ValueError for a wrong value, naming what it got."""
import math
import numbers
import operator

import numpy as np

# dtypes the kernels compute in natively; float16 is computed in float32.
COMPUTE_DTYPES = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}
LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype(dtype, name="input"):
    """The dtype the kernels use for data of ``dtype`` (byte order ignored)."""
    native = np.dtype(dtype).newbyteorder("=")
    try:
        return COMPUTE_DTYPES[native]
    except KeyError:
        raise TypeError(
            f"{name} has dtype {np.dtype(dtype)}; cbn supports float16, float32 "
            "and float64 data"
        ) from None


def layer_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in LAYER_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _real_number(value, name):
    """``value`` as a Python int or float (kept as given, so reprs read like
    PyTorch's ``eps=1``); TypeError for anything else."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        raise ValueError(
            f"{name} is out of the float range, got {type(value).__name__} {value!r}"
        ) from None
    return value if type(value) in (int, float) else as_float


def eps(value):
    value = _real_number(value, "eps")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"eps must be a positive finite number, got {value!r}")
    return value


def momentum(value, allow_none=True):
    if value is None:
        if not allow_none:
            raise TypeError("momentum must be a number in [0, 1], got None")
        return None
    value = _real_number(value, "momentum")
    if not 0 <= value <= 1:
        raise ValueError(f"momentum must be in [0, 1] (or None), got {value!r}")
    return value


ACTIVATIONS = (None, "relu")


def activation(value):
    """The ``activation`` argument: None or "relu". Returns True for "relu"."""
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"activation must be None or 'relu', got {type(value).__name__}"
        )
    if value not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {value!r}")
    return value == "relu"


NONFINITE = ("propagate", "raise", "skip")


def nonfinite(value):
    """The ``nonfinite`` argument: "propagate", "raise" or "skip"."""
    if not isinstance(value, str):
        raise TypeError(
            f"nonfinite must be one of {NONFINITE}, got {type(value).__name__}"
        )
    if value not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {value!r}")
    return value


def integer(value, name, what="an integer"):
    """``value`` as a Python int; TypeError for bools, floats and the rest."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}") from None


def num_features(value):
    value = integer(value, "num_features", "a positive integer")
    if value < 1:
        raise ValueError(f"num_features must be a positive integer, got {value}")
    return value


def to_numpy(value):
    """An ndarray view of any array-like, PyTorch CPU tensors included (duck-typed,
    so cbn never imports torch)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach()
        if hasattr(value, "cpu"):
            value = value.cpu()
        try:
            return np.asarray(value.numpy())
        except TypeError:  # dtypes NumPy lacks (bfloat16): go through float32
            if not hasattr(value, "float"):
                raise
            return np.asarray(value.float().numpy())
    try:
        return np.asarray(value)
    except Exception as exc:  # ragged sequences and other non-arrays
        raise TypeError(
            f"expected an array-like, got {type(value).__name__}: {exc}"
        ) from None


def real_dtype(array, name):
    """TypeError unless ``array`` holds real numbers (ints and floats, not bool)."""
    if array.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must hold real numbers, got dtype {array.dtype}"
        )


def channel_vector(value, num_channels, name, dtype=np.float64, copy=True):
    """``value`` as a contiguous (C,) array of ``dtype``: weights, biases, stats.

    A copy by default, so that the kernels' per-channel inputs cannot alias an
    ``out=`` array or change under a later in-place edit.
    """
    array = to_numpy(value)
    real_dtype(array, name)
    if array.shape != (num_channels,):
        raise ValueError(
            f"{name} has shape {array.shape}, expected ({num_channels},) "
            f"for {num_channels} channels"
        )
    if copy:
        return np.array(array, dtype=dtype, order="C")
    return np.ascontiguousarray(array, dtype=dtype)


def running_buffer(value, num_channels, name):
    """A running-statistics array that will be updated in place."""
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array to be updated in place, "
            f"got {type(value).__name__}"
        )
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.shape != (num_channels,):
        raise ValueError(
            f"{name} has shape {value.shape}, expected ({num_channels},) "
            f"for {num_channels} channels"
        )
    if not value.flags.writeable:
        raise ValueError(f"{name} is read-only and cannot be updated in place")
    return value
