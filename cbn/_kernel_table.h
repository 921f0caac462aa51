/* The table through which the glue (cbn._core, compiled once) calls the inner
 * kernels of one SIMD build (cbn._kernels, _kernels_avx2, _kernels_avx512).
 *
 * Each SIMD build fills one of these with its specializations of the *_impl
 * kernels (_kernels_impl.pxi) and hands it out in a PyCapsule named
 * CBN_KERNEL_TABLE_NAME; cbn._dispatch gives the chosen one to cbn._core.
 * The kernels return 0, or -1 when their scratch space cannot be allocated.
 * Flags are ints (Cython's bint). The version guards against a stale build
 * of one module next to a new build of another.
 */
#ifndef CBN_KERNEL_TABLE_H
#define CBN_KERNEL_TABLE_H

#include <Python.h>

#define CBN_KERNEL_TABLE_NAME "cbn.kernel_table"
#define CBN_KERNEL_TABLE_VERSION 4

typedef struct {
    int version;
    const char *simd_target;
    /* A mask ``valid`` is one byte per (outer, inner) position, shared by the
     * channels, nonzero where the position is valid; NULL: every position is.
     * ``count``: how many are valid (> 0), read only with a mask. */
    /* Per-channel mean and biased variance of a non-empty block. */
    int (*batch_stats_f32)(const float *x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                           const unsigned char *valid, double count,
                           double *mean, double *var, int threads);
    int (*batch_stats_f64)(const double *x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                           const unsigned char *valid, double count,
                           double *mean, double *var, int threads);
    /* Normalize with batch statistics (written to mean/var/invstd; over the
     * valid positions) or with given ones (mean/var read, invstd written);
     * every position is normalized; y may be x. */
    int (*forward_f32)(const float *x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                       const double *weight, const double *bias, double eps, int batch_stats,
                       double *mean, double *var, double *invstd, float *y, int relu,
                       const unsigned char *valid, double count, int threads);
    int (*forward_f64)(const double *x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                       const double *weight, const double *bias, double eps, int batch_stats,
                       double *mean, double *var, double *invstd, double *y, int relu,
                       const unsigned char *valid, double count, int threads);
    /* Input gradient and the per-channel sums (over every position); dx may
     * be dy or x. In training, ``valid`` says where the statistics came from. */
    int (*backward_f32)(const float *dy, const float *x, Py_ssize_t outer, Py_ssize_t C,
                        Py_ssize_t inner, const double *mean, const double *invstd,
                        const double *weight, int training, const unsigned char *valid,
                        double count, double *sum_dy, double *dotp, float *dx, int threads);
    int (*backward_f64)(const double *dy, const double *x, Py_ssize_t outer, Py_ssize_t C,
                        Py_ssize_t inner, const double *mean, const double *invstd,
                        const double *weight, int training, const unsigned char *valid,
                        double count, double *sum_dy, double *dotp, double *dx,
                        int threads);
    /* The backward's two halves, for sums that are combined across processes
     * in between (SyncBatchNorm): the per-channel sum of dy and of
     * (x - mean) * dy of a non-empty block, then the training-mode input
     * gradient from sums over ``count`` values per channel; dx may be dy or x. */
    int (*grad_sums_f32)(const float *dy, const float *x, Py_ssize_t outer, Py_ssize_t C,
                         Py_ssize_t inner, const double *mean, double *sum_dy, double *dotp,
                         int threads);
    int (*grad_sums_f64)(const double *dy, const double *x, Py_ssize_t outer, Py_ssize_t C,
                         Py_ssize_t inner, const double *mean, double *sum_dy, double *dotp,
                         int threads);
    int (*grad_input_f32)(const float *dy, const float *x, Py_ssize_t outer, Py_ssize_t C,
                          Py_ssize_t inner, const double *mean, const double *invstd,
                          const double *weight, const double *sum_dy, const double *dotp,
                          const unsigned char *valid, double count, float *dx, int threads);
    int (*grad_input_f64)(const double *dy, const double *x, Py_ssize_t outer, Py_ssize_t C,
                          Py_ssize_t inner, const double *mean, const double *invstd,
                          const double *weight, const double *sum_dy, const double *dotp,
                          const unsigned char *valid, double count, double *dx,
                          int threads);
    /* y = (x - mean) * scale + shift (then ReLU); y may be x. */
    int (*normalize_f32)(const float *x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                         const double *mean, const double *scale, const double *shift,
                         float *y, int relu, int stream, int threads);
    int (*normalize_f64)(const double *x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                         const double *mean, const double *scale, const double *shift,
                         double *y, int relu, int stream, int threads);
    /* dz = 0 where y <= 0, dy elsewhere; dz may be dy. */
    void (*relu_grad_f32)(const float *dy, const float *y, float *dz, Py_ssize_t n,
                          int threads);
    void (*relu_grad_f64)(const double *dy, const double *y, double *dz, Py_ssize_t n,
                          int threads);
    /* Outputs of at least this many bytes are written with streaming stores. */
    Py_ssize_t stream_min_bytes;
    /* Whether the kernels' thread pool exists (_pool.h); else a team is one. */
    int threads_supported;
} cbn_kernel_table;

#endif /* CBN_KERNEL_TABLE_H */
