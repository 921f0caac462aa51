"""Leaks: 100,000 small calls of every public path, and
memory does not grow.

Each path (a train forward + backward, eval calls, frozen calls, each public
function, inputs that are converted (copied) first, the inference helpers,
state-dict round trips and construction, and calls that raise) runs
``CALLS`` times on tiny arrays after a warm-up; an error path's calls take
its kinds of bad input in turn, each call one that raises. Over those calls:

- resident memory (``/proc/self/statm``) grows by less than ``RSS_BOUND``;
- Python's allocated memory blocks (``sys.getallocatedblocks``) grow by less
  than ``BLOCKS_BOUND`` (one leaked object per 1,000 calls would exceed it);
- with tracemalloc on for the last ``TRACED`` calls (it slows calls 5 to 10
  times, so not for all of them), traced memory grows by less than
  ``TRACED_BOUND`` (an 8-byte leak per call would exceed it);
- the reference counts of every input (arrays, layers, parameters, state
  dicts, the out= arrays) are unchanged.

``MEASURED`` collects the figures; ``pytest -s`` prints them.
"""
import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest

import cbn

CALLS = 100_000
WARMUP = 2_000
TRACED = 2_000
RSS_BOUND = 1 << 20         # 1 MiB over CALLS calls
TRACED_BOUND = 16 << 10     # 16 KiB over TRACED calls
BLOCKS_BOUND = 100          # pymalloc blocks over CALLS calls

MEASURED = {}


def resident_bytes():
    """Current resident set size, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def raises(call, *args, **kwargs):
    """A call that must raise ValueError or TypeError (the exception, with its
    traceback, is dropped at once)."""
    try:
        call(*args, **kwargs)
    except (ValueError, TypeError):
        return
    raise AssertionError(f"{call} did not raise")


# ---------------------------------------------------------------------------
# The paths: each returns (call, inputs whose reference counts must not move)

def _data(shape=(8, 4), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def _eval_layer(num_features=4, **kwargs):
    rng = np.random.default_rng(1)
    layer = cbn.BatchNorm(num_features, **kwargs)
    layer.weight[...] = rng.uniform(0.5, 2, num_features)
    layer.bias[...] = rng.uniform(-1, 1, num_features)
    layer.running_mean[...] = rng.standard_normal(num_features)
    layer.running_var[...] = rng.uniform(0.5, 2, num_features)
    return layer.eval()


def train_forward_backward():
    x, dy = _data()
    layer = cbn.BatchNorm(4)

    def call():
        layer(x)
        layer.backward(dy)
    return call, [x, dy, layer, layer.weight, layer.bias, layer.running_mean,
                  layer.running_var]


def train_forward_backward_out():
    x, dy = _data((6, 4, 3))
    layer = cbn.BatchNorm(4, momentum=None)
    y, dx = np.empty_like(x), np.empty_like(x)

    def call():
        layer.forward(x, out=y)
        layer.backward(dy, out=dx)
    return call, [x, dy, y, dx, layer, layer.weight, layer.running_mean]


def train_relu_channels_last():
    x, dy = _data((4, 3, 4), np.float64)
    layer = cbn.BatchNorm(4, axis=-1, activation="relu", dtype=np.float64)

    def call():
        layer(x)
        layer.backward(dy)
    return call, [x, dy, layer, layer.weight, layer.running_var]


def train_general_path():
    # Fortran order: converted, the input copied
    x, dy = _data((4, 4, 3))
    x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    layer = cbn.BatchNorm1d(4)

    def call():
        layer(x)
        layer.backward(dy)
    return call, [x, dy, layer, layer.weight, layer.running_mean]


def eval_calls():
    x, dy = _data()
    layer = _eval_layer()
    out = np.empty_like(x)

    def call():
        layer(x)
        layer(x, out=out)
        layer.backward(dy)
    return call, [x, dy, out, layer, layer.weight, layer.running_mean]


def eval_general_path():
    x, _ = _data((8, 4), np.float16)   # computed in float32, converted back
    layer = _eval_layer()

    def call():
        layer(x)
    return call, [x, layer]


def eval_in_place():
    x, _ = _data()
    layer = _eval_layer(activation="relu")

    def call():
        layer(x, out=x)
        x[0, 0] = 1.0
    return call, [x, layer]


def frozen_calls():
    x, dy = _data()
    frozen = _eval_layer().freeze()
    out = np.empty_like(x)

    def call():
        frozen(x)
        frozen.forward(x, out=out)
        frozen.backward(dy)
    return call, [x, dy, out, frozen, frozen.scale, frozen.shift]


def frozen_relu_calls():
    x, dy = _data((4, 4, 2, 2))
    frozen = _eval_layer(activation="relu").freeze()

    def call():
        frozen(x)
        frozen.backward(dy)
    return call, [x, dy, frozen]


def functional_batch_norm():
    x, _ = _data()
    running_mean, running_var = np.zeros(4), np.ones(4)
    weight, bias = np.ones(4, np.float32), np.zeros(4, np.float32)
    out = np.empty_like(x)

    def call():
        cbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)
        cbn.batch_norm(x, running_mean, running_var, weight, bias, out=out)
        cbn.batch_norm(x, running_mean, running_var, activation="relu")
    return call, [x, running_mean, running_var, weight, bias, out]


def functional_forward_backward():
    x, dy = _data()
    weight, bias = np.ones(4), np.zeros(4)

    def call():
        _, mean, invstd = cbn.batch_norm_forward(x, weight, bias)
        cbn.batch_norm_backward(dy, x, mean, invstd, weight)
        cbn.batch_norm_backward(dy, x, mean, invstd, training=False)
    return call, [x, dy, weight, bias]


def functional_batch_stats():
    x, _ = _data((3, 4, 2))
    out = (np.empty(4, np.float32), np.empty(4, np.float32))

    def call():
        cbn.batch_stats(x)
        cbn.batch_stats(x, out=out)
    return call, [x, out[0], out[1]]


def functional_general_path():
    x, dy = _data((4, 4, 3))
    x = np.asfortranarray(x)

    def call():
        _, mean, invstd = cbn.batch_norm_forward(x)
        cbn.batch_norm_backward(dy, x, mean, invstd)
    return call, [x, dy]


def fold_calls():
    layer = _eval_layer()

    def call():
        layer.fold()
    return call, [layer]


def fold_into_calls():
    layer = _eval_layer()
    rng = np.random.default_rng(2)
    dense, conv, bias = rng.standard_normal((4, 5)), rng.standard_normal((4, 2, 3)), np.zeros(4)

    def call():
        cbn.fold_into_linear(dense, bias, layer)
        cbn.fold_into_conv(conv, bias, layer)
    return call, [layer, dense, conv, bias]


def state_round_trip():
    layer = _eval_layer()
    state = layer.state_dict()

    def call():
        layer.load_state_dict(layer.state_dict())
    return call, [layer, state, *state.values()]


def freeze_calls():
    layer = _eval_layer()

    def call():
        layer.freeze()
    return call, [layer, layer.weight, layer.running_var]


def from_state_dict_calls():
    state = _eval_layer().state_dict()

    def call():
        cbn.BatchNorm2d.from_state_dict(state)
    return call, [state, *state.values()]


def frozen_construction():
    state = _eval_layer().state_dict()

    def call():
        cbn.FrozenBatchNorm(state)
    return call, [state, *state.values()]


def in_turn(*calls):
    """One call per round, each of ``calls`` in turn (each must raise)."""
    count = len(calls)
    turn = iter(range(1 << 62))

    def call():
        func, args, kwargs = calls[next(turn) % count]
        raises(func, *args, **kwargs)
    return call


def errors_layer():
    x, dy = _data()
    wrong = np.ones((8, 5), np.float32)
    layer = cbn.BatchNorm(4)
    layer(x)
    evaluating = _eval_layer()
    frozen = evaluating.freeze()
    integers = x.astype(np.int32)
    call = in_turn((layer, (wrong,), {}), (layer.backward, (wrong,), {}),
                   (evaluating, (wrong,), {}), (frozen, (integers,), {}),
                   (cbn.BatchNorm2d(4), (x,), {}), (layer, (x,), {"out": x}),
                   (frozen.backward, (dy,), {"out": integers}))
    return call, [x, dy, wrong, layer, evaluating, frozen, integers, layer.weight]


def errors_functions():
    x, dy = _data()
    wrong = np.ones((8, 5), np.float32)
    running_mean, running_var = np.zeros(4), np.ones(4)
    mean, invstd = np.zeros(4), np.ones(4)
    readonly = np.empty_like(x)
    readonly.flags.writeable = False
    call = in_turn((cbn.batch_norm, (x, running_mean, running_var), {"eps": -1.0}),
                   (cbn.batch_norm, (wrong, running_mean, running_var), {"training": True}),
                   (cbn.batch_norm_backward, (wrong, x, mean, invstd), {}),
                   (cbn.batch_norm_forward, (x,), {"out": readonly}),
                   (cbn.batch_stats, (x[0],), {}),
                   (cbn.set_num_threads, (0,), {}))
    return call, [x, dy, wrong, running_mean, running_var, mean, invstd, readonly]


def errors_state():
    layer = _eval_layer()
    bad_state = dict(layer.state_dict(), running_var=np.ones(5))
    fake = type("BatchNorm2d", (), {"num_features": 4})()
    call = in_turn((layer.load_state_dict, (bad_state,), {}),
                   (cbn.FrozenBatchNorm, ({"weight": np.ones(4)},), {}),
                   (cbn.BatchNorm.from_torch, (fake,), {}),
                   (cbn.fold_into_linear, (np.ones((5, 5)), None, layer), {}),
                   (setattr, (layer, "weight", np.ones(3)), {}),
                   (cbn.BatchNorm, (4,), {"eps": "1e-5"}))
    return call, [layer, bad_state, fake, *bad_state.values()]


PATHS = {
    "train forward+backward": train_forward_backward,
    "train forward+backward out=": train_forward_backward_out,
    "train relu channels-last": train_relu_channels_last,
    "train general path": train_general_path,
    "eval forward, out=, backward": eval_calls,
    "eval general path": eval_general_path,
    "eval relu in place": eval_in_place,
    "frozen forward, out=, backward": frozen_calls,
    "frozen relu": frozen_relu_calls,
    "batch_norm": functional_batch_norm,
    "batch_norm_forward/backward": functional_forward_backward,
    "batch_stats": functional_batch_stats,
    "functions general path": functional_general_path,
    "fold": fold_calls,
    "fold_into_linear/conv": fold_into_calls,
    "state_dict round trip": state_round_trip,
    "freeze": freeze_calls,
    "from_state_dict": from_state_dict_calls,
    "FrozenBatchNorm(state)": frozen_construction,
    "errors: layers": errors_layer,
    "errors: functions": errors_functions,
    "errors: state, construction, folding": errors_state,
}


def run(call, count):
    for _ in range(count):
        call()


@pytest.mark.parametrize("name", list(PATHS))
def test_no_growth_over_many_calls(name):
    call, inputs = PATHS[name]()
    run(call, WARMUP)
    gc.collect()
    refcounts = [sys.getrefcount(obj) for obj in inputs]
    blocks = sys.getallocatedblocks()
    rss = resident_bytes()

    run(call, CALLS - TRACED)
    tracemalloc.start()
    try:
        run(call, 100)   # fills what tracing itself caches
        traced = tracemalloc.get_traced_memory()[0]
        run(call, TRACED - 100)
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - traced
    finally:
        tracemalloc.stop()
    gc.collect()
    rss_growth = None if rss is None else resident_bytes() - rss
    blocks_growth = sys.getallocatedblocks() - blocks
    after = [sys.getrefcount(obj) for obj in inputs]
    refcount_changes = [(type(obj).__name__, refcounts[k], after[k])
                        for k, obj in enumerate(inputs) if after[k] != refcounts[k]]

    MEASURED[name] = (rss_growth, traced_growth, blocks_growth)
    print(f"\n{name}: {CALLS} calls, RSS {rss_growth} B, traced {traced_growth} B "
          f"(last {TRACED}), blocks {blocks_growth}")
    assert not refcount_changes, refcount_changes
    if rss_growth is not None:
        assert rss_growth < RSS_BOUND, rss_growth
    assert traced_growth < TRACED_BOUND, traced_growth
    assert blocks_growth < BLOCKS_BOUND, blocks_growth
