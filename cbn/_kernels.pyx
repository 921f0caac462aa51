"""cbn's inner kernels built for the baseline instruction set (see
_kernels_impl.pxi and _kernel_export.pxi), and the CPU check that lets
cbn._dispatch pick the widest build this CPU runs."""
SIMD_TARGET = "baseline"
cdef const char* SIMD_TARGET_C = "baseline"

include "_kernels_impl.pxi"
include "_kernel_export.pxi"


cdef extern from *:
    """
    #include <string.h>
    /* Runtime CPU check for the SIMD builds (GCC/Clang on x86). */
    static int cbn_cpu_supports(const char* target) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        if (strcmp(target, "avx2") == 0)
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        if (strcmp(target, "avx512") == 0)
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    #endif
        return 0;
    }
    """
    int cbn_cpu_supports(const char* target) nogil


def cpu_supports(str target):
    """Whether this CPU can run the kernels built for ``target`` ("avx2", "avx512")."""
    if target not in ("avx2", "avx512"):
        raise ValueError(f"unknown SIMD target {target!r}")
    return bool(cbn_cpu_supports(target.encode()))
