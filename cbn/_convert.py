"""Conversion of the caller's objects into what the compiled executor reads.

Design: as NumPy's ufunc machinery converts its operands before the inner
loop, this module only turns accepted inputs into NumPy arrays and Python
numbers, raising TypeError for a kind of value cbn does not take. Every rule
about values, shapes, overlaps and state lives in the executor (cbn/_core.pyx
and its .pxi files), which calls these functions only for inputs that are not
already plain (C-contiguous, aligned, native float32/float64 ndarrays and
exact Python numbers). See docs/developing.md for the table of rules.
"""
import numbers
import operator

import numpy as np

# dtypes the kernels compute in natively; float16 and bfloat16 are computed in
# float32 and returned in their own dtype.
_COMPUTE_DTYPES = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def _bfloat16():
    """ml_dtypes' bfloat16, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _is_bfloat16(dtype):
    return dtype.kind == "V" and dtype.name == "bfloat16"


def compute_dtype(dtype, name="input"):
    """The dtype the kernels use for data of ``dtype`` (byte order ignored)."""
    native = np.dtype(dtype).newbyteorder("=")
    if _is_bfloat16(native):
        return np.dtype(np.float32)
    try:
        return _COMPUTE_DTYPES[native]
    except KeyError:
        raise TypeError(
            f"{name} has dtype {np.dtype(dtype)}; cbn supports float16, bfloat16, "
            "float32 and float64 data"
        ) from None


def _tensor_to_numpy(value):
    """A PyTorch-like tensor (duck-typed: cbn never imports torch) as an
    ndarray, and the dtype its results come back in."""
    value = value.detach()
    if hasattr(value, "cpu"):
        value = value.cpu()
    if "bfloat16" in str(getattr(value, "dtype", "")) and hasattr(value, "float"):
        # NumPy has no bfloat16: computed in float32, returned as bfloat16
        # where ml_dtypes provides it, else as float32.
        array = np.asarray(value.float().numpy())
        return array, _bfloat16() or array.dtype
    try:
        array = np.asarray(value.numpy())
    except TypeError:  # other dtypes NumPy lacks: go through float32
        if not hasattr(value, "float"):
            raise
        array = np.asarray(value.float().numpy())
    return array, array.dtype


def to_numpy(value):
    """An ndarray view of any array-like, PyTorch CPU tensors included."""
    return to_numpy_with_dtype(value)[0]


def to_numpy_with_dtype(value):
    """``(array, result_dtype)``: ``value`` as an ndarray (no copy where it
    already is one) and the dtype results computed from it come back in."""
    if isinstance(value, np.ndarray):
        return value, value.dtype
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return _tensor_to_numpy(value)
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged sequences and other non-arrays
        raise TypeError(
            f"expected an array-like, got {type(value).__name__}: {exc}"
        ) from None
    return array, array.dtype


def input_array(x, name="input"):
    """``(array, result_dtype)`` for data: an ndarray of a supported float
    dtype, not copied unless it was not an array. TypeError otherwise."""
    array, result_dtype = to_numpy_with_dtype(x)
    compute_dtype(array.dtype, name)
    return array, result_dtype.newbyteorder("=")


def kernel_layout(array, dtype):
    """``array`` as the kernels read it: C-contiguous, aligned, of ``dtype``
    (itself when it already is; misaligned loads are undefined behaviour)."""
    data = np.ascontiguousarray(array, dtype=dtype)
    return data if data.flags.aligned else data.copy()


def real_array(value, name):
    """A per-channel vector (weight, bias, statistics) as an ndarray holding
    real numbers (ints and floats, not bool); TypeError otherwise."""
    array = to_numpy(value)
    if _is_bfloat16(array.dtype):
        return array.astype(np.float32)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def real_number(value, name):
    """``value`` as a Python int or float (kept as given, so reprs read like
    PyTorch's ``eps=1``); TypeError for anything else, ValueError beyond the
    float range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        raise ValueError(
            f"{name} is out of the float range, got {type(value).__name__} {value!r}"
        ) from None
    return value if type(value) in (int, float) else as_float


def integer(value, name, what="an integer"):
    """``value`` as a Python int; TypeError for bools, floats and the rest."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}") from None
