# The walk plans: how a call's (outer, C, inner) view is cut into units of
# work, where each unit's partial results go, and who runs the units.
# Included by _kernels_impl.pxi; the kernels there read these plans and never
# recompute a partition.
#
# A reduction's partition (which values go to which unit, and the order the
# partials merge in) fixes its bits, so it depends on the shape only, never
# on the thread count; only the team that runs the units (and the per-thread
# scratch) depends on it.


cdef enum Walk:
    # Reductions over short runs with enough rows: ranges of whole rows, every
    # channel in memory order (a channel's short runs lie far apart, which the
    # hardware prefetchers do not follow). Elementwise passes treat it as planar.
    WALK_SWEEP
    # Long runs (inner >= PLANAR_MIN_INNER), or a few very wide rows: units of
    # (channel, range of outer), each channel's runs read one by one.
    WALK_PLANAR
    # Short runs: rows of W = C * inner columns, units of (range of rows, tile
    # of columns), the inner loops along a row.
    WALK_INTERLEAVED


cdef enum ReduceKind:
    REDUCE_STATS      # per channel: mean and M2 (sum of squared deviations)
    REDUCE_GRAD_SUMS  # per channel: sum of dy and sum of (x - mean) * dy
    # per channel, over the positions a mask marks valid: sum of d and of d * d,
    # d = x - shift (a value of the channel's data, so the sums lose nothing to
    # a large mean); partials add, as the gradient sums do
    REDUCE_MASKED_SUMS


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Walk choose_walk(Py_ssize_t outer, Py_ssize_t C,
                             Py_ssize_t inner) noexcept nogil:
    """The walk of a view; every kernel takes it from here.

    Short runs go interleaved, unless the rows are few and wide: per-column
    scratch would then outgrow x itself (e.g. (2, 10**6, 16)).
    """
    if inner < PLANAR_MIN_INNER and not (outer < MIN_CHUNK_ROWS
                                         and C * inner > UNIT_ELEMS):
        return WALK_INTERLEAVED
    if inner < SWEEP_MAX_INNER and outer >= MIN_SWEEP_ROWS:
        return WALK_SWEEP
    return WALK_PLANAR


cdef inline Py_ssize_t evened(Py_ssize_t n, Py_ssize_t per_chunk) noexcept nogil:
    """Items per chunk when n items are cut into chunks of about per_chunk:
    the chunks are near equal and, when there are several, an even number of
    them, so that teams of 2, 4, ... threads get equal work. (The cut must
    depend on the shape only, never on the team.)"""
    cdef Py_ssize_t chunks = ceil_div(n, per_chunk)
    if chunks <= 1:
        return per_chunk
    return ceil_div(n, chunks + chunks % 2)


cdef inline int team_size(int num_threads, Py_ssize_t n_units) noexcept nogil:
    """Never more threads than units of work (and at least one)."""
    if n_units < num_threads:
        return <int>max(n_units, <Py_ssize_t>1)
    return max(num_threads, 1)


# ---------------------------------------------------------------------------
# Reductions

ctypedef struct ReducePlan:
    int walk                       # a Walk
    Py_ssize_t outer, C, inner
    # Every walk cuts outer into chunks of rows; a chunk's partial results are
    # one row of ``cols`` values (per channel, or per column of a row of x for
    # the interleaved walk), so all partials form one (n_chunks, cols) array.
    Py_ssize_t rows_per_chunk
    Py_ssize_t n_chunks
    Py_ssize_t cols
    # 1, or inner (interleaved: channel c owns columns c * inner ... c * inner + inner - 1)
    Py_ssize_t cols_per_channel
    double values_per_row          # values one row adds to one column's partial
    # A unit is (chunk, tile of tile_cols columns): the whole row of channels
    # (sweep), one channel (planar) or TILE_COLS columns (interleaved).
    Py_ssize_t tile_cols
    Py_ssize_t n_tiles
    # unit order: planar units walk one channel's chunks in a row
    bint tile_major
    Py_ssize_t n_units
    int team                       # threads that run the units
    # Scratch layout, in doubles from the start of the block
    Py_ssize_t part_a_at           # (n_chunks, cols): mean or sum of dy
    Py_ssize_t part_b_at           # (n_chunks, cols): M2 or sum of (x - mean) * dy
    Py_ssize_t mean_cols_at        # (cols,) per-column means, or -1 (not needed)
    Py_ssize_t thread_scratch_at   # (team, thread_scratch_len), or -1
    Py_ssize_t thread_scratch_len
    Py_ssize_t scratch_len


cdef inline void plan_reduction(ReducePlan* p,        # OUT
                                int kind, Py_ssize_t outer, Py_ssize_t C,
                                Py_ssize_t inner, int num_threads) noexcept nogil:
    """The partition of a ``kind`` reduction over a non-empty (outer, C, inner)
    view, its merge geometry and its scratch layout."""
    cdef Py_ssize_t per_chunk, width, end
    p.walk = choose_walk(outer, C, inner)
    p.outer = outer
    p.C = C
    p.inner = inner
    if p.walk == WALK_SWEEP:
        # About UNIT_ELEMS values per chunk, at most MAX_ROW_CHUNKS chunks.
        per_chunk = max(<Py_ssize_t>1, UNIT_ELEMS // (C * inner))
        p.rows_per_chunk = evened(outer, max(per_chunk, ceil_div(outer, MAX_ROW_CHUNKS)))
        p.cols = C
        p.cols_per_channel = 1
        p.values_per_row = <double>inner
        p.tile_cols = C
        p.n_tiles = 1
        p.tile_major = False
    elif p.walk == WALK_PLANAR:
        p.rows_per_chunk = evened(outer, max(<Py_ssize_t>1, UNIT_ELEMS // inner))
        p.cols = C
        p.cols_per_channel = 1
        p.values_per_row = <double>inner
        p.tile_cols = 1
        p.n_tiles = C
        p.tile_major = True
    else:
        # At least MIN_CHUNK_ROWS rows and about UNIT_ELEMS values per unit,
        # at most MAX_ROW_CHUNKS chunks (they bound the per-column partials).
        p.cols = C * inner
        width = min(p.cols, <Py_ssize_t>TILE_COLS)
        per_chunk = max(<Py_ssize_t>MIN_CHUNK_ROWS, ceil_div(UNIT_ELEMS, width))
        p.rows_per_chunk = evened(outer, max(per_chunk, ceil_div(outer, MAX_ROW_CHUNKS)))
        p.cols_per_channel = inner
        p.values_per_row = 1.0
        p.tile_cols = TILE_COLS
        p.n_tiles = ceil_div(p.cols, TILE_COLS)
        p.tile_major = False
    p.n_chunks = ceil_div(outer, p.rows_per_chunk)
    p.n_units = p.n_chunks * p.n_tiles
    p.team = team_size(num_threads, p.n_units)

    p.part_a_at = 0
    p.part_b_at = p.n_chunks * p.cols
    end = 2 * p.n_chunks * p.cols
    p.mean_cols_at = -1
    if kind != REDUCE_STATS and p.cols_per_channel > 1:
        # per-column means (or shifts); for (N, C) the per-channel ones serve
        p.mean_cols_at = end
        end += p.cols
    p.thread_scratch_at = -1
    p.thread_scratch_len = 0
    if kind == REDUCE_STATS and p.walk == WALK_INTERLEAVED:
        p.thread_scratch_at = end  # a tile's shift and sums, per thread
        p.thread_scratch_len = 2 * TILE_COLS
        end += p.team * p.thread_scratch_len
    p.scratch_len = end


cdef inline Py_ssize_t chunk_rows(const ReducePlan* p, Py_ssize_t k) noexcept nogil:
    """Rows in chunk k (the last one may be short)."""
    return min(p.outer, (k + 1) * p.rows_per_chunk) - k * p.rows_per_chunk


# ---------------------------------------------------------------------------
# Elementwise passes

ctypedef struct SharePlan:
    # Every element is computed alone, so the bits do not depend on the cut.
    # The shares are small (about SHARE_ELEMS elements) rather than one per
    # thread: a helper that starts late then takes only what is left.
    # interleaved: shares of whole rows, per-column parameters; else shares of
    # elements, run by run
    bint by_rows
    Py_ssize_t C, inner
    Py_ssize_t row_len    # C * inner
    Py_ssize_t n_items    # rows (by_rows) or elements
    Py_ssize_t granule    # shares start on multiples of this
    Py_ssize_t n_shares
    int team


cdef inline SharePlan plan_shares(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                                  int num_threads) noexcept nogil:
    cdef SharePlan s
    s.by_rows = choose_walk(outer, C, inner) == WALK_INTERLEAVED
    s.C = C
    s.inner = inner
    s.row_len = C * inner
    if s.by_rows:
        s.n_items = outer
        s.granule = 1
        s.n_shares = ceil_div(outer, max(<Py_ssize_t>1, SHARE_ELEMS // s.row_len))
    else:
        s.n_items = outer * C * inner
        s.granule = SHARE_GRANULE
        s.n_shares = max(<Py_ssize_t>1, s.n_items // SHARE_ELEMS)
    s.team = team_size(num_threads, s.n_shares)
    return s


cdef inline Py_ssize_t share_start(const SharePlan* s, Py_ssize_t k) noexcept nogil:
    """Start of share k of s.n_items: near-equal shares starting on multiples
    of s.granule (share s.n_shares starts at s.n_items)."""
    cdef Py_ssize_t start
    if k >= s.n_shares:
        return s.n_items
    # n_items * k // n_shares, without forming n_items * k (it could overflow)
    start = (s.n_items // s.n_shares) * k + (s.n_items % s.n_shares) * k // s.n_shares
    return start - start % s.granule


# ---------------------------------------------------------------------------
# Running the units of a job

cdef enum Task:
    TASK_REDUCE            # a unit of a ReducePlan
    TASK_ELEMENTWISE       # a share of a SharePlan
    TASK_FORWARD_CHANNEL   # a channel of the fused training forward
    TASK_BACKWARD_CHANNEL  # a channel of the fused backward
    TASK_MASKED_GRAD_INPUT  # a chunk of rows of the masked input gradient


ctypedef struct Job:
    int task               # a Task; says what ``args`` points to
    Py_ssize_t n_units
    int team
    Py_ssize_t elements    # values the job reads (how long it runs)
    const void* args
