# The operations: every public call of cbn ends in one of these, which check
# their arguments by the rules of _rules.pxi, run the kernels through the
# table, and update state. Each returns its results or raises before any
# state (running statistics, the caller's arrays but ``out``) has changed.


# -- the kernels for a block's dtype

cdef int forward_kernel(Block b, const void* x, void* y, const double* weight,
                        const double* bias, double eps, bint batch_stats, double* mean,
                        double* var, double* invstd, bint relu,
                        const unsigned char* valid, double count) noexcept nogil:
    cdef int threads = threads_for(b.outer * b.C * b.inner)
    if b.typenum == cnp.NPY_FLOAT:
        return K.forward_f32(<const float*>x, b.outer, b.C, b.inner, weight, bias, eps,
                             batch_stats, mean, var, invstd, <float*>y, relu, valid, count,
                             threads)
    return K.forward_f64(<const double*>x, b.outer, b.C, b.inner, weight, bias, eps,
                         batch_stats, mean, var, invstd, <double*>y, relu, valid, count,
                         threads)


cdef int normalize_kernel(Block b, const void* x, void* y, const double* mean,
                          const double* scale, const double* shift,
                          bint relu) noexcept nogil:
    cdef Py_ssize_t n = b.outer * b.C * b.inner
    cdef Py_ssize_t itemsize = sizeof(float) if b.typenum == cnp.NPY_FLOAT else sizeof(double)
    cdef bint stream = n * itemsize >= K.stream_min_bytes
    if b.typenum == cnp.NPY_FLOAT:
        return K.normalize_f32(<const float*>x, b.outer, b.C, b.inner, mean, scale, shift,
                               <float*>y, relu, stream, threads_for(n))
    return K.normalize_f64(<const double*>x, b.outer, b.C, b.inner, mean, scale, shift,
                           <double*>y, relu, stream, threads_for(n))


cdef int backward_kernel(Block b, const void* dy, const void* x, void* dx,
                         const double* mean, const double* invstd, const double* weight,
                         bint training, const unsigned char* valid, double count,
                         double* sum_dy, double* dotp) noexcept nogil:
    cdef int threads = threads_for(b.outer * b.C * b.inner)
    if b.typenum == cnp.NPY_FLOAT:
        return K.backward_f32(<const float*>dy, <const float*>x, b.outer, b.C, b.inner,
                              mean, invstd, weight, training, valid, count, sum_dy, dotp,
                              <float*>dx, threads)
    return K.backward_f64(<const double*>dy, <const double*>x, b.outer, b.C, b.inner,
                          mean, invstd, weight, training, valid, count, sum_dy, dotp,
                          <double*>dx, threads)


cdef int grad_sums_kernel(Block b, const void* dy, const void* x, const double* mean,
                          double* sum_dy, double* dotp) noexcept nogil:
    cdef int threads = threads_for(b.outer * b.C * b.inner)
    if b.typenum == cnp.NPY_FLOAT:
        return K.grad_sums_f32(<const float*>dy, <const float*>x, b.outer, b.C, b.inner,
                               mean, sum_dy, dotp, threads)
    return K.grad_sums_f64(<const double*>dy, <const double*>x, b.outer, b.C, b.inner,
                           mean, sum_dy, dotp, threads)


cdef int grad_input_kernel(Block b, const void* dy, const void* x, void* dx,
                           const double* mean, const double* invstd, const double* weight,
                           const double* sum_dy, const double* dotp,
                           const unsigned char* valid, double count) noexcept nogil:
    cdef int threads = threads_for(b.outer * b.C * b.inner)
    if b.typenum == cnp.NPY_FLOAT:
        return K.grad_input_f32(<const float*>dy, <const float*>x, b.outer, b.C, b.inner,
                                mean, invstd, weight, sum_dy, dotp, valid, count,
                                <float*>dx, threads)
    return K.grad_input_f64(<const double*>dy, <const double*>x, b.outer, b.C, b.inner,
                            mean, invstd, weight, sum_dy, dotp, valid, count, <double*>dx,
                            threads)


cdef void relu_grad_kernel(Block b, const void* dy, const void* y,
                           void* dz) noexcept nogil:
    cdef Py_ssize_t n = b.outer * b.C * b.inner
    if b.typenum == cnp.NPY_FLOAT:
        K.relu_grad_f32(<const float*>dy, <const float*>y, <float*>dz, n, threads_for(n))
    else:
        K.relu_grad_f64(<const double*>dy, <const double*>y, <double*>dz, n, threads_for(n))


cdef inline void* data_of(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline const unsigned char* valid_data(object valid) noexcept:
    """A mask's bytes (valid_positions), or NULL for no mask."""
    return NULL if valid is None else <const unsigned char*>cnp.PyArray_DATA(
        <cnp.ndarray>valid)


cdef inline double* row(object block, Py_ssize_t k, Py_ssize_t C) noexcept:
    return <double*>cnp.PyArray_DATA(<cnp.ndarray>block) + k * C


cdef object new_block(Py_ssize_t rows, Py_ssize_t C):
    """A (rows, C) float64 array for per-channel values."""
    cdef cnp.npy_intp dims[2]
    dims[0] = rows
    dims[1] = C
    return cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)


cdef object channels_as(const double* values, Py_ssize_t C, object dtype):
    """A new (C,) array of ``dtype`` holding ``values``."""
    cdef cnp.npy_intp n = C
    a = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT if dtype is float32_dtype else cnp.NPY_DOUBLE,
                          0)
    store_channels(a, values, C)
    if dtype is float32_dtype or dtype is float64_dtype:
        return a
    return a.astype(dtype)   # float16, bfloat16, other byte orders


# -- what a backward needs

# Rows of a forward's per-channel block
cdef enum:
    R_MEAN, R_VAR, R_INVSTD, R_WEIGHT, R_BIAS, R_RUNNING_MEAN, R_RUNNING_VAR, R_ROWS


@cython.freelist(4)
cdef class Record(View):
    """One forward, as its backward needs it: replaced whole by each forward.

    ``output``: what it returned. ``batch_stats``: it normalized with the
    batch's own statistics (which then depend on the input). ``mean``,
    ``invstd``, ``weight``: the float64 per-channel values it used. The input
    is kept (the caller's array, or the kernels' copy of it: a Record is the
    View of its forward's input) unless ``out=`` was written over it
    (``overwritten``), and so is the output when a ReLU was fused (backward
    masks with it)."""

    cdef readonly object output
    cdef readonly bint batch_stats
    cdef readonly bint overwritten   # then the input (this view) must not be read
    cdef object relu_output
    cdef object stats       # (R_ROWS, C) block, or the ChannelParams used
    cdef const double* mean_p
    cdef const double* invstd_p
    cdef const double* weight_p
    # The forward's mask (valid_positions) and its valid positions per
    # channel, when its statistics came from part of the batch; else None
    cdef object valid
    cdef Py_ssize_t valid_count

    cdef Py_ssize_t num_channels

    # Copies, as float64 (C,) arrays
    @property
    def mean(self):
        return channels_as(self.mean_p, self.num_channels, float64_dtype)

    @property
    def invstd(self):
        return channels_as(self.invstd_p, self.num_channels, float64_dtype)

    @property
    def weight(self):
        return channels_as(self.weight_p, self.num_channels, float64_dtype)


cdef Record finish_record(Record r, object out, bint relu):
    """``r`` once its forward has run: its output finished."""
    r.output = finish(r)
    r.overwritten = out is not None and shares_memory(out, r.source)
    r.relu_output = r.output if relu else None
    r.num_channels = r.b.C
    return r


# -- statistics

cdef int stats_into(View v, double* mean, double* var, object valid=None,
                    Py_ssize_t count=0) except -1:
    """``v``'s per-channel mean and biased variance, into (C,) ``mean`` and
    ``var`` (NaN for channels with no values), over the ``count`` positions
    a mask marks when ``valid`` (valid_positions) is given."""
    cdef Py_ssize_t c, C = v.b.C
    cdef int status = 0
    cdef const void* xp = data_of(kernel_data(v))
    cdef const unsigned char* vp = valid_data(valid)
    cdef int threads = threads_for(v.size())
    if valid is None:
        count = v.b.outer * v.b.inner
    if count == 0:
        for c in range(C):
            mean[c] = var[c] = NAN
    elif C:
        with nogil:
            if v.b.typenum == cnp.NPY_FLOAT:
                status = K.batch_stats_f32(<const float*>xp, v.b.outer, C, v.b.inner, vp,
                                           <double>count, mean, var, threads)
            else:
                status = K.batch_stats_f64(<const double*>xp, v.b.outer, C, v.b.inner, vp,
                                           <double>count, mean, var, threads)
        check_scratch(status)
    return 0


cdef object stats_block(View v, object valid=None, Py_ssize_t count=0):
    """A (2, C) float64 block of ``v``'s per-channel mean and biased
    variance (NaN for channels with no values), as stats_into."""
    block = new_block(2, v.b.C)
    stats_into(v, row(block, 0, v.b.C), row(block, 1, v.b.C), valid, count)
    return block


def stats(x, axis, out, mask=None):
    """cbn.batch_stats: (mean, biased var) in x's dtype, or written to
    ``out``; over the valid positions of ``mask`` when it is given."""
    cdef View v = view_of(x, axis, ANY_INPUT, "input")
    valid, count = valid_positions(mask, v)
    if out is not None:
        out = stats_out(out, v)
    block = stats_block(v, valid, count)
    if out is None:
        return block[0].astype(v.result_dtype()), block[1].astype(v.result_dtype())
    out[0][...] = block[0]
    out[1][...] = block[1]
    return out


cdef tuple moments_of_view(View v, object valid=None, Py_ssize_t count=0):
    """(count, mean, m2) of ``v`` per channel (over a mask's ``count``
    valid positions when ``valid`` is given): count an int (values per
    channel), mean and m2 (the sum of squared deviations) new float64 (C,)
    arrays; zeros for an empty batch."""
    if valid is None:
        count = v.b.outer * v.b.inner
    if count == 0:
        return 0, numpy.zeros(v.b.C), numpy.zeros(v.b.C)
    block = stats_block(v, valid, count)
    block[1] *= count   # biased variance -> m2
    return count, block[0], block[1]


def moments(x, axis, Accepts accepts=ANY_INPUT, str name="input", mask=None):
    """cbn.Moments.of: (count, mean, m2, dtype) of ``x`` (over ``mask``'s
    valid positions when it is given), the first three as moments_of_view,
    the last the input's."""
    cdef View v = view_of(x, axis, accepts, name)
    valid, count = valid_positions(mask, v)
    return moments_of_view(v, valid, count) + (v.result_dtype(),)


def check_mask(x, axis, mask):
    """The rules of a mask that a call does not use (eval mode), checked as
    where it is used."""
    valid_positions(mask, view_of(x, axis, ANY_INPUT, "input"))


cdef tuple stats_out(object out, View v):
    """``out`` of batch_stats: a pair of separate writable (C,) arrays of the
    input's dtype."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(
            "out must be a pair (mean, var) of arrays, got "
            f"{type(out).__name__}"
            f"{'' if not isinstance(out, (tuple, list)) else f' of {len(out)}'}"
        )
    for name, array in zip(("out[0] (mean)", "out[1] (var)"), out):
        if not isinstance(array, numpy.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(array).__name__}")
        if array.shape != (v.b.C,):
            raise ValueError(f"{name} has shape {array.shape}, expected "
                             f"({v.b.C},) for {v.b.C} channels")
        if array.dtype != v.dtype:
            raise TypeError(f"{name} has dtype {array.dtype}, expected the input's dtype "
                            f"{v.dtype}")
        if not array.flags.writeable:
            raise ValueError(f"{name} is read-only")
    if numpy.may_share_memory(out[0], out[1]):
        raise ValueError("out[0] (mean) and out[1] (var) must be separate arrays")
    return tuple(out)


# -- forwards

cdef enum:
    # What a forward does with batch statistics that are not finite
    NONFINITE_PROPAGATE = 0   # into the running statistics, as PyTorch
    NONFINITE_RAISE = 1       # FloatingPointError before any state changes
    NONFINITE_SKIP = 2        # those channels' running statistics stay as they were

NONFINITE_MODES = {"propagate": NONFINITE_PROPAGATE, "raise": NONFINITE_RAISE,
                   "skip": NONFINITE_SKIP}


cdef inline bint finite_stats(const double* mean, const double* var,
                              Py_ssize_t c) noexcept nogil:
    return isfinite(mean[c]) and isfinite(var[c])


def nonfinite_error(channels):
    """The FloatingPointError of nonfinite="raise" for these channels."""
    shown = list(channels[:20]) + (["..."] if len(channels) > 20 else [])
    return FloatingPointError(
        f"batch statistics are not finite in {len(channels)} channel(s) "
        f"{shown} (NaN or inf in the input); nonfinite='raise': nothing was updated"
    )


cdef void running_update(double* running_mean, double* running_var,
                         const double* mean, const double* var, Py_ssize_t C,
                         Py_ssize_t n, double factor, bint skip_nonfinite,
                         bint unbiased) noexcept nogil:
    """PyTorch's update, in place: running = (1 - factor) * running + factor *
    batch, with the unbiased batch variance (n / (n - 1); the biased one,
    the convention Keras, Flax and ONNX document, when not ``unbiased``); with
    skip_nonfinite, channels whose statistics are not finite keep theirs."""
    cdef Py_ssize_t c
    cdef double correction = <double>n / (n - 1) if unbiased else 1.0
    for c in range(C):
        if skip_nonfinite and not finite_stats(mean, var, c):
            continue
        running_mean[c] = (1.0 - factor) * running_mean[c] + factor * mean[c]
        running_var[c] = (1.0 - factor) * running_var[c] + factor * (var[c] * correction)


cdef int check_running_pair(object running_mean, object running_var) except -1:
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together (or both None), "
            f"got running_mean={'None' if running_mean is None else 'an array'} and "
            f"running_var={'None' if running_var is None else 'an array'}"
        )
    return 0


def forward_stats(x, axis, weight, bias, eps, out, mask=None):
    """cbn.batch_norm_forward: (y, save_mean, save_invstd), the statistics
    as new float64 arrays (over ``mask``'s valid positions when given)."""
    cdef Record r = train_forward(x, axis, ANY_INPUT, weight, bias, eps, None, None, None,
                                  None, False, NONFINITE_PROPAGATE, out, False, 1, mask)
    return (r.output, channels_as(r.mean_p, r.num_channels, float64_dtype),
            channels_as(r.invstd_p, r.num_channels, float64_dtype))


@cython.final
@cython.freelist(4)
cdef class TrainStep:
    """A forward with batch statistics, checked and with its output
    allocated, waiting for its statistics: its own batch's (train_forward),
    or those of a batch spread over processes (SyncBatchNorm, through
    train_begin and train_end)."""

    cdef Record r
    cdef object block              # (R_ROWS, C): statistics, parameters, running stats
    cdef object out, running_mean, running_var
    cdef double eps, factor
    cdef bint update, relu
    cdef bint unbiased             # the running variance is the unbiased one
    cdef int nonfinite

    cdef readonly Py_ssize_t count   # values per channel in this process's batch

    @property
    def shape(self):
        """The shape of this process's input."""
        return self.r.source.shape

    @property
    def dtype(self):
        """The dtype of this process's input."""
        return self.r.result_dtype()


cdef TrainStep train_step(x, axis, Accepts accepts, weight, bias, eps, running_mean,
                          running_var, momentum, batches_tracked, bint relu, int nonfinite,
                          out, bint may_overwrite_input, int var_ddof):
    """Every check of a forward with batch statistics; the output allocated."""
    cdef TrainStep t = TrainStep.__new__(TrainStep)
    cdef Record r = Record.__new__(Record)
    cdef View v = view_of(x, axis, accepts, "input", r)
    cdef Py_ssize_t C = v.b.C
    t.r = r
    t.eps = eps_value(eps)
    t.update = running_mean is not None
    check_running_pair(running_mean, running_var)
    momentum = check_momentum(momentum,
                              allow_none=batches_tracked is not None or not t.update)
    t.factor = 0.0
    if t.update:
        t.factor = 1.0 / (batches_tracked + 1) if momentum is None else momentum
    if not may_overwrite_input:
        check_not_over_input(out, v)
    t.block = new_block(R_ROWS, C)
    read_channels(weight, C, row(t.block, R_WEIGHT, C), "weight", 1.0, True)
    read_channels(bias, C, row(t.block, R_BIAS, C), "bias", 0.0, True)
    if t.update:
        running_buffer(running_mean, C, "running_mean")
        running_buffer(running_var, C, "running_var")
    t.out, t.running_mean, t.running_var = out, running_mean, running_var
    t.relu, t.nonfinite = relu, nonfinite
    t.unbiased = var_ddof == 1
    return t


cdef int check_count(Py_ssize_t count, View v, bint masked=False) except -1:
    """PyTorch's rule: one value per channel has no variance. ``v``: this
    process's input, or None for a batch spread over processes; ``masked``:
    the count is of a mask's valid positions."""
    if count == 1:
        where = ("a global batch of 1 value per channel (over all processes)"
                 if v is None else f"input size {v.source.shape}")
        if masked and v is not None:
            where += " with 1 valid position in its mask"
        raise ValueError(f"Expected more than 1 value per channel when training, got {where}")
    return 0


cdef Record train_finish(TrainStep t, Py_ssize_t count):
    """The running statistics updated from the block's statistics over
    ``count`` values per channel (skipped when there are none); the record."""
    cdef Record r = t.r
    cdef Py_ssize_t C = r.b.C
    cdef double* s = row(t.block, 0, C)
    cdef bint update = t.update and count > 0 and C > 0
    if count > 0 and t.nonfinite == NONFINITE_RAISE:
        bad = [c for c in range(C) if not finite_stats(s + R_MEAN * C, s + R_VAR * C, c)]
        if bad:
            raise nonfinite_error(bad)
    if update:
        read_channels(t.running_mean, C, s + R_RUNNING_MEAN * C, "running_mean")
        read_channels(t.running_var, C, s + R_RUNNING_VAR * C, "running_var")
        running_update(s + R_RUNNING_MEAN * C, s + R_RUNNING_VAR * C, s + R_MEAN * C,
                       s + R_VAR * C, C, count, t.factor, t.nonfinite == NONFINITE_SKIP,
                       t.unbiased)
        store_into(t.running_mean, s + R_RUNNING_MEAN * C, C)
        store_into(t.running_var, s + R_RUNNING_VAR * C, C)
    finish_record(r, t.out, t.relu)
    r.batch_stats = True
    r.stats = t.block
    r.mean_p = s + R_MEAN * C
    r.invstd_p = s + R_INVSTD * C
    r.weight_p = s + R_WEIGHT * C
    return r


cpdef Record train_forward(x, axis, Accepts accepts, weight, bias, eps, running_mean,
                           running_var, momentum, batches_tracked, bint relu, int nonfinite,
                           out, bint may_overwrite_input=False, int var_ddof=1,
                           mask=None):
    """A forward with the batch's statistics (training, or eval without
    running statistics): returns its Record. With running statistics, they
    are updated in place with ``momentum``, or with the cumulative average
    over ``batches_tracked`` earlier batches when momentum is None (layers
    only: functions pass batches_tracked=None). ``out`` may be the input only
    where no backward is expected (``may_overwrite_input``: eval mode).
    ``var_ddof``: 1 keeps the unbiased variance (PyTorch), 0 the biased one.
    ``mask``: the statistics (and the update's count) come from its valid
    positions only; every position is normalized."""
    cdef TrainStep t = train_step(x, axis, accepts, weight, bias, eps, running_mean,
                                  running_var, momentum, batches_tracked, relu, nonfinite,
                                  out, may_overwrite_input, var_ddof)
    cdef View v = t.r
    cdef Py_ssize_t C = v.b.C, n = v.b.outer * v.b.inner
    cdef int status = 0
    valid, count = valid_positions(mask, v)
    if valid is not None:
        n = count
    check_count(n, v, valid is not None)
    output_for(v, out, (running_mean, running_var) if t.update else ())
    cdef const void* xp = data_of(v.data)
    cdef void* yp = data_of(v.kernel)
    cdef double* s = row(t.block, 0, C)
    cdef const unsigned char* vp = valid_data(valid)
    cdef bint batch_stats = n > 0 and C > 0
    if not batch_stats:  # an empty batch: no statistics, nothing to update
        t.block[R_MEAN:R_INVSTD + 1] = numpy.nan
    if v.size():  # (a mask with no valid position: every output NaN)
        with nogil:
            status = forward_kernel(v.b, xp, yp, s + R_WEIGHT * C, s + R_BIAS * C, t.eps,
                                    batch_stats, s + R_MEAN * C, s + R_VAR * C,
                                    s + R_INVSTD * C, relu, vp, <double>n)
        check_scratch(status)
    t.r.valid = valid
    t.r.valid_count = n
    return train_finish(t, n)


def train_begin(x, axis, Accepts accepts, weight, bias, eps, running_mean, running_var,
                momentum, batches_tracked, bint relu, int nonfinite, out, packed,
                int var_ddof=1, mask=None):
    """The first half of a forward on a batch spread over processes: every
    check of train_forward but the count's (which is the global batch's),
    the output allocated, and this process's moments (over ``mask``'s valid
    positions when it is given) written to ``packed``, a float64 (2C + 2,)
    row: [input dtype number, count, mean (C), m2 (C)]. No state changes."""
    cdef TrainStep t = train_step(x, axis, accepts, weight, bias, eps, running_mean,
                                  running_var, momentum, batches_tracked, relu, nonfinite,
                                  out, False, var_ddof)
    cdef View v = t.r
    cdef Py_ssize_t c, C = v.b.C
    cdef double* p = packed_data(packed, 2 * C + 2, "packed")
    if cnp.PyArray_SIZE(<cnp.ndarray>packed) != 2 * C + 2:
        raise ValueError(f"packed must hold {2 * C + 2} values")
    valid, count = valid_positions(mask, v)
    output_for(v, out, (running_mean, running_var) if t.update else ())
    t.count = v.b.outer * v.b.inner if valid is None else count
    t.r.valid = valid
    t.r.valid_count = t.count
    p[0] = v.result_dtype().num
    p[1] = t.count
    if t.count == 0:
        memset(p + 2, 0, 2 * C * sizeof(double))
        return t
    stats_into(v, p + 2, p + 2 + C, valid, t.count)
    for c in range(C):
        p[2 + C + c] *= t.count   # biased variance -> m2
    return t


def train_end(TrainStep t, Py_ssize_t count, mean, m2):
    """The second half: normalize with the moments of the global batch
    (``count`` values per channel, float64 (C,) ``mean`` and ``m2``), update
    the running statistics, and return the Record."""
    cdef View v = t.r
    cdef Py_ssize_t c, C = v.b.C
    cdef double* s = row(t.block, 0, C)
    cdef int status = 0
    check_count(count, None)
    if count == 0 or C == 0:
        # A batch empty everywhere (or masked out): NaN statistics, which
        # normalize any masked-out positions here to NaN.
        t.block[R_MEAN:R_INVSTD + 1] = numpy.nan
        count = 0
    else:
        read_channels(mean, C, s + R_MEAN * C, "mean")
        read_channels(m2, C, s + R_VAR * C, "m2")
        for c in range(C):
            s[R_VAR * C + c] /= count
    cdef const void* xp = data_of(v.data)
    cdef void* yp = data_of(v.kernel)
    if v.size():
        with nogil:
            status = forward_kernel(v.b, xp, yp,
                                    s + R_WEIGHT * C, s + R_BIAS * C, t.eps, False,
                                    s + R_MEAN * C, s + R_VAR * C, s + R_INVSTD * C, t.relu,
                                    NULL, 0)
        check_scratch(status)
    else:
        for c in range(C):
            s[R_INVSTD * C + c] = 1.0 / sqrt(s[R_VAR * C + c] + t.eps)
    return train_finish(t, count)


def eval_forward(x, axis, weight, bias, running_mean, running_var, eps, momentum,
                 bint relu, out):
    """cbn.batch_norm with training=False: normalize with given statistics."""
    cdef View v = view_of(x, axis, ANY_INPUT, "input")
    cdef Py_ssize_t C = v.b.C
    cdef double eps_c = eps_value(eps)
    cdef int status = 0
    check_running_pair(running_mean, running_var)
    check_momentum(momentum)
    if running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    # malloc rather than an array: nothing outlives the call, and small calls
    # feel every allocation
    cdef double* s = <double*>malloc(R_ROWS * C * sizeof(double) + 1)
    if s == NULL:
        raise MemoryError()
    try:
        read_channels(weight, C, s + R_WEIGHT * C, "weight", 1.0, True)
        read_channels(bias, C, s + R_BIAS * C, "bias", 0.0, True)
        read_channels(running_mean, C, s + R_MEAN * C, "running_mean")
        read_channels(running_var, C, s + R_VAR * C, "running_var")
        output_for(v, out, ())
        xp = data_of(v.data)
        yp = data_of(v.kernel)
        if v.size():
            with nogil:
                status = forward_kernel(v.b, xp, yp, s + R_WEIGHT * C, s + R_BIAS * C,
                                        eps_c, False, s + R_MEAN * C, s + R_VAR * C,
                                        s + R_INVSTD * C, relu, NULL, 0)
            check_scratch(status)
        return finish(v)
    finally:
        free(s)


def normalize(x, axis, Accepts accepts, ChannelParams params not None, bint relu, out,
              str name="input", relu_mask=None):
    """An inference call with ready parameters (a layer's eval, a frozen
    layer); returns its Record. ``relu_mask``: an earlier output whose
    clipped places (<= 0) zero ``x`` first (a frozen layer's backward)."""
    cdef Record r = Record.__new__(Record)
    cdef View v = view_of(x, axis, accepts, name, r)
    cdef int status = 0
    cdef const void* mp = NULL
    if relu_mask is not None:
        if relu_mask.shape != v.source.shape:
            raise ValueError(
                f"{name} has shape {v.source.shape}, expected the output's shape "
                f"{relu_mask.shape}"
            )
        relu_mask = view_like(relu_mask, v, "output")
        mp = data_of(relu_mask)
    output_for(v, out, (relu_mask,))
    cdef const void* xp = data_of(v.data)
    cdef void* yp = data_of(v.kernel)
    if v.size():
        with nogil:
            if mp != NULL:  # masked in the output, then scaled there in place
                relu_grad_kernel(v.b, xp, mp, yp)
                xp = yp
            status = normalize_kernel(v.b, xp, yp, params.mean_p, params.scale_p,
                                      params.bias_p, relu)
        check_scratch(status)
    finish_record(r, out, relu)
    r.batch_stats = False
    r.stats = params
    r.mean_p = params.mean_p
    r.invstd_p = params.invstd_p
    r.weight_p = params.weight_p
    return r


# -- backwards

cdef View output_view(View v):
    """A View of ``v``'s input for another call's output: a forward's record
    keeps its own output fields, whatever its backwards do."""
    cdef View o = View.__new__(View)
    o.data, o.source, o.b, o.axis = v.data, v.source, v.b, v.axis
    o.converted_dtype, o.compute_dtype = v.converted_dtype, v.compute_dtype
    return o


@cython.final
@cython.freelist(4)
cdef class BackwardStep:
    """A backward, checked, its output allocated and a fused ReLU's mask
    applied to dy, waiting for the per-channel sums: its own (run_backward),
    or those summed over processes (SyncBatchNorm, through backward_begin and
    backward_end)."""

    cdef View o
    cdef object keep        # what mean_p, invstd_p and weight_p point into
    cdef object dy_data     # what dyp points into, unless masked
    cdef object aside       # where the masked dy goes when dx cannot take it
    cdef const void* dyp    # dy, masked when a ReLU was fused
    cdef const double* mean_p
    cdef const double* invstd_p
    cdef const double* weight_p
    cdef double* sums       # (3, C): sum of dy, sum of (x - mean) * dy, grad_weight
    cdef object grad_dtype
    cdef object valid       # the forward's mask (valid_positions), or None

    def __dealloc__(self):
        free(self.sums)

    cdef tuple results(self):
        """(dx, grad_weight, grad_bias): grad_weight and grad_bias from the
        local sums (zero for an empty batch, whose statistics are NaN)."""
        cdef Py_ssize_t c, C = self.o.b.C
        if self.o.size():
            for c in range(C):
                self.sums[2 * C + c] = self.sums[C + c] * self.invstd_p[c]
        return (finish(self.o), channels_as(self.sums + 2 * C, C, self.grad_dtype),
                channels_as(self.sums, C, self.grad_dtype))


cdef BackwardStep backward_step(View v, object dy, object dy_data, const double* mean,
                                const double* invstd, const double* weight, object out,
                                object relu_output, object grad_dtype, bint own_view,
                                object keep):
    """A backward of a forward on ``v`` that normalized with ``mean`` and
    ``invstd`` (held by ``keep``), up to its sums; ``relu_output``: its output
    when a ReLU was fused (its clipped places pass no gradient). ``own_view``:
    ``v`` is this call's own, and takes the output (else it is a record, which
    keeps its forward's)."""
    cdef BackwardStep t = BackwardStep.__new__(BackwardStep)
    cdef Py_ssize_t C = v.b.C
    y_data = None if relu_output is None else view_like(relu_output, v, "output")
    t.o = v if own_view else output_view(v)
    output_for(t.o, out, (dy if cnp.PyArray_Check(dy) else None, dy_data, y_data))
    t.keep, t.dy_data, t.grad_dtype = keep, dy_data, grad_dtype
    t.mean_p, t.invstd_p, t.weight_p = mean, invstd, weight
    t.sums = <double*>calloc(3 * C + 1, sizeof(double))
    if t.sums == NULL:
        raise MemoryError()
    t.dyp = data_of(dy_data)
    cdef void* masked = data_of(t.o.kernel)
    cdef const void* yp
    if y_data is not None and t.o.size():
        # The masked gradient goes where dx will, unless dx is x or the
        # output (both still to be read): then aside.
        if shares_memory(t.o.kernel, t.o.data) or shares_memory(t.o.kernel, y_data):
            t.aside = numpy.empty_like(t.o.kernel)
            masked = data_of(t.aside)
        yp = data_of(y_data)
        with nogil:
            relu_grad_kernel(t.o.b, t.dyp, yp, masked)
        t.dyp = masked
    return t


cdef tuple run_backward(View v, object dy, object dy_data, const double* mean,
                        const double* invstd, const double* weight, bint training,
                        object out, object relu_output, object grad_dtype,
                        bint own_view, object keep, object valid=None,
                        Py_ssize_t valid_count=0):
    """(dx, grad_weight, grad_bias): backward_step, then its sums and dx in
    one kernel call. ``valid``: the mask (valid_positions, over
    ``valid_count`` positions) the forward's batch statistics came from."""
    cdef BackwardStep t = backward_step(v, dy, dy_data, mean, invstd, weight, out,
                                        relu_output, grad_dtype, own_view, keep)
    cdef Py_ssize_t C = v.b.C
    cdef int status = 0
    cdef const void* xp
    cdef void* dxp
    cdef const unsigned char* vp = valid_data(valid)
    if t.o.size():  # an empty batch: nothing flows back (the sums stay 0)
        xp = data_of(t.o.data)
        dxp = data_of(t.o.kernel)
        with nogil:
            status = backward_kernel(t.o.b, t.dyp, xp, dxp, mean, invstd, weight, training,
                                     vp, <double>valid_count, t.sums, t.sums + C)
        check_scratch(status)
    return t.results()


def backward_begin(Record record, dy, out, grad_dtype, str owner, sums):
    """The first half of a layer's backward of a forward on a batch spread
    over processes (train_begin/train_end): every check, and this process's
    sums written to ``sums``, a float64 (2C + 1,) array: [unused, sum of dy
    (C), sum of (x - mean) * dy (C)]."""
    cdef BackwardStep t = backward_step(
        record, dy, record_dy(record, dy, owner), record.mean_p, record.invstd_p,
        record.weight_p, out, record.relu_output, grad_dtype, False, record)
    cdef Py_ssize_t C = t.o.b.C
    cdef double* p = packed_data(sums, 2 * C + 1, "sums")
    t.valid = record.valid
    cdef int status = 0
    cdef const void* xp = data_of(t.o.data)
    if t.o.size():
        with nogil:
            status = grad_sums_kernel(t.o.b, t.dyp, xp, t.mean_p, t.sums, t.sums + C)
        check_scratch(status)
    memcpy(p + 1, t.sums, 2 * C * sizeof(double))
    return t


def backward_end(BackwardStep t, sum_dy, dotp, Py_ssize_t count):
    """The second half: dx from the sums over all processes (float64 (C,)
    ``sum_dy`` and ``dotp``, over ``count`` values per channel);
    (dx, grad_weight, grad_bias), the last two from this process's sums."""
    cdef Py_ssize_t C = t.o.b.C
    cdef int status = 0
    cdef const void* xp = data_of(t.o.data)
    cdef void* dxp = data_of(t.o.kernel)
    cdef const unsigned char* vp = valid_data(t.valid)
    cdef double* total = <double*>malloc(2 * C * sizeof(double) + 1)
    if total == NULL:
        raise MemoryError()
    try:
        read_channels(sum_dy, C, total, "sum_dy")
        read_channels(dotp, C, total + C, "dotp")
        if t.o.size():
            with nogil:
                status = grad_input_kernel(t.o.b, t.dyp, xp, dxp, t.mean_p, t.invstd_p,
                                           t.weight_p, total, total + C, vp,
                                           <double>count)
            check_scratch(status)
    finally:
        free(total)
    return t.results()


cdef object record_dy(Record record, object dy, str owner):
    """``dy`` for a backward of ``record``'s forward, as the kernels read it."""
    if record.overwritten:
        raise ValueError(
            f"{owner}.backward: the last forward wrote its output over its input "
            "(out=x), and backward needs the input"
        )
    return view_like(dy, record, "dy")


def record_backward(Record record, dy, out, grad_dtype, str owner):
    """A layer's backward of the forward ``record`` describes."""
    return run_backward(record, dy, record_dy(record, dy, owner), record.mean_p,
                        record.invstd_p, record.weight_p, record.batch_stats, out,
                        record.relu_output, grad_dtype, False, record, record.valid,
                        record.valid_count)


def backward(dy, x, axis, save_mean, save_invstd, weight, training, out, mask=None):
    """cbn.batch_norm_backward; ``mask``: the forward's, in training."""
    cdef View v = view_of(x, axis, ANY_INPUT, "x")
    cdef Py_ssize_t C = v.b.C
    valid, count = valid_positions(mask, v)
    cdef double* s = <double*>malloc(3 * C * sizeof(double) + 1)
    if s == NULL:
        raise MemoryError()
    try:
        read_channels(save_mean, C, s, "save_mean")
        read_channels(save_invstd, C, s + C, "save_invstd")
        read_channels(weight, C, s + 2 * C, "weight", 1.0, True)
        training_c = check_training_flag(training)
        dy_data = view_like(dy, v, "dy")  # last: it may copy a huge dy
        return run_backward(v, dy, dy_data, s, s + C, s + 2 * C, training_c, out, None,
                            v.result_dtype(), True, None, valid, count)
    finally:
        free(s)
