"""SyncBatchNorm, cbn.distributed.batch_stats and calibrate(comm=) on every
rank against the single-process reference (see harness.py for the protocol).

    mpiexec -n 3 python -m mpi4py tests/mpi/sync_layer.py --out /tmp/verdicts

Cases: training forward + backward over three steps (uneven, empty and
all-empty local batches; float32 and float64; NC, NCL, NCHW and NHWC;
activation="relu"; momentum=None; affine=False; bias=False;
track_running_stats=False; non-finite data under "propagate" and "skip"),
both reduction paths and their agreement, the collectives a step makes,
eval mode without communication, convert and pickling, batch_stats, and
calibrate(comm=).
"""
import copy
import pickle

import numpy as np
from harness import (
    DX_TOL,
    SIZES,
    Y_TOL,
    Case,
    CountingComm,
    capture,
    channel_axis,
    describe,
    excess,
    excess_scaled,
    global_batches,
    global_moments,
    random_state,
    reference_grads,
    rows_of,
    run_cases,
    same_on_all_ranks,
    split,
    state_bits,
    stats_excess,
)

import cbn
import cbn.distributed

C = 3
SEED = 20261201


def sizes_for(variant, size):
    return SIZES[variant][size]


def make_sync(ref, comm, make, reduction):
    """A SyncBatchNorm with ``ref``'s settings and state, built as asked."""
    if make == "convert":
        return cbn.SyncBatchNorm.convert(copy.deepcopy(ref), comm=comm)
    kwargs = {} if reduction is None else {"reduction": reduction}
    sync = cbn.SyncBatchNorm(
        ref.num_features, ref.eps, ref.momentum, ref.affine, ref.track_running_stats,
        comm=comm, axis=ref.axis, dtype=ref.dtype, activation=ref.activation,
        nonfinite=ref.nonfinite, bias=ref.bias is not None or not ref.affine, **kwargs)
    sync.load_state_dict(ref.state_dict())
    return sync


def train_steps(verdicts, case, *, layout="NCHW", dtype=np.float32, sizes="empty", steps=3,
                reduction=None, make="construct", count_calls=False, nonfinite_at=None,
                channels=C, use_out=False, fortran=False, **layer_kwargs):
    """Forward + backward ``steps`` times on a SyncBatchNorm and on the
    single-process reference, checking after each step; returns this rank's
    outputs (a list per step) for cross-case comparisons.

    ``nonfinite_at``: (rank, value) puts ``value`` into channel 1 of one of
    that rank's rows at the second step; ``use_out``: forward writes into a
    preallocated ``out``; ``fortran``: the local batch in Fortran order."""
    comm = verdicts.comm
    rank, size = verdicts.rank, verdicts.size
    sizes = sizes_for(sizes, size)
    ref = cbn.BatchNorm(channels, axis=-1 if layout == "NHWC" else 1, dtype=dtype,
                        **layer_kwargs)
    ref.load_state_dict(random_state(ref, SEED))
    layer_comm = CountingComm(comm) if count_calls else comm
    sync = make_sync(ref, layer_comm, make, reduction)
    case.check(isinstance(sync, cbn.SyncBatchNorm) and isinstance(sync, cbn.BatchNorm),
               f"{type(sync).__name__} is not a SyncBatchNorm and BatchNorm")
    y_tol, dx_tol = Y_TOL[dtype], DX_TOL[dtype]
    outputs, worst = [], {"y": 0.0, "dx": 0.0, "grad_own": 0.0, "grad_sum": 0.0,
                          "stats": 0.0}
    calls = []
    for step in range(steps):
        xs = global_batches((SEED, step), layout, sizes, channels, dtype)
        full = np.concatenate(xs)
        if nonfinite_at is not None and step == 1:
            at, value = nonfinite_at
            if sizes[at]:
                index = [0] * full.ndim
                index[channel_axis(layout, full.ndim)] = 1
                # the rank's second row: the kernels shift by the first one
                index[0] = sum(sizes[:at]) + (sizes[at] > 1)
                full[tuple(index)] = value
                xs = split(full, sizes)
        dy_full = np.random.default_rng((SEED, step, 1)).standard_normal(
            full.shape).astype(dtype)
        dys = split(dy_full, sizes)
        rows = rows_of(rank, sizes)

        y_ref = ref(full)
        dx_ref = ref.backward(dy_full)
        x = np.asfortranarray(xs[rank]) if fortran else xs[rank]
        out = np.empty_like(xs[rank]) if use_out else None
        y, error = capture(sync, x, out)
        if use_out and error is None:
            case.check(y is out, "forward did not return out")
        if count_calls:
            forward_calls = layer_comm.take()
        dx = None
        if error is None:
            dx, error = capture(sync.backward, dys[rank])
        if count_calls:
            calls.append({"forward": forward_calls, "backward": layer_comm.take()})
        where = f"step {step}"
        if not case.check(error is None, f"{where}: {describe(error) if error else ''}"):
            # keep the harness's collectives in step on every rank
            y = dx = None
        outputs.append(y)
        if y is not None:
            case.check(y.dtype == xs[rank].dtype and y.shape == xs[rank].shape,
                       f"{where}: y has {y.dtype} {y.shape}, x {xs[rank].dtype} "
                       f"{xs[rank].shape}")
            e = excess(y, y_ref[rows], y_tol)
            worst["y"] = max(worst["y"], e)
            case.check(e <= 1, f"{where}: output off by {e:.3g} x the bound")
            e = excess(dx, dx_ref[rows], dx_tol)
            worst["dx"] = max(worst["dx"], e)
            case.check(e <= 1, f"{where}: input gradient off by {e:.3g} x the bound")

        # gradients of weight and bias: this rank's own part, and their sum
        mean, var, axes = global_moments(full, layout)
        mask_local = (y > 0) if (y is not None and ref.activation) else 1.0
        mask_full = (y_ref > 0) if ref.activation else 1.0
        own_w, own_w_mag, own_b, own_b_mag = reference_grads(
            xs[rank], dys[rank], mean, var, ref.eps, mask_local, axes)
        _, all_w_mag, _, all_b_mag = reference_grads(full, dy_full, mean, var, ref.eps,
                                                     mask_full, axes)
        grads = None if y is None else (sync.grad_weight, sync.grad_bias)
        gathered = comm.allgather(grads)
        if grads is not None and ref.affine:
            gw, gb = grads
            case.check(gw is not None and gw.dtype == ref.dtype,
                       f"{where}: grad_weight is {gw!r}")
            case.check((gb is None) == (ref.bias is None),
                       f"{where}: grad_bias is {gb!r} (bias is {ref.bias!r})")
            parts = [(gw, own_w, own_w_mag, "grad_weight")]
            if gb is not None:
                parts.append((gb, own_b, own_b_mag, "grad_bias"))
            for got, want, magnitude, name in parts:
                e = excess_scaled(got, want, dx_tol, magnitude)
                worst["grad_own"] = max(worst["grad_own"], e)
                case.check(e <= 1, f"{where}: {name} (this rank's part) off by {e:.3g} x "
                                   "the bound")
            if all(g is not None and g[0] is not None for g in gathered):
                totals = [("grad_weight", sum(g[0].astype(np.float64) for g in gathered),
                           ref.grad_weight, all_w_mag)]
                if ref.grad_bias is not None and all(g[1] is not None for g in gathered):
                    totals.append(("grad_bias", sum(g[1].astype(np.float64)
                                                    for g in gathered),
                                   ref.grad_bias, all_b_mag))
                for name, total, want, magnitude in totals:
                    e = excess_scaled(total, want, dx_tol, magnitude)
                    worst["grad_sum"] = max(worst["grad_sum"], e)
                    case.check(e <= 1, f"{where}: {name} summed over ranks off the "
                                       f"single process's by {e:.3g} x the bound")
        elif grads is not None:
            case.check(sync.grad_weight is None and sync.grad_bias is None,
                       f"{where}: affine=False but gradients {grads!r}")

        # running statistics: the same bits everywhere, and the reference's
        bits = state_bits(sync)
        same, differ = same_on_all_ranks(comm, bits)
        case.check(same, f"{where}: state differs from rank 0's on ranks {differ}")
        case.check(sync.num_batches_tracked == ref.num_batches_tracked,
                   f"{where}: num_batches_tracked {sync.num_batches_tracked}, single "
                   f"process {ref.num_batches_tracked}")
        for key in ("running_mean", "running_var"):
            mine, want = getattr(sync, key), getattr(ref, key)
            if want is None:
                case.check(mine is None, f"{where}: {key} is {mine!r}, expected None")
                continue
            e = stats_excess(mine, want)
            worst["stats"] = max(worst["stats"], e)
            case.check(e <= 1, f"{where}: {key} {mine} vs single process {want}: "
                               f"{e:.3g} roundings apart")
        for key in ("weight", "bias"):
            mine, want = getattr(sync, key), getattr(ref, key)
            case.check((mine is None and want is None) or np.array_equal(mine, want),
                       f"{where}: {key} changed: {mine} vs {want}")
    case.values.update(worst=worst, sizes=sizes)
    if count_calls:
        case.values["calls"] = calls
    return outputs


def layer_case(**kwargs):
    def run(verdicts, name):
        with Case(verdicts, name) as case:
            train_steps(verdicts, case, **kwargs)
    return run


LAYER_CASES = [
    ("train/NCHW float32 empty rank", dict()),
    ("train/NCHW float64 empty rank", dict(dtype=np.float64)),
    ("train/NCHW float32 uneven", dict(sizes="uneven")),
    ("train/NHWC float32 empty rank", dict(layout="NHWC")),
    ("train/NHWC float64 empty last rank", dict(layout="NHWC", dtype=np.float64,
                                                sizes="empty_last")),
    ("train/NC float32 relu uneven", dict(layout="NC", sizes="uneven", activation="relu")),
    ("train/NC float64 relu momentum=None", dict(layout="NC", dtype=np.float64,
                                                 activation="relu", momentum=None)),
    ("train/NCL float32 momentum=None empty last", dict(layout="NCL", momentum=None,
                                                        sizes="empty_last")),
    ("train/NCHW float64 all ranks empty", dict(dtype=np.float64, sizes="all_empty")),
    ("train/NCHW float32 affine=False", dict(affine=False)),
    ("train/NHWC float32 bias=False relu", dict(layout="NHWC", bias=False,
                                                activation="relu")),
    ("train/NCHW float64 track_running_stats=False", dict(dtype=np.float64, sizes="uneven",
                                                          track_running_stats=False)),
    ("train/NCHW float32 eps=0.1 momentum=0.5", dict(eps=0.1, momentum=0.5)),
    ("nonfinite/NCHW float64 NaN on rank 0 propagate", dict(dtype=np.float64,
                                                         nonfinite_at=(0, np.nan),
                                                         sizes="uneven")),
    ("nonfinite/NCHW float32 NaN on last rank skip", dict(nonfinite="skip",
                                                      nonfinite_at=(-1, np.nan),
                                                      sizes="uneven")),
    ("nonfinite/NC float64 inf on rank 0 propagate", dict(layout="NC", dtype=np.float64,
                                                      nonfinite_at=(0, np.inf),
                                                      sizes="uneven")),
    ("nonfinite/NC float32 -inf on last rank skip", dict(layout="NC", nonfinite="skip",
                                                     nonfinite_at=(-1, -np.inf),
                                                     sizes="uneven")),
    ("train/NC float32 5000 channels (auto: allreduce at 4 ranks)",
     dict(layout="NC", channels=5000, sizes="uneven", steps=2)),
    ("train/NCHW float32 out= and Fortran-order input", dict(use_out=True, fortran=True)),
    ("train/NCHW float32 convert", dict(make="convert", activation="relu",
                                        momentum=0.3)),
    ("train/NHWC float64 convert momentum=None", dict(layout="NHWC", dtype=np.float64,
                                                      make="convert", momentum=None)),
]


def one_row_each(verdicts, name):
    """One row per rank of an (N, C) batch: locally one value per channel, but
    the global batch has as many as there are ranks."""
    if verdicts.size < 2:
        return
    with Case(verdicts, name) as case:
        train_steps(verdicts, case, layout="NC", sizes="one_row_each", dtype=np.float64)


def reductions_agree(layout, dtype, sizes):
    def run(verdicts, name):
        with Case(verdicts, name) as case:
            paths = {}
            for reduction in ("allgather", "allreduce", "auto"):
                before = len(case.problems)
                paths[reduction] = train_steps(verdicts, case, layout=layout, dtype=dtype,
                                               sizes=sizes, reduction=reduction)
                case.problems[before:] = [f"reduction={reduction!r}: {p}"
                                          for p in case.problems[before:]]
            bitwise = True
            for step, (a, b) in enumerate(zip(paths["allgather"], paths["allreduce"])):
                if a is None or b is None:
                    continue
                e = excess(a, b, Y_TOL[dtype])
                case.check(e <= 1, f"step {step}: the two paths' outputs differ by {e:.3g} "
                                   "x the bound")
                bitwise &= a.tobytes() == b.tobytes()
            case.values["paths_bitwise_equal"] = bitwise
    return run


def collectives(reduction, expected):
    """A training forward makes exactly one collective of its path (the
    layer given a duck-typed communicator with only the four methods)."""
    def run(verdicts, name):
        with Case(verdicts, name) as case:
            train_steps(verdicts, case, reduction=reduction, count_calls=True, steps=2)
            for step, calls in enumerate(case.values.get("calls", [])):
                case.check(calls["forward"] == {expected: 1},
                           f"step {step}: a training forward with reduction={reduction!r} "
                           f"made {calls['forward']}, expected one {expected}")
    return run


# ---------------------------------------------------------------------------
# Eval mode: no communication

def eval_running_stats(verdicts, name):
    with Case(verdicts, name) as case:
        rank = verdicts.rank
        ref = cbn.BatchNorm(C, dtype=np.float32, activation="relu")
        ref.load_state_dict(random_state(ref, SEED))
        guard = CountingComm(verdicts.comm)
        sync = make_sync(ref, guard, "construct", None)
        # a synchronized training step first: its running statistics are the
        # single process's; then eval mode must not communicate
        sizes = sizes_for("uneven", verdicts.size)
        xs = global_batches((SEED, 40), "NCHW", sizes, C, np.float32)
        ref(np.concatenate(xs))
        _, error = capture(sync, xs[rank])
        case.check(error is None, f"training step: {describe(error) if error else ''}")
        guard.take()
        ref.eval()
        sync.eval()
        guard.armed = True
        for form in ("fold", "freeze"):
            mine, error = capture(getattr(sync, form))
            want = getattr(ref, form)()
            if form == "freeze" and error is None:
                mine, want = mine(xs[rank]), want(xs[rank])
            case.check(error is None and all(np.array_equal(a, b) for a, b in zip(mine, want)),
                       f"{form}() in eval mode: {describe(error) if error else 'differs'}")
        # a different number of calls and batch size on every rank: any
        # collective would raise (armed) or hang
        for k in range(rank + 1):
            [x] = global_batches((SEED, rank, k), "NCHW", [rank + k + 1], C, np.float32)
            y, error = capture(sync, x)
            if not case.check(error is None, f"call {k}: {describe(error) if error else ''}"):
                break
            e = excess(y, ref(x), Y_TOL[np.float32])
            case.check(e <= 1, f"call {k}: eval output off the local BatchNorm's by {e:.3g}")
            dy = np.ones_like(x)
            dx, error = capture(sync.backward, dy)
            case.check(error is None and excess(dx, ref.backward(dy), DX_TOL[np.float32]) <= 1,
                       f"call {k}: eval backward {describe(error) if error else 'differs'}")
        case.check(not guard.calls, f"eval mode communicated: {dict(guard.calls)}")


def eval_batch_stats(verdicts, name):
    """track_running_stats=False: eval mode normalizes with the local batch's
    statistics, without communicating."""
    with Case(verdicts, name) as case:
        rank = verdicts.rank
        ref = cbn.BatchNorm(C, track_running_stats=False, dtype=np.float64, axis=-1)
        ref.load_state_dict(random_state(ref, SEED))
        guard = CountingComm(verdicts.comm)
        sync = make_sync(ref, guard, "construct", None)
        ref.eval()
        sync.eval()
        guard.armed = True
        for k in range(rank + 1):
            [x] = global_batches((SEED, rank, k), "NHWC", [rank + k + 1], C, np.float64)
            y, error = capture(sync, x)
            if not case.check(error is None, f"call {k}: {describe(error) if error else ''}"):
                break
            e = excess(y, ref(x), Y_TOL[np.float64])
            case.check(e <= 1, f"call {k}: output off the local batch statistics' by {e:.3g}")
            dy = np.random.default_rng((SEED, k)).standard_normal(x.shape)
            dx, error = capture(sync.backward, dy)
            case.check(error is None and excess(dx, ref.backward(dy), DX_TOL[np.float64]) <= 1,
                       f"call {k}: backward {describe(error) if error else 'differs'}")
            case.check(np.array_equal(sync.grad_weight, ref.grad_weight),
                       f"call {k}: grad_weight {sync.grad_weight} vs {ref.grad_weight}")
        case.check(not guard.calls, f"eval mode communicated: {dict(guard.calls)}")


# ---------------------------------------------------------------------------
# convert, pickling

SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "axis",
            "dtype", "activation", "nonfinite", "training")


def convert_and_pickle(verdicts, name):
    with Case(verdicts, name) as case:
        comm, rank = verdicts.comm, verdicts.rank
        ref = cbn.BatchNorm(C, 1e-3, 0.2, axis=-1, dtype=np.float64, activation="relu",
                            nonfinite="skip")
        ref.load_state_dict(random_state(ref, SEED))
        [x] = global_batches((SEED, 9), "NHWC", [4], C, np.float64)
        ref(x)
        ref.backward(np.ones_like(x))   # a local step: num_batches_tracked 1, gradients
        guard = CountingComm(comm)
        sync = cbn.SyncBatchNorm.convert(ref, comm=guard)
        case.check(type(sync) is cbn.SyncBatchNorm, f"convert made a {type(sync).__name__}")
        case.check(sync.comm is guard, f"convert's comm is {sync.comm!r}")
        for key in SETTINGS:
            case.check(getattr(sync, key) == getattr(ref, key),
                       f"convert: {key} {getattr(sync, key)!r} vs {getattr(ref, key)!r}")
        case.check(state_bits(sync) == state_bits(ref), "convert: state_dict differs")
        sync.running_mean[...] += 1
        case.check(not np.array_equal(sync.running_mean, ref.running_mean),
                   "convert shares running_mean with the original")
        sync.running_mean[...] -= 1

        # a converted BatchNorm2d keeps its rank check: 3-D input is refused on
        # every rank (all ranks here), with the same error
        sync2d = cbn.SyncBatchNorm.convert(cbn.BatchNorm2d(C), comm=comm)
        _, error = capture(sync2d, np.ones((2, C, 4), np.float32))
        case.check(isinstance(error, ValueError) and "4D" in str(error),
                   f"convert(BatchNorm2d) given 3-D input: {error!r}")
        same, differ = same_on_all_ranks(comm, str(error))
        case.check(same, f"the 3-D input's error differs on ranks {differ}")

        default = cbn.SyncBatchNorm(C)
        case.values["comm_of_comm_none"] = repr(default.comm)
        twin = pickle.loads(pickle.dumps(sync))
        case.check(type(twin) is cbn.SyncBatchNorm, f"unpickled a {type(twin).__name__}")
        for key in (*SETTINGS, "reduction"):
            case.check(getattr(twin, key) == getattr(sync, key),
                       f"pickle: {key} {getattr(twin, key)!r} vs {getattr(sync, key)!r}")
        case.check(state_bits(twin) == state_bits(sync), "pickle: state_dict differs")
        case.check(twin.comm is not guard, "pickle kept the communicator")
        case.values["comm_after_unpickling"] = repr(twin.comm)
        # the unpickled layer (COMM_WORLD) synchronizes: its step equals the
        # single process's on the global batch
        sizes = sizes_for("empty", verdicts.size)
        xs = global_batches((SEED, 10), "NHWC", sizes, C, np.float64)
        single = cbn.BatchNorm(C, 1e-3, 0.2, axis=-1, dtype=np.float64, activation="relu",
                               nonfinite="skip")
        single.load_state_dict(sync.state_dict())
        y_ref = single(np.concatenate(xs))
        y, error = capture(twin, xs[rank])
        if case.check(error is None, f"unpickled forward: {describe(error) if error else ''}"):
            e = excess(y, y_ref[rows_of(rank, sizes)], Y_TOL[np.float64])
            case.check(e <= 1, f"unpickled layer's output off by {e:.3g} x the bound")
            case.check(stats_excess(twin.running_var, single.running_var) <= 1,
                       "unpickled layer's running_var off the single process's")
        same, differ = same_on_all_ranks(comm, state_bits(twin))
        case.check(same, f"unpickled layers' states differ on ranks {differ}")


# ---------------------------------------------------------------------------
# batch_stats

def moments_checks(case, got, want, where):
    case.check(isinstance(got, cbn.Moments), f"{where}: returned {type(got).__name__}")
    if not isinstance(got, cbn.Moments):
        return
    case.check(got.count == want.count, f"{where}: count {got.count}, expected {want.count}")
    if want.count == 0:
        case.check(got.count == 0, f"{where}: count {got.count} for an empty batch")
        return
    std = np.sqrt(want.var())
    mean_bound = 1e-13 * (np.abs(want.mean) + std)
    var_bound = 1e-10 * want.var()   # 0 for one value per channel: exact
    mean_off = np.abs(got.mean - want.mean)
    var_off = np.abs(got.var() - want.var())
    with np.errstate(divide="ignore", invalid="ignore"):
        case.values.setdefault("worst", {})[where] = [
            float(np.max(np.where(mean_off == 0, 0, mean_off / mean_bound))),
            float(np.max(np.where(var_off == 0, 0, var_off / var_bound)))]
    case.check(np.all(mean_off <= mean_bound), f"{where}: mean {got.mean} vs {want.mean}")
    case.check(np.all(var_off <= var_bound), f"{where}: var {got.var()} vs {want.var()}")


def batch_stats_case(layout, dtype, sizes, offset=3.0, spread=1.0):
    def run(verdicts, name):
        with Case(verdicts, name) as case:
            comm, rank = verdicts.comm, verdicts.rank
            rank_sizes = sizes_for(sizes, verdicts.size)
            xs = global_batches((SEED, 20), layout, rank_sizes, C, dtype, offset, spread)
            axis = -1 if layout == "NHWC" else 1
            want = cbn.Moments.of(np.concatenate(xs), axis=axis)
            results = {}
            for reduction in (None, "allgather", "allreduce"):
                kwargs = {} if reduction is None else {"reduction": reduction}
                where = f"reduction={reduction or 'default'}"
                got, error = capture(cbn.distributed.batch_stats, xs[rank], comm, axis=axis,
                                     **kwargs)
                case.check(error is None, f"{where}: {describe(error) if error else ''}")
                packed = None if got is None else got.to_array()
                same, differ = same_on_all_ranks(comm, packed)
                case.check(same, f"{where}: moments differ from rank 0's on ranks {differ}")
                if got is not None:
                    moments_checks(case, got, want, where)
                    results[reduction] = got
            if "allgather" in results and "allreduce" in results:
                case.values["paths_bitwise_equal"] = bool(np.array_equal(
                    results["allgather"].to_array(), results["allreduce"].to_array()))
    return run


def batch_stats_one_value(verdicts, name):
    """A global batch of one value per channel has moments (count 1, M2 0),
    as Moments.of says; only training needs more than one."""
    with Case(verdicts, name) as case:
        sizes = [1] + [0] * (verdicts.size - 1)
        xs = global_batches((SEED, 21), "NC", sizes, C, np.float64)
        want = cbn.Moments.of(np.concatenate(xs))
        got, error = capture(cbn.distributed.batch_stats, xs[verdicts.rank], verdicts.comm)
        if case.check(error is None, f"{describe(error) if error else ''}"):
            moments_checks(case, got, want, "one value per channel")


# ---------------------------------------------------------------------------
# calibrate(comm=)

def calibrate_case(layout, dtype, empty_rank, mode="population", as_moments=False):
    """calibrate(data, mode=mode, comm=) on each rank's batches (or, with
    ``as_moments``, their Moments) against one calibrate on all batches."""
    def run(verdicts, name):
        with Case(verdicts, name) as case:
            comm, rank, size = verdicts.comm, verdicts.rank, verdicts.size
            axis = -1 if layout == "NHWC" else 1
            # rank k holds k % 3 + 1 batches of varying sizes (none on the
            # last rank when empty_rank), from one generator
            counts = [k % 3 + 1 for k in range(size)]
            if empty_rank and size > 1:
                counts[-1] = 0
            batches = []
            for owner, count in enumerate(counts):
                for j in range(count):
                    [x] = global_batches((SEED, 30, owner, j), layout, [2 + 3 * j + owner], C,
                                         dtype, offset=5.0)
                    batches.append((owner, x))
            mine = [x for owner, x in batches if owner == rank]
            everything = [x for _, x in batches]

            def fresh():
                layer = cbn.BatchNorm(C, axis=axis, dtype=dtype)
                layer.load_state_dict(random_state(layer, SEED))
                return layer

            ref, layer = fresh(), fresh()
            want = ref.calibrate(everything, mode=mode)
            if as_moments:
                local = cbn.Moments(C)
                for x in mine:
                    local.update(x, axis=axis)
                mine = local
            got, error = capture(layer.calibrate, mine, mode=mode, comm=comm)
            case.check(error is None, f"calibrate: {describe(error) if error else ''}")
            same, differ = same_on_all_ranks(comm, state_bits(layer))
            case.check(same, f"running statistics differ from rank 0's on ranks {differ}")
            packed = None if got is None else got.to_array()
            same, differ = same_on_all_ranks(comm, packed)
            case.check(same, f"returned moments differ from rank 0's on ranks {differ}")
            if got is None:
                return
            moments_checks(case, got, want, "returned moments")
            for key in ("running_mean", "running_var"):
                e = stats_excess(getattr(layer, key), getattr(ref, key))
                case.check(e <= 1, f"{key} {getattr(layer, key)} vs single process "
                                   f"{getattr(ref, key)}: {e:.3g} roundings apart")
            case.check(layer.num_batches_tracked == ref.num_batches_tracked,
                       f"num_batches_tracked {layer.num_batches_tracked} vs "
                       f"{ref.num_batches_tracked}")
            for key in ("weight", "bias"):
                case.check(np.array_equal(getattr(layer, key), getattr(ref, key)),
                           f"calibrate changed {key}")
    return run


CASES = [
    *((name, layer_case(**kwargs)) for name, kwargs in LAYER_CASES),
    ("train/NC float64 one row per rank", one_row_each),
    ("reduction/NCHW float32 empty rank", reductions_agree("NCHW", np.float32, "empty")),
    ("reduction/NHWC float64 uneven", reductions_agree("NHWC", np.float64, "uneven")),
    ("collectives/allgather", collectives("allgather", "Allgather")),
    ("collectives/allreduce", collectives("allreduce", "Allreduce")),
    ("collectives/auto (few ranks: allgather)", collectives("auto", "Allgather")),
    ("eval/running statistics, no communication", eval_running_stats),
    ("eval/track_running_stats=False, local batch statistics", eval_batch_stats),
    ("pickle/convert and pickle", convert_and_pickle),
    ("batch_stats/NC float64 offset 1e6 empty rank",
     batch_stats_case("NC", np.float64, "empty", offset=1e6)),
    ("batch_stats/NHWC float32 uneven", batch_stats_case("NHWC", np.float32, "uneven")),
    # |mean| / std about 1e6: the bound holds; far beyond (1e11), neither
    # Moments.of nor a merge of per-rank moments is within 1e-10 of the exact
    # variance, and the comparison would judge the reference's rounding
    ("batch_stats/NCHW float64 offset 1e4 spread 1e-2 empty last",
     batch_stats_case("NCHW", np.float64, "empty_last", offset=1e4, spread=1e-2)),
    ("batch_stats/NCHW float64 all empty", batch_stats_case("NCHW", np.float64, "all_empty")),
    ("batch_stats/NC float64 one value per channel", batch_stats_one_value),
    ("calibrate/NCHW float32", calibrate_case("NCHW", np.float32, False)),
    ("calibrate/NHWC float64 a rank without data", calibrate_case("NHWC", np.float64, True)),
    ("calibrate/NC float32 batch_average", calibrate_case("NC", np.float32, False,
                                                          mode="batch_average")),
    ("calibrate/NCHW float64 from Moments", calibrate_case("NCHW", np.float64, True,
                                                           as_moments=True)),
]

if __name__ == "__main__":
    run_cases(CASES)
