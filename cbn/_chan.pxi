# Chan, Golub & LeVeque's pairwise merge of (count, mean, M2): the one
# formula behind the kernels' partial statistics (_kernels_impl.pxi) and the
# executor's merges of moments across batches and processes (_moments.pxi).


cdef inline void chan_combine(double* mean_a, double* m2_a, double mean_b, double m2_b,
                              double w_mean, double w_m2) noexcept nogil:
    """The merge of two non-empty blocks with the weights of their counts:
    w_mean = n_b / n and w_m2 = n_a * n_b / n (the same for every channel
    of two blocks, so a caller merging many channels computes them once)."""
    cdef double delta = mean_b - mean_a[0]
    cdef double shifted = mean_a[0] + delta * w_mean
    # An infinite mean on one side: the weighted form keeps it infinite (inf
    # and a finite mean give inf, +inf and -inf NaN), as one pass over all
    # the data would, where inf - finite would give NaN. A select, not a
    # branch, keeps loops over channels vectorized; delta - delta is 0 only
    # for a finite delta.
    cdef double weighted = mean_a[0] * (1.0 - w_mean) + mean_b * w_mean
    mean_a[0] = shifted if delta - delta == 0 else weighted
    m2_a[0] = m2_a[0] + m2_b + delta * delta * w_m2


cdef inline void chan_merge(double* n_a, double* mean_a, double* m2_a,
                            double n_b, double mean_b, double m2_b) noexcept nogil:
    """Fold the statistics (n_b, mean_b, m2_b) of one block into (n_a, mean_a, m2_a).

    Chan, Golub & LeVeque (1979): m2 = m2_a + m2_b + delta^2 * n_a * n_b / n.
    """
    cdef double n
    if n_b == 0:
        return
    if n_a[0] == 0:
        n_a[0] = n_b
        mean_a[0] = mean_b
        m2_a[0] = m2_b
        return
    n = n_a[0] + n_b
    chan_combine(mean_a, m2_a, mean_b, m2_b, n_b / n, n_a[0] * n_b / n)
    n_a[0] = n
