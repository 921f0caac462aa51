"""cbn: fast, accurate batch normalization for NumPy arrays on the CPU.

The layer (:class:`BatchNorm` and its 1d/2d/3d forms) keeps parameters and
running statistics with PyTorch's semantics; the functions in
:mod:`cbn.functional` are the same computations without state. Kernels are
typed Cython with OpenMP; :mod:`cbn.reference` holds their plain-NumPy twins.
"""
from . import reference  # noqa: F401  (cbn.reference is public)
from ._threads import get_num_threads, set_num_threads
from .folding import fold_into_conv, fold_into_linear
from .frozen import FrozenBatchNorm
from .functional import batch_norm, batch_norm_backward, batch_norm_forward, batch_stats
from .layer import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm",
    "batch_norm", "batch_stats", "batch_norm_forward", "batch_norm_backward",
    "fold_into_linear", "fold_into_conv",
    "get_num_threads", "set_num_threads", "show_config",
]


def show_config():
    """Print how the compiled kernels were built and which build is in use."""
    import sysconfig

    from . import _dispatch, _omp_env
    kernels = _dispatch.kernels
    print(f"cbn {__version__}")
    print(f"  compiler: {sysconfig.get_config_var('CC') or 'unknown'}")
    print(f"  OpenMP: {'on' if kernels.openmp_enabled() else 'off (serial build)'}")
    if kernels.openmp_enabled():
        print(f"  idle OpenMP threads spin: {_omp_env.setting}")
    print(f"  SIMD builds compiled: {', '.join(_dispatch.compiled_targets())}")
    print(f"  SIMD build in use: {kernels.simd_target()}")
    print(f"  threads: {get_num_threads()}")
