/* Elementwise passes over whole rows of float32 data with per-column
 * parameters ((N, C), NHWC and other short-run layouts), four rows per pass
 * over the parameters, so that they cost a quarter load per value.
 *
 * In C because the loops need CBN_IVDEP: with four input and four output
 * rows the compiler cannot prove the rows independent with the few runtime
 * checks it allows, and leaves the loop scalar (eight times slower). Every
 * output depends only on the inputs at its own index, and an output is
 * either the input itself or disjoint from it (cbn._core checks out=), so
 * no iteration depends on another.
 *
 * The arithmetic is that of the Cython spans in _kernels_impl.pxi
 * (normalize_span_cols_f32, grad_input_span_cols_f32, whose comments give
 * the scheme: an offset or a mean split in two floats); the results are the
 * same bits.
 */
#ifndef CBN_ROWS_H
#define CBN_ROWS_H

#include <stddef.h>

/* Columns per pass: the parameters of a tile (six float rows of it at
 * most, 12 KiB) stay in L1 beside the rows streaming through. */
#define CBN_ROW_TILE 512

#if defined(__clang__)
#define CBN_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define CBN_IVDEP _Pragma("GCC ivdep")
#else
#define CBN_IVDEP
#endif

/* y = ((x + hi) + lo) * scale + shift per column, then max(y, 0) with relu
 * (NaN stays NaN); columns 0 ... width - 1 of n_rows rows of W columns. */
static void cbn_normalize_tile_f32(const float *x, float *y, ptrdiff_t W, ptrdiff_t width,
                                   ptrdiff_t n_rows, const float *hi, const float *lo, const float *scale,
                                   const float *shift, int relu)
{
    ptrdiff_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
        const float *x0 = x + r * W, *x1 = x0 + W, *x2 = x1 + W, *x3 = x2 + W;
        float *y0 = y + r * W, *y1 = y0 + W, *y2 = y1 + W, *y3 = y2 + W;
        if (relu) {
            CBN_IVDEP
            for (ptrdiff_t j = 0; j < width; j++) {
                float h = hi[j], l = lo[j], s = scale[j], b = shift[j];
                float v0 = ((x0[j] + h) + l) * s + b, v1 = ((x1[j] + h) + l) * s + b;
                float v2 = ((x2[j] + h) + l) * s + b, v3 = ((x3[j] + h) + l) * s + b;
                y0[j] = v0 < 0 ? 0 : v0;
                y1[j] = v1 < 0 ? 0 : v1;
                y2[j] = v2 < 0 ? 0 : v2;
                y3[j] = v3 < 0 ? 0 : v3;
            }
        } else {
            CBN_IVDEP
            for (ptrdiff_t j = 0; j < width; j++) {
                float h = hi[j], l = lo[j], s = scale[j], b = shift[j];
                y0[j] = ((x0[j] + h) + l) * s + b;
                y1[j] = ((x1[j] + h) + l) * s + b;
                y2[j] = ((x2[j] + h) + l) * s + b;
                y3[j] = ((x3[j] + h) + l) * s + b;
            }
        }
    }
    for (; r < n_rows; r++) {
        const float *xr = x + r * W;
        float *yr = y + r * W;
        CBN_IVDEP
        for (ptrdiff_t j = 0; j < width; j++) {
            float v = ((xr[j] + hi[j]) + lo[j]) * scale[j] + shift[j];
            yr[j] = relu && v < 0 ? 0 : v;
        }
    }
}

/* dx = (((dy - g_hi) - g_lo) - ((x - m_hi) - m_lo) * proj) * scale per
 * column; columns 0 ... width - 1 of n_rows rows of W columns. dx may be dy
 * or x. */
static void cbn_grad_input_tile_f32(const float *dy, const float *x, float *dx, ptrdiff_t W,
                                    ptrdiff_t width, ptrdiff_t n_rows, const float *m_hi,
                                    const float *m_lo, const float *scale, const float *g_hi,
                                    const float *g_lo, const float *proj)
{
    ptrdiff_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
        const float *g = dy + r * W, *xr = x + r * W;
        float *o = dx + r * W;
        CBN_IVDEP
        for (ptrdiff_t j = 0; j < width; j++) {
            float mh = m_hi[j], ml = m_lo[j], s = scale[j];
            float gh = g_hi[j], gl = g_lo[j], q = proj[j];
            o[j] = (((g[j] - gh) - gl) - ((xr[j] - mh) - ml) * q) * s;
            o[W + j] = (((g[W + j] - gh) - gl) - ((xr[W + j] - mh) - ml) * q) * s;
            o[2 * W + j] = (((g[2 * W + j] - gh) - gl) - ((xr[2 * W + j] - mh) - ml) * q) * s;
            o[3 * W + j] = (((g[3 * W + j] - gh) - gl) - ((xr[3 * W + j] - mh) - ml) * q) * s;
        }
    }
    for (; r < n_rows; r++) {
        const float *g = dy + r * W, *xr = x + r * W;
        float *o = dx + r * W;
        CBN_IVDEP
        for (ptrdiff_t j = 0; j < width; j++)
            o[j] = (((g[j] - g_hi[j]) - g_lo[j]) - ((xr[j] - m_hi[j]) - m_lo[j]) * proj[j])
                   * scale[j];
    }
}

/* The same over whole rows, tile by tile. */
static void cbn_normalize_rows_f32(const float *x, float *y, ptrdiff_t W, ptrdiff_t n_rows,
                                   const float *hi, const float *lo, const float *scale,
                                   const float *shift, int relu)
{
    for (ptrdiff_t j = 0; j < W; j += CBN_ROW_TILE) {
        ptrdiff_t width = W - j < CBN_ROW_TILE ? W - j : CBN_ROW_TILE;
        cbn_normalize_tile_f32(x + j, y + j, W, width, n_rows, hi + j, lo + j, scale + j,
                               shift + j, relu);
    }
}

static void cbn_grad_input_rows_f32(const float *dy, const float *x, float *dx, ptrdiff_t W,
                                    ptrdiff_t n_rows, const float *m_hi, const float *m_lo,
                                    const float *scale, const float *g_hi, const float *g_lo,
                                    const float *proj)
{
    for (ptrdiff_t j = 0; j < W; j += CBN_ROW_TILE) {
        ptrdiff_t width = W - j < CBN_ROW_TILE ? W - j : CBN_ROW_TILE;
        cbn_grad_input_tile_f32(dy + j, x + j, dx + j, W, width, n_rows, m_hi + j, m_lo + j,
                                scale + j, g_hi + j, g_lo + j, proj + j);
    }
}

#endif /* CBN_ROWS_H */
