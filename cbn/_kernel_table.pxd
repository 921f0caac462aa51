# The table of inner kernels (_kernel_table.h), for the kernel builds that
# fill it (_kernel_export.pxi) and the executor that calls through it (_core.pyx).

cdef extern from "_kernel_table.h":
    const char* CBN_KERNEL_TABLE_NAME
    int CBN_KERNEL_TABLE_VERSION
    ctypedef struct cbn_kernel_table:
        int version
        const char* simd_target
        int (*batch_stats_f32)(const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               const unsigned char*, double, double*, double*,
                               int) noexcept nogil
        int (*batch_stats_f64)(const double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               const unsigned char*, double, double*, double*,
                               int) noexcept nogil
        int (*forward_f32)(const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t, const double*,
                           const double*, double, bint, double*, double*, double*, float*,
                           bint, const unsigned char*, double, int) noexcept nogil
        int (*forward_f64)(const double*, Py_ssize_t, Py_ssize_t, Py_ssize_t, const double*,
                           const double*, double, bint, double*, double*, double*, double*,
                           bint, const unsigned char*, double, int) noexcept nogil
        int (*backward_f32)(const float*, const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                            const double*, const double*, const double*, bint,
                            const unsigned char*, double, double*, double*, float*,
                            int) noexcept nogil
        int (*backward_f64)(const double*, const double*, Py_ssize_t, Py_ssize_t,
                            Py_ssize_t, const double*, const double*, const double*, bint,
                            const unsigned char*, double, double*, double*, double*,
                            int) noexcept nogil
        int (*grad_sums_f32)(const float*, const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                             const double*, double*, double*, int) noexcept nogil
        int (*grad_sums_f64)(const double*, const double*, Py_ssize_t, Py_ssize_t,
                             Py_ssize_t, const double*, double*, double*, int) noexcept nogil
        int (*grad_input_f32)(const float*, const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              const double*, const double*, const double*, const double*,
                              const double*, const unsigned char*, double, float*,
                              int) noexcept nogil
        int (*grad_input_f64)(const double*, const double*, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, const double*, const double*, const double*,
                              const double*, const double*, const unsigned char*, double,
                              double*, int) noexcept nogil
        int (*normalize_f32)(const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t, const double*,
                             const double*, const double*, float*, bint, bint,
                             int) noexcept nogil
        int (*normalize_f64)(const double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                             const double*, const double*, const double*, double*, bint,
                             bint, int) noexcept nogil
        void (*relu_grad_f32)(const float*, const float*, float*, Py_ssize_t,
                              int) noexcept nogil
        void (*relu_grad_f64)(const double*, const double*, double*, Py_ssize_t,
                              int) noexcept nogil
        Py_ssize_t stream_min_bytes
        bint threads_supported
