"""BatchNorm.calibrate: running statistics re-estimated over a whole data
set ("precise BN", "BN adaptation" after training, pruning or quantization),
optionally over the ranks of an MPI communicator."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import distributed
from ._dispatch import kernels
from .moments import Moments, merge_parts

MODES = ("population", "batch_average")


def calibrate(layer: Any, data: Any, *, mode: str, comm: Any, progress: bool,
              mask: Any = None) -> Moments:
    """The work of :meth:`cbn.BatchNorm.calibrate` (see it for the meaning).

    Parameters
    ----------
    layer : BatchNorm
        The layer whose running statistics are set.
    data : iterable of array_like or (array_like, mask) pairs, or Moments
        The batches, or their moments.
    mode : "population" or "batch_average"
        How the running statistics are formed.
    comm : MPI communicator or None
        Merge over its ranks.
    progress : bool
        Show a progress bar.
    mask : array_like of bool, optional
        The mask of every batch given without its own.

    Returns
    -------
    Moments
        The moments of all the data.
    """
    owner = f"{type(layer).__name__}.calibrate"
    if layer.running_mean is None:
        raise ValueError(f"{owner} needs running statistics; this layer has "
                         "track_running_stats=False")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if comm is not None:
        comm = distributed.resolve_comm(comm, owner)
    C = layer.num_features
    try:
        scan = _scan_data(layer, data, mode, progress, owner, mask)
    except Exception as error:
        if comm is None:
            raise
        scan = Scan(C, error)   # every rank must reach the collective
    if comm is not None:
        scan = _merge_ranks(comm, scan, owner)
    count, mean, m2 = scan.moments
    ddof = layer.running_var_ddof
    if mode == "population":
        if count < ddof + 1:
            raise ValueError(f"{owner}: the data hold {count} value(s) per channel; the "
                             f"{'unbiased ' if ddof else ''}variance needs at least "
                             f"{ddof + 1}")
        _store(layer, mean, m2 / (count - ddof))
    else:
        if scan.batches == 0:
            raise ValueError(f"{owner}: no batch with values")
        _store(layer, scan.sum_means / scan.batches, scan.sum_vars / scan.batches)
    return Moments._of_parts(count, mean, m2)


class Scan:
    """What calibrate learns from a rank's data: the moments of all of it,
    and for mode="batch_average" the number of non-empty batches and the sums
    of their means and variances (with the layer's ddof), or the error its
    data raised.

    Parameters
    ----------
    C : int
        The channel count.
    error : BaseException, optional
        The error this rank's data raised.
    ddof : int
        The variance's delta degrees of freedom (the layer's
        running_var_ddof).
    """

    def __init__(self, C, error=None, ddof=1):
        self.ddof = ddof
        self.moments = (0, np.zeros(C), np.zeros(C))
        self.batches = 0
        self.sum_means, self.sum_vars = np.zeros(C), np.zeros(C)
        self.error = error

    def add(self, count, mean, m2):
        """Merge one non-empty batch's moments.

        Parameters
        ----------
        count : int
            Values per channel of the batch.
        mean, m2 : ndarray of shape (C,)
            Its per-channel mean and sum of squared deviations.
        """
        self.moments = merge_parts(self.moments, (count, mean, m2))
        self.batches += 1
        self.sum_means = self.sum_means + mean
        if count > self.ddof:   # else mode="population", which does not use them
            self.sum_vars = self.sum_vars + m2 / (count - self.ddof)


def _batch_and_mask(batch, mask):
    """A batch of calibrate's data: an array, or an ``(x, mask)`` pair (a
    tuple of two); ``mask``: calibrate's own, for batches without one."""
    if isinstance(batch, tuple) and len(batch) == 2:
        if mask is not None:
            raise ValueError("a batch given as an (x, mask) pair, and mask= as well; "
                             "pass one of them")
        return batch
    return batch, mask


def _scan_data(layer, data, mode, progress, owner, mask=None):
    C = layer.num_features
    scan = Scan(C, ddof=layer.running_var_ddof)
    if isinstance(data, Moments):
        if mode != "population":
            raise ValueError(f"{owner}: a Moments object holds the population's "
                             "moments only; mode='batch_average' needs the batches")
        if mask is not None:
            raise ValueError(f"{owner}: mask= applies to batches, and data is a "
                             "Moments object (take the mask into Moments.of/update)")
        if data.num_features != C:
            raise ValueError(f"{owner}: the moments have {data.num_features} channels, "
                             f"the layer {C}")
        scan.moments = (data.count, data.mean, data.m2)
        return scan
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, np.ndarray)):
        raise TypeError(f"{owner}: data must be an iterable of batches or a "
                        f"cbn.Moments, got {type(data).__name__}")
    check = layer.nonfinite == "raise"
    bar = _progress(data) if progress else None
    try:
        for k, batch in enumerate(data):
            try:
                x, batch_mask = _batch_and_mask(batch, mask)
                count, mean, m2, _ = kernels.moments(x, layer.axis, layer._accepts,
                                                     "batch", batch_mask)
                if check:
                    bad = distributed.check_finite(mean, m2)
                    if bad is not None:
                        raise bad
                if mode == "batch_average" and count == 1 and scan.ddof == 1:
                    raise ValueError("1 value per channel has no unbiased variance")
            except (ValueError, TypeError, FloatingPointError) as error:
                raise type(error)(f"{owner}: batch {k}: {error}") from error
            if bar is not None:
                bar.update(1)
            if count:
                scan.add(count, mean, m2)
    finally:
        if bar is not None:
            bar.close()
    return scan


def _merge_ranks(comm, scan, owner):
    """Every rank's scan merged in rank order: the same bits on every rank."""
    C = scan.sum_means.shape[0]
    row = np.zeros(4 * C + 3)
    if scan.error is not None:
        row[0] = distributed.FAILED
    else:
        count, mean, m2 = scan.moments
        row[1], row[2:C + 2], row[C + 2:2 * C + 2] = count, mean, m2
        row[2 * C + 2] = scan.batches
        row[2 * C + 3:3 * C + 3], row[3 * C + 3:] = scan.sum_means, scan.sum_vars
    rows = np.empty((comm.Get_size(), row.shape[0]))
    comm.Allgather(row, rows)
    if (rows[:, 0] == distributed.FAILED).any():
        distributed.raise_failures(comm, distributed.LocalPart(error=scan.error), owner)
    total = Scan(C)
    _, count, mean, m2 = kernels.merge_rows(np.ascontiguousarray(rows[:, :2 * C + 2]))
    total.moments = (int(count), mean, m2)
    for r in rows:   # in rank order
        total.batches += int(r[2 * C + 2])
        total.sum_means = total.sum_means + r[2 * C + 3:3 * C + 3]
        total.sum_vars = total.sum_vars + r[3 * C + 3:]
    return total


def _store(layer, mean, var):
    """The running statistics set whole, nonfinite= applied."""
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    finite = np.isfinite(mean) & np.isfinite(var)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        if layer.nonfinite == "raise":
            raise kernels.nonfinite_error(bad)
        if layer.nonfinite == "skip":
            mean = np.where(finite, mean, layer.running_mean)
            var = np.where(finite, var, layer.running_var)
    layer.running_mean[...] = mean
    layer.running_var[...] = var
    layer._eval_cache.clear()


class _Counter:
    """A plain progress counter on stderr, when tqdm is not installed."""

    def __init__(self, total):
        self.n, self.total = 0, total

    def update(self, k):
        self.n += k
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\rcalibrate: batch {self.n}{of}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def _progress(data):
    total = len(data) if hasattr(data, "__len__") else None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, desc="calibrate", unit="batch")
