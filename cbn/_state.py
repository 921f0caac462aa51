"""A batch norm's state to and from elsewhere: reading its entries out of a
state dict (a layer's own, or a whole model's, PyTorch's included) without
importing torch, building layers from state dicts and PyTorch modules, and
the PyTorch module of a layer."""
from collections.abc import Mapping

import numpy as np

from . import _convert

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
            found[leaf] = _convert.to_numpy(value, key)
        else:
            unexpected.append(key)
    where = f" under prefix {prefix!r}" if prefix else ""
    if unexpected:
        raise ValueError(f"{owner}: unexpected keys{where}: {unexpected}")
    if not found and not allow_empty:
        raise ValueError(
            f"{owner}: no batch-norm entries{where}; expected keys among "
            f"{[prefix + key for key in STATE_KEYS]}{_prefix_hint(state_dict)}"
        )
    return found


def batch_norm_prefixes(state_dict):
    """The module paths of a whole model's state dict that hold a batch
    norm: those with running statistics or a batch count, else (a model of
    affine batch norms without running statistics) those whose entries are
    all batch-norm keys holding 1-D arrays (a dense layer's weight is not)."""
    leaves = {}
    for key, value in state_dict.items():
        if isinstance(key, str) and "." in key:
            path, _, leaf = key.rpartition(".")
            leaves.setdefault(path, {})[leaf] = value
    tracked = [path for path, found in leaves.items()
               if found.keys() & {"running_mean", "running_var", "num_batches_tracked"}]
    return tracked or [
        path for path, found in leaves.items()
        if found.keys() <= set(STATE_KEYS)
        and all(len(getattr(value, "shape", ())) == 1 for key, value in found.items()
                if key != "num_batches_tracked")]


def _prefix_hint(state_dict, shown=10):
    """The end of the "no entries" message: the prefixes found, if any."""
    prefixes = batch_norm_prefixes(state_dict)
    if not prefixes:
        return ""
    listed = prefixes[:shown] + ([f"... ({len(prefixes)} in all)"]
                                 if len(prefixes) > shown else [])
    return (f". The state dict holds batch norms under the prefixes {listed}: "
            f"pass one as prefix=, e.g. prefix={prefixes[0]!r}")


def layout(found, owner):
    """(num_features, affine, bias, track_running_stats, dtype) implied by the
    entries.

    A bias comes with a weight (affine; a weight alone is PyTorch's
    ``bias=False``), and running_mean with running_var (tracking); every
    per-channel entry has the same length. The dtype is float64 when all the
    per-channel arrays are float64, else float32.
    """
    missing = None
    if "bias" in found and "weight" not in found:
        missing = "weight"
    elif ("running_mean" in found) != ("running_var" in found):
        missing = "running_var" if "running_mean" in found else "running_mean"
    if missing:
        raise ValueError(f"{owner}: {missing!r} is missing (the state dict has "
                         f"{sorted(found)})")
    vectors = {key: value for key, value in found.items() if key != "num_batches_tracked"}
    if not vectors:
        raise ValueError(f"{owner}: a state dict with only num_batches_tracked has no "
                         "per-channel arrays to infer num_features from")
    shapes = {key: value.shape for key, value in vectors.items()}
    for key, value in vectors.items():
        _convert.real_array(value, key)
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
    return (num_features, "weight" in found, "bias" in found, "running_mean" in found,
            dtype)


def batch_count(value):
    """num_batches_tracked from a state dict: a single non-negative integer."""
    array = _convert.to_numpy(value)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise TypeError(
            "num_batches_tracked must be a single integer, got an array of "
            f"shape {array.shape} and dtype {array.dtype}"
        )
    count = int(array.reshape(()))
    if not 0 <= count < 2**63:  # PyTorch keeps it in an int64
        raise ValueError(f"num_batches_tracked must be in [0, 2**63), got {count}")
    return count


# ---------------------------------------------------------------------------
# Layers from state dicts and PyTorch modules, and back

# torch.nn class names and the cbn classes of the same name (cbn never imports
# torch to read a module).
TORCH_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


def layer_from_state_dict(cls, state_dict, *, prefix, eps, momentum, axis, dtype,
                          activation):
    """BatchNorm.from_state_dict."""
    owner = f"{cls.__name__}.from_state_dict"
    found = entries(state_dict, prefix, owner)
    num_features, affine, bias, tracking, found_dtype = layout(found, owner)
    layer = cls(num_features, eps=eps, momentum=momentum, affine=affine,
                track_running_stats=tracking, bias=bias or not affine, axis=axis,
                dtype=found_dtype if dtype is None else dtype, activation=activation)
    layer.load_state_dict(found)
    return layer


def layer_from_torch(cls, module, *, axis, dtype, activation):
    """BatchNorm.from_torch."""
    from . import layer as layer_module
    missing = [name for name in ("num_features", "eps", "momentum", "affine",
                                 "track_running_stats", "training", "state_dict")
               if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"{cls.__name__}.from_torch expects a torch.nn.BatchNorm*d-like "
            f"module; {type(module).__name__} has no attribute(s) {missing}"
        )
    if cls is layer_module.BatchNorm and type(module).__name__ in TORCH_NAMES:
        cls = getattr(layer_module, type(module).__name__)
    owner = f"{cls.__name__}.from_torch"
    # affine=False with track_running_stats=False has an empty state dict
    found = entries(module.state_dict(), "", owner, allow_empty=True)
    found_dtype = np.float32
    if set(found) - {"num_batches_tracked"}:
        found_dtype = layout(found, owner)[4]
    affine = bool(module.affine)
    # PyTorch 2.13's bias=False: a weight and no bias (module.bias is None)
    bias = "bias" in found or not affine
    # A module keeps its buffers when track_running_stats is switched off
    # after construction (eval then still uses them); so does the layer.
    layer = cls(module.num_features, eps=float(module.eps),
                momentum=None if module.momentum is None else float(module.momentum),
                affine=affine, track_running_stats="running_mean" in found, bias=bias,
                axis=axis, dtype=found_dtype if dtype is None else dtype,
                activation=activation)
    layer.load_state_dict(found)
    layer.track_running_stats = bool(module.track_running_stats)
    return layer.train(bool(module.training))


def layer_to_torch(layer):
    """BatchNorm.to_torch: the torch.nn.BatchNorm1d/2d/3d of ``layer``."""
    import torch

    owner = f"{type(layer).__name__}.to_torch()"
    if layer.activation is not None:
        raise ValueError(
            f"{owner}: activation={layer.activation!r} has no counterpart in a "
            "torch.nn batch norm; set layer.activation = None and add torch.nn.ReLU "
            "after the module"
        )
    if layer.running_var_ddof != 1:
        raise ValueError(
            f"{owner}: running_var_ddof={layer.running_var_ddof} (the biased running "
            "variance) has no counterpart in a torch.nn batch norm, which keeps the "
            "unbiased one"
        )
    name = next((base.__name__ for base in type(layer).__mro__
                 if base.__name__ in TORCH_NAMES), None)
    if name is None:
        raise ValueError(
            f"{owner}: a plain BatchNorm accepts any rank, and PyTorch has one class "
            "per rank; build the layer as cbn.BatchNorm1d, BatchNorm2d or BatchNorm3d "
            "(or load its state_dict() into the torch module of your choice)"
        )
    has_buffers = layer.running_mean is not None
    module = getattr(torch.nn, name)(
        layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
        track_running_stats=has_buffers, bias=layer._bias_enabled,
        dtype=torch.float64 if layer.dtype == np.float64 else torch.float32)
    module.load_state_dict({key: torch.from_numpy(np.array(value))
                            for key, value in layer.state_dict().items()})
    module.track_running_stats = layer.track_running_stats
    return module.train(layer.training)
