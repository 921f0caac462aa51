"""cbn's compiled kernels, built for the avx512 instruction set.

The code is in _kernels_impl.pxi, _entry.pxi and _inference.pxi; cbn._dispatch picks the best build this CPU runs.
"""
SIMD_TARGET = "avx512"

include "_kernels_impl.pxi"
include "_entry.pxi"
include "_inference.pxi"
