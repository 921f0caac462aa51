"""Concurrency: many Python threads at once, results equal
to the serial ones.

tests/test_threads.py has four threads on one shared eval/frozen layer and
the lost-update test for a shared training layer; this file adds:

- ``WORKERS`` threads each training its own layer (forward, backward, an SGD
  step; every layout, dtype, ReLU, cumulative momentum) while also calling a
  shared eval layer, a shared frozen layer and the functions, under
  ``sys.setswitchinterval(1e-6)``, with another thread flipping
  ``cbn.set_num_threads`` through 1, 2, 3 and None the whole time: every
  output, gradient and the final state equal, bit for bit, those of the same
  steps run serially;
- every kernel on layouts the kernels split across threads, from several
  threads while the thread count flips, against a one-thread serial run;
- a shared eval layer whose parameters the main thread edits between rounds:
  all threads rebuild and use its cached parameters at once and get the
  serial results.

Calls are counted in ``CALLS`` (printed with ``pytest -s``).
"""
import hashlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

import cbn

WORKERS = 8
STEPS = 48
CALLS = {}


def digest(array):
    array = np.asarray(array)
    return (array.dtype.str, array.shape,
            hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest())


@contextmanager
def fast_switching():
    """The GIL changes hands every microsecond, so Python threads interleave
    between any two bytecodes of cbn's Python layer."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextmanager
def flipping_thread_count():
    """A thread that sets the kernels' thread count to 1, 2, 3 and None in
    turn until the block ends; yields a dict that gets the number of flips."""
    stop = threading.Event()
    result = {}

    def flip():
        flips = 0
        try:
            while not stop.is_set():
                cbn.set_num_threads((1, 2, 3, None)[flips % 4])
                flips += 1
                time.sleep(0)
        finally:
            result["flips"] = flips

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        cbn.set_num_threads(None)


def run_threads(function, count):
    """``function(k)`` for k in range(count), each in its own thread, started
    together; returns the results in order (re-raising a thread's error)."""
    barrier = threading.Barrier(count)

    def start(k):
        barrier.wait()
        return function(k)

    with ThreadPoolExecutor(count) as pool:
        return [future.result() for future in [pool.submit(start, k) for k in range(count)]]


# ---------------------------------------------------------------------------
# Training layers of their own, shared eval and frozen layers, the functions

SHARED_C = 16
# Each worker's layer: (shape, channel axis, input dtype, layer kwargs). Sizes
# of 32768 elements or more are split across the kernels' threads.
WORKER_LAYERS = [
    ((32, 16, 64), 1, np.float32, {}),
    ((8, 24), 1, np.float32, {}),
    ((16, 8, 8, 32), -1, np.float32, {"axis": -1}),
    ((64, 12, 48), 1, np.float64, {"dtype": np.float64, "activation": "relu"}),
    ((6, 5, 7), 1, np.float32, {"momentum": None}),
    ((4096, 10), 1, np.float32, {"activation": "relu"}),
    ((2, 3, 4, 5, 6), 1, np.float64, {}),
    ((512, 7, 3), 1, np.float32, {"momentum": None, "dtype": np.float64}),
]


def shared_layers():
    rng = np.random.default_rng(11)
    layer = cbn.BatchNorm(SHARED_C)
    layer.weight[...] = rng.uniform(0.5, 2, SHARED_C)
    layer.bias[...] = rng.standard_normal(SHARED_C)
    layer.running_mean[...] = rng.standard_normal(SHARED_C)
    layer.running_var[...] = rng.uniform(0.5, 2, SHARED_C)
    layer.eval()
    return layer, layer.freeze()


def worker_data(k):
    """Worker k's batches: its layer's inputs and gradients, and inputs for
    the shared layers and the functions, small and large in turn."""
    shape, axis, dtype, _ = WORKER_LAYERS[k]
    rng = np.random.default_rng(100 + k)
    steps = []
    for step in range(STEPS):
        shared_shape = (64, SHARED_C, 40) if (step + k) % 3 == 0 else (5, SHARED_C)
        steps.append({
            "x": (3.0 + rng.standard_normal(shape)).astype(dtype),
            "dy": rng.standard_normal(shape).astype(dtype),
            "shared": rng.standard_normal(shared_shape).astype(np.float32),
            "function": rng.standard_normal((48, 6, 128) if step % 4 == 0 else (9, 6))
                           .astype(dtype),
        })
    return steps


def worker(k, data, shared, frozen):
    """Worker k's steps; returns the digests of everything they produce."""
    shape, axis, dtype, kwargs = WORKER_LAYERS[k]
    layer = cbn.BatchNorm(shape[axis], **kwargs)
    out = np.empty((64, SHARED_C, 40), np.float32)
    results, calls = [], 0
    for step in data:
        y = layer(step["x"])
        dx = layer.backward(step["dy"])
        layer.weight -= 0.01 * layer.grad_weight
        layer.bias -= 0.01 * layer.grad_bias
        results += [digest(y), digest(dx), digest(layer.grad_weight), digest(layer.grad_bias)]

        xs = step["shared"]
        buffer = out if xs.shape == out.shape else None
        results.append(digest(shared(xs)))
        results.append(digest(frozen(xs, out=buffer)))
        results.append(digest(frozen.backward(xs)))
        results += [digest(a) for a in shared.fold()]

        xf = step["function"]
        yf, mean, invstd = cbn.batch_norm_forward(xf)
        grads = cbn.batch_norm_backward(xf, xf, mean, invstd)
        results += [digest(yf), digest(mean), digest(invstd)] + [digest(g) for g in grads]
        results += [digest(a) for a in cbn.batch_stats(xf)]
        calls += 9   # cbn calls in this step
    layer.eval()
    results += [digest(layer(data[-1]["x"]))]
    results += [digest(a) for a in layer.state_dict().values()]
    return results, calls + 2


def test_threads_training_own_layers_and_sharing_eval_layers_get_serial_results(
        restore_threads):
    shared, frozen = shared_layers()
    data = [worker_data(k) for k in range(WORKERS)]
    serial = [worker(k, data[k], shared, frozen) for k in range(WORKERS)]

    with fast_switching(), flipping_thread_count() as flipped:
        together = run_threads(lambda k: worker(k, data[k], shared, frozen), WORKERS)
    for k in range(WORKERS):
        assert together[k][0] == serial[k][0], f"worker {k} ({WORKER_LAYERS[k]})"
    calls = sum(count for _, count in together)
    CALLS["own training layers + shared eval/frozen"] = (WORKERS, calls, flipped["flips"])
    print(f"\n{WORKERS} threads x {calls // WORKERS} calls, thread count flipped "
          f"{flipped['flips']} times")
    assert flipped["flips"] > 0


# ---------------------------------------------------------------------------
# Every kernel on split layouts while the thread count flips

SPLIT_LAYOUTS = [((64, 16, 16, 16), 1), ((4096, 96), 1), ((8, 24, 24, 64), -1),
                 ((3, 2, 70000), 1), ((40, 24, 300), 1), ((333, 101), 1)]
ROUNDS = 4


def all_kernels(x, dy, axis, weight, bias, layer, frozen):
    num_channels = x.shape[axis]
    y, mean, invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    running = [np.zeros(num_channels), np.ones(num_channels)]
    results = [y, mean, invstd, *cbn.batch_stats(x, axis=axis),
               *cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis),
               *cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                        training=False),
               cbn.batch_norm(x, *running, weight, bias, axis=axis),
               cbn.batch_norm(x, *running, weight, bias, training=True, axis=axis,
                              activation="relu"),
               *running, layer(x), layer.backward(dy), frozen(x), frozen.backward(dy)]
    return [digest(a) for a in results]


def split_case(k):
    shape, axis = SPLIT_LAYOUTS[k]
    rng = np.random.default_rng(200 + k)
    dtype = np.float32 if k % 2 == 0 else np.float64
    x = (50.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    num_channels = shape[axis]
    weight, bias = rng.uniform(0.5, 2, num_channels), rng.uniform(-1, 1, num_channels)
    state = {"weight": weight, "bias": bias, "running_mean": 50.0 + rng.standard_normal(
        num_channels), "running_var": rng.uniform(0.5, 2, num_channels)}
    layer = cbn.BatchNorm.from_state_dict(state, axis=axis).eval()
    frozen = cbn.FrozenBatchNorm(state, axis=axis, activation="relu")
    return x, dy, axis, weight, bias, layer, frozen


def test_every_kernel_from_threads_while_the_thread_count_flips(restore_threads):
    cases = [split_case(k) for k in range(len(SPLIT_LAYOUTS))]
    threads = WORKERS   # some layouts in two threads at once
    cbn.set_num_threads(1)
    serial = [all_kernels(*case) for case in cases]
    cbn.set_num_threads(None)

    def work(k):
        case = cases[k % len(cases)]
        return [all_kernels(*case) for _ in range(ROUNDS)]

    with fast_switching(), flipping_thread_count() as flipped:
        together = run_threads(work, threads)
    for k, results in enumerate(together):
        for round_results in results:
            assert round_results == serial[k % len(cases)], SPLIT_LAYOUTS[k % len(cases)]
    calls = threads * ROUNDS * 10   # cbn calls in all_kernels
    CALLS["every kernel, split layouts"] = (threads, calls, flipped["flips"])
    print(f"\n{threads} threads x {calls // threads} calls, thread count flipped "
          f"{flipped['flips']} times")


# ---------------------------------------------------------------------------
# The eval cache rebuilt from many threads at once

EDIT_ROUNDS = 10
CALLS_PER_ROUND = 60
CACHE_THREADS = 12


def test_threads_rebuild_the_eval_cache_of_a_shared_layer_together(restore_threads):
    # Between rounds the main thread edits the shared layer's parameters in
    # place (or loads a state dict): at the start of each round every thread
    # finds the cached parameters stale and rebuilds or reuses them while the
    # others read them.
    rng = np.random.default_rng(300)
    layer = cbn.BatchNorm(SHARED_C, activation="relu").eval()
    reference = cbn.BatchNorm(SHARED_C, activation="relu").eval()
    inputs = [rng.standard_normal(shape).astype(np.float32)
              for shape in [(3, SHARED_C), (64, SHARED_C, 40), (2, SHARED_C, 5, 5)]]
    edits = []
    for _ in range(EDIT_ROUNDS):
        edits.append({"weight": rng.uniform(0.5, 2, SHARED_C).astype(np.float32),
                      "bias": rng.standard_normal(SHARED_C).astype(np.float32),
                      "running_mean": rng.standard_normal(SHARED_C).astype(np.float32),
                      "running_var": rng.uniform(0.5, 2, SHARED_C).astype(np.float32)})

    def apply(target, r):
        if r % 2:
            target.load_state_dict(edits[r], strict=False)
        else:
            for key, value in edits[r].items():
                getattr(target, key)[...] = value

    expected = []
    for r in range(EDIT_ROUNDS):
        apply(reference, r)
        expected.append(([digest(reference(x)) for x in inputs],
                         [digest(a) for a in reference.fold()]))

    total = 0
    with fast_switching(), flipping_thread_count():
        for r in range(EDIT_ROUNDS):
            apply(layer, r)

            def work(k, r=r):
                outs = [np.empty_like(x) for x in inputs]
                for i in range(CALLS_PER_ROUND):
                    j = (i + k) % len(inputs)
                    y = layer(inputs[j], out=outs[j] if i % 2 else None)
                    assert digest(y) == expected[r][0][j], (r, k, i)
                    if i % 10 == 0:
                        assert [digest(a) for a in layer.fold()] == expected[r][1]
                return CALLS_PER_ROUND + CALLS_PER_ROUND // 10

            total += sum(run_threads(work, CACHE_THREADS))
    CALLS["shared eval cache rebuilt"] = (CACHE_THREADS, total, None)
    print(f"\n{CACHE_THREADS} threads x {total // CACHE_THREADS} calls over {EDIT_ROUNDS} "
          "edits")


def test_the_thread_count_is_restored_after_flipping(restore_threads):
    cbn.set_num_threads(None)
    default = cbn.get_num_threads()
    with flipping_thread_count() as flipped:
        while not cbn.get_num_threads() == 3:
            time.sleep(0)
    assert cbn.get_num_threads() == default
    assert flipped["flips"] > 2


@pytest.fixture(autouse=True)
def _switch_interval_restored():
    before = sys.getswitchinterval()
    yield
    assert sys.getswitchinterval() == before
