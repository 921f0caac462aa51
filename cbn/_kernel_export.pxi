# The table of this SIMD build's inner kernels, handed to the glue.
#
# Design: only the loops of _kernels_impl.pxi gain from wider instructions, so
# only they are compiled once per SIMD target; the glue that validates calls
# and keeps caches (cbn._core) is compiled once and calls the chosen build
# through this table of function pointers (_kernel_table.h), the way NumPy's
# dispatch picks an inner loop. The table is static: it lives as long as the
# module, which cbn._dispatch keeps imported.

from cpython.pycapsule cimport PyCapsule_New


from cbn._kernel_table cimport (CBN_KERNEL_TABLE_NAME, CBN_KERNEL_TABLE_VERSION,
                                cbn_kernel_table)


cdef cbn_kernel_table TABLE
TABLE.version = CBN_KERNEL_TABLE_VERSION
TABLE.simd_target = SIMD_TARGET_C
TABLE.batch_stats_f32 = batch_stats_impl[float]
TABLE.batch_stats_f64 = batch_stats_impl[double]
TABLE.forward_f32 = forward_impl[float]
TABLE.forward_f64 = forward_impl[double]
TABLE.backward_f32 = backward_impl[float]
TABLE.backward_f64 = backward_impl[double]
TABLE.grad_sums_f32 = grad_sums_impl[float]
TABLE.grad_sums_f64 = grad_sums_impl[double]
TABLE.grad_input_f32 = grad_input_from_sums_impl[float]
TABLE.grad_input_f64 = grad_input_from_sums_impl[double]
TABLE.normalize_f32 = normalize_impl[float]
TABLE.normalize_f64 = normalize_impl[double]
TABLE.relu_grad_f32 = relu_grad_impl[float]
TABLE.relu_grad_f64 = relu_grad_impl[double]
TABLE.stream_min_bytes = STREAM_MIN_BYTES
TABLE.threads_supported = cbn_pool_threaded()


def kernel_table():
    """This build's kernels, as a capsule for cbn._core.use_kernels()."""
    return PyCapsule_New(&TABLE, CBN_KERNEL_TABLE_NAME, NULL)
