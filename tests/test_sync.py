"""SyncBatchNorm, cbn.distributed and calibrate(comm=) in one process: ranks
are threads sharing a duck-typed communicator (Allgather, Allreduce,
Get_rank, Get_size), which is all cbn may use. Real MPI ranks, the
all-reduce path and killed ranks: test_mpi.py."""
import pickle
import sys
import threading
from copy import deepcopy

import numpy as np
import pytest

import cbn
from cbn import distributed


class ThreadWorld:
    """Ranks as threads; collectives meet at a barrier."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots = [None] * size
        self.calls = []


class ThreadComm:
    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.world.size

    def _exchange(self, send):
        world = self.world
        world.slots[self.rank] = np.array(send, copy=True)
        world.barrier.wait()
        gathered = list(world.slots)
        world.barrier.wait()
        return gathered

    def Allgather(self, send, recv):
        self.world.calls.append("Allgather")
        recv[...] = np.stack(self._exchange(send)).reshape(recv.shape)

    def Allreduce(self, send, recv, op=None):
        assert op is None   # the merging operation needs real MPI
        self.world.calls.append("Allreduce")
        gathered = self._exchange(send)
        total = gathered[0].copy()
        for part in gathered[1:]:
            total += part
        recv[...] = total


class SilentComm(ThreadComm):
    """A communicator that must not be used."""

    def Allgather(self, send, recv):
        raise AssertionError("communicated")

    def Allreduce(self, send, recv, op=None):
        raise AssertionError("communicated")


def run_ranks(size, work):
    """work(comm) on every rank in its own thread; the list of results or
    exceptions, in rank order."""
    world = ThreadWorld(size)
    results = [None] * size

    def target(rank):
        try:
            results[rank] = work(ThreadComm(world, rank))
        except BaseException as error:   # reported to the test
            results[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a rank hung"
    return results


def split(x, sizes):
    return np.split(x, np.cumsum(sizes)[:-1])


def state_bytes(layer):
    return {key: value.tobytes() for key, value in layer.state_dict().items()}


def within_one_rounding(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.all(np.abs(a.astype(np.float64) - b) <= np.spacing(np.abs(b)))


CASES = [
    # dtype, axis, per-rank shape after N, sizes, activation
    (np.float32, 1, (3, 4, 5), (3, 0, 5, 2), None),
    (np.float64, 1, (3, 4, 5), (1, 4, 0, 3), "relu"),
    (np.float32, -1, (4, 5, 3), (2, 2, 7, 1), "relu"),
    (np.float64, -1, (6, 3), (5, 1, 1, 0), None),
]


@pytest.mark.parametrize("dtype, axis, shape, sizes, activation", CASES)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_training_steps_equal_one_process_on_the_whole_batch(ranks, dtype, axis, shape,
                                                             sizes, activation):
    sizes = sizes[:ranks] if ranks > 1 else (sum(sizes),)
    C = shape[0] if axis == 1 else shape[-1]
    rng = np.random.default_rng(ranks)
    steps = [((rng.standard_normal((sum(sizes),) + shape) * 3 + 20).astype(dtype),
              rng.standard_normal((sum(sizes),) + shape).astype(dtype)) for _ in range(3)]
    single = cbn.BatchNorm(C, axis=axis, dtype=dtype, activation=activation, momentum=None)
    expected = []
    for x, dy in steps:
        y = single(x)
        dx = single.backward(dy)
        expected.append((y, dx, single.grad_weight.copy(), single.grad_bias.copy(),
                         state_bytes(single), single.state_dict()))

    def work(comm):
        layer = cbn.SyncBatchNorm(C, axis=axis, dtype=dtype, activation=activation,
                                  momentum=None, comm=comm, reduction="allgather")
        out = []
        for x, dy in steps:
            rank = comm.Get_rank()
            y = layer(split(x, sizes)[rank])
            dx = layer.backward(split(dy, sizes)[rank])
            out.append((y, dx, layer.grad_weight, layer.grad_bias, state_bytes(layer),
                        layer.state_dict()))
        return out

    results = run_ranks(ranks, work)
    y_tol, dx_tol = (1e-6, 1e-5) if dtype == np.float32 else (1e-12, 1e-10)
    for k, (y, dx, grad_w, grad_b, _, state) in enumerate(expected):
        for rank, result in enumerate(results):
            assert not isinstance(result, BaseException), result
            got_y, got_dx = result[k][0], result[k][1]
            ref_y, ref_dx = split(y, sizes)[rank], split(dx, sizes)[rank]
            assert got_y.dtype == dtype and got_y.shape == ref_y.shape
            assert np.all(np.abs(got_y - ref_y) <= y_tol * (1 + np.abs(ref_y)))
            assert np.all(np.abs(got_dx - ref_dx) <= dx_tol * (1 + np.abs(ref_dx)))
            # every rank holds the same state bits
            assert result[k][4] == results[0][k][4]
        got = results[0][k][5]
        assert int(got["num_batches_tracked"]) == int(state["num_batches_tracked"]) == k + 1
        for key in ("running_mean", "running_var"):
            if dtype == np.float32:
                assert within_one_rounding(got[key], state[key]), key
            else:
                np.testing.assert_allclose(got[key], state[key], rtol=1e-12)
        grad_tol = 1e-5 if dtype == np.float32 else 1e-10
        for index, ref in ((2, grad_w), (3, grad_b)):
            total = sum(r[k][index].astype(np.float64) for r in results)
            assert np.all(np.abs(total - ref) <= grad_tol * (1 + np.abs(ref)))


def test_one_collective_each_way_per_step():
    def work(comm):
        layer = cbn.SyncBatchNorm(3, comm=comm)
        layer(np.ones((2, 3), np.float32) * comm.Get_rank())
        layer.backward(np.ones((2, 3), np.float32))

    world_calls = []

    def counted(comm):
        work(comm)
        world_calls.append(list(comm.world.calls))

    run_ranks(2, counted)
    # two ranks, each one Allgather and one Allreduce
    assert sorted(world_calls[0]) == ["Allgather"] * 2 + ["Allreduce"] * 2


def test_eval_modes_do_not_communicate():
    world = ThreadWorld(1)
    comm = SilentComm(world, 0)
    layer = cbn.SyncBatchNorm(3, comm=comm).eval()
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), cbn.BatchNorm(3).eval()(x))
    layer.backward(np.ones_like(x))
    batch = cbn.SyncBatchNorm(3, track_running_stats=False, comm=comm).eval()
    np.testing.assert_array_equal(batch(x), cbn.BatchNorm(3, track_running_stats=False)
                                  .eval()(x))


FAILURES = [
    # what rank 1 gets, the builtin type every rank raises, text of the reason
    (lambda: np.ones((2, 5), np.float32), ValueError, r"rank 1: ValueError: .*5"),
    (lambda: np.ones((2, 4), np.float64), TypeError,
     r"rank 1: TypeError: input dtype float64 differs"),
    (lambda: ["a", "b"], TypeError, r"rank 1: TypeError"),
    (lambda: np.full((2, 4), np.nan, np.float32), FloatingPointError,
     r"rank 1: FloatingPointError: batch statistics are not finite"),
]


@pytest.mark.parametrize("bad, error, text", FAILURES)
def test_one_bad_rank_raises_the_same_error_everywhere(bad, error, text):
    def work(comm):
        layer = cbn.SyncBatchNorm(4, comm=comm, nonfinite="raise")
        layer(np.ones((3, 4), np.float32) * np.arange(3)[:, None])   # one good step
        before = state_bytes(layer)
        x = bad() if comm.Get_rank() == 1 else np.ones((2, 4), np.float32)
        try:
            layer(x)
        except distributed.DistributedError as caught:
            return caught, state_bytes(layer) == before
        return None, None

    results = run_ranks(3, work)
    messages = set()
    for caught, unchanged in results:
        assert isinstance(caught, error) and isinstance(caught, distributed.DistributedError)
        assert list(caught.failures) == [1]
        assert unchanged
        messages.add(str(caught))
    assert len(messages) == 1
    assert __import__("re").search(text, messages.pop())


def test_a_global_batch_of_one_value_names_the_rank_holding_it():
    def work(comm):
        layer = cbn.SyncBatchNorm(2, comm=comm)
        rows = 1 if comm.Get_rank() == 2 else 0
        try:
            layer(np.ones((rows, 2), np.float32))
        except ValueError as caught:
            return caught, layer.num_batches_tracked
        return None

    for caught, tracked in run_ranks(3, work):
        assert isinstance(caught, distributed.DistributedError)
        assert list(caught.failures) == [2] and "1 value per channel" in str(caught)
        assert tracked == 0


def test_a_failed_eval_call_leaves_the_training_backward_synchronized():
    def data(rank):
        rng = np.random.default_rng(rank)
        return rng.standard_normal((4, 3)) + rank, rng.standard_normal((4, 3))

    def work(comm):
        layer = cbn.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        x, dy = data(comm.Get_rank())
        layer(x)
        layer.eval()
        with pytest.raises(ValueError):
            layer(np.ones((4, 5)))
        return layer.backward(dy)

    single = cbn.BatchNorm(3, dtype=np.float64)
    single(np.concatenate([data(rank)[0] for rank in range(2)]))
    expected = single.backward(np.concatenate([data(rank)[1] for rank in range(2)]))
    for rank, dx in enumerate(run_ranks(2, work)):
        assert not isinstance(dx, BaseException), dx
        np.testing.assert_allclose(dx, expected[4 * rank:4 * rank + 4], rtol=1e-10,
                                   atol=1e-12)


def test_an_empty_global_batch_counts_like_one_process():
    def work(comm):
        layer = cbn.SyncBatchNorm(2, comm=comm)
        y = layer(np.ones((0, 2), np.float32))
        return y.shape, layer.num_batches_tracked, state_bytes(layer)

    single = cbn.BatchNorm(2)
    single(np.ones((0, 2), np.float32))
    for shape, tracked, state in run_ranks(2, work):
        assert shape == (0, 2) and tracked == 1 and state == state_bytes(single)


def test_a_bad_gradient_on_one_rank_raises_everywhere():
    def work(comm):
        layer = cbn.SyncBatchNorm(3, comm=comm)
        x = np.random.default_rng(comm.Get_rank()).standard_normal((4, 3)).astype(np.float32)
        layer(x)
        dy = np.ones((5, 3), np.float32) if comm.Get_rank() == 0 else np.ones_like(x)
        try:
            layer.backward(dy)
        except ValueError as caught:
            return caught
        return None

    for caught in run_ranks(2, work):
        assert isinstance(caught, distributed.DistributedError)
        assert list(caught.failures) == [0] and "dy has shape (5, 3)" in str(caught)


def test_distributed_batch_stats():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((12, 3, 2)) * 1e-2 + 1e4
    sizes = (5, 0, 7)
    whole = cbn.Moments.of(x)
    results = run_ranks(3, lambda comm: distributed.batch_stats(
        split(x, sizes)[comm.Get_rank()], comm))
    for moments in results:
        assert moments.to_array().tobytes() == results[0].to_array().tobytes()
        assert moments.count == whole.count
        assert np.all(np.abs(moments.mean - whole.mean) <= 1e-13 * np.abs(whole.mean))
        np.testing.assert_allclose(moments.var(), whole.var(), rtol=1e-10)


def test_distributed_batch_stats_channel_mismatch():
    def work(comm):
        x = np.ones((2, 4 if comm.Get_rank() == 1 else 3))
        try:
            distributed.batch_stats(x, comm)
        except ValueError as caught:
            return caught
        return None

    for caught in run_ranks(2, work):
        assert isinstance(caught, distributed.DistributedError)
        assert "rank 1" in str(caught) and "4 channels" in str(caught)


def test_calibrate_over_ranks_equals_one_process():
    rng = np.random.default_rng(11)
    data = [(rng.standard_normal((n, 3, 2, 2)) + 7).astype(np.float32)
            for n in (4, 6, 1, 3, 5, 2)]
    for mode in ("population", "batch_average"):
        single = cbn.BatchNorm2d(3, dtype=np.float64)
        single.calibrate(data, mode=mode)

        def work(comm, mode=mode):
            layer = cbn.BatchNorm2d(3, dtype=np.float64)
            mine = data[comm.Get_rank() * 3:(comm.Get_rank() + 1) * 3]
            layer.calibrate(mine, mode=mode, comm=comm)
            return state_bytes(layer), layer.state_dict()

        results = run_ranks(2, work)
        assert results[0][0] == results[1][0]
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(results[0][1][key], single.state_dict()[key],
                                       rtol=1e-12)


def test_calibrate_bad_batch_on_one_rank():
    def work(comm):
        layer = cbn.BatchNorm(3)
        before = state_bytes(layer)
        data = [np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)] \
            if comm.Get_rank() == 1 else [np.ones((2, 3), np.float32)]
        try:
            layer.calibrate(data, comm=comm)
        except ValueError as caught:
            return caught, state_bytes(layer) == before
        return None

    for caught, unchanged in run_ranks(2, work):
        assert isinstance(caught, distributed.DistributedError) and unchanged
        assert "rank 1" in str(caught) and "batch 1" in str(caught)


def test_construction_convert_and_pickle():
    world = ThreadWorld(1)
    comm = ThreadComm(world, 0)
    layer = cbn.BatchNorm2d(3, momentum=0.2, activation="relu", dtype=np.float64)
    layer(np.random.default_rng(0).standard_normal((4, 3, 2, 2)))
    layer.eval()
    sync = cbn.SyncBatchNorm.convert(layer, comm=comm)
    assert isinstance(sync, cbn.BatchNorm) and sync.comm is comm
    assert state_bytes(sync) == state_bytes(layer) and not sync.training
    assert sync.momentum == 0.2 and sync.activation == "relu" and sync.dtype == np.float64
    with pytest.raises(ValueError, match="4D"):
        sync(np.ones((2, 3)))
    copy = pickle.loads(pickle.dumps(sync))
    assert state_bytes(copy) == state_bytes(sync) and copy._comm is None
    twin = deepcopy(sync)
    assert twin.comm is comm and state_bytes(twin) == state_bytes(sync)
    assert twin.running_mean is not sync.running_mean
    assert "comm" not in copy.__getstate__() and "_comm" not in copy.__getstate__()
    with pytest.raises(TypeError, match="Allgather"):
        cbn.SyncBatchNorm(3, comm=object())
    with pytest.raises(ValueError, match="reduction"):
        cbn.SyncBatchNorm(3, comm=comm, reduction="tree")
    with pytest.raises(TypeError, match="cbn.BatchNorm"):
        cbn.SyncBatchNorm.convert("layer")


def test_without_mpi4py_comm_none_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "cbn\[mpi\]"'):
        cbn.SyncBatchNorm(3)
    with pytest.raises(ImportError, match=r'pip install "cbn\[mpi\]"'):
        distributed.batch_stats(np.ones((2, 3)), None)


def test_running_var_ddof_over_ranks_and_through_convert():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 3)) + 2
    sizes = (4, 5)
    single = cbn.BatchNorm(3, dtype=np.float64, running_var_ddof=0)
    single(x)

    def work(comm):
        layer = cbn.SyncBatchNorm.convert(
            cbn.BatchNorm(3, dtype=np.float64, running_var_ddof=0), comm=comm)
        layer(split(x, sizes)[comm.Get_rank()])
        return layer.running_var_ddof, layer.running_var

    for ddof, running_var in run_ranks(2, work):
        assert ddof == 0
        np.testing.assert_allclose(running_var, single.running_var, rtol=1e-12)
    np.testing.assert_allclose(single.running_var, 0.9 + 0.1 * x.var(0), rtol=1e-13)
