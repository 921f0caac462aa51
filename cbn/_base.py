"""What the BatchNorm layer and the frozen layer share: the channel count, the
channel axis, the input ranks they accept, and the head of their repr."""
from __future__ import annotations

from ._checks import num_features as _num_features
from ._convert import integer
from ._dispatch import kernels


class ChannelLayer:
    """A layer over ``num_features`` channels on ``axis``.

    ``_ranks`` is the range of input ranks a class accepts (None: any rank
    >= 2) and ``_ranks_text`` names it in messages; BatchNorm1d/2d/3d set
    them, and a frozen layer keeps those of the layer it was frozen from.
    """

    _num_features: int
    _axis: int
    _eps: float
    _ranks: range | None = None
    _ranks_text: str | None = "at least 2D"

    def _set_channels(self, num_features: int, axis: int, ranks: range | None = None,
                      ranks_text: str | None = None) -> None:
        self._num_features = _num_features(num_features)
        self._axis = integer(axis, "axis")
        if ranks is not None:
            self._ranks, self._ranks_text = ranks, ranks_text
        self._build_accepts()

    @property
    def num_features(self) -> int:
        """The number of channels C, fixed at construction."""
        return self._num_features

    @property
    def axis(self) -> int:
        """The channel axis of the input, fixed at construction."""
        return self._axis

    def _build_accepts(self) -> None:
        """What the executor checks every input against."""
        ranks = self._ranks or range(2, 65)   # NumPy's maximum is 64 dimensions
        self._accepts = kernels.Accepts(ranks.start, ranks.stop - 1,
                                        None if self._ranks is None else self._ranks_text,
                                        self.num_features, type(self).__name__)

    def _repr_head(self) -> str:
        return f"{type(self).__name__}({self.num_features}, eps={self._eps}"
