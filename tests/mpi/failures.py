"""Nobody hangs: one rank's bad input makes every rank raise the same error.

    mpiexec -n 3 python -m mpi4py tests/mpi/failures.py --out /tmp/verdicts

For each case every rank checks that it raised; that the exception is a
``cbn.distributed.DistributedError`` and an instance of the builtin type the
failing rank's own error had (found by giving the same input to a plain
``cbn.BatchNorm`` on that rank); that its text names each failing rank
("rank K") with its reason; that ``failures`` and the text are the same on
every rank; and that its layer's state (state_dict bits, num_batches_tracked)
did not change. Then every rank takes a good step, which must match the
single-process reference: the communicator is still in step after a failure.
Needs at least two ranks.
"""
import numpy as np
from harness import (
    DX_TOL,
    Y_TOL,
    Case,
    capture,
    describe,
    excess,
    global_batches,
    random_state,
    rows_of,
    run_cases,
    same_on_all_ranks,
    state_bits,
)

import cbn
import cbn.distributed

C = 3
SEED = 20261202


def good_batch(rank, size, dtype, step, layout="NCHW"):
    sizes = [2 + k for k in range(size)]
    xs = global_batches((SEED, step), layout, sizes, C, dtype)
    return xs, sizes


def layers(dtype, **kwargs):
    """(plain reference, SyncBatchNorm over COMM_WORLD) with the same random
    state."""
    ref = cbn.BatchNorm(C, dtype=dtype, **kwargs)
    ref.load_state_dict(random_state(ref, SEED))
    sync = cbn.SyncBatchNorm(C, dtype=dtype, **kwargs)
    sync.load_state_dict(ref.state_dict())
    return ref, sync


def own_error(bad_x, dtype, layer_kwargs):
    """The error a plain BatchNorm with the same settings raises for ``bad_x``."""
    plain = cbn.BatchNorm(C, dtype=dtype, **layer_kwargs)
    _, error = capture(plain, bad_x)
    return error


def reason_of(error):
    """The part of a plain layer's message that does not name its class."""
    text = str(error)
    head = "BatchNorm("
    if text.startswith(head) and ") " in text:
        return text.split(") ", 1)[1]
    return text


def check_failure(case, comm, error, expected_type, bad_ranks, own, before, layer):
    """The checks every failure case makes on every rank."""
    rank = comm.Get_rank()
    case.check(error is not None, "no error was raised")
    failures = getattr(error, "failures", None)
    text = "" if error is None else str(error)
    case.values.update(type=None if error is None else
                       [c.__name__ for c in type(error).__mro__],
                       message=text, failures=failures)
    if error is not None:
        case.check(isinstance(error, cbn.distributed.DistributedError),
                   f"{type(error).__name__} is not a DistributedError: {error}")
        if expected_type is not None:
            case.check(isinstance(error, expected_type),
                       f"{type(error).__name__} is not a {expected_type.__name__}")
        case.check(isinstance(failures, dict) and all(isinstance(k, int) and
                                                      isinstance(v, str) and v
                                                      for k, v in failures.items()),
                   f"failures is {failures!r}, expected a dict {{rank: message}}")
        if bad_ranks is not None:
            case.check(isinstance(failures, dict) and set(failures) == set(bad_ranks),
                       f"failures names ranks {sorted(failures or {})}, expected "
                       f"{sorted(bad_ranks)}")
            for k in bad_ranks:
                case.check(f"rank {k}" in text, f"the message does not name rank {k}: {text}")
    # the failing ranks' own reasons appear in the message of every rank
    reasons = comm.allgather(None if own is None else reason_of(own))
    for k in bad_ranks or ():
        if reasons[k] is not None:
            case.check(reasons[k] in text,
                       f"the message lacks rank {k}'s reason {reasons[k]!r}: {text}")
            if isinstance(failures, dict) and k in failures:
                case.check(reasons[k] in failures[k],
                           f"failures[{k}] = {failures[k]!r} lacks {reasons[k]!r}")
    same, differ = same_on_all_ranks(comm, (text, failures, type(error).__name__))
    case.check(same, f"the error differs from rank 0's on ranks {differ}")
    case.check(state_bits(layer) == before, f"rank {rank}'s layer state changed")


def good_step_after(case, comm, ref, sync, dtype, step, layout="NCHW"):
    """Every rank's good step after the failure matches the single process."""
    rank, size = comm.Get_rank(), comm.Get_size()
    xs, sizes = good_batch(rank, size, dtype, step, layout)
    full = np.concatenate(xs)
    y_ref = ref(full)
    dx_ref = ref.backward(np.ones_like(full))
    y, error = capture(sync, xs[rank])
    if case.check(error is None, f"good step after the failure: "
                                 f"{describe(error) if error else ''}"):
        dx, error = capture(sync.backward, np.ones_like(xs[rank]))
        case.check(error is None and excess(y, y_ref[rows_of(rank, sizes)], Y_TOL[dtype]) <= 1
                   and excess(dx, dx_ref[rows_of(rank, sizes)], DX_TOL[dtype]) <= 1,
                   "the good step after the failure is off the single process's")
    same, differ = same_on_all_ranks(comm, state_bits(sync))
    case.check(same, f"after the good step, states differ on ranks {differ}")


def forward_failure(bad_input, bad_ranks_of, expected_type, *, layout="NCHW",
                    dtype=np.float32, rank_named=True, **layer_kwargs):
    """A case: ranks ``bad_ranks_of(size)`` call forward with
    ``bad_input(x, rank)``, the others with their good batch.

    ``expected_type``: the builtin type, or "own" for the failing rank's own
    error's type; ``rank_named``: whether the failures must be exactly the
    bad ranks (a dtype mismatch or a one-value global batch has no single
    culprit by construction)."""
    def run(verdicts, name):
        comm, rank, size = verdicts.comm, verdicts.rank, verdicts.size
        bad_ranks = sorted({k % size for k in bad_ranks_of(size)})
        with Case(verdicts, name) as case:
            case.values["bad_ranks"] = bad_ranks
            ref, sync = layers(dtype, axis=-1 if layout == "NHWC" else 1, **layer_kwargs)
            # one good step first: state that is not the initial one
            xs, sizes = good_batch(rank, size, dtype, 0, layout)
            ref(np.concatenate(xs))
            _, error = capture(sync, xs[rank])
            case.check(error is None, f"the first good step: {describe(error) if error else ''}")
            before = state_bits(sync)
            xs, sizes = good_batch(rank, size, dtype, 1, layout)
            x = bad_input(xs[rank], rank) if rank in bad_ranks else xs[rank]
            own = own_error(x, dtype, dict(axis=sync.axis, **layer_kwargs)) \
                if rank in bad_ranks else None
            kinds = comm.allgather(None if own is None else type(own))
            want = expected_type
            if expected_type == "own":
                found = [kinds[k] for k in bad_ranks if kinds[k] is not None]
                want = found[0] if found else None
                case.check(want is not None, "no failing rank's own BatchNorm refused "
                                             "its input (the case is broken)")
            _, error = capture(sync, x)
            case.values["own_errors"] = [k and k.__name__ for k in kinds]
            check_failure(case, comm, error, want, bad_ranks if rank_named else None,
                          own, before, sync)
            good_step_after(case, comm, ref, sync, dtype, 2, layout)
    return run


def backward_failure(verdicts, name):
    """A wrong gradient shape on the last rank: every rank's backward raises;
    then a good backward of the same forward works on every rank."""
    comm, rank, size = verdicts.comm, verdicts.rank, verdicts.size
    with Case(verdicts, name) as case:
        ref, sync = layers(np.float64)
        xs, sizes = good_batch(rank, size, np.float64, 0)
        full = np.concatenate(xs)
        ref(full)
        dx_ref = ref.backward(np.ones_like(full))
        _, error = capture(sync, xs[rank])
        case.check(error is None, f"forward: {describe(error) if error else ''}")
        before = state_bits(sync)
        bad = rank == size - 1
        dy = np.ones(xs[rank].shape[:-1] + (xs[rank].shape[-1] + 1,)) if bad \
            else np.ones_like(xs[rank])
        _, error = capture(sync.backward, dy)
        plain = cbn.BatchNorm(C, dtype=np.float64)
        plain(xs[rank])
        _, own = capture(plain.backward, dy) if bad else (None, None)
        kinds = comm.allgather(None if own is None else type(own))
        check_failure(case, comm, error, kinds[size - 1] or ValueError, [size - 1], own,
                      before, sync)
        dx, error = capture(sync.backward, np.ones_like(xs[rank]))
        case.check(error is None and excess(dx, dx_ref[rows_of(rank, sizes)],
                                            DX_TOL[np.float64]) <= 1,
                   "a good backward after the failed one is off the single process's: "
                   f"{describe(error) if error else ''}")


def with_nan(x, rank):
    x = x.copy()
    x.flat[0] = np.nan
    return x


def with_inf(x, rank):
    x = x.copy()
    x.flat[-1] = np.inf
    return x


def extra_channel(x, rank):
    return np.concatenate([x, x[:, :1]], axis=1)


CASES = [
    ("fail/wrong channel count on the last rank",
     forward_failure(extra_channel, lambda size: [size - 1], ValueError)),
    ("fail/wrong channel count on the first and last ranks",
     forward_failure(extra_channel, lambda size: [0, size - 1], ValueError)),
    ("fail/list of strings on rank 1",
     forward_failure(lambda x, rank: ["a", "b", "c"], lambda size: [1], TypeError)),
    ("fail/1-D input on rank 0",
     forward_failure(lambda x, rank: np.ones(3, x.dtype), lambda size: [0], "own")),
    ("fail/NaN on rank 0 under nonfinite='raise'",
     forward_failure(with_nan, lambda size: [0], FloatingPointError, nonfinite="raise")),
    ("fail/inf on the last rank under nonfinite='raise', float64 NHWC",
     forward_failure(with_inf, lambda size: [size - 1], FloatingPointError,
                     layout="NHWC", dtype=np.float64, nonfinite="raise")),
    ("fail/float64 input on the last rank, float32 elsewhere",
     forward_failure(lambda x, rank: x.astype(np.float64), lambda size: [size - 1], None,
                     rank_named=False)),
]


def one_value_per_channel(verdicts, name):
    """(N, C) batches: one row on rank 0, none elsewhere. Each rank alone is
    fine; the global batch has one value per channel: ValueError everywhere."""
    comm, rank, size = verdicts.comm, verdicts.rank, verdicts.size
    with Case(verdicts, name) as case:
        ref, sync = layers(np.float32)
        xs = global_batches((SEED, 5), "NC", [4] * size, C, np.float32)
        ref(np.concatenate(xs))
        capture(sync, xs[rank])
        before = state_bits(sync)
        xs = global_batches((SEED, 6), "NC", [1] + [0] * (size - 1), C, np.float32)
        plain = cbn.BatchNorm(C)
        _, single = capture(plain, np.concatenate(xs))
        case.check(isinstance(single, ValueError), f"the single process gave {single!r}")
        _, error = capture(sync, xs[rank])
        check_failure(case, comm, error, ValueError, None, None, before, sync)
        good_step_after(case, comm, ref, sync, np.float32, 7)


CASES += [
    ("fail/a global batch of one value per channel", one_value_per_channel),
    ("fail/wrong gradient shape in backward on the last rank", backward_failure),
]

if __name__ == "__main__":
    run_cases(CASES)
