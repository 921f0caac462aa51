# Stub of cbn's inner kernels built for the baseline instruction set
# (cbn/_kernels.pyx: _kernels_impl.pxi and _kernel_export.pxi). Python sees
# only the build's name, its kernel table and, in this build alone, the CPU
# check; the SIMD builds' stubs (_kernels_avx2.pyi, _kernels_avx512.pyi) are
# the same without cpu_supports.

SIMD_TARGET: str

def kernel_table() -> object: ...  # a PyCapsule, for cbn._core.use_kernels
def cpu_supports(target: str) -> bool: ...
