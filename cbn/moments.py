"""Per-channel moments (count, mean, M2) that merge exactly: the one object
behind dataset calibration, SyncBatchNorm and Dask.

Two sets of moments merge with Chan, Golub and LeVeque's pairwise formula
("Algorithms for computing the sample variance", 1979), compiled once for
the kernels and every merge (cbn/_chan.pxi):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta**2 * n_a * n_b / n,

in float64. Unlike sums of x and x**2 (which lose the variance entirely once
|mean| / std reaches about 1e8 in float64), every term is a deviation from a
mean: for |mean| / std up to 1e6, merged in any chunking and order, the
variance stays within 1e-10 of an exactly rounded result (1e-11 for chunks
of 1,000 values or more). Beyond that, each float64 mean's rounding grows
with the offset (about 2e-10 at 1e8, 1e-6 at 1e11).
M2 is not additive, so merges are applied in a fixed order; the same chunks
in the same order always give the same bits.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._dispatch import kernels

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray
    from typing_extensions import Self

__all__ = ["Moments"]


class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations) of data
    seen so far, in float64; merges exactly (see the module docstring).

    Parameters
    ----------
    num_features : int
        The number of channels C. A new object is empty (count 0).

    Attributes
    ----------
    num_features : int
        C.
    count : int
        Values per channel so far (the same for every channel).
    mean, m2 : ndarray of float64, shape (C,)
        The mean and the sum of squared deviations from it (zeros while
        empty). Read-only views: the object changes only through
        :meth:`update`.

    Examples
    --------
    >>> m = cbn.Moments(3)
    >>> for batch in batches:          # (N, 3) arrays
    ...     m.update(batch)
    >>> m.mean, m.var(ddof=1)          # as if all batches were one
    """

    __slots__ = ("_num_features", "_count", "_mean", "_m2")

    def __init__(self, num_features: int) -> None:
        from ._checks import num_features as check_num_features
        self._num_features = check_num_features(num_features)
        self._count = 0
        self._mean = np.zeros(self._num_features)
        self._m2 = np.zeros(self._num_features)
        self._freeze()

    @classmethod
    def _of_parts(cls, count: int, mean: NDArray[np.float64],
                  m2: NDArray[np.float64]) -> Self:
        moments = cls.__new__(cls)
        moments._num_features = mean.shape[0]
        moments._count, moments._mean, moments._m2 = int(count), mean, m2
        moments._freeze()
        return moments

    def _freeze(self) -> None:
        self._mean.flags.writeable = False
        self._m2.flags.writeable = False

    # -- from data

    @classmethod
    def of(cls, x: ArrayLike, *, axis: int = 1, mask: ArrayLike | None = None) -> Self:
        """The moments of one batch ``x`` over every axis but ``axis``.

        Parameters
        ----------
        x : array_like
            Data of at least 2 dimensions, of any float dtype and layout
            (it may be empty: count 0).
        axis : int, keyword-only
            The channel axis.
        mask : array_like of bool, keyword-only, optional
            Valid positions: a boolean array that broadcasts to ``x``'s
            shape with the channel axis removed ((N, L) or (N, 1) for
            (N, C, L) input, (N,) for (N, C)); True marks a valid position.
            Only valid positions count (none: count 0).

        Returns
        -------
        Moments
            Computed by cbn's kernels in float64.

        Raises
        ------
        ValueError
            Fewer than 2 dimensions, ``axis`` out of range or without
            channels, a bad ``mask``.
        TypeError
            A dtype cbn does not take, or a non-boolean ``mask``.
        """
        count, mean, m2, _ = kernels.moments(x, axis, mask=mask)
        if mean.shape[0] == 0:
            raise ValueError(f"x has shape {np.shape(x)}: axis {axis} has no channels")
        return cls._of_parts(count, mean, m2)

    def update(self, x: ArrayLike, *, axis: int = 1,
               mask: ArrayLike | None = None) -> Self:
        """Merge the batch ``x`` into these moments in place.

        Parameters
        ----------
        x : array_like
            Data with ``num_features`` channels on ``axis``.
        axis : int, keyword-only
            The channel axis.
        mask : array_like of bool, keyword-only, optional
            Valid positions: a boolean array that broadcasts to ``x``'s
            shape with the channel axis removed ((N, L) or (N, 1) for
            (N, C, L) input, (N,) for (N, C)); True marks a valid position.
            Only valid positions count (none: count 0).

        Returns
        -------
        Moments
            ``self``, so that calls chain.

        Raises
        ------
        ValueError, TypeError
            A channel count other than ``num_features``, a non-array, a
            wrong axis, a bad ``mask``; the object is then unchanged.
        """
        accepts = kernels.Accepts(2, 64, None, self._num_features, type(self).__name__)
        count, mean, m2, _ = kernels.moments(x, axis, accepts, mask=mask)
        self._count, self._mean, self._m2 = merge_parts(
            (self._count, self._mean, self._m2), (count, mean, m2))
        self._freeze()
        return self

    # -- merging

    def merge(self, other: Moments) -> Moments:
        """The moments of this data followed by ``other``'s.

        Parameters
        ----------
        other : Moments
            Of the same ``num_features``.

        Returns
        -------
        Moments
            A new object; both inputs are unchanged.

        Raises
        ------
        TypeError
            ``other`` is not a Moments object.
        ValueError
            The channel counts differ.
        """
        self._check_mergeable(other, "merge")
        return Moments._of_parts(*merge_parts((self._count, self._mean, self._m2),
                                              (other._count, other._mean, other._m2)))

    @classmethod
    def merge_all(cls, moments: Iterable[Moments]) -> Moments:
        """Merge ``moments`` left to right, in the order given (the order
        fixes the bits).

        Parameters
        ----------
        moments : iterable of Moments
            At least one (it gives C), all of the same ``num_features``.

        Returns
        -------
        Moments
            A new object.

        Raises
        ------
        ValueError
            No item, or channel counts that differ.
        TypeError
            An item that is not a Moments object.
        """
        total = None
        for k, item in enumerate(moments):
            if not isinstance(item, Moments):
                raise TypeError(f"merge_all expects Moments objects, got "
                                f"{type(item).__name__} at position {k}")
            if total is None:
                total = (item._count, item._mean, item._m2)
                first = item
                continue
            first._check_mergeable(item, f"merge_all (position {k})")
            total = merge_parts(total, (item._count, item._mean, item._m2))
        if total is None:
            raise ValueError("merge_all needs at least one Moments object")
        return Moments._of_parts(*total)

    def _check_mergeable(self, other: Any, what: str) -> None:
        if not isinstance(other, Moments):
            raise TypeError(f"{what} expects a Moments object, got {type(other).__name__}")
        if other._num_features != self._num_features:
            raise ValueError(
                f"{what}: cannot merge moments of {other._num_features} channels into "
                f"moments of {self._num_features}"
            )

    # -- what it holds

    @property
    def num_features(self) -> int:
        """The number of channels C."""
        return self._num_features

    @property
    def count(self) -> int:
        """Values per channel so far (the same for every channel)."""
        return self._count

    @property
    def mean(self) -> NDArray[np.float64]:
        """Per-channel mean, float64 of shape (C,), read-only (zeros while
        empty)."""
        return self._mean

    @property
    def m2(self) -> NDArray[np.float64]:
        """Per-channel sum of squared deviations from the mean, float64 of
        shape (C,), read-only."""
        return self._m2

    def var(self, ddof: float = 0) -> NDArray[np.float64]:
        """The per-channel variance.

        Parameters
        ----------
        ddof : float
            0: biased (``m2 / count``), 1: unbiased (``m2 / (count - 1)``).

        Returns
        -------
        ndarray of float64, shape (C,)
            ``m2 / (count - ddof)``; NaN where ``count - ddof <= 0``.

        Raises
        ------
        TypeError
            ``ddof`` is not a real number.
        """
        if isinstance(ddof, bool) or not isinstance(ddof, numbers.Real):
            raise TypeError(f"ddof must be a real number, got {type(ddof).__name__}")
        dof = self._count - float(ddof)
        if not dof > 0:
            return np.full(self._num_features, np.nan)
        return self._m2 / dof

    # -- over a wire, in a pickle

    def to_array(self) -> NDArray[np.float64]:
        """The moments as one array, for a wire or a file.

        Returns
        -------
        ndarray of float64, shape (2C + 1,)
            count, then mean, then m2.
        """
        return np.concatenate(([float(self._count)], self._mean, self._m2))

    @classmethod
    def from_array(cls, a: ArrayLike) -> Moments:
        """The inverse of :meth:`to_array`.

        Parameters
        ----------
        a : ndarray of shape (2C + 1,)
            count, then mean, then m2 (C >= 1); the count a non-negative
            integer.

        Returns
        -------
        Moments
            A new object.

        Raises
        ------
        TypeError
            ``a`` is not a NumPy array of a numeric dtype.
        ValueError
            A shape other than (2C + 1,), or a count that is not a
            non-negative integer.
        """
        if not isinstance(a, np.ndarray):
            raise TypeError(f"from_array expects a NumPy array, got {type(a).__name__}")
        if a.ndim != 1 or a.size < 3 or a.size % 2 == 0:
            raise ValueError(f"from_array expects a 1D array of length 2C + 1 (C >= 1), "
                             f"got shape {a.shape}")
        if a.dtype.kind not in "fiu":
            raise TypeError(f"from_array expects a float64 array, got dtype {a.dtype}")
        values = a.astype(np.float64)
        return cls._of_parts(wire_count(values[0]), values[1:(a.size + 1) // 2].copy(),
                             values[(a.size + 1) // 2:].copy())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Moments.from_array, (self.to_array(),))

    def __repr__(self) -> str:
        return f"Moments(num_features={self._num_features}, count={self._count})"


def wire_count(value: float) -> int:
    """A count read from a float64 word: a non-negative integer."""
    if not (math.isfinite(value) and value >= 0 and value == math.floor(value)):
        raise ValueError(f"a moments count must be a non-negative integer, got {value}")
    return int(value)


def merge_parts(a, b):
    """(count, mean, m2) of a followed by b, per channel, by the compiled
    merge (cbn/_moments.pxi). Arrays are new, or the other side's when one
    side is empty."""
    if b[0] == 0:
        return a
    if a[0] == 0:
        return b
    return kernels.merge_moments(*a, *b)
