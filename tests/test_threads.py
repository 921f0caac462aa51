"""Thread count: results bit-identical for any count, and the count's API."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cbn

from corpus import make_input

# Large enough to be split across threads in both kernel walks. Odd sizes put
# the cuts of elementwise passes (one share per thread) inside channel runs.
THREADED_LAYOUTS = [((64, 16, 16, 16), 1), ((4096, 96), 1), ((8, 24, 24, 64), -1),
                    ((3, 2, 70000), 1), ((40, 24, 300), 1), ((51, 7, 101), 1),
                    ((3, 7, 2001), 1), ((333, 101), 1)]


def run_all_kernels(x, dy, axis, weight, bias):
    num_channels = x.shape[axis]
    y, mean, invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    stats = cbn.batch_stats(x, axis=axis)
    grads = cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    eval_grads = cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                         training=False)
    running = [np.zeros(num_channels), np.ones(num_channels)]
    y_eval = cbn.batch_norm(x, *running, weight, bias, axis=axis)
    y_train = cbn.batch_norm(x, *running, weight, bias, training=True, axis=axis)
    return [y, mean, invstd, *stats, *grads, *eval_grads, y_eval, y_train, *running]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", THREADED_LAYOUTS)
def test_bit_identical_for_one_and_more_threads(rng, restore_threads, shape, axis, dtype,
                                                threads):
    x = make_input(rng, shape, axis, dtype, offset=100.0)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 2, shape[axis])
    bias = rng.uniform(-1, 1, shape[axis])
    cbn.set_num_threads(1)
    serial = run_all_kernels(x, dy, axis, weight, bias)
    cbn.set_num_threads(threads)
    parallel = run_all_kernels(x, dy, axis, weight, bias)
    for a, b in zip(serial, parallel):
        assert a.tobytes() == b.tobytes()


def test_set_and_get_num_threads(restore_threads):
    cbn.set_num_threads(3)
    assert cbn.get_num_threads() == 3
    cbn.set_num_threads(None)
    assert cbn.get_num_threads() >= 1


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError),
                                        ("2", TypeError), (1.5, TypeError),
                                        (True, TypeError)])
def test_set_num_threads_rejects(restore_threads, bad, error):
    cbn.set_num_threads(2)
    with pytest.raises(error, match="set_num_threads"):
        cbn.set_num_threads(bad)
    assert cbn.get_num_threads() == 2


def _threads_in_child(env):
    out = subprocess.run(
        [sys.executable, "-c", "import cbn; print(cbn.get_num_threads())"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
        cwd=os.path.dirname(__file__))
    return int(out.stdout)


def test_default_follows_omp_num_threads():
    from cbn._dispatch import kernels as _kernels
    if not _kernels.threads_enabled():
        pytest.skip("serial build: OMP_NUM_THREADS has nothing to set")
    assert _threads_in_child(dict(os.environ, OMP_NUM_THREADS="3")) == 3
    assert _threads_in_child(dict(os.environ, OMP_NUM_THREADS="5,2")) == 5


def test_default_without_omp_num_threads_is_the_cpus_this_process_may_use():
    from cbn._threads import default_num_threads
    assert default_num_threads({}) == len(os.sched_getaffinity(0))
    assert default_num_threads({"OMP_NUM_THREADS": "0"}) == len(os.sched_getaffinity(0))
    assert default_num_threads({"OMP_NUM_THREADS": "many"}) == len(os.sched_getaffinity(0))
    assert default_num_threads({"OMP_NUM_THREADS": "100000"}) == 256


def test_threadpool_limits_overrides_set_num_threads_and_restores_it(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cbn._dispatch import kernels as _kernels
    if not _kernels.threads_enabled():
        pytest.skip("serial build: no threads to limit")
    cbn.set_num_threads(2)
    info = [lib for lib in threadpoolctl.threadpool_info() if lib["internal_api"] == "cbn"]
    assert len(info) == 1 and info[0]["num_threads"] == 2
    assert info[0]["user_api"] == "openmp"
    with threadpoolctl.threadpool_limits(1):
        assert cbn.get_num_threads() == 1
    assert cbn.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert cbn.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert cbn.get_num_threads() == 2
    assert cbn.get_num_threads() == 2


def test_many_pooled_calls_give_the_serial_bits(rng, restore_threads):
    # Jobs of every kind (reductions, elementwise shares, fused channels)
    # back to back, so that helpers join late, early and in between.
    cases = [((256, 1024), 1), ((8, 64, 28, 28), 1), ((64, 512, 8), 1),
             ((32, 28, 28, 64), -1)]
    for shape, axis in cases:
        x = make_input(rng, shape, axis, np.float32)
        dy = make_input(rng, shape, axis, np.float32)
        cbn.set_num_threads(1)
        y1, mean, invstd = cbn.batch_norm_forward(x, axis=axis)
        dx1 = cbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
        cbn.set_num_threads(2)
        for _ in range(50):
            y2 = cbn.batch_norm_forward(x, axis=axis)[0]
            dx2 = cbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
            assert y2.tobytes() == y1.tobytes()
            assert dx2.tobytes() == dx1.tobytes()


def test_thread_count_above_the_cap_is_rejected(restore_threads):
    from cbn._threads import MAX_THREADS
    with pytest.raises(ValueError, match=str(MAX_THREADS)):
        cbn.set_num_threads(MAX_THREADS + 1)


def test_more_threads_than_work_units_gives_the_same_result(rng, restore_threads):
    x = make_input(rng, (64, 8, 64), 1, np.float32)
    cbn.set_num_threads(1)
    serial = cbn.batch_norm_forward(x)[0]
    cbn.set_num_threads(64)
    assert cbn.batch_norm_forward(x)[0].tobytes() == serial.tobytes()


FORK_CHILD = """
import multiprocessing as mp, numpy as np, cbn
x = np.random.default_rng(0).standard_normal((256, 64, 64)).astype(np.float32)
cbn.set_num_threads(2)
cbn.batch_norm_forward(x)            # the parent starts its thread pool
def child(queue):
    queue.put(float(cbn.batch_norm_forward(x)[0].sum()))
ctx = mp.get_context("fork")
queue = ctx.Queue()
p = ctx.Process(target=child, args=(queue,))
p.start()
print(queue.get(timeout=60))
p.join(60)
"""


def test_a_forked_child_does_not_hang():
    out = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert abs(float(out.stdout)) < 1.0   # a normalized batch sums to ~0


def test_python_threads_calling_at_once_get_their_own_results(rng, restore_threads):
    # The kernels release the GIL and share one kept scratch block between
    # calls (cbn/_scratch.h): concurrent calls of different sizes must each
    # get the results of a call made alone.
    from concurrent.futures import ThreadPoolExecutor
    cbn.set_num_threads(1)
    shapes = [(512, 96), (64, 8, 3), (300, 40, 7), (40, 24, 300), (1000, 33)]
    xs = [make_input(rng, shape, 1, np.float32, offset=10.0) for shape in shapes]
    dys = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]

    def step(i):
        y, mean, invstd = cbn.batch_norm_forward(xs[i])
        return [y, mean, invstd, *cbn.batch_norm_backward(dys[i], xs[i], mean, invstd)]

    alone = [step(i) for i in range(len(xs))]
    calls = [i % len(xs) for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(step, calls))
    for i, results in zip(calls, together):
        for a, b in zip(alone[i], results):
            assert a.tobytes() == b.tobytes()


def _eval_layers(rng, num_features, relu):
    layer = cbn.BatchNorm(num_features, activation="relu" if relu else None)
    layer.weight[...] = rng.uniform(0.5, 2.0, num_features)
    layer.bias[...] = rng.standard_normal(num_features)
    layer.running_mean[...] = rng.standard_normal(num_features)
    layer.running_var[...] = rng.uniform(0.5, 2.0, num_features)
    layer.eval()
    return layer, layer.freeze()


@pytest.mark.parametrize("relu", [False, True])
def test_four_threads_sharing_eval_and_frozen_layers_get_the_serial_results(rng, relu):
    # Many small calls (as in an inference pipeline) and a few that the kernels
    # split themselves, on one shared eval layer and its frozen form, some
    # writing into per-thread out= buffers: every result must be the bits of
    # the same call made alone.
    from concurrent.futures import ThreadPoolExecutor
    layer, frozen = _eval_layers(rng, 24, relu)
    shapes = [(1, 24), (32, 24), (7, 24, 5, 5), (256, 24, 4, 4), (64, 24, 40)]
    xs = [make_input(rng, shape, 1, np.float32, offset=3.0) for shape in shapes]
    alone = {(which, i): np.array(model(x))
             for which, model in (("layer", layer), ("frozen", frozen))
             for i, x in enumerate(xs)}

    def run(thread):
        buffers = [np.empty_like(x) for x in xs]
        results = []
        for k in range(300):
            i = (k + thread) % len(xs)
            which = "layer" if k % 2 else "frozen"
            model = layer if which == "layer" else frozen
            out = buffers[i] if k % 3 == 0 else None
            y = model(xs[i], out=out)
            assert out is None or y is out
            results.append(((which, i), y.tobytes()))
        return results

    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(run, range(4)):
            for key, got in results:
                assert got == alone[key].tobytes(), key


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_forwards_from_several_threads_never_lose_an_update(rng, momentum):
    # Every thread trains the one layer on the same batch, so the running
    # statistics after K updates do not depend on the order, only on K: an
    # update lost between reading and writing them (two calls reading the same
    # old values while the kernel runs without the GIL) would change them.
    from concurrent.futures import ThreadPoolExecutor
    switch = sys.getswitchinterval()
    x = make_input(rng, (512, 32, 4), 1, np.float64, offset=5.0)
    calls_per_thread, threads = 60, 4
    serial = cbn.BatchNorm(32, momentum=momentum, dtype=np.float64)
    for _ in range(calls_per_thread * threads):
        serial(x)
    shared = cbn.BatchNorm(32, momentum=momentum, dtype=np.float64)
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: [shared(x) for _ in range(calls_per_thread)],
                          range(threads)))
    finally:
        sys.setswitchinterval(switch)
    assert shared.num_batches_tracked == calls_per_thread * threads
    assert shared.running_mean.tobytes() == serial.running_mean.tobytes()
    assert shared.running_var.tobytes() == serial.running_var.tobytes()


@pytest.mark.parametrize("call", ["eval", "frozen", "train", "backward", "function"])
def test_kernels_release_the_gil(rng, restore_threads, call):
    # The other thread signals just before a call that takes tens of
    # milliseconds, writing into ``out`` (NaN beforehand) front to back on one
    # thread. This thread needs the GIL to return from wait(): a kernel that
    # held it would be finished by then, its last element written.
    import threading
    cbn.set_num_threads(1)
    layer, frozen = _eval_layers(rng, 64, False)
    x = rng.standard_normal((8192, 64, 16)).astype(np.float32)   # 32 MiB
    dy = np.ones_like(x)
    out = np.full_like(x, np.nan)
    mean, invstd = np.zeros(64), np.ones(64)
    calls = {"eval": lambda: layer(x, out=out), "frozen": lambda: frozen(x, out=out),
             "train": lambda: layer.train()(x, out=out),
             "backward": lambda: cbn.batch_norm_backward(dy, x, mean, invstd, out=out),
             "function": lambda: cbn.batch_norm(x, layer.running_mean,
                                                layer.running_var, out=out)}
    starting = threading.Event()

    def worker():
        starting.set()
        calls[call]()

    thread = threading.Thread(target=worker)
    thread.start()
    starting.wait()
    last_written = not np.isnan(out.flat[-1])
    thread.join()
    assert not np.isnan(out.flat[-1])
    assert not last_written


FLUSH_DENORMAL_CHILD = """
import numpy as np, torch, cbn
x = (1e-9 * np.random.default_rng(0).standard_normal((512, 4096))).astype(np.float32)
c = x.shape[1]
args = (np.zeros(c), np.ones(c), np.full(c, 1e-30), np.zeros(c))  # y near 1e-39
cbn.set_num_threads(2)
cbn.batch_norm(x, *args)             # the helpers start, in the default mode
torch.set_flush_denormal(True)       # flush-to-zero on this thread only
cbn.set_num_threads(1)
serial = cbn.batch_norm(x, *args)
cbn.set_num_threads(2)
pooled = [cbn.batch_norm(x, *args) for _ in range(5)]
print(int((serial == 0).all()), int(all(p.tobytes() == serial.tobytes() for p in pooled)))
"""


def test_helpers_take_on_the_callers_floating_point_mode():
    # With flush-to-zero on the calling thread, denormal outputs are 0 there;
    # the helpers must compute the same, whatever mode they started with.
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-c", FLUSH_DENORMAL_CHILD], capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
