"""Checks of a layer's settings that are not about a call: num_features, the
layer dtype, activation, nonfinite and running_var_ddof. (The rules of a call live in the
executor, cbn/_core.pyx; eps and momentum are checked there too, through
check_eps/check_momentum, so a layer's setter and a function call share
them.) Each raises TypeError for a wrong kind of value and ValueError for a
wrong value, naming what it got."""
import numpy as np

from ._convert import integer

LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def layer_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in LAYER_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


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


def num_features(value):
    value = integer(value, "num_features", "a positive integer")
    if value < 1:
        raise ValueError(f"num_features must be a positive integer, got {value}")
    return value


def var_ddof(value):
    """``running_var_ddof``: 0 or 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"running_var_ddof must be 0 or 1, got {type(value).__name__}")
    if value not in (0, 1):
        raise ValueError(f"running_var_ddof must be 0 or 1, got {value}")
    return int(value)
