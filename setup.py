"""Build of cbn's compiled kernels.

Environment switches (read at build time):
    CBN_BOUNDSCHECK=1  compile the Cython kernels with boundscheck, wraparound
                       and initializedcheck on. This checks memoryview indexing
                       (per-channel vectors); the hot loops walk raw pointers,
                       which it does not check (a sanitizer build would).
    CBN_NO_THREADS=1   build the kernels without their thread pool (serial).
    CBN_NO_SIMD=1      build only the baseline kernels (no AVX2/AVX-512 builds).
    CBN_SANITIZE=1     build with AddressSanitizer and UndefinedBehaviorSanitizer
                       (-fsanitize=address,undefined, any error fatal); run
                       Python with libasan preloaded (README, "Developing").
"""
import os
import platform
import sys
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def thread_flags():
    """Compile flags for the kernels' thread pool (_pool.h, POSIX threads).

    CBN_NO_THREADS=1 builds the kernels without it: every call then runs on
    the calling thread.
    """
    if env_flag("CBN_NO_THREADS"):
        warnings.warn("cbn: CBN_NO_THREADS is set; building the kernels serial.",
                      stacklevel=2)
        return ["-DCBN_POOL_SERIAL"] if sys.platform != "win32" else ["/DCBN_POOL_SERIAL"]
    return [] if sys.platform == "win32" else ["-pthread"]


BOUNDSCHECK = env_flag("CBN_BOUNDSCHECK")

# Set once here rather than in file headers, so one switch re-enables checks.
COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": BOUNDSCHECK,
    "wraparound": BOUNDSCHECK,
    "initializedcheck": BOUNDSCHECK,
    "cdivision": True,
    "embedsignature": True,
}

threads = thread_flags()
# -O3 without -march=native: the baseline build must run on any CPU of its
# architecture. -ffp-contract=off keeps the compiler from fusing a*b+c into
# FMAs in some builds and not others, so every SIMD build gives the same bits.
# -fno-math-errno only drops errno for sqrt of a negative number (the kernels
# never read errno); without it the per-channel sqrt loops cannot vectorize.
if sys.platform == "win32":
    base_args = ["/O2"]
else:
    base_args = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
sanitize_args = []
if env_flag("CBN_SANITIZE"):
    sanitize_args = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                     "-fno-omit-frame-pointer", "-g"]

# The same kernels compiled again for wider SIMD; cbn._dispatch picks the
# widest one the CPU runs (NumPy-style runtime dispatch).
SIMD_BUILDS = {"_kernels": []}
if (platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
        and not env_flag("CBN_NO_SIMD")):
    SIMD_BUILDS["_kernels_avx2"] = ["-mavx2", "-mfma"]
    SIMD_BUILDS["_kernels_avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512dq",
                                      "-mavx512vl", "-mprefer-vector-width=512"]

TABLE = ["cbn/_kernel_table.h", "cbn/_kernel_table.pxd"]
KERNEL_DEPENDS = TABLE + ["cbn/_kernels_impl.pxi", "cbn/_plan.pxi", "cbn/_kernel_export.pxi",
                          "cbn/_stream.h", "cbn/_scratch.h", "cbn/_pool.h", "cbn/_rows.h"]
CORE_DEPENDS = TABLE + ["cbn/_threads.pxi", "cbn/_view.pxi", "cbn/_rules.pxi",
                        "cbn/_inference.pxi", "cbn/_calls.pxi"]


def extension(name, depends, simd_args=()):
    return Extension(
        f"cbn.{name}",
        sources=[f"cbn/{name}.pyx"],
        include_dirs=["cbn", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=depends,
        extra_compile_args=base_args + list(simd_args) + threads + sanitize_args,
        extra_link_args=[f for f in threads if f == "-pthread"] + sanitize_args,
    )


# Only the inner kernels are compiled per SIMD target; the executor (cbn._core:
# validation, caches, entry points) once, calling them through a table.
extensions = [extension("_core", CORE_DEPENDS)] + [
    extension(name, KERNEL_DEPENDS, simd_args) for name, simd_args in SIMD_BUILDS.items()
]


class build_ext_from_pyx(build_ext):
    """Generates the C sources when the extensions are built, not each time
    setup.py runs: the sdist and metadata steps need only the .pyx sources,
    and shipping generated C would go stale with the switches above."""

    def build_extensions(self):
        # force: the generated C depends on the switches above, which
        # cythonize's timestamp check cannot see.
        generated = cythonize(self.extensions, compiler_directives=COMPILER_DIRECTIVES,
                              force=True)
        # Only the sources change: the extensions keep what setuptools set on them.
        for extension, cythonized in zip(self.extensions, generated):
            extension.sources = cythonized.sources
        super().build_extensions()


setup(ext_modules=extensions, cmdclass={"build_ext": build_ext_from_pyx})
