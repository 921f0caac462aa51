# Stub of cbn's inner kernels built for AVX-512 (cbn/_kernels_avx512.pyx:
# _kernels_impl.pxi and _kernel_export.pxi): cbn/_kernels.pyi without the CPU
# check, which only the baseline build has.

SIMD_TARGET: str

def kernel_table() -> object: ...  # a PyCapsule, for cbn._core.use_kernels
