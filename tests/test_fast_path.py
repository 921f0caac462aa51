"""Plain and converted inputs compute the same bits.

The executor (cbn/_core.pyx) reads plain inputs (C-contiguous float32/float64
NumPy arrays, Python numbers) as they are and hands anything else to
cbn._convert first. An ndarray subclass is not plain, so passing the same
data as a subclass runs the conversion on identical numbers.
"""
import numpy as np
import pytest

import cbn

from corpus import DTYPES, LAYOUTS, make_input


class NotPlain(np.ndarray):
    """Same data, but not an exact ndarray: the executor converts it."""


def general(array):
    return array.view(NotPlain)


def bits(*arrays):
    return [(np.asarray(a).dtype.str, np.asarray(a).shape, np.asarray(a).tobytes())
            for a in arrays]


def channel_vectors(rng, num_channels, dtype, count):
    return [rng.uniform(0.5, 2, num_channels).astype(dtype) for _ in range(count)]


@pytest.mark.parametrize("buffer_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_batch_norm_training_same_bits(rng, shape, axis, dtype, buffer_dtype):
    x = make_input(rng, shape, axis, dtype, offset=50.0)
    weight, bias, mean, var = channel_vectors(rng, shape[axis], buffer_dtype, 4)
    runs = {}
    for path, data in (("fast", x), ("general", general(x))):
        running_mean, running_var = mean.copy(), var.copy()
        y = cbn.batch_norm(data, running_mean, running_var, weight, bias,
                           training=True, momentum=0.3, axis=axis)
        runs[path] = bits(y, running_mean, running_var)
    assert runs["fast"] == runs["general"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_batch_norm_eval_same_bits(rng, shape, axis, dtype):
    x = make_input(rng, shape, axis, dtype, offset=50.0)
    weight, bias, mean, var = channel_vectors(rng, shape[axis], np.float32, 4)
    fast = cbn.batch_norm(x, mean, var, weight, bias, axis=axis)
    slow = cbn.batch_norm(general(x), mean, var, weight, bias, axis=axis)
    assert bits(fast) == bits(slow)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_and_backward_same_bits(rng, shape, axis, dtype, training):
    x = make_input(rng, shape, axis, dtype, offset=-20.0)
    dy = rng.standard_normal(shape).astype(dtype)
    weight, bias = channel_vectors(rng, shape[axis], np.float64, 2)
    fast = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    slow = cbn.batch_norm_forward(general(x), weight, bias, axis=axis)
    assert bits(*fast) == bits(*slow)
    _, mean, invstd = fast
    fast = cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                   training=training)
    slow = cbn.batch_norm_backward(general(dy), x, mean, invstd, weight, axis=axis,
                                   training=training)
    assert bits(*fast) == bits(*slow)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_layer_same_bits(rng, shape, axis, dtype, momentum):
    layers = {path: cbn.BatchNorm(shape[axis], momentum=momentum, axis=axis,
                                  dtype=np.float64)
              for path in ("fast", "general")}
    results = {path: [] for path in layers}
    for step in range(3):  # two training steps, then one in eval mode
        x = make_input(rng, shape, axis, dtype, offset=10.0 * step)
        dy = rng.standard_normal(shape).astype(dtype)
        for path, layer in layers.items():
            layer.train(step < 2)
            wrap = general if path == "general" else (lambda a: a)
            y = layer(wrap(x))
            dx = layer.backward(wrap(dy))
            results[path] += bits(y, dx, layer.grad_weight, layer.grad_bias,
                                  layer.running_mean, layer.running_var)
            results[path].append(layer.num_batches_tracked)
    assert results["fast"] == results["general"]


def test_fast_in_place_call_and_preallocated_output(rng):
    x = rng.standard_normal((16, 8)).astype(np.float32)
    mean, var = np.zeros(8, np.float32), np.full(8, 4.0, np.float32)
    expected = cbn.batch_norm(general(x), mean, var)
    out = np.empty_like(x)
    assert cbn.batch_norm(x, mean, var, out=out) is out
    assert bits(out) == bits(expected)
    assert cbn.batch_norm(x, mean, var, out=x) is x
    assert bits(x) == bits(expected)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_relu_layer_forward_and_backward_same_bits(rng, shape, axis, dtype, training):
    # Plain and converted inputs: the same bits, with and without out=.
    x = make_input(rng, shape, axis, dtype, offset=2.0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    results = {}
    for path in ("fast", "general"):
        layer = cbn.BatchNorm(shape[axis], axis=axis, activation="relu")
        layer.bias[...] = np.linspace(-1, 1, shape[axis])  # some outputs clipped
        layer.train(training)
        wrap = general if path == "general" else (lambda a: a)
        y = layer(wrap(x))
        dx = layer.backward(wrap(dy))
        out = np.empty_like(dy)
        dx_out = layer.backward(wrap(dy), out=out)
        in_place = dy.copy()
        dx_in_place = layer.backward(wrap(in_place), out=in_place)
        results[path] = bits(y, dx, dx_out, layer.grad_weight, layer.grad_bias,
                             dx_in_place)
    assert results["fast"] == results["general"]


def test_relu_backward_with_out_over_the_input_masks_aside(rng):
    # The masked gradient is made in the output array, except where that is
    # x (or the saved output): it would overwrite them before they are read.
    x = make_input(rng, (64, 8), 1, np.float32, offset=1.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = cbn.BatchNorm(8, activation="relu")
    layer.bias[...] = np.linspace(-1, 1, 8)
    layer(x)
    expected = layer.backward(dy)
    kept = x.copy()
    result = layer.backward(dy, out=x)
    assert result is x
    np.testing.assert_array_equal(result, expected)
    assert not np.array_equal(kept, x)
