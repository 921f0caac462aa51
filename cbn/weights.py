"""Weight files that are safe to load: cbn.save and cbn.load.

A file is an ``.npz`` archive of plain arrays, read back with
``allow_pickle=False``: hyper-parameters are stored as data (0-d arrays and
strings), never as pickled objects, so loading a file never runs code. A
pickled layer (``pickle.dumps(layer)``) is for trusted files only.

Entries: ``cbn.format`` ("cbn-weights"), ``cbn.version`` (1), ``cbn.kind``
(the class name, or "state_dict"), ``hp.<name>`` (hyper-parameters) and
``state.<key>`` (the state dict's arrays).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import IO, Any, Union

import numpy as np

from . import _convert
from .frozen import FrozenBatchNorm
from .layer import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

__all__ = ["save", "load"]

FORMAT = "cbn-weights"
VERSION = 1
LAYERS = {cls.__name__: cls for cls in (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                                        SyncBatchNorm)}
Saved = Union[BatchNorm, FrozenBatchNorm, dict]
File = Union[str, "os.PathLike[str]", IO[bytes]]


def save(file: File, obj: Saved) -> None:
    """Write a layer or a state dict to ``file`` (a path, written as given,
    or a binary file object) as a safe ``.npz`` weight file.

    Parameters
    ----------
    file : str, path-like or binary file object
        Where to write. A path gets no suffix added.
    obj : BatchNorm (1d/2d/3d), SyncBatchNorm, FrozenBatchNorm, or a mapping
        of str to arrays
        A layer keeps its hyper-parameters, state and mode; a
        SyncBatchNorm's communicator is not saved.

    Raises
    ------
    TypeError
        ``obj`` is none of those, a subclass cbn cannot rebuild, or a state
        dict with non-str keys or object arrays.
    """
    entries = {"cbn.format": np.array(FORMAT), "cbn.version": np.array(VERSION)}
    if isinstance(obj, FrozenBatchNorm):
        kind, hyper, state = "FrozenBatchNorm", _frozen_hyper(obj), obj.state_dict()
    elif isinstance(obj, BatchNorm):
        kind, hyper, state = type(obj).__name__, _layer_hyper(obj), obj.state_dict()
        if kind not in LAYERS:
            raise TypeError(f"cbn.save: {kind} is a subclass cbn does not know how to "
                            "rebuild; save its state_dict() instead")
    elif isinstance(obj, Mapping):
        kind, hyper, state = "state_dict", {}, _plain_state(obj)
    else:
        raise TypeError(f"cbn.save expects a BatchNorm, FrozenBatchNorm, SyncBatchNorm or "
                        f"a state dict, got {type(obj).__name__}")
    entries["cbn.kind"] = np.array(kind)
    entries.update({f"hp.{name}": value for name, value in hyper.items()})
    entries.update({f"state.{key}": value for key, value in state.items()})
    if isinstance(file, (str, os.PathLike)):
        with open(file, "wb") as handle:
            np.savez(handle, **entries)
    else:
        np.savez(file, **entries)


def load(file: File) -> Saved:
    """Read what :func:`save` wrote. Never runs code from the file.

    Parameters
    ----------
    file : str, path-like or binary file object
        A file written by :func:`save`.

    Returns
    -------
    BatchNorm, SyncBatchNorm, FrozenBatchNorm or dict
        The layer (of its saved class, in the mode it was saved in) or the
        state dict of NumPy arrays.

    Raises
    ------
    ValueError
        The file is truncated, corrupted, or not a cbn weight file.
    """
    unreadable = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
                  zipfile.LargeZipFile, UnicodeDecodeError, NotImplementedError)
    try:
        archive = np.load(file, allow_pickle=False)
        if not hasattr(archive, "files"):   # a lone .npy array
            raise ValueError("an .npy array, not an .npz archive")
        with archive:
            entries = {name: archive[name] for name in archive.files}
    except unreadable as error:
        raise ValueError(f"cbn.load: not a readable cbn weight file ({error})") from error
    try:
        return _rebuild(entries)
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise ValueError(f"cbn.load: not a valid cbn weight file ({error})") from error


# -- what is stored

def _layer_hyper(layer: BatchNorm) -> dict[str, Any]:
    hyper = {
        "eps": np.array(layer.eps, np.float64),
        # None (cumulative average) is an empty array
        "momentum": np.array([] if layer.momentum is None else layer.momentum, np.float64),
        "affine": np.array(layer.affine), "bias": np.array(layer._bias_enabled),
        "track_running_stats": np.array(layer.track_running_stats),
        "has_running_stats": np.array(layer.running_mean is not None),
        "axis": np.array(layer.axis, np.int64), "dtype": np.array(layer.dtype.name),
        "activation": np.array(layer.activation or ""),
        "nonfinite": np.array(layer.nonfinite), "training": np.array(layer.training),
        "running_var_ddof": np.array(layer.running_var_ddof, np.int64),
        "num_features": np.array(layer.num_features, np.int64),
    }
    hyper.update(_ranks(layer))
    if isinstance(layer, SyncBatchNorm):
        hyper["reduction"] = np.array(layer.reduction)
    return hyper


def _frozen_hyper(frozen: FrozenBatchNorm) -> dict[str, Any]:
    hyper = {"eps": np.array(frozen.eps, np.float64), "axis": np.array(frozen.axis, np.int64),
             "dtype": np.array(frozen.dtype.name),
             "activation": np.array(frozen.activation or ""),
             "bias": np.array(frozen._bias_enabled)}
    hyper.update(_ranks(frozen))
    return hyper


def _ranks(layer: Any) -> dict[str, Any]:
    """The input ranks a layer accepts (empty: any rank >= 2)."""
    ranks = layer._ranks
    return {"ranks": np.array([] if ranks is None else [ranks.start, ranks.stop], np.int64),
            "ranks_text": np.array(layer._ranks_text or "")}


def _plain_state(state: Mapping[Any, Any]) -> dict[str, Any]:
    plain = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"cbn.save: state dict keys must be str, got {key!r}")
        array = np.ascontiguousarray(_convert.to_numpy(value))
        if array.dtype.hasobject:
            raise TypeError(f"cbn.save: {key!r} holds Python objects (dtype object), "
                            "which a safe weight file cannot store")
        plain[key] = array
    return plain


# -- reading it back, every field checked

def _text(entries: dict[str, Any], name: str) -> str:
    value = entries[name]
    if value.dtype.kind != "U" or value.shape != ():
        raise ValueError(f"{name} must be a string")
    return str(value)


def _scalar(entries: dict[str, Any], name: str, kind: str) -> Any:
    value = entries[name]
    if value.dtype.kind not in kind or value.shape != ():
        raise ValueError(f"{name} must be a single value of kind {kind!r}, got "
                         f"{value.dtype} {value.shape}")
    return value.item()


def _rebuild(entries: dict[str, Any]) -> Saved:
    if "cbn.format" not in entries or _text(entries, "cbn.format") != FORMAT:
        raise ValueError("no cbn.format entry: this .npz was not written by cbn.save")
    version = _scalar(entries, "cbn.version", "iu")
    if version != VERSION:
        raise ValueError(f"format version {version}; this cbn reads version {VERSION}")
    kind = _text(entries, "cbn.kind")
    state = {name[len("state."):]: value for name, value in entries.items()
             if name.startswith("state.")}
    if kind == "state_dict":
        return state
    hyper = {name[len("hp."):]: name for name in entries if name.startswith("hp.")}
    text = lambda name: _text(entries, hyper[name])
    scalar = lambda name, k: _scalar(entries, hyper[name], k)
    activation = text("activation") or None
    ranks = entries[hyper["ranks"]]
    if ranks.dtype.kind not in "iu" or ranks.shape not in ((0,), (2,)):
        raise ValueError("hp.ranks must hold 0 or 2 integers")
    if kind == "FrozenBatchNorm":
        frozen = FrozenBatchNorm(state, eps=scalar("eps", "f"), axis=scalar("axis", "iu"),
                                 activation=activation, dtype=text("dtype"),
                                 bias=scalar("bias", "b"))
        _set_ranks(frozen, ranks, text("ranks_text"))
        return frozen
    if kind not in LAYERS:
        raise ValueError(f"unknown kind {kind!r}")
    momentum = entries[hyper["momentum"]]
    if momentum.dtype.kind != "f" or momentum.shape not in ((), (0,)):
        raise ValueError("hp.momentum must be a number or empty (None)")
    layer = BatchNorm(scalar("num_features", "iu"), scalar("eps", "f"),
                      None if momentum.shape == (0,) else momentum.item(),
                      scalar("affine", "b"), scalar("has_running_stats", "b"),
                      bias=scalar("bias", "b"), axis=scalar("axis", "iu"),
                      dtype=text("dtype"), activation=activation,
                      nonfinite=text("nonfinite"),
                      running_var_ddof=scalar("running_var_ddof", "iu"))
    layer.load_state_dict(state)
    layer.track_running_stats = scalar("track_running_stats", "b")
    layer.train(scalar("training", "b"))
    # The class's own state restored as unpickling would, from the checked
    # layer: a SyncBatchNorm gets its communicator (COMM_WORLD) on first use.
    built = LAYERS[kind].__new__(LAYERS[kind])
    built.__setstate__(layer.__getstate__())
    if kind == "SyncBatchNorm":
        built.reduction = text("reduction")
    _set_ranks(built, ranks, text("ranks_text"))
    return built


def _set_ranks(layer: Any, ranks: Any, ranks_text: str) -> None:
    if ranks.shape == (2,):
        start, stop = (int(k) for k in ranks)
        if not 2 <= start < stop <= 65:
            raise ValueError(f"hp.ranks [{start}, {stop}) is not a range of ranks")
        layer._set_channels(layer.num_features, layer.axis, range(start, stop),
                            ranks_text or None)
    elif type(layer)._ranks is not None:
        raise ValueError(f"{type(layer).__name__} accepts fixed ranks; hp.ranks is empty")

