"""cbn: fast, accurate batch normalization for NumPy arrays on the CPU.

The layer (:class:`BatchNorm` and its 1d/2d/3d forms) keeps parameters and
running statistics with PyTorch's semantics; the functions in
:mod:`cbn.functional` are the same computations without state. Kernels are
typed Cython with their own thread pool; :mod:`cbn.reference` holds their plain-NumPy twins.
"""
import importlib.util as _importlib_util
import os as _os

if _importlib_util.find_spec("cbn._core") is None:
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.exists(_os.path.join(_here, "_core.pyx")):
        raise ImportError(
            f"cbn's compiled kernels are missing from {_here}: this is cbn's source "
            "folder, and it shadows any installed cbn because it comes first on "
            "sys.path (you are probably in the repository root). Change to another "
            "directory to use the installed cbn, or build the kernels in place with "
            "`python setup.py build_ext --inplace`."
        )
    raise ImportError(f"cbn's compiled kernels (cbn._core) are missing from {_here}; "
                      "reinstall cbn")

from . import distributed, reference  # noqa: F401  (public submodules)
from ._threads import get_num_threads, set_num_threads
from .folding import fold_into_conv, fold_into_linear
from .frozen import FrozenBatchNorm
from .functional import batch_norm, batch_norm_backward, batch_norm_forward, batch_stats
from .layer import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .moments import Moments
from .sync import SyncBatchNorm
from .weights import load, save

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm",
    "SyncBatchNorm", "Moments", "save", "load",
    "batch_norm", "batch_stats", "batch_norm_forward", "batch_norm_backward",
    "fold_into_linear", "fold_into_conv",
    "get_num_threads", "set_num_threads", "show_config",
]


def show_config() -> None:
    """Print how the compiled kernels were built and which build is in use:
    cbn's version, the compiler, whether the thread pool is compiled in, the
    SIMD builds compiled and the one in use, and the thread count."""
    import sysconfig

    from . import _dispatch
    kernels = _dispatch.kernels
    print(f"cbn {__version__}")
    print(f"  compiler: {sysconfig.get_config_var('CC') or 'unknown'}")
    print(f"  thread pool: {'on' if kernels.threads_enabled() else 'off (serial build)'}")
    print(f"  SIMD builds compiled: {', '.join(_dispatch.compiled_targets())}")
    print(f"  SIMD build in use: {kernels.simd_target()}")
    print(f"  threads: {get_num_threads()}")
