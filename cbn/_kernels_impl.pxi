# Compiled batch-normalization kernels: the code every SIMD build of
# cbn._kernels* shares (included by _kernels.pyx, _kernels_avx2.pyx, ...).
#
# Design: every layout arrives as a C-contiguous ``(outer, C, inner)`` block of
# float32 or float64 data, already validated, plus per-channel parameters in
# float64. The ``*_impl`` functions take raw pointers and only loop: they never
# raise and never touch the GIL (a scratch allocation that fails returns -1).
# Two kinds of callers share them: the ``def`` wrappers here, which take
# memoryviews from cbn's Python layer, and the fast entry points of
# _entry.pxi, which validate the common case in C (small calls).
#
# Two walks over that view:
#
# * planar (``inner >= PLANAR_MIN_INNER``, e.g. NCHW, or a few very wide rows):
#   a channel's data is ``outer`` contiguous runs of ``inner`` elements; work
#   is split into units of (channel, range of outer). Reductions over short
#   runs (``inner < SWEEP_MAX_INNER``) with enough rows instead sweep ranges
#   of rows whole, every channel in memory order: a channel's short runs lie
#   far apart, which the hardware prefetchers do not follow.
# * interleaved (short ``inner``, e.g. (N, C) or NHWC): the view is read as
#   rows of ``W = C * inner`` columns; work is split into units of (range of
#   rows, tile of columns) and the inner loops run along a row, vectorizable.
#   Its per-column scratch (partials, expanded parameters) is at most
#   UNIT_ELEMS columns' worth or a small fraction of x.
#
# A reduction's partials take one block of scratch memory, kept between calls
# (_scratch.h): a fresh block of megabytes would be faulted in page by page on
# every call.
#
# Determinism: the split of a reduction into units depends only on the shape,
# each unit writes its own partial results, and partials are merged in a fixed
# order after the parallel region. Elementwise passes (normalize, input
# gradient) compute every element alone, so they are cut into one equal share
# per thread instead. Results are therefore bit-identical for any thread count.
#
# Large outputs (``STREAM_MIN_BYTES``) are written with streaming stores
# (_stream.h): computed into an L1 buffer, then copied past the cache.
#
# Accuracy: statistics accumulate in double, and a huge mean relative to the
# spread never cancels. The planar walk reduces each run of at most ``BLOCK``
# elements two-pass (mean, then squared deviations from it) while it sits in
# L1; the interleaved walk sums each unit's deviations from its first row (a
# value within the spread) in one pass. Partial results combine with Chan et
# al.'s pairwise update. Elementwise kernels subtract the mean in double
# before scaling.


from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc


cdef extern from "_omp_compat.h" nogil:
    int cbn_openmp_enabled()
    int cbn_max_threads()


cdef extern from "_stream.h" nogil:
    void cbn_stream_copy(void* dst, const void* src, size_t nbytes)
    void cbn_stream_fence()


cdef extern from "_scratch.h" nogil:
    void* cbn_scratch_take(size_t nbytes)
    void cbn_scratch_give(void* block)


cdef enum:
    PLANAR_MIN_INNER = 32  # runs at least this long are walked one by one
    BLOCK = 2048           # elements reduced two-pass while in L1
    UNIT_ELEMS = 65536     # target elements per unit of a reduction
    TILE_COLS = 4096       # columns per interleaved work unit (whole rows of
                           # (N, C) for C up to 4096: the reads stream)
    MIN_CHUNK_ROWS = 64    # interleaved units span about this many rows or more
    MAX_ROW_CHUNKS = 64    # bounds the number of per-column partials
    SWEEP_MAX_INNER = 1024 # planar runs shorter than this are reduced row by row
    MIN_SWEEP_ROWS = 8     # ... when there are enough rows to share out
    LANES = 16             # independent accumulators in contiguous reductions
    STAGE = 512            # outputs computed into an L1 buffer per streaming copy
    SHARE_GRANULE = 16     # elementwise shares start on multiples of this
    # Outputs this large bypass the cache (streaming stores): they would not
    # survive in it until the next layer reads them anyway, and normal stores
    # would read every output line first and evict the input being re-read.
    STREAM_MIN_BYTES = 16 << 20


def simd_target():
    """The instruction set this build of the kernels was compiled for."""
    return SIMD_TARGET


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(cbn_openmp_enabled())


def stream_min_bytes():
    """Outputs of at least this many bytes are written with streaming stores."""
    return STREAM_MIN_BYTES


def max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return cbn_max_threads()


# ---------------------------------------------------------------------------
# Work partition (shape only, never the thread count)

cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline bint planar_walk(Py_ssize_t outer, Py_ssize_t C,
                             Py_ssize_t inner) noexcept nogil:
    """Which walk a view takes; every kernel must agree on it.

    Short runs go interleaved, unless the rows are few and wide: per-column
    scratch would then outgrow x itself (e.g. (2, 10**6, 16)).
    """
    if inner >= PLANAR_MIN_INNER:
        return True
    return outer < MIN_CHUNK_ROWS and C * inner > UNIT_ELEMS


cdef inline bint sweeps_rows(Py_ssize_t outer, Py_ssize_t C,
                             Py_ssize_t inner) noexcept nogil:
    """Whether a planar reduction reads rows whole, every channel in memory
    order, rather than channel by channel: a channel of short runs far apart
    defeats the hardware prefetchers (and may alias in the cache)."""
    return (planar_walk(outer, C, inner) and inner < SWEEP_MAX_INNER
            and outer >= MIN_SWEEP_ROWS)


cdef inline Py_ssize_t evened(Py_ssize_t n, Py_ssize_t per_chunk) noexcept nogil:
    """Items per chunk when n items are cut into chunks of about per_chunk:
    the chunks are near equal and, when there are several, an even number of
    them, so that teams of 2, 4, ... threads get equal work. (The cut must
    depend on the shape only, never on the team.)"""
    cdef Py_ssize_t chunks = ceil_div(n, per_chunk)
    if chunks <= 1:
        return per_chunk
    return ceil_div(n, chunks + chunks % 2)


cdef inline Py_ssize_t sweep_rows_per_chunk(Py_ssize_t outer, Py_ssize_t C,
                                            Py_ssize_t inner) noexcept nogil:
    cdef Py_ssize_t r = max(<Py_ssize_t>1, UNIT_ELEMS // (C * inner))
    return evened(outer, max(r, ceil_div(outer, MAX_ROW_CHUNKS)))


cdef inline int team_size(int num_threads, Py_ssize_t n_units) noexcept nogil:
    """Never more threads than units of work (and at least one)."""
    if n_units < num_threads:
        return <int>max(n_units, <Py_ssize_t>1)
    return max(num_threads, 1)


cdef inline Py_ssize_t planar_outer_per_unit(Py_ssize_t outer,
                                             Py_ssize_t inner) noexcept nogil:
    return evened(outer, max(<Py_ssize_t>1, UNIT_ELEMS // inner))


cdef inline Py_ssize_t interleaved_rows_per_chunk(Py_ssize_t rows,
                                                  Py_ssize_t cols) noexcept nogil:
    cdef Py_ssize_t width = min(cols, <Py_ssize_t>TILE_COLS)
    cdef Py_ssize_t r = max(<Py_ssize_t>MIN_CHUNK_ROWS, ceil_div(UNIT_ELEMS, width))
    return evened(rows, max(r, ceil_div(rows, MAX_ROW_CHUNKS)))


cdef inline Py_ssize_t share_start(Py_ssize_t n, Py_ssize_t k, Py_ssize_t parts,
                                   Py_ssize_t granule) noexcept nogil:
    """Start of share k when n items are cut into ``parts`` contiguous, near
    equal shares starting on multiples of ``granule`` (share ``parts`` starts
    at n). Only for elementwise work, whose bits do not depend on the cut:
    one share per thread balances the team exactly."""
    cdef Py_ssize_t start
    if k >= parts:
        return n
    start = n * k // parts
    return start - start % granule


cdef inline bint streams(size_t output_bytes) noexcept nogil:
    """Whether an output of this size is written with streaming stores."""
    return output_bytes >= STREAM_MIN_BYTES


cdef int check_scratch(int status) except -1:
    """Turn an ``*_impl`` failure into MemoryError (with the GIL held)."""
    if status < 0:
        raise MemoryError("cbn: cannot allocate the kernels' scratch space")
    return 0


# ---------------------------------------------------------------------------
# Scalar helpers

cdef inline void chan_merge(double* n_a, double* mean_a, double* m2_a,
                            double n_b, double mean_b, double m2_b) noexcept nogil:
    """Fold the statistics (n_b, mean_b, m2_b) of one block into (n_a, mean_a, m2_a).

    Chan, Golub & LeVeque (1979): m2 = m2_a + m2_b + delta^2 * n_a * n_b / n.
    """
    cdef double n, delta
    if n_b == 0:
        return
    if n_a[0] == 0:
        n_a[0] = n_b
        mean_a[0] = mean_b
        m2_a[0] = m2_b
        return
    n = n_a[0] + n_b
    delta = mean_b - mean_a[0]
    mean_a[0] = mean_a[0] + delta * (n_b / n)
    m2_a[0] = m2_a[0] + m2_b + delta * delta * (n_a[0] * n_b / n)
    n_a[0] = n


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
# 1. Batch statistics: per-channel mean and biased variance

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
    row = x + r_start * W + j_start
    for j in range(width):
        shift[j] = row[j]
        sum_d[j] = 0
        m2_out[j] = 0  # sum of d * d until the end
    # The first row's deviations are 0. Four rows at a time keep the
    # accumulators' memory traffic below that of x.
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


cdef void merge_row_chunks(double* part_mean,   # IN/OUT (n_chunks, W); row 0 gets the result
                           double* part_m2,     # IN/OUT (n_chunks, W); row 0 gets the result
                           Py_ssize_t W, Py_ssize_t outer, Py_ssize_t rows_per_chunk,
                           Py_ssize_t n_chunks, double values_per_row) noexcept nogil:
    """Chan merge of the per-column statistics of each row chunk, in chunk
    order. Chunks hold the same count for every column, so the weights are
    computed once per chunk and the column loop vectorizes. A "column" is a
    channel when rows are swept (values_per_row = inner)."""
    cdef Py_ssize_t k, j
    cdef double n_acc = <double>min(outer, rows_per_chunk) * values_per_row
    cdef double nb, total, w_mean, w_m2, delta
    cdef double* chunk_mean
    cdef double* chunk_m2
    for k in range(1, n_chunks):
        nb = <double>(min(outer, (k + 1) * rows_per_chunk) - k * rows_per_chunk) * values_per_row
        total = n_acc + nb
        w_mean = nb / total
        w_m2 = n_acc * nb / total
        chunk_mean = part_mean + k * W
        chunk_m2 = part_m2 + k * W
        for j in range(W):
            delta = chunk_mean[j] - part_mean[j]
            part_mean[j] = part_mean[j] + delta * w_mean
            part_m2[j] = part_m2[j] + chunk_m2[j] + delta * delta * w_m2
        n_acc = total


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


cdef inline void sweep_stats_chunk(const floating* xp, Py_ssize_t outer,
                                   Py_ssize_t C, Py_ssize_t inner,
                                   Py_ssize_t rows_per_chunk,
                                   Py_ssize_t k_start, Py_ssize_t k_stop,
                                   double* part_mean,   # OUT (n_chunks, C)
                                   double* part_m2      # OUT (n_chunks, C)
                                   ) noexcept nogil:
    """Row chunks k_start:k_stop of the row sweep, each into its own slots."""
    cdef Py_ssize_t k
    for k in range(k_start, k_stop):
        sweep_stats_rows(xp, C, inner, k * rows_per_chunk,
                         min(outer, (k + 1) * rows_per_chunk),
                         part_mean + k * C, part_m2 + k * C)


cdef inline void planar_stats_chunk(const floating* xp, Py_ssize_t outer,
                                    Py_ssize_t C, Py_ssize_t inner,
                                    Py_ssize_t per_unit, Py_ssize_t n_chunks,
                                    Py_ssize_t u,
                                    double* part_mean,   # OUT, slot u
                                    double* part_m2      # OUT, slot u
                                    ) noexcept nogil:
    """Unit u of the planar walk: chunk u % n_chunks of channel u // n_chunks."""
    cdef Py_ssize_t c = u // n_chunks, o_start = (u % n_chunks) * per_unit
    planar_stats_unit(xp, C, inner, c, o_start, min(outer, o_start + per_unit),
                      &part_mean[u], &part_m2[u])


cdef inline void interleaved_stats_tile(const floating* xp, Py_ssize_t outer,
                                        Py_ssize_t W, Py_ssize_t rows_per_chunk,
                                        Py_ssize_t n_tiles, Py_ssize_t u,
                                        double* scratch,     # 2 * TILE_COLS, this thread's
                                        double* part_mean,   # OUT (n_chunks, W)
                                        double* part_m2      # OUT (n_chunks, W)
                                        ) noexcept nogil:
    """Unit u of the interleaved walk: row chunk u // n_tiles, column tile u % n_tiles."""
    cdef Py_ssize_t k = u // n_tiles, j_start = (u % n_tiles) * TILE_COLS
    interleaved_stats_unit(xp, W, k * rows_per_chunk, min(outer, (k + 1) * rows_per_chunk),
                           j_start, min(W, j_start + TILE_COLS),
                           scratch,
                           part_mean + k * W + j_start, part_m2 + k * W + j_start)


cdef int batch_stats_impl(const floating* xp, Py_ssize_t outer, Py_ssize_t C,
                          Py_ssize_t inner,
                          double* mean,          # OUT (C,)
                          double* var,           # OUT (C,), biased
                          int num_threads) noexcept nogil:
    """Per-channel mean and biased variance of a non-empty (outer, C, inner)
    block. Returns 0, or -1 when scratch space cannot be allocated."""
    cdef double* part_mean = NULL
    cdef double* part_m2 = NULL
    cdef double* scratch = NULL
    cdef Py_ssize_t per_unit, n_chunks, n_units, u, c, k
    cdef Py_ssize_t W, rows_per_chunk, n_tiles, j, i
    cdef double n, m, m2, n_part, total = <double>outer * inner
    cdef int status = 0
    if sweeps_rows(outer, C, inner):
        rows_per_chunk = sweep_rows_per_chunk(outer, C, inner)
        n_chunks = ceil_div(outer, rows_per_chunk)
        part_mean = <double*>cbn_scratch_take(2 * n_chunks * C * sizeof(double))
        if part_mean == NULL:
            status = -1
        else:
            part_m2 = part_mean + n_chunks * C
            num_threads = team_size(num_threads, n_chunks)
            if num_threads == 1:
                sweep_stats_chunk(xp, outer, C, inner, rows_per_chunk, 0, n_chunks,
                                  part_mean, part_m2)
            else:
                for k in prange(n_chunks, schedule='static', num_threads=num_threads):
                    sweep_stats_chunk(xp, outer, C, inner, rows_per_chunk, k, k + 1,
                                      part_mean, part_m2)
            merge_row_chunks(part_mean, part_m2, C, outer, rows_per_chunk, n_chunks,
                             <double>inner)
            for c in range(C):
                mean[c] = part_mean[c]
                var[c] = part_m2[c] / total
    elif planar_walk(outer, C, inner):
        per_unit = planar_outer_per_unit(outer, inner)
        n_chunks = ceil_div(outer, per_unit)
        n_units = C * n_chunks
        part_mean = <double*>cbn_scratch_take(2 * n_units * sizeof(double))
        if part_mean == NULL:
            status = -1
        else:
            part_m2 = part_mean + n_units
            num_threads = team_size(num_threads, n_units)
            if num_threads == 1:
                for u in range(n_units):
                    planar_stats_chunk(xp, outer, C, inner, per_unit, n_chunks, u,
                                       part_mean, part_m2)
            else:
                for u in prange(n_units, schedule='static', num_threads=num_threads):
                    planar_stats_chunk(xp, outer, C, inner, per_unit, n_chunks, u,
                                       part_mean, part_m2)
            for c in range(C):
                n = 0
                m = 0
                m2 = 0
                for k in range(n_chunks):
                    n_part = <double>(min(outer, (k + 1) * per_unit) - k * per_unit) * inner
                    chan_merge(&n, &m, &m2, n_part,
                               part_mean[c * n_chunks + k], part_m2[c * n_chunks + k])
                mean[c] = m
                var[c] = m2 / total
    else:
        W = C * inner
        rows_per_chunk = interleaved_rows_per_chunk(outer, W)
        n_chunks = ceil_div(outer, rows_per_chunk)
        n_tiles = ceil_div(W, TILE_COLS)
        n_units = n_chunks * n_tiles
        num_threads = team_size(num_threads, n_units)
        part_mean = <double*>cbn_scratch_take(
            (2 * n_chunks * W + <size_t>num_threads * 2 * TILE_COLS) * sizeof(double))
        if part_mean == NULL:
            status = -1
        else:
            part_m2 = part_mean + n_chunks * W
            scratch = part_m2 + n_chunks * W  # a tile's accumulators per thread
            if num_threads == 1:
                for u in range(n_units):
                    interleaved_stats_tile(xp, outer, W, rows_per_chunk, n_tiles, u,
                                           scratch, part_mean, part_m2)
            else:
                with parallel(num_threads=num_threads):
                    for u in prange(n_units, schedule='static'):
                        interleaved_stats_tile(xp, outer, W, rows_per_chunk, n_tiles, u,
                                               scratch + threadid() * 2 * TILE_COLS,
                                               part_mean, part_m2)
            # Row chunks merge into chunk 0's columns, then columns into channels
            # (for (N, C) the columns are the channels: a loop that vectorizes).
            merge_row_chunks(part_mean, part_m2, W, outer, rows_per_chunk, n_chunks, 1.0)
            if inner == 1:
                for c in range(C):
                    mean[c] = part_mean[c]
                    var[c] = part_m2[c] / total
            else:
                for c in range(C):
                    n = 0
                    m = 0
                    m2 = 0
                    for i in range(inner):
                        j = c * inner + i
                        chan_merge(&n, &m, &m2, <double>outer, part_mean[j], part_m2[j])
                    mean[c] = m
                    var[c] = m2 / total
    cbn_scratch_give(part_mean)
    return status


def batch_stats(const floating[:, :, ::1] x,
                double[::1] mean,      # OUT (C,)
                double[::1] var,       # OUT (C,), biased
                int num_threads):
    """Per-channel mean and biased variance of a non-empty (outer, C, inner) view."""
    cdef int status
    with nogil:
        status = batch_stats_impl(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2],
                                  &mean[0], &var[0], num_threads)
    check_scratch(status)


# ---------------------------------------------------------------------------
# 2./3. Normalize with per-channel parameters: y = (x - mean) * scale + shift
# Training passes the batch mean and scale = invstd * weight; inference passes
# the running mean and scale = weight / sqrt(running_var + eps).

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


cdef inline void normalize_run(const floating* x, floating* y, Py_ssize_t n,
                               double mean, double scale, double shift, bint relu,
                               bint stream) noexcept nogil:
    """One channel's contiguous run, written directly or streamed."""
    cdef floating staged[STAGE]
    cdef Py_ssize_t start, length
    if not stream:
        normalize_span(x, y, n, mean, scale, shift, relu)
        return
    start = 0
    while start < n:
        length = min(<Py_ssize_t>STAGE, n - start)
        normalize_span(x + start, staged, length, mean, scale, shift, relu)
        cbn_stream_copy(y + start, staged, length * sizeof(floating))
        start += length


cdef inline void normalize_rows(const floating* xp, floating* yp, Py_ssize_t W,
                                Py_ssize_t r_start, Py_ssize_t r_stop,
                                const double* m_cols, const double* s_cols,
                                const double* b_cols, bint relu,
                                bint stream) noexcept nogil:
    """Rows r_start:r_stop of the interleaved walk, with per-column parameters."""
    cdef floating staged[STAGE]
    cdef Py_ssize_t r, start, length
    for r in range(r_start, r_stop):
        if not stream:
            normalize_span_cols(xp + r * W, yp + r * W, W, m_cols, s_cols, b_cols, relu)
            continue
        start = 0
        while start < W:
            length = min(<Py_ssize_t>STAGE, W - start)
            normalize_span_cols(xp + r * W + start, staged, length, m_cols + start,
                                s_cols + start, b_cols + start, relu)
            cbn_stream_copy(yp + r * W + start, staged, length * sizeof(floating))
            start += length
    if stream:
        cbn_stream_fence()


cdef inline void normalize_elems(const floating* xp, floating* yp, Py_ssize_t C,
                                 Py_ssize_t inner, Py_ssize_t start, Py_ssize_t stop,
                                 const double* mean, const double* scale,
                                 const double* shift, bint relu,
                                 bint stream) noexcept nogil:
    """Elements start:stop of the planar walk, run by run (run s is channel s % C)."""
    cdef Py_ssize_t i = start, seg, n
    while i < stop:
        seg = i // inner
        n = min((seg + 1) * inner, stop) - i
        normalize_run(xp + i, yp + i, n, mean[seg % C], scale[seg % C],
                      shift[seg % C], relu, stream)
        i += n
    if stream:
        cbn_stream_fence()


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
    cdef Py_ssize_t k, W, n = outer * C * inner
    cdef double* cols = NULL
    cdef const double* m_cols = mean
    cdef const double* s_cols = scale
    cdef const double* b_cols = shift
    if planar_walk(outer, C, inner):
        num_threads = team_size(num_threads, n // SHARE_GRANULE)
        if num_threads == 1:
            normalize_elems(xp, yp, C, inner, 0, n, mean, scale, shift, relu, stream)
        else:
            for k in prange(num_threads, schedule='static', num_threads=num_threads):
                normalize_elems(xp, yp, C, inner,
                                share_start(n, k, num_threads, SHARE_GRANULE),
                                share_start(n, k + 1, num_threads, SHARE_GRANULE),
                                mean, scale, shift, relu, stream)
        return 0
    W = C * inner
    if inner > 1:  # per-column copies of the parameters; for (N, C) they are per-channel
        cols = <double*>malloc(3 * W * sizeof(double))
        if cols == NULL:
            return -1
        expand_to_columns(mean, C, inner, cols)
        expand_to_columns(scale, C, inner, cols + W)
        expand_to_columns(shift, C, inner, cols + 2 * W)
        m_cols, s_cols, b_cols = cols, cols + W, cols + 2 * W
    num_threads = team_size(num_threads, outer)
    if num_threads == 1:
        normalize_rows(xp, yp, W, 0, outer, m_cols, s_cols, b_cols, relu, stream)
    else:
        for k in prange(num_threads, schedule='static', num_threads=num_threads):
            normalize_rows(xp, yp, W, share_start(outer, k, num_threads, 1),
                           share_start(outer, k + 1, num_threads, 1),
                           m_cols, s_cols, b_cols, relu, stream)
    free(cols)
    return 0


# ---------------------------------------------------------------------------
# 1+2 fused: training forward with each channel's data still in cache

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
    return (planar_walk(outer, C, inner) and not sweeps_rows(outer, C, inner) and C >= 2
            and outer * inner * channel_bytes <= FUSED_MAX_BYTES)


cdef inline void train_forward_channel(const floating* xp, Py_ssize_t outer,
                                       Py_ssize_t C, Py_ssize_t inner, Py_ssize_t c,
                                       const double* weight, const double* bias,
                                       double eps,
                                       double* mean,     # OUT, slot c
                                       double* var,      # OUT, slot c
                                       double* invstd,   # OUT, slot c
                                       floating* yp,
                                       bint relu, bint stream) noexcept nogil:
    """Channel c of the fused training forward: statistics, then normalization."""
    cdef Py_ssize_t o
    cdef double m, v, inv, s, b
    planar_stats_unit(xp, C, inner, c, 0, outer, &mean[c], &var[c])
    m = mean[c]
    v = var[c] / (<double>outer * inner)
    inv = 1.0 / sqrt(v + eps)
    var[c] = v
    invstd[c] = inv
    s = inv * weight[c]
    b = bias[c]
    for o in range(outer):
        normalize_run(xp + (o * C + c) * inner, yp + (o * C + c) * inner,
                      inner, m, s, b, relu, stream)
    if stream:
        cbn_stream_fence()


cdef void train_forward_fused_impl(const floating* xp, Py_ssize_t outer,
                                   Py_ssize_t C, Py_ssize_t inner,
                                   const double* weight,  # IN (C,)
                                   const double* bias,    # IN (C,)
                                   double eps,
                                   double* mean,          # OUT (C,)
                                   double* var,           # OUT (C,), biased
                                   double* invstd,        # OUT (C,)
                                   floating* yp,          # OUT, may be xp itself
                                   bint relu, bint stream,
                                   int num_threads) noexcept nogil:
    """Statistics and normalization channel by channel, so that each channel is
    read from memory once and re-read from cache. Only for shapes where
    fuses() is true."""
    cdef Py_ssize_t c
    num_threads = team_size(num_threads, C)
    if num_threads == 1:
        for c in range(C):
            train_forward_channel(xp, outer, C, inner, c, weight, bias, eps,
                                  mean, var, invstd, yp, relu, stream)
    else:
        for c in prange(C, schedule='static', num_threads=num_threads):
            train_forward_channel(xp, outer, C, inner, c, weight, bias, eps,
                                  mean, var, invstd, yp, relu, stream)


# ---------------------------------------------------------------------------
# 4. Backward: per-channel sums, then the input gradient

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


cdef inline void sweep_grad_sums_chunk(const floating* dy, const floating* x,
                                       Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                                       Py_ssize_t rows_per_chunk,
                                       Py_ssize_t k_start, Py_ssize_t k_stop,
                                       const double* mean,
                                       double* part_s,   # OUT (n_chunks, C)
                                       double* part_p    # OUT (n_chunks, C)
                                       ) noexcept nogil:
    """Row chunks k_start:k_stop of the row sweep, each into its own slots."""
    cdef Py_ssize_t k
    for k in range(k_start, k_stop):
        sweep_grad_sums_rows(dy, x, C, inner, k * rows_per_chunk,
                             min(outer, (k + 1) * rows_per_chunk), mean,
                             part_s + k * C, part_p + k * C)


cdef void interleaved_grad_sums_unit(const floating* dy, const floating* x,
                                     Py_ssize_t W, const double* mean_cols,
                                     Py_ssize_t r_start, Py_ssize_t r_stop,
                                     Py_ssize_t j_start, Py_ssize_t j_stop,
                                     double* sum_dy_out,   # OUT, columns j_start:j_stop
                                     double* dotp_out      # OUT, columns j_start:j_stop
                                     ) noexcept nogil:
    cdef Py_ssize_t r, j, width = j_stop - j_start, offset
    for j in range(width):
        sum_dy_out[j] = 0
        dotp_out[j] = 0
    for r in range(r_start, r_stop):
        offset = r * W + j_start
        for j in range(width):
            sum_dy_out[j] += dy[offset + j]
            dotp_out[j] += (x[offset + j] - mean_cols[j_start + j]) * dy[offset + j]


cdef inline void planar_grad_sums_chunk(const floating* dy, const floating* x,
                                        Py_ssize_t outer, Py_ssize_t C,
                                        Py_ssize_t inner, Py_ssize_t per_unit,
                                        Py_ssize_t n_chunks, Py_ssize_t u,
                                        const double* mean,
                                        double* part_s,   # OUT, slot u
                                        double* part_p    # OUT, slot u
                                        ) noexcept nogil:
    """Unit u of the planar walk: chunk u % n_chunks of channel u // n_chunks."""
    cdef Py_ssize_t c = u // n_chunks, o_start = (u % n_chunks) * per_unit
    planar_grad_sums_unit(dy, x, C, inner, c, o_start, min(outer, o_start + per_unit),
                          mean[c], &part_s[u], &part_p[u])


cdef inline void interleaved_grad_sums_tile(const floating* dy, const floating* x,
                                            Py_ssize_t outer, Py_ssize_t W,
                                            Py_ssize_t rows_per_chunk,
                                            Py_ssize_t n_tiles, Py_ssize_t u,
                                            const double* mean_cols,
                                            double* part_s,   # OUT (n_chunks, W)
                                            double* part_p    # OUT (n_chunks, W)
                                            ) noexcept nogil:
    """Unit u of the interleaved walk: row chunk u // n_tiles, column tile u % n_tiles."""
    cdef Py_ssize_t k = u // n_tiles, j_start = (u % n_tiles) * TILE_COLS
    interleaved_grad_sums_unit(dy, x, W, mean_cols,
                               k * rows_per_chunk, min(outer, (k + 1) * rows_per_chunk),
                               j_start, min(W, j_start + TILE_COLS),
                               part_s + k * W + j_start, part_p + k * W + j_start)


cdef int grad_sums_impl(const floating* dyp, const floating* xp,
                        Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                        const double* mean,   # IN (C,)
                        double* sum_dy,       # OUT (C,): sum of dy
                        double* dotp,         # OUT (C,): sum of (x - mean) * dy
                        int num_threads) noexcept nogil:
    """Returns 0, or -1 when scratch space cannot be allocated."""
    cdef double* part_s = NULL
    cdef double* part_p = NULL
    cdef double* mean_cols = NULL
    cdef Py_ssize_t per_unit, n_chunks, n_units, u, c, k, i, j, j_start, W
    cdef Py_ssize_t rows_per_chunk, n_tiles
    cdef double s, p
    cdef int status = 0
    if sweeps_rows(outer, C, inner):
        rows_per_chunk = sweep_rows_per_chunk(outer, C, inner)
        n_chunks = ceil_div(outer, rows_per_chunk)
        part_s = <double*>cbn_scratch_take(2 * n_chunks * C * sizeof(double))
        if part_s == NULL:
            status = -1
        else:
            part_p = part_s + n_chunks * C
            num_threads = team_size(num_threads, n_chunks)
            if num_threads == 1:
                sweep_grad_sums_chunk(dyp, xp, outer, C, inner, rows_per_chunk, 0,
                                      n_chunks, mean, part_s, part_p)
            else:
                for k in prange(n_chunks, schedule='static', num_threads=num_threads):
                    sweep_grad_sums_chunk(dyp, xp, outer, C, inner, rows_per_chunk, k,
                                          k + 1, mean, part_s, part_p)
            for c in range(C):
                s = 0
                p = 0
                for k in range(n_chunks):
                    s = s + part_s[k * C + c]
                    p = p + part_p[k * C + c]
                sum_dy[c] = s
                dotp[c] = p
    elif planar_walk(outer, C, inner):
        per_unit = planar_outer_per_unit(outer, inner)
        n_chunks = ceil_div(outer, per_unit)
        n_units = C * n_chunks
        part_s = <double*>cbn_scratch_take(2 * n_units * sizeof(double))
        if part_s == NULL:
            status = -1
        else:
            part_p = part_s + n_units
            num_threads = team_size(num_threads, n_units)
            if num_threads == 1:
                for u in range(n_units):
                    planar_grad_sums_chunk(dyp, xp, outer, C, inner, per_unit,
                                           n_chunks, u, mean, part_s, part_p)
            else:
                for u in prange(n_units, schedule='static', num_threads=num_threads):
                    planar_grad_sums_chunk(dyp, xp, outer, C, inner, per_unit,
                                           n_chunks, u, mean, part_s, part_p)
            for c in range(C):
                s = 0
                p = 0
                for k in range(n_chunks):
                    s = s + part_s[c * n_chunks + k]
                    p = p + part_p[c * n_chunks + k]
                sum_dy[c] = s
                dotp[c] = p
    else:
        W = C * inner
        rows_per_chunk = interleaved_rows_per_chunk(outer, W)
        n_chunks = ceil_div(outer, rows_per_chunk)
        n_tiles = ceil_div(W, TILE_COLS)
        n_units = n_chunks * n_tiles
        # And per-column means; for (N, C) they are the per-channel ones.
        part_s = <double*>cbn_scratch_take((2 * n_chunks + 1) * W * sizeof(double))
        if part_s == NULL:
            status = -1
        else:
            part_p = part_s + n_chunks * W
            mean_cols = part_p + n_chunks * W
            if inner > 1:
                expand_to_columns(mean, C, inner, mean_cols)
                mean = mean_cols
            num_threads = team_size(num_threads, n_units)
            if num_threads == 1:
                for u in range(n_units):
                    interleaved_grad_sums_tile(dyp, xp, outer, W, rows_per_chunk,
                                               n_tiles, u, mean, part_s, part_p)
            else:
                for u in prange(n_units, schedule='static', num_threads=num_threads):
                    interleaved_grad_sums_tile(dyp, xp, outer, W, rows_per_chunk,
                                               n_tiles, u, mean, part_s, part_p)
            # Row chunks add into chunk 0's columns, then columns into channels.
            for k in range(1, n_chunks):
                for j in range(W):
                    part_s[j] = part_s[j] + part_s[k * W + j]
                    part_p[j] = part_p[j] + part_p[k * W + j]
            for c in range(C):
                s = 0
                p = 0
                for i in range(inner):
                    s = s + part_s[c * inner + i]
                    p = p + part_p[c * inner + i]
                sum_dy[c] = s
                dotp[c] = p
    cbn_scratch_give(part_s)
    return status


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


cdef inline void grad_input_run(const floating* dy, const floating* x,
                                floating* dx, Py_ssize_t n, double mean,
                                double mean_dy, double proj, double scale,
                                bint stream) noexcept nogil:
    """One channel's contiguous run, written directly or streamed."""
    cdef floating staged[STAGE]
    cdef Py_ssize_t start, length
    if not stream:
        grad_input_span(dy, x, dx, n, mean, mean_dy, proj, scale)
        return
    start = 0
    while start < n:
        length = min(<Py_ssize_t>STAGE, n - start)
        grad_input_span(dy + start, x + start, staged, length, mean, mean_dy, proj,
                        scale)
        cbn_stream_copy(dx + start, staged, length * sizeof(floating))
        start += length


cdef inline void grad_input_rows(const floating* dy, const floating* x,
                                 floating* dx, Py_ssize_t W,
                                 Py_ssize_t r_start, Py_ssize_t r_stop,
                                 const double* m_cols, const double* mdy_cols,
                                 const double* q_cols, const double* s_cols,
                                 bint stream) noexcept nogil:
    """Rows r_start:r_stop of the interleaved walk, with per-column parameters."""
    cdef floating staged[STAGE]
    cdef Py_ssize_t r, start, length, offset
    for r in range(r_start, r_stop):
        offset = r * W
        if not stream:
            grad_input_span_cols(dy + offset, x + offset, dx + offset, W, m_cols,
                                 mdy_cols, q_cols, s_cols)
            continue
        start = 0
        while start < W:
            length = min(<Py_ssize_t>STAGE, W - start)
            grad_input_span_cols(dy + offset + start, x + offset + start, staged, length,
                                 m_cols + start, mdy_cols + start, q_cols + start,
                                 s_cols + start)
            cbn_stream_copy(dx + offset + start, staged, length * sizeof(floating))
            start += length
    if stream:
        cbn_stream_fence()


cdef inline void grad_input_elems(const floating* dy, const floating* x, floating* dx,
                                  Py_ssize_t C, Py_ssize_t inner, Py_ssize_t start,
                                  Py_ssize_t stop, const double* mean,
                                  const double* mean_dy, const double* proj,
                                  const double* scale, bint stream) noexcept nogil:
    """Elements start:stop of the planar walk, run by run (run s is channel s % C)."""
    cdef Py_ssize_t i = start, n, c
    while i < stop:
        c = (i // inner) % C
        n = min((i // inner + 1) * inner, stop) - i
        grad_input_run(dy + i, x + i, dx + i, n, mean[c], mean_dy[c], proj[c], scale[c],
                       stream)
        i += n
    if stream:
        cbn_stream_fence()


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
    cdef Py_ssize_t k, W, n = outer * C * inner
    cdef double* cols = NULL
    if planar_walk(outer, C, inner):
        num_threads = team_size(num_threads, n // SHARE_GRANULE)
        if num_threads == 1:
            grad_input_elems(dyp, xp, dxp, C, inner, 0, n, mean, mean_dy, proj, scale,
                             stream)
        else:
            for k in prange(num_threads, schedule='static', num_threads=num_threads):
                grad_input_elems(dyp, xp, dxp, C, inner,
                                 share_start(n, k, num_threads, SHARE_GRANULE),
                                 share_start(n, k + 1, num_threads, SHARE_GRANULE),
                                 mean, mean_dy, proj, scale, stream)
        return 0
    W = C * inner
    if inner > 1:  # per-column copies of the parameters; for (N, C) they are per-channel
        cols = <double*>malloc(4 * W * sizeof(double))
        if cols == NULL:
            return -1
        expand_to_columns(mean, C, inner, cols)
        expand_to_columns(mean_dy, C, inner, cols + W)
        expand_to_columns(proj, C, inner, cols + 2 * W)
        expand_to_columns(scale, C, inner, cols + 3 * W)
        mean, mean_dy, proj, scale = cols, cols + W, cols + 2 * W, cols + 3 * W
    num_threads = team_size(num_threads, outer)
    if num_threads == 1:
        grad_input_rows(dyp, xp, dxp, W, 0, outer, mean, mean_dy, proj, scale, stream)
    else:
        for k in prange(num_threads, schedule='static', num_threads=num_threads):
            grad_input_rows(dyp, xp, dxp, W, share_start(outer, k, num_threads, 1),
                            share_start(outer, k + 1, num_threads, 1),
                            mean, mean_dy, proj, scale, stream)
    free(cols)
    return 0


cdef inline void backward_channel(const floating* dyp, const floating* xp,
                                  Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                                  Py_ssize_t c, const double* mean,
                                  const double* invstd, const double* weight,
                                  bint training,
                                  double* sum_dy,   # OUT, slot c
                                  double* dotp,     # OUT, slot c
                                  floating* dxp,
                                  bint stream) noexcept nogil:
    """Channel c of the fused backward: sums, then the input gradient."""
    cdef Py_ssize_t o, offset, n = outer * inner
    cdef double scale, mean_dy, proj
    planar_grad_sums_unit(dyp, xp, C, inner, c, 0, outer, mean[c], &sum_dy[c], &dotp[c])
    scale = invstd[c] * weight[c]
    mean_dy = sum_dy[c] / <double>n
    proj = dotp[c] * invstd[c] * invstd[c] / <double>n
    for o in range(outer):
        offset = (o * C + c) * inner
        if training:
            grad_input_run(dyp + offset, xp + offset, dxp + offset, inner, mean[c],
                           mean_dy, proj, scale, stream)
        else:
            normalize_run(dyp + offset, dxp + offset, inner, 0.0, scale, 0.0, False,
                          stream)
    if stream:
        cbn_stream_fence()


# ---------------------------------------------------------------------------
# 4b. The gradient through a fused ReLU, before the backward proper

cdef inline void relu_grad_span(const floating* dy, const floating* y, floating* dz,
                                Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dz[i] = 0 if y[i] <= 0 else dy[i]


cdef void relu_grad_impl(const floating* dy,   # IN (n,)
                         const floating* y,    # IN (n,): the forward's output
                         floating* dz,         # OUT (n,), may be dy itself
                         Py_ssize_t n, int num_threads) noexcept nogil:
    """dz = 0 where the ReLU clipped the output (y <= 0), dy elsewhere (NaN
    outputs included, as PyTorch's threshold_backward)."""
    cdef Py_ssize_t k, start
    num_threads = team_size(num_threads, n // SHARE_GRANULE)
    if num_threads == 1:
        relu_grad_span(dy, y, dz, n)
        return
    for k in prange(num_threads, schedule='static', num_threads=num_threads):
        start = share_start(n, k, num_threads, SHARE_GRANULE)
        relu_grad_span(dy + start, y + start, dz + start,
                       share_start(n, k + 1, num_threads, SHARE_GRANULE) - start)


# ---------------------------------------------------------------------------
# 5. Whole steps: what the Python layer and the fast entry points call. The
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
                      int num_threads) noexcept nogil:
    """y = (x - mean) * invstd * weight + bias, with the batch statistics
    (computed here) or given running ones; then max(y, 0) with relu. Returns 0,
    or -1 when scratch space cannot be allocated."""
    cdef Py_ssize_t c
    cdef double* scale
    cdef int status
    cdef bint stream = streams(outer * C * inner * sizeof(floating))
    if batch_stats and fuses(outer, C, inner, sizeof(floating)):
        train_forward_fused_impl(xp, outer, C, inner, weight, bias, eps, mean, var,
                                 invstd, yp, relu, stream, num_threads)
        return 0
    if batch_stats:
        status = batch_stats_impl(xp, outer, C, inner, mean, var, num_threads)
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


cdef int backward_impl(const floating* dyp, const floating* xp, Py_ssize_t outer,
                       Py_ssize_t C, Py_ssize_t inner,
                       const double* mean,     # IN (C,): the forward's
                       const double* invstd,   # IN (C,): the forward's
                       const double* weight,   # IN (C,)
                       bint training,
                       double* sum_dy,         # OUT (C,): sum of dy
                       double* dotp,           # OUT (C,): sum of (x - mean) * dy
                       floating* dxp,          # OUT, may be dyp or xp itself
                       int num_threads) noexcept nogil:
    """Input gradient and per-channel sums. training: the forward used batch
    statistics, so dx = (dy - mean(dy) - (x - mean) * dotp * invstd^2 / n)
    * invstd * weight; otherwise the statistics were constants and dx = dy *
    invstd * weight. Returns 0, or -1 when scratch space cannot be allocated."""
    cdef Py_ssize_t c, n = outer * inner
    cdef double* s
    cdef int status
    cdef bint stream = streams(outer * C * inner * sizeof(floating))
    if fuses(outer, C, inner, 2 * sizeof(floating)):
        num_threads = team_size(num_threads, C)
        if num_threads == 1:
            for c in range(C):
                backward_channel(dyp, xp, outer, C, inner, c, mean, invstd, weight,
                                 training, sum_dy, dotp, dxp, stream)
        else:
            for c in prange(C, schedule='static', num_threads=num_threads):
                backward_channel(dyp, xp, outer, C, inner, c, mean, invstd, weight,
                                 training, sum_dy, dotp, dxp, stream)
        return 0
    status = grad_sums_impl(dyp, xp, outer, C, inner, mean, sum_dy, dotp, num_threads)
    if status < 0:
        return status
    s = <double*>malloc(3 * C * sizeof(double))  # scale, mean_dy, proj
    if s == NULL:
        return -1
    for c in range(C):
        s[c] = invstd[c] * weight[c]
        s[C + c] = sum_dy[c] / <double>n
        s[2 * C + c] = dotp[c] * invstd[c] * invstd[c] / <double>n
    if training:
        status = grad_input_impl(dyp, xp, outer, C, inner, mean, s + C, s + 2 * C, s,
                                 dxp, stream, num_threads)
    else:
        for c in range(C):
            s[C + c] = 0
        status = normalize_impl(dyp, outer, C, inner, s + C, s, s + C, dxp, False,
                                stream, num_threads)
    free(s)
    return status


def forward(const floating[:, :, ::1] x,
            const double[::1] weight,
            const double[::1] bias,
            double eps,
            bint batch_stats,
            double[::1] mean,      # OUT batch mean, or IN running mean
            double[::1] var,       # OUT biased batch var, or IN running var
            double[::1] invstd,    # OUT
            floating[:, :, ::1] out,   # OUT, may be x itself
            bint relu,
            int num_threads):
    """forward_impl for a non-empty (outer, C, inner) view."""
    cdef int status
    with nogil:
        status = forward_impl(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2],
                              &weight[0], &bias[0], eps, batch_stats, &mean[0],
                              &var[0], &invstd[0], &out[0, 0, 0], relu, num_threads)
    check_scratch(status)


def backward(const floating[:, :, ::1] dy,
             const floating[:, :, ::1] x,
             const double[::1] mean,
             const double[::1] invstd,
             const double[::1] weight,
             bint training,
             double[::1] sum_dy,       # OUT
             double[::1] dotp,         # OUT
             floating[:, :, ::1] dx,   # OUT, may be dy or x itself
             int num_threads):
    """backward_impl for a non-empty (outer, C, inner) view."""
    cdef int status
    with nogil:
        status = backward_impl(&dy[0, 0, 0], &x[0, 0, 0], x.shape[0], x.shape[1],
                               x.shape[2], &mean[0], &invstd[0], &weight[0], training,
                               &sum_dy[0], &dotp[0], &dx[0, 0, 0], num_threads)
    check_scratch(status)
