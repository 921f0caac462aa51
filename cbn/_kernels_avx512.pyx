"""cbn's inner kernels built for AVX-512 (see _kernels_impl.pxi and _kernel_export.pxi)."""
SIMD_TARGET = "avx512"
cdef const char* SIMD_TARGET_C = "avx512"

include "_kernels_impl.pxi"
include "_kernel_export.pxi"
