"""Statistics of a batch spread over the processes of an MPI communicator.

Every process computes its own moments (count, mean, M2) and every process
merges all of them in rank order, so each ends with the same bits. Two
collectives do it:

- "allgather": one ``Allgather`` of each rank's packed moments (2C + 2
  doubles: a status word, the count, the means, the M2s), merged in rank
  order by every rank. Fewest rounds; the payload grows with the rank count.
- "allreduce": one ``Allreduce`` of one packed row with a user-defined,
  non-commutative MPI operation that merges moments (MPI applies such an
  operation in rank order). The payload stays 2C + 2 doubles whatever the
  rank count, at the price of a call into Python at every step of the tree.

The merges are compiled (cbn/_moments.pxi): every rank applies the same
formula in the same order and gets the same bits.

"auto" picks the all-gather until the gathered payload passes
``ALLGATHER_MAX_BYTES`` or the rank count passes ``ALLGATHER_MAX_RANKS``; the
cost model behind them is in docs/2026-12-01-past-one-process.md.

Nobody hangs: a rank whose input is bad still takes part in the collective,
with a status word that says so, and then every rank takes part in one more
``Allgather`` of fixed-size messages and raises the same
:class:`DistributedError` naming the failing ranks and their reasons.

The communicator is mpi4py's (``COMM_WORLD`` by default) or any object with
its buffer methods ``Allgather``, ``Allreduce``, ``Get_rank`` and
``Get_size``; no pickle-based call is made.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import moments as _moments
from ._dispatch import kernels

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["DistributedError", "batch_stats", "resolve_comm", "REDUCTIONS"]

REDUCTIONS = ("auto", "allgather", "allreduce")
# "auto" switches to the all-reduce above these (see the module docstring).
ALLGATHER_MAX_RANKS = 64
ALLGATHER_MAX_BYTES = 256 << 10
# Bytes of each rank's message when one fails (longer reasons are cut).
MESSAGE_BYTES = 512



class DistributedError(RuntimeError):
    """Raised on every rank when any rank's part of a collective call failed.

    The exception raised is also an instance of the builtin type the lowest
    failing rank's own error had (ValueError, TypeError, FloatingPointError),
    so ``except ValueError`` works the same on every rank.

    Parameters
    ----------
    message : str
        The text, naming every failing rank and its reason.
    failures : dict of int to str
        The failing ranks and their reasons ("TypeName: message").

    Attributes
    ----------
    failures : dict of int to str
        The failing ranks and their reasons ("TypeName: message").
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def _error_class(base: type[BaseException]) -> type[DistributedError]:
    return type(f"Distributed{base.__name__}", (DistributedError, base),
                {"__module__": __name__, "__doc__": DistributedError.__doc__})


_ERROR_CLASSES = {base.__name__: _error_class(base)
                  for base in (ValueError, TypeError, FloatingPointError, MemoryError)}


def resolve_comm(comm: Any, owner: str) -> Any:
    """The communicator to use, checked.

    Parameters
    ----------
    comm : MPI communicator or None
        mpi4py's, or any object with its ``Allgather``, ``Allreduce``,
        ``Get_rank`` and ``Get_size``; None for mpi4py's ``COMM_WORLD``.
    owner : str
        The caller's name, for messages.

    Returns
    -------
    communicator
        ``comm``, or ``COMM_WORLD``.

    Raises
    ------
    TypeError
        ``comm`` lacks one of the four methods.
    ImportError
        ``comm`` is None and mpi4py is not installed.
    """
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError(
                f"{owner} needs mpi4py for comm=None (COMM_WORLD): "
                'pip install "cbn[mpi]"'
            ) from None
        return MPI.COMM_WORLD
    missing = [name for name in ("Allgather", "Allreduce", "Get_rank", "Get_size")
               if not callable(getattr(comm, name, None))]
    if missing:
        raise TypeError(
            f"{owner}: comm must be an MPI communicator (mpi4py's, or an object with "
            f"its buffer methods); {type(comm).__name__} has no {missing}"
        )
    return comm


def check_reduction(value: Any) -> str:
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# The collective merge of moments

# A rank's packed row (cbn/_moments.pxi): [status, count, mean (C), m2 (C)];
# the status is its input dtype's number, or FAILED.
FAILED = kernels.MOMENTS_FAILED


class LocalPart:
    """What one rank brings to a collective, for the messages of a failure:
    its count and input dtype, or the error its input raised."""

    __slots__ = ("count", "dtype", "error")

    def __init__(self, count: int = 0, dtype: Any = None,
                 error: BaseException | None = None) -> None:
        self.count = count
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.error = error


def packed_row(C: int, count: int = 0, mean: Any = 0.0, m2: Any = 0.0,
               dtype: Any = None) -> Any:
    """A rank's packed moments (the layer writes its own in train_begin)."""
    row = np.empty(2 * C + 2)
    row[0] = 0 if dtype is None else np.dtype(dtype).num
    row[1] = count
    row[2:C + 2] = mean
    row[C + 2:] = m2
    return row


def merge_packed(comm: Any, row: Any, reduction: str) -> tuple[float, int, Any, Any]:
    """Every rank's packed ``row`` merged in rank order: (status, count,
    mean, m2), the same bits on every rank. A negative status means a rank
    failed or the dtypes differ (the moments are then meaningless)."""
    size = comm.Get_size()
    if reduction == "auto":
        reduction = ("allgather" if size <= ALLGATHER_MAX_RANKS
                     and size * row.nbytes <= ALLGATHER_MAX_BYTES else "allreduce")
    if reduction == "allgather":
        rows = np.empty((size, row.shape[0]))
        comm.Allgather(row, rows)
        status, count, mean, m2 = kernels.merge_rows(rows)
    else:
        result = np.empty_like(row)
        op, datatype = _merge_op(row.shape[0])
        comm.Allreduce([row, 1, datatype], [result, 1, datatype], op=op)
        C = (row.shape[0] - 2) // 2
        status, count, mean, m2 = result[0], result[1], result[2:C + 2], result[C + 2:]
    return status, int(count), mean, m2


_OPS: dict[int, Any] = {}


def _merge_op(length):
    """The MPI operation and datatype that merge packed rows of ``length``
    doubles. One element is a whole row (a contiguous datatype), so MPI
    never hands the operation part of one."""
    if length not in _OPS:
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError('reduction="allreduce" needs mpi4py for its MPI operation: '
                              'pip install "cbn[mpi]"') from None
        datatype = MPI.DOUBLE.Create_contiguous(length).Commit()

        def merge(inbuf, inoutbuf, _datatype):
            # MPI's rule for a non-commutative operation: inoutbuf holds the
            # later ranks, so the result is inbuf followed by inoutbuf.
            kernels.merge_row_pairs(np.frombuffer(inbuf, np.float64),
                                    np.frombuffer(inoutbuf, np.float64), length)

        _OPS[length] = (MPI.Op.Create(merge, commute=False), datatype)
    return _OPS[length]


def merge_moments(comm: Any, row: Any, part: LocalPart, *, reduction: str = "auto",
                  owner: str = "cbn.distributed") -> tuple[int, Any, Any]:
    """merge_packed, or, when any rank's part is an error or their input
    dtypes differ, the same DistributedError on every rank."""
    status, count, mean, m2 = merge_packed(comm, row, reduction)
    if status < 0:
        raise_failures(comm, part, owner)
    return count, mean, m2


def raise_failures(comm: Any, part: LocalPart, owner: str, *,
                   single_value: bool = False) -> None:
    """Every rank's reason, gathered; the same DistributedError on every
    rank. A rank that did not fail sends its dtype and count instead, which
    name the culprits of a dtype mismatch or of a one-value global batch."""
    if part.error is not None:
        text = f"E{type(part.error).__name__}: {part.error}"
    else:
        text = f"D{part.dtype.name if part.dtype else ''}:{part.count}"
    message = np.zeros(MESSAGE_BYTES, np.uint8)
    encoded = text.encode("utf-8", "replace")[:MESSAGE_BYTES]
    message[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    messages = np.empty((comm.Get_size(), MESSAGE_BYTES), np.uint8)
    comm.Allgather(message, messages)
    texts = [bytes(m).rstrip(b"\0").decode("utf-8", "replace") for m in messages]
    failures = {rank: text[1:] for rank, text in enumerate(texts) if text[:1] == "E"}
    kind = None
    if failures:
        kind = failures[min(failures)].split(":", 1)[0]
    elif single_value:
        kind = "ValueError"
        failures = {rank: "ValueError: Expected more than 1 value per channel when "
                          "training; the global batch has 1 value per channel (this "
                          "rank holds it)"
                    for rank, text in enumerate(texts) if text.rsplit(":", 1)[1] == "1"}
    else:
        kind = "TypeError"
        dtypes = {rank: text[1:].rsplit(":", 1)[0] for rank, text in enumerate(texts)}
        first = dtypes[0]
        failures = {rank: f"TypeError: input dtype {dtype} differs from rank 0's {first} "
                          "(all ranks must pass the same dtype)"
                    for rank, dtype in dtypes.items() if dtype != first}
    shown = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(failures.items()))
    cls = _ERROR_CLASSES.get(kind, DistributedError)
    raise cls(f"{owner} failed on {len(failures)} of {len(texts)} ranks ({shown}); "
              "no rank changed its state", failures)


def check_finite(mean: Any, m2: Any) -> FloatingPointError | None:
    """nonfinite="raise"'s error for these moments, or None."""
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(m2)))
    return kernels.nonfinite_error(bad.tolist()) if bad.size else None


# ---------------------------------------------------------------------------

def batch_stats(x: ArrayLike, comm: Any, *, axis: int = 1,
                reduction: str = "auto") -> _moments.Moments:
    """The moments of a batch spread over the ranks of ``comm``: every rank
    passes its part ``x`` (local batch sizes may differ, and be empty) and
    gets the moments of the whole, the same bits on every rank.

    Parameters
    ----------
    x : array_like
        This rank's part, channels on ``axis``.
    comm : MPI communicator
        mpi4py's, or any object with its ``Allgather``, ``Allreduce``,
        ``Get_rank`` and ``Get_size``; None for ``COMM_WORLD``.
    axis : int
        The channel axis.
    reduction : "auto", "allgather" or "allreduce"
        The collective (see :mod:`cbn.distributed`).

    Returns
    -------
    Moments
        Of all ranks' data, merged in rank order.

    Raises
    ------
    DistributedError
        On every rank, when any rank's ``x`` was refused or the ranks'
        channel counts or dtypes differ (also an instance of the builtin
        error of the lowest failing rank).
    ValueError
        A bad ``reduction``.
    """
    owner = "cbn.distributed.batch_stats"
    comm = resolve_comm(comm, owner)
    reduction = check_reduction(reduction)
    try:
        count, mean, m2, dtype = kernels.moments(x, axis)
        part = LocalPart(count, dtype)
    except Exception as error:  # every rank must reach the collectives
        part, mean = LocalPart(error=error), np.zeros(0)
    # Without a layer, the channel count is the data's: agree on it first,
    # since the packed rows of every rank must have the same length.
    channels = np.array([-1.0 if part.error is not None else mean.shape[0]])
    every = np.empty(comm.Get_size())
    comm.Allgather(channels, every)
    if (every < 0).any() or len(set(every.tolist())) > 1:
        if part.error is None and every[0] >= 0 and channels[0] != every[0]:
            part = LocalPart(error=ValueError(
                f"x has {int(channels[0])} channels on axis {axis}, rank 0 has "
                f"{int(every[0])}"))
        raise_failures(comm, part, owner)
    row = packed_row(mean.shape[0], count, mean, m2, dtype)
    count, mean, m2 = merge_moments(comm, row, part, reduction=reduction, owner=owner)
    return _moments.Moments._of_parts(count, np.array(mean), np.array(m2))
