# Compiled batch-normalization kernels: the code every SIMD build of
# cbn._kernels* shares (included by _kernels.pyx, _kernels_avx2.pyx, ...).
#
# Design: every layout arrives as a C-contiguous ``(outer, C, inner)`` block of
# float32 or float64 data, already validated, plus per-channel parameters in
# float64. The ``*_impl`` functions take raw pointers and only loop: they never
# raise and never touch the GIL (a scratch allocation that fails returns -1).
# Their one caller is the executor, cbn._core, which validates every call and
# reaches the kernels of the chosen SIMD build through _kernel_table.h
# (filled in _kernel_export.pxi).
#
# One walk plan (_plan.pxi). choose_walk picks, from the shape alone, how a
# view is read: planar (long runs, e.g. NCHW: units of a channel's runs),
# sweep (planar runs too short to read channel by channel: ranges of whole
# rows, every channel in memory order) or interleaved (short runs, e.g.
# (N, C) or NHWC: rows of ``W = C * inner`` columns, units of rows and a tile
# of columns, the inner loops along a row). plan_reduction turns that into a
# ReducePlan: the chunks of rows, the tiles of columns, the units, the team
# and the scratch layout; plan_shares into a SharePlan for elementwise work.
# Kernels read their plan and recompute nothing of the partition.
#
# One reduction driver (reduce_impl): the batch statistics and the gradient
# sums differ only in their per-unit kernels (one per walk) and in how two
# partial results combine (Chan's formula, or addition). The driver plans,
# runs the units, folds the chunks into chunk 0 in chunk order, then the
# columns into channels. Elementwise passes (normalize, input gradient, ReLU
# gradient) share one share walker and one writer (direct, or staged in L1
# and streamed, _stream.h). Fused steps run a channel's reduction and its
# elementwise pass while its data is in cache.
#
# One loop over units (run_job): every kernel describes its work as a Job of
# units, and run_job has them claimed by this thread and the pool's helpers
# (_pool.h: the caller never waits for a helper that has not started), or
# runs them in order on this thread when the team is one.
#
# A reduction's partials take one block of scratch memory, kept between calls
# (_scratch.h): a fresh block of megabytes would be faulted in page by page on
# every call.
#
# Determinism: the split of a reduction into units depends only on the shape,
# each unit writes its own partial results, and partials are merged in a fixed
# order after all units ran. Elementwise passes compute every element alone,
# so their cut (small shares) does not matter to the bits. Results are
# therefore bit-identical for any thread count.
#
# Accuracy: statistics accumulate in double, and a huge mean relative to the
# spread never cancels. The planar walk reduces each run of at most ``BLOCK``
# elements two-pass (mean, then squared deviations from it) while it sits in
# L1; the interleaved walk sums each unit's deviations from its first row (a
# value within the spread) in one pass. Partial results combine with Chan et
# al.'s pairwise update. Elementwise kernels compute float64 data in double
# and float32 data in float32 lanes whose roundings stay relative to the
# output (see "float32 lanes" below).

from cython cimport floating
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef extern from "_stream.h" nogil:
    void cbn_stream_copy(void* dst, const void* src, size_t nbytes)
    void cbn_stream_fence()


cdef extern from "_pool.h" nogil:
    ctypedef void (*cbn_unit_fn)(const void* job, Py_ssize_t unit, int worker) noexcept nogil
    void cbn_pool_run(cbn_unit_fn fn, const void* job, Py_ssize_t n_units, int team,
                      Py_ssize_t elements)
    int cbn_pool_threaded()


cdef extern from "_rows.h" nogil:
    void cbn_normalize_rows_f32(const float* x, float* y, Py_ssize_t W, Py_ssize_t n_rows,
                                const float* hi, const float* lo, const float* scale,
                                const float* shift, int relu)
    void cbn_grad_input_rows_f32(const float* dy, const float* x, float* dx, Py_ssize_t W,
                                 Py_ssize_t n_rows, const float* m_hi, const float* m_lo,
                                 const float* scale, const float* g_hi, const float* g_lo,
                                 const float* proj)


cdef extern from "_scratch.h" nogil:
    void* cbn_scratch_take(size_t nbytes)
    void cbn_scratch_give(void* block)


cdef enum:
    PLANAR_MIN_INNER = 32  # runs at least this long are walked one by one
    BLOCK = 2048           # elements reduced two-pass while in L1
    UNIT_ELEMS = 65536     # target elements per unit of a reduction
    # columns per interleaved work unit: the unit's per-column accumulators
    # (three doubles per column, 12 KiB) stay in L1 beside the rows read
    TILE_COLS = 512
    MIN_CHUNK_ROWS = 64    # interleaved units span about this many rows or more
    MAX_ROW_CHUNKS = 64    # bounds the number of per-column partials
    SWEEP_MAX_INNER = 1024  # planar runs shorter than this are reduced row by row
    MIN_SWEEP_ROWS = 8     # ... when there are enough rows to share out
    LANES = 16             # independent accumulators in contiguous reductions
    STAGE = 512            # outputs computed into an L1 buffer per streaming copy
    SHARE_GRANULE = 16     # elementwise shares start on multiples of this
    SHARE_ELEMS = 16384    # about this many elements per elementwise share
    # Outputs this large bypass the cache (streaming stores): they would not
    # survive in it until the next layer reads them anyway, and normal stores
    # would read every output line first and evict the input being re-read.
    STREAM_MIN_BYTES = 16 << 20


# Offsets beyond this do not fit a float32 (FLT_MAX is about 3.4e38).
cdef double FLOAT_LIMIT = 1e38


include "_plan.pxi"


cdef inline bint streams(size_t output_bytes) noexcept nogil:
    """Whether an output of this size is written with streaming stores."""
    return output_bytes >= STREAM_MIN_BYTES


# ---------------------------------------------------------------------------
# Scalar helpers

include "_chan.pxi"


cdef inline double sum_lanes(const double* acc) noexcept nogil:
    """Pairwise sum of LANES accumulators, in a fixed order."""
    cdef double half[LANES]  # the first LANES / 2 are used
    cdef Py_ssize_t k, width = LANES // 2
    for k in range(width):
        half[k] = acc[k] + acc[k + width]
    while width > 1:
        width //= 2
        for k in range(width):
            half[k] = half[k] + half[k + width]
    return half[0]


cdef inline void run_two_pass(const floating* x, Py_ssize_t n,
                              double* mean, double* m2) noexcept nogil:
    """Mean and sum of squared deviations of a short contiguous run (n >= 1)."""
    # LANES independent accumulators: the compiler maps them onto SIMD
    # registers of any width without reassociating, so every build and thread
    # count sums in the same order.
    cdef double acc[LANES]
    cdef double mu, d
    cdef Py_ssize_t i, k, n_full = n - n % LANES
    for k in range(LANES):
        acc[k] = 0
    for i in range(0, n_full // LANES):
        for k in range(LANES):
            acc[k] += x[i * LANES + k]
    for i in range(n_full, n):
        acc[i - n_full] += x[i]
    mu = sum_lanes(acc) / n
    for k in range(LANES):
        acc[k] = 0
    for i in range(0, n_full // LANES):
        for k in range(LANES):
            d = x[i * LANES + k] - mu
            acc[k] += d * d
    for i in range(n_full, n):
        d = x[i] - mu
        acc[i - n_full] += d * d
    mean[0] = mu
    m2[0] = sum_lanes(acc)


# ---------------------------------------------------------------------------
# 1. Per-unit reduction kernels: what a unit of each walk computes. Statistics
# and gradient sums differ only here; the driver (section 2) is shared.

cdef void planar_stats_unit(const floating* x, Py_ssize_t C, Py_ssize_t inner,
                            Py_ssize_t c, Py_ssize_t o_start, Py_ssize_t o_stop,
                            double* mean_out,      # OUT
                            double* m2_out         # OUT
                            ) noexcept nogil:
    cdef double n = 0, mean = 0, m2 = 0, block_mean, block_m2
    cdef Py_ssize_t o, start, length
    cdef const floating* run
    for o in range(o_start, o_stop):
        run = x + (o * C + c) * inner
        start = 0
        while start < inner:
            length = min(<Py_ssize_t>BLOCK, inner - start)
            run_two_pass(run + start, length, &block_mean, &block_m2)
            chan_merge(&n, &mean, &m2, <double>length, block_mean, block_m2)
            start += length
    mean_out[0] = mean
    m2_out[0] = m2


cdef void interleaved_stats_unit(const floating* x, Py_ssize_t W,
                                 Py_ssize_t r_start, Py_ssize_t r_stop,
                                 Py_ssize_t j_start, Py_ssize_t j_stop,
                                 double* sum_d,        # scratch, 2 * TILE_COLS
                                 double* mean_out,     # OUT, columns j_start:j_stop
                                 double* m2_out        # OUT, columns j_start:j_stop
                                 ) noexcept nogil:
    """Statistics of a block of rows and a tile of columns, in one pass over x.

    The rows are summed as deviations from the block's first row, which lies
    within the data's spread: sums of d = x - shift and d * d in double then
    lose nothing to a large mean, and m2 = sum(d * d) - sum(d)^2 / n cancels
    only as much as the shift is off the mean. One read of x, rows streamed
    whole tiles at a time, keeps this loop at memory speed.
    """
    cdef Py_ssize_t width = j_stop - j_start, n = r_stop - r_start, r, j
    cdef double d0, d1, d2, d3
    cdef double* shift = sum_d + TILE_COLS
    cdef const floating* row
    cdef Py_ssize_t nonfinite = 0
    row = x + r_start * W + j_start
    for j in range(width):
        shift[j] = row[j]
        sum_d[j] = 0
        m2_out[j] = 0  # sum of d * d until the end
        nonfinite += row[j] - row[j] != 0
    if nonfinite:
        # A non-finite first value would turn every deviation into NaN; with
        # no shift an infinite value keeps an infinite mean, as in one sum.
        for j in range(width):
            if shift[j] - shift[j] != 0:
                shift[j] = 0
                sum_d[j] = row[j]
                m2_out[j] = sum_d[j] * sum_d[j]
    # The first row's deviations are 0 (but for a non-finite one). Four rows
    # at a time keep the accumulators' memory traffic below that of x.
    r = r_start + 1
    while r + 4 <= r_stop:
        row = x + r * W + j_start
        for j in range(width):
            d0 = row[j] - shift[j]
            d1 = row[W + j] - shift[j]
            d2 = row[2 * W + j] - shift[j]
            d3 = row[3 * W + j] - shift[j]
            sum_d[j] += (d0 + d1) + (d2 + d3)
            m2_out[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    while r < r_stop:
        row = x + r * W + j_start
        for j in range(width):
            d0 = row[j] - shift[j]
            sum_d[j] += d0
            m2_out[j] += d0 * d0
        r += 1
    for j in range(width):
        mean_out[j] = shift[j] + sum_d[j] / n
        m2_out[j] = max(m2_out[j] - sum_d[j] * (sum_d[j] / n), 0.0)


cdef void sweep_stats_rows(const floating* x, Py_ssize_t C, Py_ssize_t inner,
                           Py_ssize_t o_start, Py_ssize_t o_stop,
                           double* mean_out,     # OUT (C,)
                           double* m2_out        # OUT (C,)
                           ) noexcept nogil:
    """Statistics of rows o_start:o_stop for every channel, reading x in
    memory order. Runs are shorter than BLOCK: each is one two-pass block."""
    cdef Py_ssize_t o, c
    cdef double n_before, block_mean, block_m2
    cdef const floating* run = x + o_start * C * inner
    for c in range(C):
        run_two_pass(run + c * inner, inner, &mean_out[c], &m2_out[c])
    for o in range(o_start + 1, o_stop):
        run = x + o * C * inner
        for c in range(C):
            run_two_pass(run + c * inner, inner, &block_mean, &block_m2)
            n_before = <double>(o - o_start) * inner
            chan_merge(&n_before, &mean_out[c], &m2_out[c], <double>inner,
                       block_mean, block_m2)


cdef void planar_grad_sums_unit(const floating* dy, const floating* x,
                                Py_ssize_t C, Py_ssize_t inner, Py_ssize_t c,
                                Py_ssize_t o_start, Py_ssize_t o_stop, double mean,
                                double* sum_dy_out,    # OUT
                                double* dotp_out       # OUT
                                ) noexcept nogil:
    cdef double acc_dy[LANES]
    cdef double acc_p[LANES]
    cdef Py_ssize_t o, i, k, offset, n_full = inner - inner % LANES
    for k in range(LANES):
        acc_dy[k] = 0
        acc_p[k] = 0
    for o in range(o_start, o_stop):
        offset = (o * C + c) * inner
        for i in range(n_full // LANES):
            for k in range(LANES):
                acc_dy[k] += dy[offset + i * LANES + k]
                acc_p[k] += (x[offset + i * LANES + k] - mean) * dy[offset + i * LANES + k]
        for i in range(offset + n_full, offset + inner):
            acc_dy[i - offset - n_full] += dy[i]
            acc_p[i - offset - n_full] += (x[i] - mean) * dy[i]
    sum_dy_out[0] = sum_lanes(acc_dy)
    dotp_out[0] = sum_lanes(acc_p)


cdef inline void run_grad_sums(const floating* dy, const floating* x, Py_ssize_t n,
                               double mean,
                               double* sum_dy,   # OUT
                               double* dotp      # OUT
                               ) noexcept nogil:
    """sum(dy) and sum((x - mean) * dy) over one contiguous run."""
    cdef double acc_dy[LANES]
    cdef double acc_p[LANES]
    cdef Py_ssize_t i, k, n_full = n - n % LANES
    for k in range(LANES):
        acc_dy[k] = 0
        acc_p[k] = 0
    for i in range(n_full // LANES):
        for k in range(LANES):
            acc_dy[k] += dy[i * LANES + k]
            acc_p[k] += (x[i * LANES + k] - mean) * dy[i * LANES + k]
    for i in range(n_full, n):
        acc_dy[i - n_full] += dy[i]
        acc_p[i - n_full] += (x[i] - mean) * dy[i]
    sum_dy[0] = sum_lanes(acc_dy)
    dotp[0] = sum_lanes(acc_p)


cdef void sweep_grad_sums_rows(const floating* dy, const floating* x,
                               Py_ssize_t C, Py_ssize_t inner,
                               Py_ssize_t o_start, Py_ssize_t o_stop,
                               const double* mean,
                               double* sum_dy_out,   # OUT (C,)
                               double* dotp_out      # OUT (C,)
                               ) noexcept nogil:
    """Sums over rows o_start:o_stop for every channel, reading in memory order."""
    cdef Py_ssize_t o, c, offset
    cdef double run_dy, run_p
    for c in range(C):
        sum_dy_out[c] = 0
        dotp_out[c] = 0
    for o in range(o_start, o_stop):
        for c in range(C):
            offset = (o * C + c) * inner
            run_grad_sums(dy + offset, x + offset, inner, mean[c], &run_dy, &run_p)
            sum_dy_out[c] += run_dy
            dotp_out[c] += run_p


cdef void interleaved_grad_sums_unit(const floating* dy, const floating* x,
                                     Py_ssize_t W, const double* mean_cols,
                                     Py_ssize_t r_start, Py_ssize_t r_stop,
                                     Py_ssize_t j_start, Py_ssize_t j_stop,
                                     double* sum_dy_out,   # OUT, columns j_start:j_stop
                                     double* dotp_out      # OUT, columns j_start:j_stop
                                     ) noexcept nogil:
    cdef Py_ssize_t r, j, width = j_stop - j_start, offset
    cdef double m, g0, g1, g2, g3
    cdef const double* mean = mean_cols + j_start
    for j in range(width):
        sum_dy_out[j] = 0
        dotp_out[j] = 0
    # Four rows at a time, as in interleaved_stats_unit: the accumulators'
    # memory traffic stays below that of dy and x.
    r = r_start
    while r + 4 <= r_stop:
        offset = r * W + j_start
        for j in range(width):
            m = mean[j]
            g0 = dy[offset + j]
            g1 = dy[offset + W + j]
            g2 = dy[offset + 2 * W + j]
            g3 = dy[offset + 3 * W + j]
            sum_dy_out[j] += (g0 + g1) + (g2 + g3)
            dotp_out[j] += (((x[offset + j] - m) * g0 + (x[offset + W + j] - m) * g1)
                            + ((x[offset + 2 * W + j] - m) * g2
                               + (x[offset + 3 * W + j] - m) * g3))
        r += 4
    while r < r_stop:
        offset = r * W + j_start
        for j in range(width):
            sum_dy_out[j] += dy[offset + j]
            dotp_out[j] += (x[offset + j] - mean[j]) * dy[offset + j]
        r += 1


# Masked statistics: sums of d = x - shift and d * d over the positions a
# mask (one byte per (outer, inner) position, shared by every channel) marks
# valid. Masked-out values are selected away, never multiplied by 0, so
# padding that holds NaN or inf leaves no trace.

cdef inline void shifted_sums(const floating* x, Py_ssize_t n, double shift,
                              double* sum_d,     # IN/OUT: added to
                              double* sum_d2     # IN/OUT: added to
                              ) noexcept nogil:
    """Sums of d = x - shift and d * d over a short contiguous run; the
    shift must be exact in x's dtype (masked_shifts' are values of x)."""
    cdef double acc_d[LANES]
    cdef double acc_d2[LANES]
    cdef floating tail[LANES]
    cdef double d
    cdef Py_ssize_t i, k, n_full = n - n % LANES
    for k in range(LANES):
        acc_d[k] = 0
        acc_d2[k] = 0
    # Two loops of one accumulator each (the run is in L1): a loop that
    # feeds two accumulators does not vectorize.
    for i in range(n_full // LANES):
        for k in range(LANES):
            acc_d[k] += x[i * LANES + k] - shift
    for i in range(n_full // LANES):
        for k in range(LANES):
            d = x[i * LANES + k] - shift
            acc_d2[k] += d * d
    if n > n_full:
        # The last values padded with the shift (deviation exactly 0) to one
        # more block: a scalar tail through the accumulators would chain
        # their latencies, and padded rows have tails of every length.
        for k in range(LANES):
            tail[k] = <floating>shift
        for i in range(n_full, n):
            tail[i - n_full] = x[i]
        for k in range(LANES):
            acc_d[k] += tail[k] - shift
        for k in range(LANES):
            d = tail[k] - shift
            acc_d2[k] += d * d
    sum_d[0] += sum_lanes(acc_d)
    sum_d2[0] += sum_lanes(acc_d2)


ctypedef struct Mask:   # a mask as the masked kernels read it
    const unsigned char* valid   # (outer, inner): 1 where the position is valid
    # (outer,): the length of row o's valid prefix when the row is valid up
    # to a point and masked after it (a padded sequence's row, or one wholly
    # valid or masked), else -1. Found once per call for every channel.
    Py_ssize_t* prefix


cdef int mask_rows(Mask* m,          # OUT
                   const unsigned char* valid, Py_ssize_t outer,
                   Py_ssize_t inner) noexcept nogil:
    """Returns 0, or -1 when the prefix table cannot be allocated."""
    cdef Py_ssize_t o, k, j
    cdef const unsigned char* row
    m.valid = valid
    m.prefix = <Py_ssize_t*>malloc(outer * sizeof(Py_ssize_t) + 1)
    if m.prefix == NULL:
        return -1
    for o in range(outer):
        row = valid + o * inner
        k = 0
        while k < inner and row[k]:
            k += 1
        j = k
        while j < inner and not row[j]:
            j += 1
        m.prefix[o] = k if j == inner else -1
    return 0


cdef inline void masked_run_sums(const floating* x, const unsigned char* valid,
                                 Py_ssize_t n, Py_ssize_t prefix, double shift,
                                 double* sum_d,     # IN/OUT: added to
                                 double* sum_d2     # IN/OUT: added to
                                 ) noexcept nogil:
    """Sums of d = x - shift and d * d over the valid values of a run.

    A run valid up to some point and masked after it (``prefix`` >= 0 valid
    values: a padded sequence's, or one wholly valid or masked) is summed in
    place. Any other is taken
    STAGE values at a time, first copied to an L1 buffer with the masked
    ones replaced by the shift itself (a value of x, so exactly
    representable), whose deviation is exactly 0; both loops then vectorize,
    where a select inside the sums would not (mixed byte and double lanes).
    """
    cdef floating staged[STAGE]
    cdef floating fill = <floating>shift, v
    cdef Py_ssize_t start = 0, length, i
    if prefix >= 0:
        shifted_sums(x, prefix, shift, sum_d, sum_d2)
        return
    while start < n:
        length = min(<Py_ssize_t>STAGE, n - start)
        for i in range(length):
            v = x[start + i]   # loaded whatever the mask: a blend, no branch
            staged[i] = v if valid[start + i] else fill
        shifted_sums(staged, length, shift, sum_d, sum_d2)
        start += length


cdef void planar_masked_unit(const floating* x, const Mask* m,
                             Py_ssize_t C, Py_ssize_t inner, Py_ssize_t c,
                             Py_ssize_t o_start, Py_ssize_t o_stop, double shift,
                             double* sum_d_out,    # OUT
                             double* sum_d2_out    # OUT
                             ) noexcept nogil:
    cdef Py_ssize_t o
    sum_d_out[0] = 0
    sum_d2_out[0] = 0
    for o in range(o_start, o_stop):
        masked_run_sums(x + (o * C + c) * inner, m.valid + o * inner, inner, m.prefix[o],
                        shift,
                        sum_d_out, sum_d2_out)


cdef void sweep_masked_rows(const floating* x, const Mask* m,
                            Py_ssize_t C, Py_ssize_t inner,
                            Py_ssize_t o_start, Py_ssize_t o_stop, const double* shift,
                            double* sum_d_out,    # OUT (C,)
                            double* sum_d2_out    # OUT (C,)
                            ) noexcept nogil:
    cdef Py_ssize_t o, c
    for c in range(C):
        sum_d_out[c] = 0
        sum_d2_out[c] = 0
    for o in range(o_start, o_stop):
        for c in range(C):
            masked_run_sums(x + (o * C + c) * inner, m.valid + o * inner, inner,
                            m.prefix[o], shift[c],
                            &sum_d_out[c], &sum_d2_out[c])


cdef void interleaved_masked_unit(const floating* x, const Mask* m,
                                  Py_ssize_t W, Py_ssize_t inner,
                                  const double* shift_cols,
                                  Py_ssize_t r_start, Py_ssize_t r_stop,
                                  Py_ssize_t j_start, Py_ssize_t j_stop,
                                  double* sum_d_out,    # OUT, columns j_start:j_stop
                                  double* sum_d2_out    # OUT, columns j_start:j_stop
                                  ) noexcept nogil:
    """Rows of W = C * inner columns; column j is position j % inner of its
    channel. With inner 1 a row is valid or not as a whole, and skipped;
    otherwise the row's mask is spread over the tile's columns as values of
    x's dtype (1 or 0), so that the select in the sums compares lanes of the
    data's width and the loop vectorizes."""
    cdef Py_ssize_t r, j, i, seg, filled, width = j_stop - j_start
    cdef double d
    cdef const double* shift = shift_cols + j_start
    cdef const floating* row
    cdef const unsigned char* mrow
    cdef floating fills[TILE_COLS]   # the shifts, exact in x's dtype
    cdef floating v
    cdef floating mcols[TILE_COLS]   # 1 where the column is valid in this row, else 0
    for j in range(width):
        sum_d_out[j] = 0
        sum_d2_out[j] = 0
        fills[j] = <floating>shift[j]
    for r in range(r_start, r_stop):
        row = x + r * W + j_start
        if inner == 1:
            if m.valid[r]:
                for j in range(width):
                    d = row[j] - shift[j]
                    sum_d_out[j] += d
                    sum_d2_out[j] += d * d
            continue
        # The row's mask repeats every inner columns: the tile's first
        # (partial) stretch, one whole one, then doubling copies.
        mrow = m.valid + r * inner
        if m.prefix[r] == 0:
            continue
        if m.prefix[r] == inner:
            for j in range(width):
                d = row[j] - shift[j]
                sum_d_out[j] += d
                sum_d2_out[j] += d * d
            continue
        i = j_start % inner
        seg = min(inner - i, width)
        for j in range(seg):
            mcols[j] = mrow[i + j]
        filled = min(seg + inner, width)
        for j in range(seg, filled):
            mcols[j] = mrow[j - seg]
        while filled < width:
            j = min(filled - seg, width - filled)
            memcpy(mcols + filled, mcols + seg, j * sizeof(floating))
            filled += j
        for j in range(width):
            v = row[j]   # loaded whatever the mask: a blend, no branch
            v = v if mcols[j] != 0 else fills[j]
            d = v - shift[j]
            sum_d_out[j] += d
            sum_d2_out[j] += d * d


# ---------------------------------------------------------------------------
# 2. The reduction driver: plan, run the units, merge. Shared by the batch
# statistics (combined with Chan's formula) and the gradient sums (added).

ctypedef struct Reduction:   # a reduction's job arguments
    ReducePlan plan
    int kind                 # a ReduceKind
    double* scratch          # laid out as the plan says
    # REDUCE_GRAD_SUMS: the means; REDUCE_MASKED_SUMS: the shifts. Per column
    # when plan.cols_per_channel > 1, else per channel.
    const double* mean
    const Mask* mask             # REDUCE_MASKED_SUMS only


cdef inline void reduce_unit(const Reduction* r, Py_ssize_t u, int thread,
                             const floating* x,
                             const floating* dy      # REDUCE_GRAD_SUMS only
                             ) noexcept nogil:
    """Unit u of r's plan: one chunk of rows and one tile of columns, into
    that chunk's row of the partials."""
    cdef const ReducePlan* p = &r.plan
    cdef Py_ssize_t k, tile, o_start, o_stop, j_start, j_stop
    cdef double* part_a
    cdef double* part_b
    if p.tile_major:
        tile = u // p.n_chunks
        k = u % p.n_chunks
    else:
        k = u // p.n_tiles
        tile = u % p.n_tiles
    o_start = k * p.rows_per_chunk
    o_stop = o_start + chunk_rows(p, k)
    j_start = tile * p.tile_cols
    j_stop = min(p.cols, j_start + p.tile_cols)
    part_a = r.scratch + p.part_a_at + k * p.cols + j_start
    part_b = r.scratch + p.part_b_at + k * p.cols + j_start
    if r.kind == REDUCE_STATS:
        if p.walk == WALK_SWEEP:
            sweep_stats_rows(x, p.C, p.inner, o_start, o_stop, part_a, part_b)
        elif p.walk == WALK_PLANAR:
            planar_stats_unit(x, p.C, p.inner, j_start, o_start, o_stop, part_a, part_b)
        else:
            interleaved_stats_unit(x, p.cols, o_start, o_stop, j_start, j_stop,
                                   r.scratch + p.thread_scratch_at
                                   + thread * p.thread_scratch_len,
                                   part_a, part_b)
    elif r.kind == REDUCE_MASKED_SUMS:
        if p.walk == WALK_SWEEP:
            sweep_masked_rows(x, r.mask, p.C, p.inner, o_start, o_stop, r.mean,
                              part_a, part_b)
        elif p.walk == WALK_PLANAR:
            planar_masked_unit(x, r.mask, p.C, p.inner, j_start, o_start, o_stop,
                               r.mean[j_start], part_a, part_b)
        else:
            interleaved_masked_unit(x, r.mask, p.cols, p.inner, r.mean, o_start, o_stop,
                                    j_start, j_stop, part_a, part_b)
    else:
        if p.walk == WALK_SWEEP:
            sweep_grad_sums_rows(dy, x, p.C, p.inner, o_start, o_stop, r.mean,
                                 part_a, part_b)
        elif p.walk == WALK_PLANAR:
            planar_grad_sums_unit(dy, x, p.C, p.inner, j_start, o_start, o_stop,
                                  r.mean[j_start], part_a, part_b)
        else:
            interleaved_grad_sums_unit(dy, x, p.cols, r.mean, o_start, o_stop,
                                       j_start, j_stop, part_a, part_b)


cdef void combine_chunks(const Reduction* r) noexcept nogil:
    """Fold the partials of chunks 1, 2, ... into chunk 0's row, in chunk
    order, column by column (a loop that vectorizes)."""
    cdef const ReducePlan* p = &r.plan
    cdef double* part_a = r.scratch + p.part_a_at
    cdef double* part_b = r.scratch + p.part_b_at
    cdef double* chunk_a
    cdef double* chunk_b
    cdef Py_ssize_t k, j
    cdef double n_acc = <double>chunk_rows(p, 0) * p.values_per_row
    cdef double nb, total, w_mean, w_m2
    for k in range(1, p.n_chunks):
        chunk_a = part_a + k * p.cols
        chunk_b = part_b + k * p.cols
        if r.kind != REDUCE_STATS:   # sums: added
            for j in range(p.cols):
                part_a[j] = part_a[j] + chunk_a[j]
                part_b[j] = part_b[j] + chunk_b[j]
            continue
        # The chunk's count is the same for every column, so its weights
        # are computed once.
        nb = <double>chunk_rows(p, k) * p.values_per_row
        total = n_acc + nb
        w_mean = nb / total
        w_m2 = n_acc * nb / total
        for j in range(p.cols):
            chan_combine(&part_a[j], &part_b[j], chunk_a[j], chunk_b[j], w_mean, w_m2)
        n_acc = total


cdef void combine_columns(const Reduction* r,
                          double* out_a,     # OUT (C,): mean or sum of dy
                          double* out_b      # OUT (C,): biased var or dotp
                          ) noexcept nogil:
    """Per-channel results from chunk 0's columns (for every walk but the
    interleaved one with inner > 1, the columns are the channels). Sums
    (REDUCE_GRAD_SUMS, REDUCE_MASKED_SUMS) are added."""
    cdef const ReducePlan* p = &r.plan
    cdef const double* col_a = r.scratch + p.part_a_at
    cdef const double* col_b = r.scratch + p.part_b_at
    cdef Py_ssize_t c, i, j, per = p.cols_per_channel
    cdef double n, m, m2, s, q, total = <double>p.outer * p.inner
    if r.kind == REDUCE_STATS:
        if per == 1:
            for c in range(p.C):
                out_a[c] = col_a[c]
                out_b[c] = col_b[c] / total
            return
        for c in range(p.C):
            n = 0
            m = 0
            m2 = 0
            for i in range(per):
                j = c * per + i
                chan_merge(&n, &m, &m2, <double>p.outer, col_a[j], col_b[j])
            out_a[c] = m
            out_b[c] = m2 / total
        return
    for c in range(p.C):
        s = 0
        q = 0
        for i in range(per):
            s = s + col_a[c * per + i]
            q = q + col_b[c * per + i]
        out_a[c] = s
        out_b[c] = q


cdef int reduce_impl(int kind,                # a ReduceKind
                     const floating* xp,
                     const floating* dyp,     # REDUCE_GRAD_SUMS only
                     const Mask* mask,        # REDUCE_MASKED_SUMS only
                     Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                     const double* mean,      # IN (C,): REDUCE_GRAD_SUMS' means,
                                              # REDUCE_MASKED_SUMS' shifts
                     double* out_a,           # OUT (C,): mean, sum of dy, or sum of d
                     double* out_b,           # OUT (C,): biased var, dotp = sum of
                                              # (x - mean) * dy, or sum of d * d
                     int num_threads) noexcept nogil:
    """A per-channel reduction of a non-empty (outer, C, inner) block. Returns
    0, or -1 when scratch space cannot be allocated."""
    cdef Reduction r
    cdef Job job
    plan_reduction(&r.plan, kind, outer, C, inner, num_threads)
    r.kind = kind
    r.scratch = <double*>cbn_scratch_take(r.plan.scratch_len * sizeof(double))
    if r.scratch == NULL:
        return -1
    r.mean = mean
    r.mask = mask
    if r.plan.mean_cols_at >= 0:
        expand_to_columns(mean, C, inner, r.scratch + r.plan.mean_cols_at)
        r.mean = r.scratch + r.plan.mean_cols_at
    job.task = TASK_REDUCE
    job.n_units = r.plan.n_units
    job.team = r.plan.team
    job.elements = outer * C * inner
    job.args = &r
    run_job(&job, xp, dyp, <floating*>NULL)
    combine_chunks(&r)
    combine_columns(&r, out_a, out_b)
    cbn_scratch_give(r.scratch)
    return 0


cdef void masked_shifts(const floating* x, const unsigned char* valid, Py_ssize_t outer,
                        Py_ssize_t C, Py_ssize_t inner,
                        double* shift      # OUT (C,)
                        ) noexcept nogil:
    """Each channel's value at the first valid position, which lies within
    its data's spread; 0 where that value is not finite (an infinite value
    then keeps an infinite mean, as in a plain sum) or nothing is valid."""
    cdef Py_ssize_t c, p = 0, n = outer * inner
    cdef double v
    while p < n and not valid[p]:
        p += 1
    for c in range(C):
        v = x[((p // inner) * C + c) * inner + p % inner] if p < n else 0.0
        shift[c] = v if v - v == 0 else 0.0


cdef inline void masked_moments(double shift, double sum_d, double sum_d2, double count,
                                double* mean,   # OUT
                                double* var     # OUT, biased
                                ) noexcept nogil:
    """Mean and biased variance from sums of d = x - shift over ``count``
    values: m2 = sum(d * d) - sum(d)^2 / n cancels only as much as the shift
    is off the mean."""
    mean[0] = shift + sum_d / count
    var[0] = max(sum_d2 - sum_d * (sum_d / count), 0.0) / count


cdef int batch_stats_impl(const floating* xp, Py_ssize_t outer, Py_ssize_t C,
                          Py_ssize_t inner,
                          const unsigned char* valid,  # IN (outer, inner) or NULL: all
                          double count,          # positions valid, when ``valid``
                          double* mean,          # OUT (C,)
                          double* var,           # OUT (C,), biased
                          int num_threads) noexcept nogil:
    """Per-channel mean and biased variance of a non-empty (outer, C, inner)
    block, over the positions ``valid`` marks (count > 0 of them) when it is
    given. Returns 0, or -1 when scratch space cannot be allocated."""
    cdef Py_ssize_t c
    cdef int status
    cdef double* shift
    cdef Mask m
    if valid == NULL:
        return reduce_impl(REDUCE_STATS, xp, <const floating*>NULL, NULL, outer, C, inner,
                           NULL, mean, var, num_threads)
    shift = <double*>malloc(C * sizeof(double) + 1)
    if shift == NULL or mask_rows(&m, valid, outer, inner) < 0:
        free(shift)
        return -1
    masked_shifts(xp, valid, outer, C, inner, shift)
    status = reduce_impl(REDUCE_MASKED_SUMS, xp, <const floating*>NULL, &m, outer, C,
                         inner, shift, mean, var, num_threads)
    if status == 0:
        for c in range(C):
            masked_moments(shift[c], mean[c], var[c], count, &mean[c], &var[c])
    free(shift)
    free(m.prefix)
    return status


cdef int grad_sums_impl(const floating* dyp, const floating* xp,
                        Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                        const double* mean,   # IN (C,)
                        double* sum_dy,       # OUT (C,): sum of dy
                        double* dotp,         # OUT (C,): sum of (x - mean) * dy
                        int num_threads) noexcept nogil:
    """Returns 0, or -1 when scratch space cannot be allocated."""
    return reduce_impl(REDUCE_GRAD_SUMS, xp, dyp, NULL, outer, C, inner, mean, sum_dy,
                       dotp, num_threads)


cdef enum ElementOp:
    OP_NORMALIZE       # out = (a - mean) * scale + shift
    OP_NORMALIZE_RELU  # the same, then max(out, 0)
    OP_GRAD_INPUT      # out = (a - mean_dy - (b - mean) * proj) * scale, a = dy, b = x
    OP_RELU_GRAD       # out = 0 where b <= 0, else a; a = dy, b = the forward's y


ctypedef struct ElementParams:   # per channel, or per column when by_rows
    const double* mean
    const double* scale
    const double* shift           # OP_NORMALIZE*
    const double* mean_dy         # OP_GRAD_INPUT
    const double* proj            # OP_GRAD_INPUT
    # float32 data walked by rows: the float32 parameters of every column
    # (LaneParam rows of ``lane_stride`` values; see float_lane_params)
    const float* lanes
    Py_ssize_t lane_stride


cdef enum LaneParam:   # rows of ElementParams.lanes
    LANE_HI            # normalize: its offset split in two floats (NormalizeF32);
    LANE_LO            # the input gradient: the mean split (split_mean)
    LANE_SCALE
    LANE_SHIFT         # OP_NORMALIZE*
    LANE_MEAN_DY_HI = 3  # OP_GRAD_INPUT, in place of the shift
    LANE_MEAN_DY_LO
    LANE_PROJ
    LANE_PARAMS        # rows in all


cdef enum:
    SMALL_ROW = 256    # rows this short keep their float32 parameters on the stack


cdef inline ElementParams element_params(const double* mean, const double* scale,
                                         const double* shift, const double* mean_dy,
                                         const double* proj) noexcept nogil:
    cdef ElementParams p
    p.mean = mean
    p.scale = scale
    p.shift = shift
    p.mean_dy = mean_dy
    p.proj = proj
    p.lanes = NULL
    p.lane_stride = 0
    return p


cdef inline void expand_to_columns(const double* per_channel, Py_ssize_t C,
                                   Py_ssize_t inner,
                                   double* per_column     # OUT (C * inner,)
                                   ) noexcept nogil:
    cdef Py_ssize_t c, i
    for c in range(C):
        for i in range(inner):
            per_column[c * inner + i] = per_channel[c]


cdef inline void normalize_span(const floating* x, floating* y, Py_ssize_t n,
                                double mean, double scale, double shift,
                                bint relu) noexcept nogil:
    """y = (x - mean) * scale + shift over n values of one channel, in double;
    with relu, negative results become 0 (NaN stays NaN, as in PyTorch)."""
    cdef Py_ssize_t i
    cdef floating v
    if relu:  # a loop per variant: no branch per element
        for i in range(n):
            v = <floating>((x[i] - mean) * scale + shift)
            y[i] = 0 if v < 0 else v
    else:
        for i in range(n):
            y[i] = <floating>((x[i] - mean) * scale + shift)


cdef inline void normalize_span_cols(const floating* x, floating* y, Py_ssize_t n,
                                     const double* m_cols, const double* s_cols,
                                     const double* b_cols, bint relu) noexcept nogil:
    """The same along a row, with per-column parameters."""
    cdef Py_ssize_t j
    cdef floating v
    if relu:
        for j in range(n):
            v = <floating>((x[j] - m_cols[j]) * s_cols[j] + b_cols[j])
            y[j] = 0 if v < 0 else v
    else:
        for j in range(n):
            y[j] = <floating>((x[j] - m_cols[j]) * s_cols[j] + b_cols[j])


cdef inline void grad_input_span(const floating* dy, const floating* x,
                                 floating* dx, Py_ssize_t n, double mean,
                                 double mean_dy, double proj, double scale) noexcept nogil:
    """Training-mode input gradient over n values of one channel."""
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = <floating>((dy[i] - mean_dy - (x[i] - mean) * proj) * scale)


cdef inline void grad_input_span_cols(const floating* dy, const floating* x,
                                      floating* dx, Py_ssize_t n,
                                      const double* m_cols, const double* mdy_cols,
                                      const double* q_cols,
                                      const double* s_cols) noexcept nogil:
    """The same along a row, with per-column parameters."""
    cdef Py_ssize_t j
    for j in range(n):
        dx[j] = <floating>((dy[j] - mdy_cols[j] - (x[j] - m_cols[j]) * q_cols[j])
                           * s_cols[j])


cdef inline void relu_grad_span(const floating* dy, const floating* y, floating* dz,
                                Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dz[i] = 0 if y[i] <= 0 else dy[i]


# float32 lanes: float32 data is normalized in float32 arithmetic, twice as
# many values per instruction as double, without losing the accuracy of a
# double computation rounded once (outputs within a few float32 ulps of y):
#
# - normalize: y = (x - mean) * scale + shift = (x + d) * scale with
#   d = shift / scale - mean, computed in double and split in two floats
#   (hi = float(d), lo = float(d - hi)); y = ((x + hi) + lo) * s. Each
#   rounding is relative to |x + d| = |y / scale|, so to |y| in the end,
#   however large the mean, the scaled term or the shift (a plain float32
#   (x - mean) * s + b would round relative to |b| and |(x - mean) * s|,
#   which cancel when y is near 0). Where d is not a finite float (scale 0,
#   or shift / scale beyond float range), the offset is -mean and the shift
#   is added after the scaling.
# - input gradient: both means are split, (dy - g_hi) - g_lo and
#   (x - m_hi) - m_lo, exact near the means (Sterbenz).

ctypedef struct NormalizeF32:   # normalize's float32 parameters of a channel
    float hi, lo                # the offset d, split
    float scale
    float shift                 # 0, or the shift where d is not usable


cdef inline void split_mean(double mean, float* hi, float* lo) noexcept nogil:
    hi[0] = <float>mean
    lo[0] = <float>(mean - <double>hi[0])


cdef inline NormalizeF32 normalize_f32(double mean, double scale,
                                       double shift) noexcept nogil:
    # Blends, not branches: no mispredicted jump per channel in small calls.
    cdef NormalizeF32 q
    cdef double d = shift / scale - mean
    cdef bint usable = (scale != 0) & (-FLOAT_LIMIT <= d) & (d <= FLOAT_LIMIT)  # not NaN
    d = d if usable else -mean
    q.hi = <float>d
    q.lo = <float>(d - <double>q.hi)
    q.scale = <float>scale
    q.shift = 0 if usable else <float>shift
    return q


cdef inline void normalize_span_f32(const float* x, float* y, Py_ssize_t n,
                                    double mean, double scale, double shift,
                                    bint relu) noexcept nogil:
    """normalize_span for float32 data, in float32 lanes."""
    cdef Py_ssize_t i
    cdef float v
    cdef NormalizeF32 q = normalize_f32(mean, scale, shift)
    if relu:
        for i in range(n):
            v = ((x[i] + q.hi) + q.lo) * q.scale + q.shift
            y[i] = 0 if v < 0 else v
    else:
        for i in range(n):
            y[i] = ((x[i] + q.hi) + q.lo) * q.scale + q.shift


cdef inline void normalize_span_cols_f32(const float* x, float* y, Py_ssize_t n,
                                         const float* lanes, Py_ssize_t stride,
                                         bint relu) noexcept nogil:
    """The same along a row, with per-column parameters (LaneParam rows)."""
    cdef Py_ssize_t j
    cdef float v
    cdef const float* hi = lanes + LANE_HI * stride
    cdef const float* lo = lanes + LANE_LO * stride
    cdef const float* s = lanes + LANE_SCALE * stride
    cdef const float* b = lanes + LANE_SHIFT * stride
    if relu:
        for j in range(n):
            v = ((x[j] + hi[j]) + lo[j]) * s[j] + b[j]
            y[j] = 0 if v < 0 else v
    else:
        for j in range(n):
            y[j] = ((x[j] + hi[j]) + lo[j]) * s[j] + b[j]


cdef inline void grad_input_span_f32(const float* dy, const float* x, float* dx,
                                     Py_ssize_t n, double mean, double mean_dy,
                                     double proj, double scale) noexcept nogil:
    """grad_input_span for float32 data, in float32 lanes (both means split)."""
    cdef Py_ssize_t i
    cdef float m_hi, m_lo, g_hi, g_lo, q = <float>proj, s = <float>scale
    split_mean(mean, &m_hi, &m_lo)
    split_mean(mean_dy, &g_hi, &g_lo)
    for i in range(n):
        dx[i] = (((dy[i] - g_hi) - g_lo) - ((x[i] - m_hi) - m_lo) * q) * s


cdef inline void grad_input_span_cols_f32(const float* dy, const float* x, float* dx,
                                          Py_ssize_t n, const float* lanes,
                                          Py_ssize_t stride) noexcept nogil:
    cdef Py_ssize_t j
    cdef const float* m_hi = lanes + LANE_HI * stride
    cdef const float* m_lo = lanes + LANE_LO * stride
    cdef const float* s = lanes + LANE_SCALE * stride
    cdef const float* g_hi = lanes + LANE_MEAN_DY_HI * stride
    cdef const float* g_lo = lanes + LANE_MEAN_DY_LO * stride
    cdef const float* q = lanes + LANE_PROJ * stride
    for j in range(n):
        dx[j] = (((dy[j] - g_hi[j]) - g_lo[j]) - ((x[j] - m_hi[j]) - m_lo[j]) * q[j]) * s[j]


cdef inline void float_op_span(int op, const float* a, const float* b, float* out,
                               Py_ssize_t n, const ElementParams* p, Py_ssize_t at,
                               bint per_column) noexcept nogil:
    """op_span of a normalizing op for float32 data."""
    if per_column:
        if op == OP_GRAD_INPUT:
            grad_input_span_cols_f32(a, b, out, n, p.lanes + at, p.lane_stride)
        else:
            normalize_span_cols_f32(a, out, n, p.lanes + at, p.lane_stride,
                                    op == OP_NORMALIZE_RELU)
    elif op == OP_GRAD_INPUT:
        grad_input_span_f32(a, b, out, n, p.mean[at], p.mean_dy[at], p.proj[at],
                            p.scale[at])
    else:
        normalize_span_f32(a, out, n, p.mean[at], p.scale[at], p.shift[at],
                           op == OP_NORMALIZE_RELU)


cdef void float_lane_params(int op, const ElementParams* p, Py_ssize_t C,
                            Py_ssize_t inner,
                            float* lanes   # OUT (LANE_PARAMS, C * inner)
                            ) noexcept nogil:
    """The float32 parameters of every column of a row (column c * inner + i
    is channel c): first per channel in the first C columns, then spread
    over the columns."""
    cdef Py_ssize_t c, i, k, W = C * inner
    cdef NormalizeF32 q
    cdef int rows = LANE_PARAMS if op == OP_GRAD_INPUT else LANE_SHIFT + 1
    if op == OP_GRAD_INPUT:
        for c in range(C):
            split_mean(p.mean[c], &lanes[LANE_HI * W + c], &lanes[LANE_LO * W + c])
            lanes[LANE_SCALE * W + c] = <float>p.scale[c]
            split_mean(p.mean_dy[c], &lanes[LANE_MEAN_DY_HI * W + c],
                       &lanes[LANE_MEAN_DY_LO * W + c])
            lanes[LANE_PROJ * W + c] = <float>p.proj[c]
    else:
        for c in range(C):
            q = normalize_f32(p.mean[c], p.scale[c], p.shift[c])
            lanes[LANE_HI * W + c] = q.hi
            lanes[LANE_LO * W + c] = q.lo
            lanes[LANE_SCALE * W + c] = q.scale
            lanes[LANE_SHIFT * W + c] = q.shift
    if inner == 1:
        return
    for k in range(rows):  # column c * inner + i takes channel c's values
        for c in range(C - 1, -1, -1):
            for i in range(inner - 1, -1, -1):
                lanes[k * W + c * inner + i] = lanes[k * W + c]


cdef inline void op_span(int op, const floating* a, const floating* b, floating* out,
                         Py_ssize_t n, const ElementParams* p, Py_ssize_t at,
                         bint per_column) noexcept nogil:
    """``op`` over n values: with the parameters of channel ``at``, or
    per_column from column ``at`` on. One branch per span, none per element."""
    if op == OP_RELU_GRAD:
        relu_grad_span(a, b, out, n)
    elif floating is float:
        float_op_span(op, a, b, out, n, p, at, per_column)
    elif per_column:
        if op == OP_GRAD_INPUT:
            grad_input_span_cols(a, b, out, n, p.mean + at, p.mean_dy + at,
                                 p.proj + at, p.scale + at)
        else:
            normalize_span_cols(a, out, n, p.mean + at, p.scale + at, p.shift + at,
                                op == OP_NORMALIZE_RELU)
    elif op == OP_GRAD_INPUT:
        grad_input_span(a, b, out, n, p.mean[at], p.mean_dy[at], p.proj[at],
                        p.scale[at])
    else:
        normalize_span(a, out, n, p.mean[at], p.scale[at], p.shift[at],
                       op == OP_NORMALIZE_RELU)


cdef inline void write_span(int op, const floating* a, const floating* b,
                            floating* out, Py_ssize_t n, const ElementParams* p,
                            Py_ssize_t at, bint per_column, bint stream) noexcept nogil:
    """op_span written directly, or STAGE values at a time into an L1 buffer
    streamed to ``out`` (the caller fences after its last span)."""
    cdef floating staged[STAGE]
    cdef Py_ssize_t start = 0, length
    if not stream:
        op_span(op, a, b, out, n, p, at, per_column)
        return
    while start < n:
        length = min(<Py_ssize_t>STAGE, n - start)
        op_span(op, a + start, b + start, staged, length, p,
                at + start if per_column else at, per_column)
        cbn_stream_copy(out + start, staged, length * sizeof(floating))
        start += length


ctypedef struct Elementwise:   # an elementwise pass's job arguments
    SharePlan shares
    int op                     # an ElementOp
    ElementParams params
    bint stream


cdef inline void elementwise_share(const Elementwise* e, Py_ssize_t k,
                                   const floating* a, const floating* b,
                                   floating* out) noexcept nogil:
    """Share k of the pass: whole rows, or elements run by run (run s is
    channel s % C)."""
    cdef const SharePlan* s = &e.shares
    cdef Py_ssize_t start = share_start(s, k), stop = share_start(s, k + 1)
    cdef Py_ssize_t i, run, n, W = s.row_len
    cdef const float* L = e.params.lanes
    if floating is float:
        # Whole rows of float32, four at a time (_rows.h); streamed outputs
        # (large arrays) take the staged spans below.
        if s.by_rows and not e.stream and e.op != OP_RELU_GRAD:
            if e.op == OP_GRAD_INPUT:
                cbn_grad_input_rows_f32(a + start * W, b + start * W, out + start * W, W,
                                        stop - start, L + LANE_HI * W,
                                        L + LANE_LO * W, L + LANE_SCALE * W,
                                        L + LANE_MEAN_DY_HI * W, L + LANE_MEAN_DY_LO * W,
                                        L + LANE_PROJ * W)
            else:
                cbn_normalize_rows_f32(a + start * W, out + start * W, W, stop - start,
                                       L + LANE_HI * W, L + LANE_LO * W,
                                       L + LANE_SCALE * W, L + LANE_SHIFT * W,
                                       e.op == OP_NORMALIZE_RELU)
            return
    if s.by_rows:
        for i in range(start, stop):
            write_span(e.op, a + i * W, b + i * W, out + i * W, W, &e.params, 0, True,
                       e.stream)
    else:
        i = start
        while i < stop:
            run = i // s.inner
            n = min((run + 1) * s.inner, stop) - i
            write_span(e.op, a + i, b + i, out + i, n, &e.params, run % s.C, False,
                       e.stream)
            i += n
    if e.stream:
        cbn_stream_fence()


cdef int elementwise_impl(int op, const floating* a, const floating* b, floating* out,
                          Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                          ElementParams params,   # IN, per channel (C,)
                          bint stream, int num_threads) noexcept nogil:
    """``op`` over a non-empty (outer, C, inner) block. Returns 0, or -1 when
    scratch space cannot be allocated."""
    cdef Elementwise e
    cdef Job job
    cdef double* cols = NULL
    cdef float* lanes = NULL
    cdef float small_lanes[LANE_PARAMS * SMALL_ROW]
    cdef Py_ssize_t W = C * inner
    e.shares = plan_shares(outer, C, inner, num_threads)
    e.op = op
    e.params = params
    e.stream = stream
    if e.shares.by_rows and op != OP_RELU_GRAD and floating is float:
        if W <= SMALL_ROW:  # a small call: no allocation
            e.params.lanes = small_lanes
        else:
            lanes = <float*>malloc(LANE_PARAMS * W * sizeof(float))
            if lanes == NULL:
                return -1
            e.params.lanes = lanes
        float_lane_params(op, &params, C, inner, <float*>e.params.lanes)
        e.params.lane_stride = W
    elif e.shares.by_rows and inner > 1 and op != OP_RELU_GRAD:
        # Per-column copies of the parameters; for (N, C) they are per-channel.
        cols = <double*>malloc(4 * W * sizeof(double))
        if cols == NULL:
            return -1
        expand_to_columns(params.mean, C, inner, cols)
        expand_to_columns(params.scale, C, inner, cols + W)
        e.params.mean = cols
        e.params.scale = cols + W
        if op == OP_GRAD_INPUT:
            expand_to_columns(params.mean_dy, C, inner, cols + 2 * W)
            expand_to_columns(params.proj, C, inner, cols + 3 * W)
            e.params.mean_dy = cols + 2 * W
            e.params.proj = cols + 3 * W
        else:
            expand_to_columns(params.shift, C, inner, cols + 2 * W)
            e.params.shift = cols + 2 * W
    job.task = TASK_ELEMENTWISE
    job.n_units = e.shares.n_shares
    job.team = e.shares.team
    job.elements = outer * C * inner
    job.args = &e
    run_job(&job, a, b, out)
    free(cols)
    free(lanes)
    return 0


cdef int normalize_impl(const floating* xp, Py_ssize_t outer, Py_ssize_t C,
                        Py_ssize_t inner,
                        const double* mean,    # IN (C,)
                        const double* scale,   # IN (C,)
                        const double* shift,   # IN (C,)
                        floating* yp,          # OUT, may be xp itself
                        bint relu, bint stream,
                        int num_threads) noexcept nogil:
    """y = (x - mean) * scale + shift per channel, then max(y, 0) with relu.
    Returns 0, or -1 when scratch space cannot be allocated."""
    return elementwise_impl(OP_NORMALIZE_RELU if relu else OP_NORMALIZE, xp, xp, yp,
                            outer, C, inner, element_params(mean, scale, shift, NULL, NULL),
                            stream, num_threads)


cdef int grad_input_impl(const floating* dyp, const floating* xp,
                         Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                         const double* mean,      # IN (C,)
                         const double* mean_dy,   # IN (C,): sum_dy / n
                         const double* proj,      # IN (C,): dotp * invstd^2 / n
                         const double* scale,     # IN (C,): invstd * weight
                         floating* dxp,           # OUT, may be dyp itself
                         bint stream,
                         int num_threads) noexcept nogil:
    """Training-mode input gradient: dx = (dy - mean_dy - (x - mean) * proj) * scale.
    Returns 0, or -1 when scratch space cannot be allocated."""
    return elementwise_impl(OP_GRAD_INPUT, dyp, xp, dxp, outer, C, inner,
                            element_params(mean, scale, NULL, mean_dy, proj), stream,
                            num_threads)


cdef void relu_grad_impl(const floating* dy,   # IN (n,)
                         const floating* y,    # IN (n,): the forward's output
                         floating* dz,         # OUT (n,), may be dy itself
                         Py_ssize_t n, int num_threads) noexcept nogil:
    """dz = 0 where the ReLU clipped the output (y <= 0), dy elsewhere (NaN
    outputs included, as PyTorch's threshold_backward)."""
    elementwise_impl(OP_RELU_GRAD, dy, y, dz, 1, 1, n,
                     element_params(NULL, NULL, NULL, NULL, NULL), False, num_threads)


# ---------------------------------------------------------------------------
# 4. Fused steps: a channel's reduction, then its elementwise pass, while its
# data is still in cache

cdef enum:
    # A channel's data this small is still in cache (L2, or a thread's share
    # of L3) when the second pass over it starts; large outputs stream past
    # the cache and do not evict it. Measured on a 32 MiB L3: 4 MiB took the
    # backward of (64, 128, 56, 56) float32 from 1.5 to 1.1 copies.
    FUSED_MAX_BYTES = 4 << 20


cdef inline bint fuses(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                       Py_ssize_t channel_bytes) noexcept nogil:
    """Whether a two-pass step runs channel by channel: planar walk, the
    channel's data (``channel_bytes`` per value, all arrays read) fits in
    cache, and there are enough channels to share among threads."""
    return (choose_walk(outer, C, inner) == WALK_PLANAR and C >= 2
            and outer * inner * channel_bytes <= FUSED_MAX_BYTES)


ctypedef struct FusedChannels:   # a fused step's job arguments
    Py_ssize_t outer, C, inner
    const double* mean     # backward: IN (C,)
    const double* invstd   # backward: IN (C,)
    const double* weight   # IN (C,)
    const double* bias     # forward: IN (C,)
    double eps             # forward
    bint relu              # forward
    bint training          # backward
    bint stream
    const Mask* mask             # forward: the mask, or NULL: all valid
    const double* shift          # forward with a mask: IN (C,)
    double count                 # forward with a mask: valid positions
    double* out_a          # forward: OUT mean (C,); backward: OUT sum of dy
    double* out_b          # forward: OUT biased var (C,); backward: OUT dotp
    double* out_c          # forward: OUT invstd (C,)


cdef inline void write_channel(int op, const FusedChannels* f, Py_ssize_t c,
                               const floating* a, const floating* b, floating* out,
                               const ElementParams* p) noexcept nogil:
    """op_span over channel c's ``outer`` runs, then the fence of its streaming
    stores (the fused passes' last step)."""
    cdef Py_ssize_t o, offset
    for o in range(f.outer):
        offset = (o * f.C + c) * f.inner
        write_span(op, a + offset, b + offset, out + offset, f.inner, p, 0, False, f.stream)
    if f.stream:
        cbn_stream_fence()


cdef inline void forward_channel(const FusedChannels* f, Py_ssize_t c,
                                 const floating* xp, floating* yp) noexcept nogil:
    """Channel c of the fused training forward: statistics, then normalization."""
    cdef double m, v, inv, s, b, sum_d, sum_d2
    cdef ElementParams p
    if f.mask == NULL:
        planar_stats_unit(xp, f.C, f.inner, c, 0, f.outer, &f.out_a[c], &f.out_b[c])
        m = f.out_a[c]
        v = f.out_b[c] / (<double>f.outer * f.inner)
    else:
        planar_masked_unit(xp, f.mask, f.C, f.inner, c, 0, f.outer, f.shift[c], &sum_d,
                           &sum_d2)
        masked_moments(f.shift[c], sum_d, sum_d2, f.count, &m, &v)
        f.out_a[c] = m
    inv = 1.0 / sqrt(v + f.eps)
    f.out_b[c] = v
    f.out_c[c] = inv
    s = inv * f.weight[c]
    b = f.bias[c]
    p = element_params(&m, &s, &b, NULL, NULL)
    write_channel(OP_NORMALIZE_RELU if f.relu else OP_NORMALIZE, f, c, xp, xp, yp, &p)


cdef inline void backward_channel(const FusedChannels* f, Py_ssize_t c,
                                  const floating* dyp, const floating* xp,
                                  floating* dxp) noexcept nogil:
    """Channel c of the fused backward: sums, then the input gradient."""
    cdef Py_ssize_t n = f.outer * f.inner
    cdef double m, scale, mean_dy, proj, zero = 0
    cdef ElementParams p
    m = f.mean[c]
    planar_grad_sums_unit(dyp, xp, f.C, f.inner, c, 0, f.outer, m, &f.out_a[c],
                          &f.out_b[c])
    scale = f.invstd[c] * f.weight[c]
    mean_dy = f.out_a[c] / <double>n
    proj = f.out_b[c] * f.invstd[c] * f.invstd[c] / <double>n
    if f.training:
        p = element_params(&m, &scale, NULL, &mean_dy, &proj)
    else:  # constant statistics: dx = (dy - 0) * scale + 0
        p = element_params(&zero, &scale, &zero, NULL, NULL)
    write_channel(OP_GRAD_INPUT if f.training else OP_NORMALIZE, f, c, dyp, xp, dxp, &p)


cdef inline void run_fused(int task, FusedChannels* f, const floating* a,
                           const floating* b, floating* out,
                           int num_threads) noexcept nogil:
    cdef Job job
    job.task = task
    job.n_units = f.C
    job.team = team_size(num_threads, f.C)
    job.elements = f.outer * f.C * f.inner
    job.args = f
    run_job(&job, a, b, out)


# ---------------------------------------------------------------------------
# 4b. The masked input gradient: the valid positions take the training-mode
# formula, the masked ones only the direct term dy * scale (the statistics do
# not depend on them). Computed in double, per element.

ctypedef struct MaskedGradInput:   # the masked input gradient's job arguments
    Py_ssize_t outer, C, inner
    Py_ssize_t rows_per_unit
    const Mask* mask
    const double* mean             # (C,)
    const double* mean_dy          # (C,): sum_dy / count
    const double* proj             # (C,): dotp * invstd^2 / count
    const double* scale            # (C,): invstd * weight


cdef inline void masked_grad_input_rows(const MaskedGradInput* g, Py_ssize_t u,
                                        const floating* dy, const floating* x,
                                        floating* dx) noexcept nogil:
    """Rows u * rows_per_unit ... of the block; dx may be dy or x."""
    cdef Py_ssize_t o, c, i, at, prefix
    cdef Py_ssize_t o_stop = min(g.outer, (u + 1) * g.rows_per_unit)
    cdef const unsigned char* mrow
    cdef double m, mean_dy, q, s, corr
    for o in range(u * g.rows_per_unit, o_stop):
        if g.inner == 1:   # (N, C): a row is valid or not as a whole
            at = o * g.C
            if g.mask.valid[o]:
                for c in range(g.C):
                    dx[at + c] = <floating>((dy[at + c] - g.mean_dy[c]
                                             - (x[at + c] - g.mean[c]) * g.proj[c])
                                            * g.scale[c])
            else:
                for c in range(g.C):
                    dx[at + c] = <floating>(dy[at + c] * g.scale[c])
            continue
        mrow = g.mask.valid + o * g.inner
        prefix = g.mask.prefix[o]
        for c in range(g.C):
            at = (o * g.C + c) * g.inner
            m, mean_dy, q, s = g.mean[c], g.mean_dy[c], g.proj[c], g.scale[c]
            if prefix >= 0:   # valid up to a point, masked after it: two plain loops
                for i in range(prefix):
                    dx[at + i] = <floating>((dy[at + i] - mean_dy - (x[at + i] - m) * q)
                                            * s)
                for i in range(prefix, g.inner):
                    dx[at + i] = <floating>(dy[at + i] * s)
                continue
            for i in range(g.inner):
                corr = mean_dy + (x[at + i] - m) * q
                corr = corr if mrow[i] else 0.0   # a blend: masked x may be NaN
                dx[at + i] = <floating>((dy[at + i] - corr) * s)


cdef int masked_grad_input_impl(const floating* dyp, const floating* xp,
                                Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                                const unsigned char* valid, const double* mean,
                                const double* mean_dy, const double* proj,
                                const double* scale, floating* dxp,
                                int num_threads) noexcept nogil:
    """Returns 0, or -1 when the mask's prefix table cannot be allocated."""
    cdef MaskedGradInput g
    cdef Job job
    cdef Mask m
    if mask_rows(&m, valid, outer, inner) < 0:
        return -1
    g.outer, g.C, g.inner = outer, C, inner
    g.rows_per_unit = max(<Py_ssize_t>1, UNIT_ELEMS // (C * inner))
    g.mask, g.mean, g.mean_dy, g.proj, g.scale = &m, mean, mean_dy, proj, scale
    job.task = TASK_MASKED_GRAD_INPUT
    job.n_units = ceil_div(outer, g.rows_per_unit)
    job.team = team_size(num_threads, job.n_units)
    job.elements = outer * C * inner
    job.args = &g
    run_job(&job, dyp, xp, dxp)
    free(m.prefix)
    return 0


# ---------------------------------------------------------------------------
# 5. The one loop over units: every kernel's work runs here

cdef inline void run_unit(const Job* job, Py_ssize_t u, int thread,
                          const floating* a, const floating* b,
                          floating* out) noexcept nogil:
    if job.task == TASK_REDUCE:
        reduce_unit(<const Reduction*>job.args, u, thread, a, b)
    elif job.task == TASK_ELEMENTWISE:
        elementwise_share(<const Elementwise*>job.args, u, a, b, out)
    elif job.task == TASK_FORWARD_CHANNEL:
        forward_channel(<const FusedChannels*>job.args, u, a, out)
    elif job.task == TASK_MASKED_GRAD_INPUT:
        masked_grad_input_rows(<const MaskedGradInput*>job.args, u, a, b, out)
    else:
        backward_channel(<const FusedChannels*>job.args, u, a, b, out)


ctypedef struct JobCall:   # a job and its arrays, for the pool's callback
    const Job* job
    const void* a
    const void* b
    void* out


cdef void run_unit_f32(const void* call, Py_ssize_t u, int thread) noexcept nogil:
    cdef const JobCall* c = <const JobCall*>call
    run_unit(c.job, u, thread, <const float*>c.a, <const float*>c.b, <float*>c.out)


cdef void run_unit_f64(const void* call, Py_ssize_t u, int thread) noexcept nogil:
    cdef const JobCall* c = <const JobCall*>call
    run_unit(c.job, u, thread, <const double*>c.a, <const double*>c.b, <double*>c.out)


cdef void run_job(const Job* job, const floating* a, const floating* b,
                  floating* out) noexcept nogil:
    """Units 0 ... n_units - 1 of a job: claimed one by one by this thread and
    the pool's helpers (_pool.h), up to job.team threads in all, or in order
    on this thread when the team is one (without touching the pool)."""
    cdef Py_ssize_t u
    cdef JobCall call
    if job.team <= 1:
        for u in range(job.n_units):
            run_unit(job, u, 0, a, b, out)
        return
    call.job, call.a, call.b, call.out = job, a, b, out
    if floating is float:
        cbn_pool_run(run_unit_f32, &call, job.n_units, job.team, job.elements)
    else:
        cbn_pool_run(run_unit_f64, &call, job.n_units, job.team, job.elements)


# ---------------------------------------------------------------------------
# 6. Whole steps: what the executor (cbn._core) calls through the table. The
# per-channel arithmetic between kernels lives here only.

cdef int forward_impl(const floating* xp, Py_ssize_t outer, Py_ssize_t C,
                      Py_ssize_t inner,
                      const double* weight,  # IN (C,)
                      const double* bias,    # IN (C,)
                      double eps, bint batch_stats,
                      double* mean,          # OUT (C,) batch mean; IN running mean
                      double* var,           # OUT (C,) biased batch var; IN running var
                      double* invstd,        # OUT (C,)
                      floating* yp,          # OUT, may be xp itself
                      bint relu,
                      const unsigned char* valid,  # IN (outer, inner) or NULL: all
                      double count,          # positions valid, when ``valid``
                      int num_threads) noexcept nogil:
    """y = (x - mean) * invstd * weight + bias, with the batch statistics
    (computed here, over the positions ``valid`` marks when it is given) or
    given running ones; then max(y, 0) with relu. Every position is
    normalized. Returns 0, or -1 when scratch space cannot be allocated."""
    cdef Py_ssize_t c
    cdef double* scale
    cdef double* shift = NULL
    cdef int status
    cdef FusedChannels f
    cdef Mask m
    cdef bint stream = streams(outer * C * inner * sizeof(floating))
    if not batch_stats:
        valid = NULL
    if batch_stats and fuses(outer, C, inner, sizeof(floating)):
        f.outer, f.C, f.inner = outer, C, inner
        f.weight, f.bias, f.eps, f.relu, f.stream = weight, bias, eps, relu, stream
        f.out_a, f.out_b, f.out_c = mean, var, invstd
        f.count = count
        f.mask = NULL
        if valid != NULL:
            shift = <double*>malloc(C * sizeof(double) + 1)
            if shift == NULL or mask_rows(&m, valid, outer, inner) < 0:
                free(shift)
                return -1
            masked_shifts(xp, valid, outer, C, inner, shift)
            f.mask = &m
        f.shift = shift
        run_fused(TASK_FORWARD_CHANNEL, &f, xp, xp, yp, num_threads)
        if valid != NULL:
            free(m.prefix)
        free(shift)
        return 0
    if batch_stats:
        status = batch_stats_impl(xp, outer, C, inner, valid, count, mean, var,
                                  num_threads)
        if status < 0:
            return status
    scale = <double*>malloc(C * sizeof(double))
    if scale == NULL:
        return -1
    for c in range(C):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
        scale[c] = invstd[c] * weight[c]
    status = normalize_impl(xp, outer, C, inner, mean, scale, bias, yp, relu, stream,
                            num_threads)
    free(scale)
    return status


cdef int grad_input_from_sums_impl(const floating* dyp, const floating* xp,
                                   Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                                   const double* mean,     # IN (C,): the forward's
                                   const double* invstd,   # IN (C,): the forward's
                                   const double* weight,   # IN (C,)
                                   const double* sum_dy,   # IN (C,): sum of dy
                                   const double* dotp,     # IN (C,): sum of (x - mean) * dy
                                   const unsigned char* valid,  # IN (outer, inner), or
                                                                # NULL: all valid
                                   double count,           # values per channel the
                                                           # statistics cover
                                   floating* dxp,          # OUT, may be dyp or xp itself
                                   int num_threads) noexcept nogil:
    """Training-mode input gradient from per-channel sums over every position
    (which may cover more than this block: SyncBatchNorm's, summed over
    processes): dx = (dy - sum_dy / count - (x - mean) * dotp * invstd^2 /
    count) * invstd * weight, where the statistics came from; with a mask,
    dy * invstd * weight at the masked positions. Returns 0, or -1 when
    scratch space cannot be allocated."""
    cdef Py_ssize_t c
    cdef int status
    cdef double* s = <double*>malloc(3 * C * sizeof(double))  # scale, mean_dy, proj
    if s == NULL:
        return -1
    for c in range(C):
        s[c] = invstd[c] * weight[c]
        s[C + c] = sum_dy[c] / count
        s[2 * C + c] = dotp[c] * invstd[c] * invstd[c] / count
    if valid != NULL:
        status = masked_grad_input_impl(dyp, xp, outer, C, inner, valid, mean, s + C,
                                        s + 2 * C, s, dxp, num_threads)
        free(s)
        return status
    status = grad_input_impl(dyp, xp, outer, C, inner, mean, s + C, s + 2 * C, s, dxp,
                             streams(outer * C * inner * sizeof(floating)), num_threads)
    free(s)
    return status


cdef int backward_impl(const floating* dyp, const floating* xp, Py_ssize_t outer,
                       Py_ssize_t C, Py_ssize_t inner,
                       const double* mean,     # IN (C,): the forward's
                       const double* invstd,   # IN (C,): the forward's
                       const double* weight,   # IN (C,)
                       bint training,
                       const unsigned char* valid,  # IN (outer, inner) or NULL: the
                       double count,           # positions (count of them) the forward's
                                               # statistics came from, when training
                       double* sum_dy,         # OUT (C,): sum of dy
                       double* dotp,           # OUT (C,): sum of (x - mean) * dy
                       floating* dxp,          # OUT, may be dyp or xp itself
                       int num_threads) noexcept nogil:
    """Input gradient and per-channel sums. training: the forward used batch
    statistics, so dx = (dy - mean(dy) - (x - mean) * dotp * invstd^2 / n)
    * invstd * weight; otherwise the statistics were constants and dx = dy *
    invstd * weight. Returns 0, or -1 when scratch space cannot be allocated."""
    cdef Py_ssize_t c
    cdef double* s
    cdef int status
    cdef FusedChannels f
    cdef bint stream = streams(outer * C * inner * sizeof(floating))
    if not training:
        valid = NULL
    if valid == NULL and fuses(outer, C, inner, 2 * sizeof(floating)):
        f.outer, f.C, f.inner = outer, C, inner
        f.mean, f.invstd, f.weight = mean, invstd, weight
        f.training, f.stream = training, stream
        f.out_a, f.out_b = sum_dy, dotp
        run_fused(TASK_BACKWARD_CHANNEL, &f, dyp, xp, dxp, num_threads)
        return 0
    status = grad_sums_impl(dyp, xp, outer, C, inner, mean, sum_dy, dotp, num_threads)
    if status < 0:
        return status
    if training:
        return grad_input_from_sums_impl(dyp, xp, outer, C, inner, mean, invstd, weight,
                                         sum_dy, dotp, valid,
                                         count if valid != NULL else <double>(outer * inner),
                                         dxp, num_threads)
    s = <double*>malloc(2 * C * sizeof(double))  # scale, zeros
    if s == NULL:
        return -1
    for c in range(C):
        s[c] = invstd[c] * weight[c]
        s[C + c] = 0
    status = normalize_impl(dyp, outer, C, inner, s + C, s, s + C, dxp, False, stream,
                            num_threads)
    free(s)
    return status
