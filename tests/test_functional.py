"""The functional API against the float64 NumPy reference, over every layout,
dtype and awkward memory layout of the corpus."""
import numpy as np
import pytest

import cbn
from cbn import reference

from corpus import DTYPES, LAYOUTS, assert_close, make_input


def params(rng, num_channels):
    return rng.uniform(0.5, 2, num_channels), rng.uniform(-1, 1, num_channels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_batch_stats_matches_reference(rng, shape, axis, dtype):
    x = make_input(rng, shape, axis, dtype)
    mean, var = cbn.batch_stats(x, axis=axis)
    ref_mean, ref_var = reference.batch_stats(x, axis=axis)
    assert mean.dtype == dtype and var.dtype == dtype
    assert mean.shape == var.shape == (shape[axis],)
    assert_close(mean, ref_mean, kind="stats", dtype=dtype, scale=1)
    assert_close(var, ref_var, kind="stats", dtype=dtype, scale=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_training_forward_and_running_update(rng, shape, axis, dtype):
    x = make_input(rng, shape, axis, dtype)
    num_channels = shape[axis]
    weight, bias = params(rng, num_channels)
    running = [rng.uniform(-1, 1, num_channels).astype(dtype),
               rng.uniform(0.5, 2, num_channels).astype(dtype)]
    ref_running = [r.astype(np.float64) for r in running]
    y = cbn.batch_norm(x, *running, weight, bias, training=True, momentum=0.3,
                       eps=1e-3, axis=axis)
    ref_y = reference.batch_norm(x, *ref_running, weight, bias, training=True,
                                 momentum=0.3, eps=1e-3, axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref_y, dtype=dtype, scale=1)
    assert_close(running[0], ref_running[0], kind="stats", dtype=dtype, scale=1)
    assert_close(running[1], ref_running[1], kind="stats", dtype=dtype, scale=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_inference_forward(rng, shape, axis, dtype):
    x = make_input(rng, shape, axis, dtype)
    num_channels = shape[axis]
    weight, bias = params(rng, num_channels)
    running_mean = rng.uniform(-1, 1, num_channels)
    running_var = rng.uniform(0.5, 2, num_channels)
    y = cbn.batch_norm(x, running_mean, running_var, weight, bias, axis=axis)
    ref_y = reference.batch_norm(x, running_mean, running_var, weight, bias, axis=axis)
    assert y.dtype == x.dtype
    assert_close(y, ref_y, dtype=dtype, scale=1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_backward_pair(rng, shape, axis, dtype, training):
    x = make_input(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight, bias = params(rng, shape[axis])
    y, mean, invstd = cbn.batch_norm_forward(x, weight, bias, eps=1e-4, axis=axis)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(
        x, weight, bias, eps=1e-4, axis=axis)
    assert mean.dtype == invstd.dtype == np.float64
    assert_close(y, ref_y, dtype=dtype, scale=1)
    assert_close(mean, ref_mean, kind="stats", dtype=dtype, scale=1)
    assert_close(invstd, ref_invstd, kind="stats", dtype=dtype, scale=1)

    dx, grad_weight, grad_bias = cbn.batch_norm_backward(
        dy, x, mean, invstd, weight, axis=axis, training=training)
    ref = reference.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                        training=training)
    assert dx.dtype == grad_weight.dtype == grad_bias.dtype == dtype
    # Sums over many values: scale the tolerance with the count.
    count = x.size // shape[axis]
    assert_close(dx, ref[0], kind="grad", dtype=dtype, scale=1)
    assert_close(grad_weight, ref[1], kind="grad", dtype=dtype, scale=np.sqrt(count))
    assert_close(grad_bias, ref[2], kind="grad", dtype=dtype, scale=np.sqrt(count))


def awkward_copies(x):
    """The same values in memory layouts the kernels do not take directly."""
    fortran = np.asfortranarray(x)
    swapped = x.astype(x.dtype.newbyteorder(">"))
    readonly = x.copy()
    readonly.flags.writeable = False
    padded = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    padded[..., ::2] = x
    reversed_first = np.ascontiguousarray(x[::-1])[::-1]
    return {"fortran": fortran, "byteswapped": swapped, "readonly": readonly,
            "strided": padded[..., ::2], "negative-stride": reversed_first}


@pytest.mark.parametrize("kind", ["fortran", "byteswapped", "readonly", "strided",
                                  "negative-stride"])
@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 6), 1), ((9, 4), 1),
                                         ((3, 5, 6, 4), -1)])
def test_awkward_memory_layouts_give_identical_results(rng, shape, axis, kind):
    x = make_input(rng, shape, axis, np.float32)
    awkward = awkward_copies(x)[kind]
    before = awkward.copy()
    running = np.zeros(shape[axis]), np.ones(shape[axis])
    expected = cbn.batch_norm(x, *running, training=False, axis=axis)
    got = cbn.batch_norm(awkward, *running, training=False, axis=axis)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(cbn.batch_norm_forward(awkward, axis=axis)[0],
                                  cbn.batch_norm_forward(x, axis=axis)[0])
    np.testing.assert_array_equal(cbn.batch_stats(awkward, axis=axis)[1],
                                  cbn.batch_stats(x, axis=axis)[1])
    np.testing.assert_array_equal(awkward, before)


def test_float16_is_computed_in_float32_and_returned_as_float16(rng):
    x = make_input(rng, (8, 3, 4, 4), 1, np.float16)
    y, mean, invstd = cbn.batch_norm_forward(x)
    assert y.dtype == np.float16
    expected, _, _ = cbn.batch_norm_forward(x.astype(np.float32))
    np.testing.assert_array_equal(y, expected.astype(np.float16))
    stats = cbn.batch_stats(x)
    assert stats[0].dtype == stats[1].dtype == np.float16


@pytest.mark.parametrize("training", [True, False])
def test_input_is_never_modified(rng, training):
    x = make_input(rng, (6, 4, 3, 3), 1, np.float32)
    before = x.copy()
    cbn.batch_norm(x, np.zeros(4), np.ones(4), training=training)
    y, mean, invstd = cbn.batch_norm_forward(x)
    cbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_receives_the_result_and_is_returned(rng, dtype):
    x = make_input(rng, (5, 3, 4, 4), 1, dtype)
    running = np.zeros(3), np.ones(3)
    out = np.empty_like(x)
    result = cbn.batch_norm(x, *running, out=out)
    assert result is out
    np.testing.assert_array_equal(out, cbn.batch_norm(x, *running))
    out = np.empty_like(x)
    y, _, _ = cbn.batch_norm_forward(x, out=out)
    assert y is out


def test_out_may_be_the_input_in_eval(rng):
    x = make_input(rng, (5, 3, 4, 4), 1, np.float64)
    expected = cbn.batch_norm(x, np.zeros(3), np.ones(3))
    result = cbn.batch_norm(x, np.zeros(3), np.ones(3), out=x)
    assert result is x
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_training_forwards_refuse_out_over_the_input(rng, dtype):
    # A backward would need the overwritten input; nothing may change.
    x = make_input(rng, (5, 3, 4, 4), 1, dtype)
    running = [np.zeros(3), np.ones(3)]
    kept = [x.copy(), *(r.copy() for r in running)]
    for call in (lambda out: cbn.batch_norm(x, *running, training=True, out=out),
                 lambda out: cbn.batch_norm(x, None, None, training=True, out=out),
                 lambda out: cbn.batch_norm_forward(x, out=out)):
        for out in (x, x.reshape(5, 3, 16)):
            with pytest.raises(ValueError, match="out overlaps the input"):
                call(out)
        for before, after in zip(kept, (x, *running)):
            np.testing.assert_array_equal(before, after)


def test_running_stats_are_updated_in_place_in_their_dtype(rng):
    x = make_input(rng, (16, 3), 1, np.float64)
    running_mean = np.zeros(3, np.float32)
    running_var = np.ones(3, np.float32)
    keep = running_mean
    cbn.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    mean, var = reference.batch_stats(x)
    assert running_mean is keep and running_mean.dtype == np.float32
    np.testing.assert_allclose(running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(running_var, var * 16 / 15, rtol=1e-6)


def test_training_without_running_stats_uses_batch_statistics(rng):
    x = make_input(rng, (16, 3, 2), 1, np.float64)
    y = cbn.batch_norm(x, None, None, training=True)
    np.testing.assert_allclose(y, reference.batch_norm_forward(x)[0], rtol=1e-12, atol=1e-12)


def test_empty_batch(rng):
    x = np.empty((0, 3, 4, 4), np.float32)
    running_mean, running_var = np.zeros(3), np.ones(3)
    y = cbn.batch_norm(x, running_mean, running_var, training=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(running_mean, 0)
    np.testing.assert_array_equal(running_var, 1)
    mean, var = cbn.batch_stats(x)
    assert np.isnan(mean).all() and np.isnan(var).all()


def test_nonfinite_values_stay_in_their_channel(rng):
    x = make_input(rng, (8, 4, 5, 5), 1, np.float32)
    x[3, 1, 2, 2] = np.nan
    x[0, 2, 0, 0] = np.inf
    y, mean, invstd = cbn.batch_norm_forward(x)
    assert np.isnan(y[:, 1]).all() and np.isnan(y[:, 2]).all()
    clean = np.delete(x, [1, 2], axis=1)
    assert_close(np.delete(y, [1, 2], axis=1), reference.batch_norm_forward(clean)[0],
                 dtype=np.float32, scale=1)


def test_backward_out_may_be_dy_but_not_overlap_it_partially(rng):
    x = make_input(rng, (6, 3, 4, 4), 1, np.float64)
    _, mean, invstd = cbn.batch_norm_forward(x)
    buffer = rng.standard_normal(2 * x.size)
    dy = buffer[: x.size].reshape(x.shape)
    expected = cbn.batch_norm_backward(dy.copy(), x, mean, invstd)[0]
    shifted = buffer[1: x.size + 1].reshape(x.shape)
    with pytest.raises(ValueError, match="overlaps"):
        cbn.batch_norm_backward(dy, x, mean, invstd, out=shifted)
    dx, _, _ = cbn.batch_norm_backward(dy, x, mean, invstd, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("shape", [(0, 3), (2, 3, 0), (0, 3, 4, 4)])
def test_backward_of_an_empty_batch_is_empty_with_zero_parameter_gradients(shape):
    x = np.empty(shape, np.float32)
    y, mean, invstd = cbn.batch_norm_forward(x)
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(np.empty_like(x), x, mean, invstd)
    assert dx.shape == shape and dx.dtype == np.float32
    np.testing.assert_array_equal(grad_weight, np.zeros(3, np.float32))
    np.testing.assert_array_equal(grad_bias, np.zeros(3, np.float32))
    layer = cbn.BatchNorm(3)
    layer(x)
    assert layer.backward(np.empty_like(x)).shape == shape
    np.testing.assert_array_equal(layer.grad_weight, np.zeros(3, np.float32))


def test_per_channel_inputs_may_share_memory_with_out(rng):
    # The kernels get copies of the (C,) vectors, so in eval out may overlap
    # the running statistics it is computed from.
    buffer = rng.standard_normal(2 * 3 * 32)
    running_mean = buffer[:3]
    x = buffer.reshape(2, 3, 32).copy()
    expected = reference.batch_norm(x, running_mean.copy(), np.ones(3))
    out = buffer.reshape(2, 3, 32)
    cbn.batch_norm(x, running_mean, np.ones(3), out=out)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_training_out_must_not_overlap_the_running_buffers(rng):
    buffer = np.zeros(2 * 3 * 32)
    x = rng.standard_normal((2, 3, 32))
    with pytest.raises(ValueError, match="overlaps"):
        cbn.batch_norm(x, buffer[:3], np.ones(3), training=True,
                       out=buffer.reshape(2, 3, 32))
    np.testing.assert_array_equal(buffer, 0)


@pytest.mark.parametrize("dtype", [np.longdouble, np.int32, np.complex64])
def test_dy_of_an_unsupported_dtype_is_rejected(rng, dtype):
    if np.dtype(dtype) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    x = rng.standard_normal((4, 3)).astype(np.float32)
    _, mean, invstd = cbn.batch_norm_forward(x)
    with pytest.raises(TypeError, match=str(np.dtype(dtype))):
        cbn.batch_norm_backward(np.ones((4, 3), dtype), x, mean, invstd)
    layer = cbn.BatchNorm(3)
    layer(x)
    with pytest.raises(TypeError, match=str(np.dtype(dtype))):
        layer.backward(np.ones((4, 3), dtype))


def test_numpy_error_settings_do_not_interrupt_the_running_update(rng):
    layer = cbn.BatchNorm(2, momentum=1.0)
    x = rng.standard_normal((4, 2)).astype(np.float32)
    x[0, 1] = np.inf
    with np.errstate(all="raise"):
        layer(x)
        layer(rng.standard_normal((4, 2)).astype(np.float32))
    assert layer.num_batches_tracked == 2
    # 0 * inf is NaN, in PyTorch's update formula too: channel 1 stays poisoned.
    assert np.isfinite(layer.running_mean[0]) and np.isnan(layer.running_mean[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_without_channels_give_empty_results(dtype):
    # (N, 0): the kernels' row cuts would divide by the number of columns.
    x = np.zeros((2, 0), dtype)
    empty = np.zeros(0)
    assert cbn.batch_norm(x, empty, empty.copy()).shape == (2, 0)
    assert cbn.batch_norm(x, None, None, training=True).shape == (2, 0)
    y, mean, invstd = cbn.batch_norm_forward(x)
    assert y.shape == (2, 0) and mean.shape == invstd.shape == (0,)
    for training in (True, False):
        dx, grad_weight, grad_bias = cbn.batch_norm_backward(
            x, x, mean, invstd, training=training)
        assert dx.shape == (2, 0) and grad_weight.shape == grad_bias.shape == (0,)
    assert [a.shape for a in cbn.batch_stats(x)] == [(0,), (0,)]
