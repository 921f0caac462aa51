"""Conversion of the caller's objects into what the compiled executor reads.

Design: as NumPy's ufunc machinery converts its operands before the inner
loop, this module only turns accepted inputs into NumPy arrays and Python
numbers, raising TypeError for a kind of value cbn does not take. Every rule
about values, shapes, overlaps and state lives in the executor (cbn/_core.pyx
and its .pxi files), which calls these functions only for inputs that are not
already plain (C-contiguous, aligned, native float32/float64 ndarrays and
exact Python numbers). See docs/developing.md for the table of rules.

Arrays of other libraries are read through DLPack (``np.from_dlpack``): a
PyTorch CPU tensor, a JAX CPU array or any object with ``__dlpack__`` becomes
an ndarray over the same memory, so the kernels read (and ``out=`` or running
statistics are written) in place, without a copy. A tensor that requires grad
is refused: cbn computes outside any autograd graph, and reading it silently
would detach it behind the caller's back.
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
        hint = ""
        if native.kind in "iub":
            hint = f"; convert it to a float dtype first, e.g. {name}.astype(np.float32)"
        raise TypeError(
            f"{name} has dtype {np.dtype(dtype)}; cbn supports float16, bfloat16, "
            f"float32 and float64 data{hint}"
        ) from None


def _tensor_to_numpy(value):
    """A PyTorch-like tensor (duck-typed: cbn never imports torch) as an
    ndarray, and the dtype its results come back in: for what DLPack does
    not carry to NumPy (bfloat16, other devices, objects without DLPack)."""
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


def _requires_grad(value):
    return getattr(value, "requires_grad", False) is True


def check_no_grad(value, name):
    """TypeError for a tensor that requires grad (an autograd leaf or result)."""
    if _requires_grad(value):
        raise TypeError(
            f"{name} is a {type(value).__name__} that requires grad; cbn works "
            f"outside autograd: pass {name}.detach()"
        )


def _from_dlpack(value):
    """``value``'s memory as an ndarray (no copy), or the reason NumPy cannot
    read it (another device, a dtype NumPy lacks such as bfloat16)."""
    try:
        return np.from_dlpack(value), None
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        return None, exc


def to_numpy(value, name="value"):
    """An ndarray view of any array-like, PyTorch CPU tensors included (one
    that requires grad is detached: for parameters read from a model)."""
    if _requires_grad(value) and hasattr(value, "detach"):
        value = value.detach()
    return to_numpy_with_dtype(value, name)[0]


def to_numpy_with_dtype(value, name="input"):
    """``(array, result_dtype)``: ``value`` as an ndarray (no copy where it
    already is one or implements DLPack on the CPU) and the dtype results
    computed from it come back in. TypeError for None, a tensor that
    requires grad and what is not an array."""
    if isinstance(value, np.ndarray):
        return value, value.dtype
    if value is None:
        raise TypeError(f"{name}: expected an array, got None")
    check_no_grad(value, name)
    reason = None
    if hasattr(value, "__dlpack__"):
        array, reason = _from_dlpack(value)
        if array is not None:
            return array, array.dtype
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return _tensor_to_numpy(value)
    if reason is not None and not hasattr(value, "__array__"):
        raise TypeError(
            f"{name} is a {type(value).__name__} with DLPack that NumPy cannot read "
            f"on the CPU ({reason})"
        )
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged sequences and other non-arrays
        raise TypeError(
            f"expected an array-like, got {type(value).__name__}: {exc}"
        ) from None
    return array, array.dtype


def writable_array(value, name, purpose):
    """The ndarray through which ``value`` is written in place: ``value``
    itself, or the memory of a DLPack tensor on the CPU (a torch tensor).
    TypeError for anything else; whether it may be written (read-only,
    layout) is the caller's rule."""
    if isinstance(value, np.ndarray):
        return value
    check_no_grad(value, name)
    if hasattr(value, "__dlpack__"):
        array, reason = _from_dlpack(value)
        if array is not None:
            return array
        raise TypeError(
            f"{name} is a {type(value).__name__} that NumPy cannot write in place "
            f"({reason}); pass a NumPy array or a CPU tensor"
        )
    raise TypeError(
        f"{name} must be a NumPy array or a CPU tensor with DLPack (such as a torch "
        f"tensor) to be {purpose}, got {type(value).__name__}"
    )


def input_array(x, name="input"):
    """``(array, result_dtype)`` for data: an ndarray of a supported float
    dtype, not copied unless it was not an array. TypeError otherwise."""
    array, result_dtype = to_numpy_with_dtype(x, name)
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
    array = to_numpy_with_dtype(value, name)[0]
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
