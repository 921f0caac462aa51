"""SyncBatchNorm: batch normalization over a batch spread over the processes
of an MPI communicator (data-parallel training on CPUs).

A training forward computes this rank's moments, merges every rank's in
rank order (cbn.distributed: one Allgather, or one Allreduce with a merging
operation), and normalizes with the global batch's statistics; the running
statistics are then updated identically on every rank. Its backward sums the
per-channel sum of dy and of (x - mean) * dy over the ranks with one
Allreduce before computing the input gradient. Eval mode communicates
nothing.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import distributed
from ._dispatch import kernels
from .layer import BatchNorm

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray
    from typing_extensions import Self

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(BatchNorm):
    """A :class:`BatchNorm` whose training statistics are those of the
    global batch over the ranks of an MPI communicator.

    Every rank calls forward (and backward) in step with its part of the
    batch; parts may differ in size, and be empty. The output on each rank
    is that of a single :class:`BatchNorm` on all ranks' parts concatenated
    in rank order, sliced to this rank's rows; the running statistics and
    ``num_batches_tracked`` are the same bits on every rank. ``grad_weight``
    and ``grad_bias`` are this rank's contribution (sum them over ranks, as
    a data-parallel loop does with every gradient). Eval mode runs locally.
    When any rank's input is refused, every rank raises the same
    :class:`cbn.distributed.DistributedError` and no state changes anywhere.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats
        As :class:`BatchNorm`.
    comm : MPI communicator, keyword-only
        mpi4py's (None: ``MPI.COMM_WORLD``, which needs ``pip install
        "cbn[mpi]"``), or any object with its ``Allgather``, ``Allreduce``,
        ``Get_rank`` and ``Get_size``. Every rank's layer must have the same
        ``num_features``.
    reduction : "auto", "allgather" or "allreduce", keyword-only
        How the moments are merged (see :mod:`cbn.distributed`); "auto"
        switches to the all-reduce at large rank counts.
    bias, axis, dtype, activation, nonfinite, running_var_ddof : keyword-only
        As :class:`BatchNorm`.

    Attributes
    ----------
    comm
        The communicator (assignable). It is not pickled: an unpickled layer
        uses ``COMM_WORLD`` unless another is assigned; ``copy.deepcopy``
        shares it.
    reduction : str
        "auto", "allgather" or "allreduce" (assignable).
    weight, bias, running_mean, running_var, num_batches_tracked, training
        As :class:`BatchNorm`.
    grad_weight, grad_bias, affine, track_running_stats, dtype
        As :class:`BatchNorm`; the gradients are this rank's.

    Examples
    --------
    Run under ``mpiexec -n 4 python train.py``:

    >>> layer = cbn.SyncBatchNorm(64, comm=MPI.COMM_WORLD)
    >>> y = layer(x_local)               # statistics of all ranks' batches
    >>> dx = layer.backward(dy_local)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 comm: Any = None,
                 reduction: Literal["auto", "allgather", "allreduce"] = "auto",
                 bias: bool = True, axis: int = 1, dtype: DTypeLike = np.float32,
                 activation: Literal["relu"] | None = None,
                 nonfinite: Literal["propagate", "raise", "skip"] = "propagate",
                 running_var_ddof: int = 1) -> None:
        resolved = distributed.resolve_comm(comm, type(self).__name__)
        self.reduction = reduction
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         bias=bias, axis=axis, dtype=dtype, activation=activation,
                         nonfinite=nonfinite, running_var_ddof=running_var_ddof)
        self._comm = resolved

    def _init_call_state(self) -> None:
        super()._init_call_state()
        self._global_count = None   # of the last forward, when it synchronized

    @property
    def comm(self) -> Any:
        """The MPI communicator (``COMM_WORLD`` when None was given or after
        unpickling); assigning checks its methods."""
        if self._comm is None:
            self._comm = distributed.resolve_comm(None, type(self).__name__)
        return self._comm

    @comm.setter
    def comm(self, value: Any) -> None:
        self._comm = distributed.resolve_comm(value, type(self).__name__)

    @property
    def reduction(self) -> str:
        """"auto", "allgather" or "allreduce": how the moments are merged."""
        return self._reduction

    @reduction.setter
    def reduction(self, value: str) -> None:
        self._reduction = distributed.check_reduction(value)

    @classmethod
    def convert(cls, layer: BatchNorm, comm: Any = None) -> Self:
        """A SyncBatchNorm with ``layer``'s configuration, state (copies),
        mode and accepted ranks.

        Parameters
        ----------
        layer : BatchNorm
            The layer to convert (unchanged).
        comm : MPI communicator, optional
            None: ``COMM_WORLD``.

        Returns
        -------
        SyncBatchNorm
            A new layer, over ``comm``.

        Raises
        ------
        TypeError
            ``layer`` is not a cbn.BatchNorm, or ``comm`` lacks the methods
            used.
        """
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"{cls.__name__}.convert expects a cbn.BatchNorm, got "
                            f"{type(layer).__name__}")
        sync = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                   layer.running_mean is not None, comm=comm, bias=layer._bias_enabled,
                   axis=layer.axis, dtype=layer.dtype, activation=layer.activation,
                   nonfinite=layer.nonfinite, running_var_ddof=layer.running_var_ddof)
        sync._set_channels(layer.num_features, layer.axis, layer._ranks, layer._ranks_text)
        sync.load_state_dict(layer.state_dict())
        sync.track_running_stats = layer.track_running_stats
        for name in ("grad_weight", "grad_bias"):
            value = getattr(layer, name)
            setattr(sync, name, None if value is None else value.copy())
        return sync.train(layer.training)

    # -- forward and backward

    def forward(self, x: ArrayLike, out: NDArray[Any] | None = None, *,
                mask: ArrayLike | None = None) -> NDArray[Any]:
        """As :meth:`BatchNorm.forward`; in training mode every rank must
        call it, and the statistics are the global batch's.

        Parameters
        ----------
        x : array_like
            This rank's part of the batch (it may be empty).
        out : ndarray, optional
            As in :meth:`BatchNorm.forward`.
        mask : array_like of bool, keyword-only, optional
            This rank's mask, as in :meth:`BatchNorm.forward`: the global
            statistics and count use every rank's valid positions only.

        Returns
        -------
        ndarray
            ``y`` for this rank's part, of ``x``'s shape and dtype.

        Raises
        ------
        cbn.distributed.DistributedError
            In training, on every rank, when any rank's input was refused
            (also an instance of that rank's ValueError, TypeError or
            FloatingPointError); no rank's state changes.
        """
        if not self.training:
            y = super().forward(x, out, mask=mask)
            self._global_count = None   # its backward is local (after success only)
            return y
        comm = self.comm
        owner = f"{type(self).__name__}.forward"
        update = self.track_running_stats and self._running_mean is not None
        C = self.num_features
        row = np.empty(2 * C + 2)   # this rank's packed moments (cbn.distributed)
        with self._lock:  # the running statistics change whole or not at all
            step = error = None
            try:
                step = kernels.train_begin(x, *self._batch_stats_arguments(update), out,
                                           row, self._running_var_ddof, mask)
                if self._nonfinite == "raise":
                    error = distributed.check_finite(row[2:C + 2], row[C + 2:])
            except Exception as caught:  # every rank must reach the collective
                error = caught
            if error is not None:
                row[0] = distributed.FAILED
            status, count, mean, m2 = distributed.merge_packed(comm, row, self._reduction)
            if status < 0 or count == 1:
                part = distributed.LocalPart(error=error) if step is None else \
                    distributed.LocalPart(step.count, step.dtype, error)
                distributed.raise_failures(comm, part, owner, single_value=status >= 0)
            record = kernels.train_end(step, count, mean, m2)
            if update:
                self.num_batches_tracked += 1
        self._last = record
        self._global_count = count
        return record.output

    def backward(self, dy: ArrayLike, out: NDArray[Any] | None = None) -> NDArray[Any]:
        """As :meth:`BatchNorm.backward`; after a training forward every rank
        must call it, and the input gradient is that of the global batch's
        statistics.

        Parameters
        ----------
        dy : array_like
            The gradient of this rank's output.
        out : ndarray, optional
            As in :meth:`BatchNorm.backward`.

        Returns
        -------
        ndarray
            ``dx`` for this rank's part.

        Raises
        ------
        cbn.distributed.DistributedError
            On every rank, when any rank's ``dy`` was refused.

        Notes
        -----
        ``grad_weight`` and ``grad_bias`` are this rank's share: sum them
        over ranks, as a data-parallel loop does with every gradient.
        """
        count = self._global_count
        if self._last is None or count is None:
            return super().backward(dy, out)
        C = self.num_features
        sums = np.zeros(2 * C + 1)   # [failed ranks, sum of dy, sum of (x - mean) * dy]
        step = error = None
        try:
            step = kernels.backward_begin(self._last, dy, out, self.dtype,
                                          type(self).__name__, sums)
        except Exception as caught:  # every rank must reach the collective
            error = caught
            sums[0] = 1
        total = np.empty_like(sums)
        self.comm.Allreduce(sums, total)
        if total[0] > 0:
            distributed.raise_failures(self.comm, distributed.LocalPart(error=error),
                                       f"{type(self).__name__}.backward")
        dx, grad_weight, grad_bias = kernels.backward_end(step, total[1:C + 1],
                                                          total[C + 1:], count)
        if self.affine:
            self.grad_weight = grad_weight
            self.grad_bias = grad_bias if self._bias is not None else None
        return dx

    # -- pickling: everything but the communicator

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_comm", None)
        state.pop("_global_count", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._comm = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        # A copy in the same process still talks to the same ranks: it
        # shares the communicator (which cannot be copied) and copies the rest.
        clone = type(self).__new__(type(self))
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        clone._comm = self._comm
        return clone

    def __repr__(self) -> str:
        text = super().__repr__()
        if self._reduction != "auto":
            text = text[:-1] + f", reduction={self._reduction!r})"
        return text
