"""Reading a batch norm's entries out of a state dict (a layer's own, or a whole
model's, PyTorch's included) without importing torch."""
from collections.abc import Mapping

import numpy as np

from . import _checks

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def entries(state_dict, prefix, owner, allow_empty=False):
    """The batch norm's entries under ``prefix`` as {key: ndarray}, keys without
    the prefix. ``prefix`` is a module path such as "layer1.0.bn1" (a trailing
    "." is optional). Entries of nested modules under it are ignored; any other
    key directly under it is an error, as is a state dict with no entry there.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if prefix and not prefix.endswith("."):
        prefix += "."
    found, unexpected = {}, []
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        leaf = key[len(prefix):]
        if "." in leaf:
            continue
        if leaf in STATE_KEYS:
            found[leaf] = _checks.to_numpy(value)
        else:
            unexpected.append(key)
    where = f" under prefix {prefix!r}" if prefix else ""
    if unexpected:
        raise ValueError(f"{owner}: unexpected keys{where}: {unexpected}")
    if not found and not allow_empty:
        raise ValueError(
            f"{owner}: no batch-norm entries{where}; expected keys among "
            f"{[prefix + key for key in STATE_KEYS]}"
        )
    return found


def layout(found, owner):
    """(num_features, affine, track_running_stats, dtype) implied by the entries.

    weight and bias come together (affine), and so do running_mean and
    running_var (tracking); every per-channel entry has the same length. The
    dtype is float64 when the per-channel arrays are float64, else float32.
    """
    for first, second in (("weight", "bias"), ("running_mean", "running_var")):
        if (first in found) != (second in found):
            missing = second if first in found else first
            raise ValueError(f"{owner}: {missing!r} is missing (the state dict has "
                             f"{sorted(found)})")
    vectors = {key: value for key, value in found.items() if key != "num_batches_tracked"}
    if not vectors:
        raise ValueError(f"{owner}: a state dict with only num_batches_tracked has no "
                         "per-channel arrays to infer num_features from")
    shapes = {key: value.shape for key, value in vectors.items()}
    for key, value in vectors.items():
        _checks.real_dtype(value, key)
        if value.ndim != 1:
            raise ValueError(f"{owner}: {key} must be 1D (one value per channel), "
                             f"got shape {value.shape}")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{owner}: per-channel entries differ in length: {shapes}")
    num_features = next(iter(shapes.values()))[0]
    if num_features < 1:
        raise ValueError(f"{owner}: per-channel entries are empty (shape (0,))")
    wide = all(value.dtype == np.float64 for value in vectors.values())
    dtype = np.dtype(np.float64 if wide else np.float32)
    return num_features, "weight" in found, "running_mean" in found, dtype


def batch_count(value):
    """num_batches_tracked from a state dict: a single non-negative integer."""
    array = _checks.to_numpy(value)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise TypeError(
            "num_batches_tracked must be a single integer, got an array of "
            f"shape {array.shape} and dtype {array.dtype}"
        )
    count = int(array.reshape(()))
    if not 0 <= count < 2**63:  # PyTorch keeps it in an int64
        raise ValueError(f"num_batches_tracked must be in [0, 2**63), got {count}")
    return count
