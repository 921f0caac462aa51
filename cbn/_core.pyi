# Stub of cbn's compiled executor (cbn/_core.pyx and the .pxi files it
# includes: _threads.pxi, _view.pxi, _rules.pxi, _inference.pxi, _calls.pxi,
# _moments.pxi).
# Only the names Python sees: def/cpdef functions, cdef classes with their
# readonly attributes and properties, and module-level Python names. Checked
# against the built module by tests/test_typing.py (mypy.stubtest). Each
# cdef class has its own C layout, hence @disjoint_base (PEP 800).
from collections.abc import Sequence
from types import ModuleType
from typing import Any, SupportsFloat, SupportsIndex

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from typing_extensions import disjoint_base, final

_F64Array = NDArray[np.float64]

def use_kernels(module: ModuleType) -> None: ...
def simd_target() -> str: ...
def stream_min_bytes() -> int: ...

# -- _threads.pxi

PARALLEL_MIN_ELEMENTS: int
MAX_THREADS: int

def threads_enabled() -> bool: ...
def set_default_threads(n: int) -> None: ...
def set_thread_count(n: int) -> None: ...
def thread_count() -> int: ...

# -- _view.pxi

@disjoint_base
class Accepts:
    """Input ranks, channel count (-1: any) and owner name of a caller."""

    def __init__(
        self,
        min_ndim: int = 2,
        max_ndim: int = 64,
        ranks_text: str | None = None,
        num_channels: int = -1,
        owner: str = "",
    ) -> None: ...
    @property
    def min_ndim(self) -> int: ...
    @property
    def max_ndim(self) -> int: ...
    @property
    def ranks_text(self) -> str | None: ...
    @property
    def num_channels(self) -> int: ...
    @property
    def owner(self) -> str: ...

@disjoint_base
class View:
    """An input as the kernels read it (built by the executor only)."""

    @property
    def source(self) -> NDArray[Any]: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def shape(self) -> tuple[int, ...]: ...

# -- _rules.pxi

def check_eps(value: SupportsFloat) -> float: ...
def check_momentum(value: SupportsFloat | None, allow_none: bool = True) -> float | None: ...
def check_training_flag(training: object) -> bool: ...
def channel_vector(
    value: ArrayLike,
    num_channels: int,
    name: str,
    dtype: DTypeLike = ...,
    copy: bool = True,
) -> NDArray[Any]: ...

# -- _inference.pxi

@disjoint_base
class ChannelParams:
    """Float64 per-channel parameters of an inference call, read-only."""

    def __init__(
        self, mean: ArrayLike, invstd: ArrayLike, weight: ArrayLike, bias: ArrayLike
    ) -> None: ...
    @property
    def mean(self) -> _F64Array: ...
    @property
    def invstd(self) -> _F64Array: ...
    @property
    def weight(self) -> _F64Array: ...
    @property
    def bias(self) -> _F64Array: ...
    @property
    def scale(self) -> _F64Array: ...
    @property
    def num_channels(self) -> int: ...
    def scale_shift(self, dtype: DTypeLike) -> tuple[NDArray[Any], NDArray[Any]]: ...

def inference_params(
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    running_mean: NDArray[Any] | None,
    running_var: ArrayLike | None,
    eps: float,
) -> ChannelParams: ...

@disjoint_base
class EvalCache:
    """The ChannelParams of a layer's current parameters, rebuilt on change."""

    def current(
        self,
        weight: ArrayLike | None,
        bias: ArrayLike | None,
        running_mean: NDArray[Any] | None,
        running_var: ArrayLike | None,
        eps: float,
    ) -> ChannelParams: ...
    def clear(self) -> None: ...

# -- _calls.pxi

float32_dtype: np.dtype[np.float32]
float64_dtype: np.dtype[np.float64]

NONFINITE_MODES: dict[str, int]

@disjoint_base
class Record(View):
    """One forward, as its backward needs it (the View of its input)."""

    @property
    def output(self) -> NDArray[Any]: ...
    @property
    def batch_stats(self) -> bool: ...
    @property
    def overwritten(self) -> bool: ...
    @property
    def mean(self) -> _F64Array: ...
    @property
    def invstd(self) -> _F64Array: ...
    @property
    def weight(self) -> _F64Array: ...

def stats(
    x: ArrayLike,
    axis: SupportsIndex,
    out: tuple[NDArray[Any], NDArray[Any]] | list[NDArray[Any]] | None,
    mask: ArrayLike | None = None,
) -> tuple[NDArray[Any], NDArray[Any]]: ...
def check_mask(x: ArrayLike, axis: SupportsIndex, mask: ArrayLike) -> None: ...
def nonfinite_error(channels: Sequence[int]) -> FloatingPointError: ...
def forward_stats(
    x: ArrayLike,
    axis: SupportsIndex,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    eps: SupportsFloat,
    out: NDArray[Any] | None,
    mask: ArrayLike | None = None,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.float64]]: ...
def train_forward(
    x: ArrayLike,
    axis: SupportsIndex,
    accepts: Accepts,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    eps: SupportsFloat,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    momentum: SupportsFloat | None,
    batches_tracked: int | None,
    relu: bool,
    nonfinite: int,
    out: NDArray[Any] | None,
    may_overwrite_input: bool = False,
    var_ddof: int = 1,
    mask: ArrayLike | None = None,
) -> Record: ...
def eval_forward(
    x: ArrayLike,
    axis: SupportsIndex,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    eps: SupportsFloat,
    momentum: SupportsFloat | None,
    relu: bool,
    out: NDArray[Any] | None,
) -> NDArray[Any]: ...
def normalize(
    x: ArrayLike,
    axis: SupportsIndex,
    accepts: Accepts,
    params: ChannelParams,
    relu: bool,
    out: NDArray[Any] | None,
    name: str = "input",
    relu_mask: NDArray[Any] | None = None,
) -> Record: ...
def record_backward(
    record: Record, dy: ArrayLike, out: NDArray[Any] | None, grad_dtype: DTypeLike, owner: str
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]: ...
def backward(
    dy: ArrayLike,
    x: ArrayLike,
    axis: SupportsIndex,
    save_mean: ArrayLike,
    save_invstd: ArrayLike,
    weight: ArrayLike | None,
    training: bool,
    out: NDArray[Any] | None,
    mask: ArrayLike | None = None,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]: ...
def moments(
    x: ArrayLike,
    axis: SupportsIndex,
    accepts: Accepts = ...,
    name: str = "input",
    mask: ArrayLike | None = None,
) -> tuple[int, _F64Array, _F64Array, np.dtype[Any]]: ...
@final
class TrainStep:
    """A forward with batch statistics waiting for its statistics."""

    @property
    def count(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...

def train_begin(
    x: ArrayLike,
    axis: SupportsIndex,
    accepts: Accepts,
    weight: ArrayLike | None,
    bias: ArrayLike | None,
    eps: SupportsFloat,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    momentum: SupportsFloat | None,
    batches_tracked: int | None,
    relu: bool,
    nonfinite: int,
    out: NDArray[Any] | None,
    packed: _F64Array,
    var_ddof: int = 1,
    mask: ArrayLike | None = None,
) -> TrainStep: ...
def train_end(t: TrainStep, count: int, mean: ArrayLike, m2: ArrayLike) -> Record: ...
@final
class BackwardStep:
    """A backward waiting for its per-channel sums."""

def backward_begin(
    record: Record,
    dy: ArrayLike,
    out: NDArray[Any] | None,
    grad_dtype: DTypeLike,
    owner: str,
    sums: _F64Array,
) -> BackwardStep: ...
def backward_end(
    t: BackwardStep, sum_dy: ArrayLike, dotp: ArrayLike, count: int
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]: ...

# -- _moments.pxi

MOMENTS_FAILED: float
MOMENTS_MIXED: float

def merge_moments(
    count_a: int,
    mean_a: ArrayLike,
    m2_a: ArrayLike,
    count_b: int,
    mean_b: ArrayLike,
    m2_b: ArrayLike,
) -> tuple[int, _F64Array, _F64Array]: ...
def merge_rows(rows: _F64Array) -> tuple[float, float, _F64Array, _F64Array]: ...
def merge_row_pairs(left: _F64Array, right: _F64Array, width: int) -> None: ...
