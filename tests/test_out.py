"""out=: the result is written into out and returned, in place (out=x) in
eval and frozen calls, with the bits of the allocating call; bad, mismatched
or partially overlapping out arrays raise and change nothing; backward after
an in-place call; warm eval calls with out= allocate nothing.

Expected values are written out with float64 NumPy from the formulas, never
computed by cbn.
"""
import tracemalloc

import numpy as np
import pytest

import cbn

from corpus import (
    ALL_DTYPES,
    LAYER_DTYPES,
    SMALL_LAYOUTS,
    affine_of,
    assert_close,
    eval_oracle,
    grads_oracle,
    layer_state,
    make_input,
    make_layer,
    moments,
    oracle,
    per_channel,
    train_oracle,
)

# A few layouts for tests whose subject is not the layout: the three common
# ones and one big enough for the parallel kernels.
OUT_LAYOUTS = [pytest.param((6, 4), 1, id="NC"), pytest.param((3, 4, 5, 6), 1, id="NCHW"),
               pytest.param((3, 5, 6, 4), -1, id="NHWC"),
               pytest.param((2, 3, 40000), 1, id="NCL-long")]


OUT_FORMS = ["layer-call-train", "layer-forward-train", "layer-call-eval",
             "layer-forward-eval", "layer-relu-eval", "layer-eval-no-running-stats",
             "frozen-call", "frozen-forward", "frozen-relu", "batch_norm-train",
             "batch_norm-eval", "batch_norm-relu", "batch_norm_forward",
             "batch_norm_backward"]


IN_PLACE_FORMS = ["layer-call-eval", "layer-forward-eval", "layer-relu-eval",
                  "layer-eval-no-running-stats", "frozen-call", "frozen-forward",
                  "frozen-relu", "batch_norm-eval", "batch_norm-relu"]
# Training forwards refuse out=x: test_training_forward_with_out_x_raises_and_changes_nothing
# and test_functional.py.


def run_form(form, seed, x, axis, out):
    """Call ``form`` on x with ``out``, with parameters drawn from ``seed``;
    returns (result, float64 oracle computed before the call)."""
    rng = np.random.default_rng(seed)
    c = x.shape[axis]
    layer = make_layer(c, rng, axis=axis, dtype=np.float64,
                       track_running_stats=form != "layer-eval-no-running-stats")
    if "relu" in form:
        layer.activation = "relu"
    weight, bias = affine_of(layer)
    if form.startswith("layer"):
        layer.train(form.endswith("train"))
        call = layer.forward if "forward" in form else layer
        use_batch = layer.training or layer.running_mean is None
        expected = train_oracle(layer, x) if use_batch else eval_oracle(layer, x)
        return call(x, out=out), expected
    if form.startswith("frozen"):
        frozen = layer.freeze()
        call = frozen.forward if form == "frozen-forward" else frozen
        expected = eval_oracle(layer, x)
        return call(x, out=out), expected
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    if form.startswith("batch_norm-"):
        training = form == "batch_norm-train"
        expected = (train_oracle(layer, x) if training else eval_oracle(layer, x))
        return cbn.batch_norm(x, rm, rv, weight, bias, training=training, axis=axis,
                              out=out, activation=layer.activation), expected
    mean, var, _ = moments(x, axis)
    if form == "batch_norm_forward":
        expected = oracle(x, axis, mean, var, weight, bias, 1e-5)
        y, _, _ = cbn.batch_norm_forward(x, weight, bias, axis=axis, out=out)
        return y, expected
    assert form == "batch_norm_backward"
    dy = np.linspace(-1, 1, x.size).reshape(x.shape).astype(x.dtype)
    invstd = 1 / np.sqrt(var + 1e-5)
    expected = grads_oracle(x, dy, axis, mean, invstd, weight, True)[0]
    dx, _, _ = cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    return dx, expected


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", OUT_LAYOUTS)
def test_out_is_written_and_returned(rng, shape, axis, dtype):
    for form in OUT_FORMS:
        x = make_input(rng, shape, axis, dtype)
        x_before = x.copy()
        out = np.full(shape, 7.0, dtype)
        result, expected = run_form(form, 1, x, axis, out)
        assert result is out, form
        assert_close(out, expected, dtype=dtype, err_msg=form)
        np.testing.assert_array_equal(x, x_before, err_msg=form)
        # the same bits as the allocating call
        y, _ = run_form(form, 1, x, axis, None)
        assert y is not out
        np.testing.assert_array_equal(out, y, err_msg=form)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", OUT_LAYOUTS)
def test_out_x_works_in_place_in_eval_and_frozen(rng, shape, axis, dtype):
    for form in IN_PLACE_FORMS:
        x = make_input(rng, shape, axis, dtype)
        y, _ = run_form(form, 2, x, axis, None)
        result, expected = run_form(form, 2, x, axis, x)
        assert result is x, form
        assert_close(x, expected, dtype=dtype, err_msg=form)
        np.testing.assert_array_equal(x, y, err_msg=form)  # the bits of the allocating call


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_backward_writes_into_out(rng, relu, dtype):
    layer = cbn.BatchNorm(4, activation="relu" if relu else None)
    layer.running_var[...] = rng.uniform(0.5, 2, 4)
    x = make_input(rng, (6, 4, 5), 1, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    for model in (layer, layer.eval().freeze(), layer.train()):
        model(x.copy())
        expected = model.backward(dy)
        out = np.full_like(dy, np.nan)
        assert model.backward(dy, out=out) is out
        np.testing.assert_array_equal(out, expected)
        in_place = dy.copy()
        assert model.backward(in_place, out=in_place) is in_place
        np.testing.assert_array_equal(in_place, expected)
        with pytest.raises(ValueError, match=r"\(6, 4\)"):
            model.backward(dy, out=np.empty((6, 4), dtype))
        with pytest.raises(TypeError, match="dtype"):
            model.backward(dy, out=np.empty(dy.shape, np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_stats_writes_into_out(rng, dtype):
    x = make_input(rng, (7, 3, 5), 1, dtype, offset=100.0)
    mean, var = cbn.batch_stats(x)
    out = (np.empty(3, dtype), np.empty(3, dtype))
    got = cbn.batch_stats(x, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(out[0], mean)
    np.testing.assert_array_equal(out[1], var)
    np.testing.assert_allclose(out[0], x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6)
    bad = [((np.empty(3, dtype),), TypeError, "pair"),
           ((np.empty(4, dtype), np.empty(3, dtype)), ValueError, r"\(4,\)"),
           ((np.empty(3, np.float16), np.empty(3, dtype)), TypeError, "float16"),
           ((out[0], out[0]), ValueError, "separate"),
           ([np.empty(3, dtype), [0.0, 0.0, 0.0]], TypeError, "list")]
    for value, error, words in bad:
        with pytest.raises(error, match=words):
            cbn.batch_stats(x, out=value)


# ---------------------------------------------------------------------------
# Errors leave everything unchanged

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape, axis", SMALL_LAYOUTS)
def test_training_forward_with_out_x_raises_and_changes_nothing(rng, shape, axis, dtype):
    for relu in (False, True):
        for call in ("call", "forward"):
            layer = make_layer(shape[axis], rng, axis=axis, relu=relu)
            warm = make_input(rng, shape, axis, dtype)
            layer(warm)
            dy = rng.standard_normal(shape).astype(dtype)
            dx_warm = layer.backward(dy)
            before = layer_state(layer)
            x = make_input(rng, shape, axis, dtype)
            x_before = x.copy()
            fn = layer if call == "call" else layer.forward
            with pytest.raises(ValueError):
                fn(x, out=x)
            with pytest.raises(ValueError):
                fn(x, out=x.reshape(x.shape))  # another array over the same memory
            assert layer_state(layer) == before
            np.testing.assert_array_equal(x, x_before)
            assert layer.training
            # backward still differentiates the last successful forward
            np.testing.assert_array_equal(layer.backward(dy), dx_warm)


BAD_OUT_FORMS = ["layer-train", "layer-relu-train", "layer-eval", "layer-forward-eval",
                 "frozen", "batch_norm-train", "batch_norm-eval", "batch_norm_forward",
                 "batch_norm_backward"]


def _bad_outs(shape, dtype):
    """{kind: (out, exception, strings the message must contain)}."""
    other = np.float64 if np.dtype(dtype) != np.float64 else np.float32
    shape_str = str(tuple(shape))
    return {
        "shape": (np.zeros((4, 5, 3), dtype), ValueError, ["(4, 5, 3)", shape_str]),
        "flat": (np.zeros(60, dtype), ValueError, ["(60,)", shape_str]),
        "extra-dim": (np.zeros((1,) + shape, dtype), ValueError,
                      [str((1,) + shape), shape_str]),
        "dtype": (np.zeros(shape, other), TypeError,
                  [str(np.dtype(other)), str(np.dtype(dtype))]),
        "non-contiguous": (np.zeros((4, 3, 6), dtype)[..., :5], ValueError, []),
        "fortran": (np.asfortranarray(np.zeros(shape, dtype)), ValueError, []),
        "read-only": (np.broadcast_to(np.zeros((), dtype), shape), ValueError, []),
        "list": (np.zeros(shape, dtype).tolist(), TypeError, []),
    }


def _form_call(form, layer, shape, dtype):
    """A function (x, out) for ``form``, after a forward when the form is a
    layer (so that backward has something to lose)."""
    axis = 1
    if form.startswith("layer"):
        layer.activation = "relu" if "relu" in form else None
        layer.train(form.endswith("train"))
        layer(make_input(np.random.default_rng(9), shape, axis, dtype))
        return layer.forward if "forward" in form else layer
    if form == "frozen":
        return layer.freeze()
    if form == "batch_norm_forward":
        return lambda x, out: cbn.batch_norm_forward(x, layer.weight, axis=axis, out=out)
    if form == "batch_norm_backward":
        return lambda x, out: cbn.batch_norm_backward(
            np.ones(shape, dtype), x, np.zeros(3), np.ones(3), layer.weight, out=out)
    return lambda x, out: cbn.batch_norm(x, layer.running_mean, layer.running_var,
                                         layer.weight, layer.bias,
                                         training=form.endswith("train"), out=out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("form", BAD_OUT_FORMS)
def test_bad_out_raises_with_details_and_changes_nothing(rng, form, dtype):
    shape = (4, 3, 5)
    for kind, (out, error, words) in _bad_outs(shape, dtype).items():
        x = make_input(rng, shape, 1, dtype)
        x_before = x.copy()
        out_before = np.array(out, copy=True)
        layer = make_layer(3, rng)
        call = _form_call(form, layer, shape, dtype)
        dy = np.ones(shape, dtype)
        dx_before = layer.backward(dy) if form.startswith("layer") else None
        before = layer_state(layer)
        with pytest.raises(error) as info:
            call(x, out=out)
        message = str(info.value)
        for word in words:
            assert word in message, (kind, word, message)
        assert layer_state(layer) == before, kind
        np.testing.assert_array_equal(x, x_before, err_msg=kind)
        np.testing.assert_array_equal(np.asarray(out), out_before, err_msg=kind)
        if dx_before is not None:  # backward still differentiates the last good forward
            np.testing.assert_array_equal(layer.backward(dy), dx_before, err_msg=kind)


@pytest.mark.parametrize("source", [
    pytest.param((np.float16, False), id="f16"), pytest.param((np.float32, False), id="f32"),
    pytest.param((np.float64, False), id="f64"),
    pytest.param((np.float32, True), id="f32-strided-x"),
])
@pytest.mark.parametrize("shift", [1, -1, 7], ids=["shift+1", "shift-1", "shift+7"])
def test_partially_overlapping_out_raises_and_changes_nothing(rng, shift, source):
    """out and x are windows of one buffer, ``shift`` elements apart (x also
    as every other element of its window: an input that cbn must copy)."""
    dtype, strided = source
    shape = (4, 3, 5)
    n = int(np.prod(shape))
    step = 2 if strided else 1
    lo, hi = (0, shift) if shift > 0 else (-shift, 0)
    accepted = []
    for form in BAD_OUT_FORMS:
        buffer = rng.normal(0, 2, step * n + abs(shift)).astype(dtype)
        x = buffer[lo:lo + step * n:step].reshape(shape)
        out = buffer[hi:hi + n].reshape(shape)
        assert out.flags.c_contiguous and x.flags.c_contiguous != strided
        assert np.shares_memory(x, out)
        layer = make_layer(3, rng)
        call = _form_call(form, layer, shape, dtype)
        before = layer_state(layer)
        buffer_before = buffer.copy()
        try:
            call(x, out=out)
        except ValueError:
            pass
        else:
            accepted.append(form)
            continue
        assert layer_state(layer) == before, form
        np.testing.assert_array_equal(buffer, buffer_before, err_msg=form)
    assert not accepted, f"a partially overlapping out= was accepted by {accepted}"


def test_relu_backward_with_a_non_array_out_raises_a_type_error(rng):
    layer = cbn.BatchNorm(4, activation="relu")
    x = make_input(rng, (8, 4), 1, np.float32)
    layer(x)
    for bad in (object(), [0.0] * 32, "out"):
        with pytest.raises(TypeError, match="out"):
            layer.backward(np.ones_like(x), out=bad)


# ---------------------------------------------------------------------------
# Backward after an in-place call

@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_backward_after_in_place_eval_raises_but_frozen_backward_works(rng, dtype):
    for relu in (False, True):
        layer = make_layer(3, rng, relu=relu).eval()
        x = make_input(rng, (5, 3, 4), 1, dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        layer(x.copy())
        layer.backward(dy)  # fine after an ordinary eval call
        before = layer_state(layer)
        assert layer(x, out=x) is x
        with pytest.raises(ValueError):
            layer.backward(dy)
        with pytest.raises(ValueError):
            layer.backward(dy)
        assert layer_state(layer) == before
        # a forward that keeps its input makes backward work again
        x2 = make_input(rng, (5, 3, 4), 1, dtype)
        layer(x2)
        dx = layer.backward(dy)
        weight, _ = affine_of(layer)
        invstd = 1 / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
        mask = (eval_oracle(layer, x2) > 0) if relu else None
        assert_close(dx, grads_oracle(x2, dy, 1, layer.running_mean, invstd, weight, False,
                                      mask)[0], kind="grad", dtype=dtype)
        # a frozen layer's backward needs no input: it works after out=x
        frozen = layer.freeze()
        x3 = make_input(rng, (5, 3, 4), 1, dtype)
        x3_copy = x3.copy()
        assert frozen(x3, out=x3) is x3
        dx = frozen.backward(dy)
        expected = dy.astype(np.float64) * per_channel(weight * invstd, 3, 1)
        if relu:
            expected = np.where(eval_oracle(layer, x3_copy) > 0, expected, 0.0)
        assert_close(dx, expected, kind="grad", dtype=dtype)


def test_in_place_eval_without_running_stats_also_blocks_backward(rng):
    layer = make_layer(3, rng, track_running_stats=False).eval()
    x = make_input(rng, (5, 3), 1, np.float32)
    layer(x, out=x)
    with pytest.raises(ValueError):
        layer.backward(np.ones_like(x))


# ---------------------------------------------------------------------------
# No allocation

def _growth(fn, calls):
    """Bytes still allocated (tracemalloc) after ``calls`` more calls of fn."""
    fn()
    tracemalloc.start()
    try:
        fn()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(calls):
            fn()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return end - start


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_warm_eval_calls_with_out_do_not_allocate(rng, relu, dtype):
    layer = make_layer(8, rng, dtype=dtype, relu=relu).eval()
    frozen = layer.freeze()
    x = make_input(rng, (16, 8, 4), 1, dtype)
    expected = eval_oracle(layer, x)
    out = np.empty_like(x)
    rm, rv, w, b = layer.running_mean, layer.running_var, layer.weight, layer.bias
    activation = layer.activation
    calls = {
        "layer-call": lambda: layer(x, out=out),
        "layer-forward": lambda: layer.forward(x, out=out),
        "layer-in-place": lambda: layer(out, out=out),
        "frozen": lambda: frozen(x, out=out),
        "frozen-in-place": lambda: frozen.forward(out, out=out),
        "batch_norm-eval": lambda: cbn.batch_norm(x, rm, rv, w, b, out=out,
                                                  activation=activation),
    }
    for what, fn in calls.items():
        out[...] = x
        assert fn() is out, what
        if "in-place" not in what:
            assert_close(out, expected, dtype=dtype, err_msg=what)
        growth = _growth(fn, 2000)
        assert growth < 64 * 1024, f"{what}: {growth} bytes after 2000 calls"
        assert fn() is out, what


def test_the_allocation_measure_can_fail():
    kept = []
    x = np.ones((16, 8, 4), np.float32)
    assert _growth(lambda: kept.append(x.copy()), 200) > 64 * 1024


@pytest.mark.parametrize("shape, axis", [((64, 256), 1), ((8, 32, 8, 8), 1),
                                         ((8, 8, 8, 32), -1)])
def test_warm_eval_calls_with_out_allocate_nothing_even_temporarily(rng, shape, axis):
    # Peak, not growth: a temporary output or parameter array of a call would
    # raise the peak by at least its size (64 KiB input here).
    num_features = shape[axis]
    layer = cbn.BatchNorm(num_features, axis=axis, activation="relu").eval()
    layer.running_var[...] = rng.uniform(0.5, 2, num_features)
    frozen = layer.freeze()
    x = rng.standard_normal(shape).astype(np.float32)
    out = np.empty_like(x)
    for call in (lambda: layer(x, out=out), lambda: frozen(x, out=out)):
        call()
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            for _ in range(200):
                call()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - start < 1024
    tracemalloc.start()
    try:  # the measure sees a call that allocates its output
        start, _ = tracemalloc.get_traced_memory()
        layer(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - start >= x.nbytes
