"""cbn's inner kernels built for AVX2 (see _kernels_impl.pxi and _kernel_export.pxi)."""
SIMD_TARGET = "avx2"
cdef const char* SIMD_TARGET_C = "avx2"

include "_kernels_impl.pxi"
include "_kernel_export.pxi"
