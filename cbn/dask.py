"""Batch normalization of Dask arrays: per-channel moments of data that never
sits in memory at once, and an inference layer applied block by block.

Design: Dask only schedules; every number comes from cbn's kernels. The
moments are a tree reduction of :meth:`cbn.Moments.of` of each block. Its
shape is fixed by the block grid alone: per channel block, the moments of the
blocks (in C order of the grid over the other axes) are merged in consecutive
groups of ``FAN_IN``, left to right, level by level, and the channel blocks
are put side by side at the end. No merge depends on which worker or thread
ran what, so every scheduler and worker count gives the same bits.

``import cbn`` never imports Dask; this module does (``pip install
"cbn[dask]"``).
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if importlib.util.find_spec("dask") is None:
    raise ImportError('cbn.dask needs Dask, which is not installed: pip install "cbn[dask]"')

import dask
import dask.array as da
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import _convert
from .frozen import FrozenBatchNorm
from .layer import BatchNorm
from .moments import Moments

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["apply", "moments"]

# Moments merged per task of the tree: small enough that a merge task is
# cheap, large enough that the tree stays shallow (8**4 = 4096 blocks in four
# levels). Changing it changes the grouping, hence the last bits.
FAN_IN = 8


def moments(x: da.Array, *, axis: int = 1) -> Moments:
    """Per-channel moments of a Dask array, computed block by block.

    Parameters
    ----------
    x : dask.array.Array
        Data of at least 2 dimensions, of a float dtype cbn supports
        (float16, bfloat16, float32, float64), in any chunking. Blocks may
        be empty; sizes along the channel axis must be known.
    axis : int, keyword-only
        The channel axis (1 for NCHW and (N, C); -1 for channels-last).

    Returns
    -------
    cbn.Moments
        The count, mean and M2 of every channel over all the other axes,
        computed now with Dask's current scheduler.

    Raises
    ------
    TypeError
        ``x`` is not a Dask array (for a NumPy array, use
        :meth:`cbn.Moments.of`) or its dtype is not a supported float.
    ValueError
        ``x`` has fewer than 2 dimensions, ``axis`` is out of range, or the
        channel axis has no channels or unknown chunk sizes.

    Notes
    -----
    The moments of each block are :meth:`cbn.Moments.of`'s; they are merged
    per channel block in a tree of fixed shape (see the module docstring),
    so the result has the same bits with any scheduler and any number of
    workers, and equals ``cbn.Moments.of(x.compute())`` to rounding (both
    merge exactly, in different orders).

    Examples
    --------
    >>> x = da.from_array(np.load("data.npy", mmap_mode="r"), chunks=(1024, -1, -1, -1))
    >>> layer.calibrate(cbn.dask.moments(x))
    """
    x = _dask_array(x, "moments", "cbn.Moments.of(x, axis=axis)")
    ax = _channel_axis(x, axis)
    return dask.compute(Delayed(*_moments_graph(x, ax)))[0]


def apply(layer: BatchNorm | FrozenBatchNorm, x: da.Array) -> da.Array:
    """An eval-mode layer applied to a Dask array, block by block.

    Parameters
    ----------
    layer : cbn.BatchNorm in eval mode, or cbn.FrozenBatchNorm
        The layer whose inference computation is applied. Its current
        parameters and statistics are copied now: later changes to the
        layer do not reach the returned array.
    x : dask.array.Array
        Input in any chunking, with the layer's channel count on its
        channel axis (``layer.axis``).

    Returns
    -------
    dask.array.Array
        A lazy array of ``x``'s shape, chunks and dtype holding
        ``layer(x.compute())``, bit for bit: each block is computed by a
        frozen copy of the layer restricted to the block's channels.

    Raises
    ------
    TypeError
        ``layer`` is not a cbn layer, or ``x`` is not a Dask array (or has
        a dtype cbn does not take).
    ValueError
        The layer is in training mode or has no running statistics (both
        normalize with each batch's own statistics, which blocks do not
        have), or ``x`` does not fit the layer (rank, channel count).
    """
    if isinstance(layer, BatchNorm):
        if layer.training:
            raise ValueError(
                f"cbn.dask.apply needs an eval-mode layer: {type(layer).__name__} in "
                "training mode normalizes with each batch's statistics; call .eval() "
                "first (or calibrate it with cbn.dask.moments)"
            )
        frozen = layer.freeze()   # ValueError without running statistics
    elif isinstance(layer, FrozenBatchNorm):
        # a copy: its forward keeps the last output for a ReLU's backward,
        # and the blocks' calls must not replace the caller's
        frozen = copy.deepcopy(layer)
    else:
        raise TypeError(f"cbn.dask.apply expects a cbn.BatchNorm in eval mode or a "
                        f"cbn.FrozenBatchNorm, got {type(layer).__name__}")
    x = _dask_array(x, "apply", "the layer itself: layer(x)")
    ax = _channel_axis(x, frozen.axis)
    # An empty input of x's rank through the layer: its own checks (rank,
    # channels, dtype) now rather than in a worker, and the output dtype.
    probe = np.empty(tuple(frozen.num_features if k == ax else 0 for k in range(x.ndim)),
                     dtype=x.dtype)
    meta = frozen.forward(probe)
    if x.shape[ax] != frozen.num_features:
        raise ValueError(f"{type(layer).__name__}({frozen.num_features}) expects "
                         f"{frozen.num_features} channels on axis {frozen.axis}, got x of "
                         f"shape {x.shape}")
    bounds = np.cumsum((0, *x.chunks[ax]))
    normalize = _BlockNormalize(ax, [_channel_slice(frozen, int(lo), int(hi))
                                     for lo, hi in zip(bounds[:-1], bounds[1:])])
    return x.map_blocks(normalize, dtype=meta.dtype, meta=meta[(slice(0, 0),) * x.ndim],
                        token="cbn-apply")


# -- blocks


def _moments_graph(x: da.Array, ax: int) -> tuple[str, HighLevelGraph]:
    """The key and graph of :func:`moments`' tree (see the module docstring)."""
    token = tokenize(x, ax, FAN_IN)
    leaf, merge, whole = (f"cbn-moments-{part}-{token}" for part in ("block", "merge", "whole"))
    grid = [range(n) for n in x.numblocks]
    grid[ax] = range(1)                     # the other axes' blocks, in C order
    tasks: dict[Any, Any] = {}
    channel_blocks = []
    for j, width in enumerate(x.chunks[ax]):
        if width == 0:
            continue
        level: list[tuple[Any, ...]] = []
        for k, index in enumerate(itertools.product(*grid)):
            block = (x.name, *index[:ax], j, *index[ax + 1:])
            tasks[leaf, j, k] = (_block_moments, block, ax)
            level.append((leaf, j, k))
        depth = 0
        while len(level) > 1:
            groups = [level[k:k + FAN_IN] for k in range(0, len(level), FAN_IN)]
            level = [(merge, depth, j, g) for g in range(len(groups))]
            tasks.update({key: (_merge, group) for key, group in zip(level, groups)})
            depth += 1
        channel_blocks.append(level[0])
    tasks[whole] = (_side_by_side, channel_blocks)
    return whole, HighLevelGraph.from_collections(whole, tasks, dependencies=[x])


def _block_moments(block: NDArray[Any], axis: int) -> Moments:
    return Moments.of(block, axis=axis)


def _merge(parts: list[Moments]) -> Moments:
    return Moments.merge_all(parts)


def _side_by_side(parts: list[Moments]) -> Moments:
    """The moments of consecutive channel blocks as one object (the blocks
    of one array: every channel holds the same number of values)."""
    counts = {part.count for part in parts}
    if len(counts) != 1:  # cannot happen for the blocks of one array
        raise RuntimeError(f"channel blocks with different counts {sorted(counts)}")
    return Moments.from_array(np.concatenate(
        ([float(counts.pop())], *[part.mean for part in parts],
         *[part.m2 for part in parts])))


class _BlockNormalize:
    """``map_blocks``' function: a block through the layer of its channel
    block (one frozen layer per channel block, built once)."""

    def __init__(self, axis: int, layers: list[FrozenBatchNorm]) -> None:
        self.axis = axis
        self.layers = layers

    def __call__(self, block: NDArray[Any], block_id: tuple[int, ...]) -> NDArray[Any]:
        return self.layers[block_id[self.axis]].forward(block)


def _channel_slice(frozen: FrozenBatchNorm, lo: int, hi: int) -> FrozenBatchNorm:
    """A frozen layer for channels lo:hi of ``frozen`` (itself when that is
    all of them), with the same eps, axis, activation and dtype."""
    if (lo, hi) == (0, frozen.num_features):
        return frozen
    state = {key: value if value.ndim == 0 else value[lo:hi]
             for key, value in frozen.state_dict().items()}
    return FrozenBatchNorm(state, eps=frozen.eps, axis=frozen.axis,
                           activation=frozen.activation, dtype=frozen.dtype)


# -- checks


def _dask_array(x: Any, function: str, instead: str) -> da.Array:
    if isinstance(x, da.Array):
        return x
    if isinstance(x, np.ndarray):
        raise TypeError(f"cbn.dask.{function} expects a Dask array, got a NumPy array: "
                        f"use {instead}")
    raise TypeError(f"cbn.dask.{function} expects a Dask array, got {type(x).__name__}")


def _channel_axis(x: da.Array, axis: int) -> int:
    """``axis`` as an index in [0, x.ndim), after the checks every block
    would fail (rank, dtype)."""
    axis = _convert.integer(axis, "axis")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and channels), got "
                         f"shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for x of shape {x.shape} "
                         f"({x.ndim}D)")
    _convert.compute_dtype(x.dtype, "x")   # TypeError for dtypes cbn does not take
    ax = axis % x.ndim
    if any(math.isnan(size) for size in x.chunks[ax]):
        raise ValueError(f"x has unknown chunk sizes along the channel axis {axis}; "
                         "call x.compute_chunk_sizes() first")
    if x.shape[ax] == 0:
        raise ValueError(f"x has shape {x.shape}: axis {axis} has no channels")
    return ax
