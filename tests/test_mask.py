"""Masked statistics (``mask=``): batch statistics and the running update
over the valid positions only, every position normalized with them, and the
exact gradient of that function. The reference is NumPy on the valid values
picked out by boolean indexing, which shares no code with the kernels."""
import math

import numpy as np
import pytest
from test_sync import run_ranks, split

import cbn

RNG = np.random.default_rng(20261201)


def positions_shape(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:]


def valid_values(x, mask, axis):
    """(K, C) float64: the values at the valid positions, channel last."""
    channels_last = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return channels_last[np.broadcast_to(mask, channels_last.shape[:-1])]


def reference_stats(x, mask, axis):
    """Mean (exactly rounded, math.fsum) and biased variance over the valid
    positions, and their count."""
    values = valid_values(x, mask, axis)
    count = values.shape[0]
    mean = np.array([math.fsum(column) / count for column in values.T])
    var = np.array([math.fsum((column - m) ** 2) / count
                    for column, m in zip(values.T, mean)])
    return mean, var, count


def padded(x, mask, axis, fill):
    """x with ``fill`` written at every masked-out position."""
    x = np.array(x, copy=True)
    channels_last = np.moveaxis(x, axis, -1)
    channels_last[~np.broadcast_to(mask, channels_last.shape[:-1])] = fill
    return x


def random_mask(shape, share=0.6):
    mask = RNG.random(shape) < share
    mask.flat[:2] = True   # at least two valid positions
    return mask


def padding_mask(shape):
    """Each row (the last axis) valid up to a random length, some wholly
    valid or wholly masked: padded sequences, which the kernels sum in place."""
    lengths = RNG.integers(0, shape[-1] + 1, size=shape[:-1])
    mask = np.arange(shape[-1]) < lengths[..., None]
    mask.flat[:2] = True
    return mask


MASKS = {"random": random_mask, "padding": padding_mask}


# (shape, axis): every walk of the kernels: the fused planar forward, long
# planar runs, short runs row by row (sweep), (N, C) rows, short interleaved
# runs whose tiles split channels (C * inner > 512), and channels last.
SHAPES = [
    ((8, 6, 300), 1),
    ((3, 4, 70000), 1),
    ((64, 16, 40), 1),
    ((500, 7), 1),
    ((256, 70, 9), 1),
    ((130, 3, 5), 1),
    ((5, 4, 3, 6), 1),
    ((12, 9, 5), -1),
    ((2, 40000, 3), 1),
]


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_batch_stats_over_the_valid_positions(shape, axis, dtype, kind):
    mask = MASKS[kind](positions_shape(shape, axis))
    x = (RNG.standard_normal(shape) * 2 + 1e3).astype(dtype)
    x = padded(x, mask, axis, np.nan)   # padding never reaches the statistics
    mean, var = cbn.batch_stats(x, axis=axis, mask=mask)
    ref_mean, ref_var, _ = reference_stats(x, mask, axis)
    assert mean.dtype == var.dtype == dtype
    if dtype == np.float64:
        np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-13 * 1e3)
        np.testing.assert_allclose(var, ref_var, rtol=1e-12)
    else:   # one float32 rounding of the exact values
        assert np.all(np.abs(mean - ref_mean) <= np.spacing(np.float32(ref_mean)))
        np.testing.assert_allclose(var, ref_var, rtol=2e-7)


def test_a_large_mean_loses_nothing():
    shape = (16, 5, 700)
    mask = random_mask((16, 700))
    x = RNG.standard_normal(shape) + 1e8
    mean, var = cbn.batch_stats(x, mask=mask)
    ref_mean, ref_var, _ = reference_stats(x, mask, 1)
    np.testing.assert_allclose(mean - 1e8, ref_mean - 1e8, atol=1e-7)
    np.testing.assert_allclose(var, ref_var, rtol=1e-7)


@pytest.mark.parametrize("mask_shape", [(6, 1), (1, 5), (5,), ()])
def test_masks_broadcast_like_numpy(mask_shape):
    x = RNG.standard_normal((6, 3, 5))
    mask = RNG.random(mask_shape) < 0.7
    if mask.size:
        mask.flat[0] = True
    else:
        mask = np.bool_(True)
    full = np.broadcast_to(mask, (6, 5))
    if full.sum() < 2:
        full = full.copy()
        full[:, :] = True
        mask = full
    np.testing.assert_array_equal(np.stack(cbn.batch_stats(x, mask=mask)),
                                  np.stack(cbn.batch_stats(x, mask=np.array(full))))


def test_all_valid_mask_equals_no_mask():
    x = RNG.standard_normal((7, 4, 33))
    mean, var = cbn.batch_stats(x, mask=np.ones((7, 33), bool))
    ref_mean, ref_var = cbn.batch_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_training_forward(dtype, ddof):
    shape = (6, 4, 9)
    x = RNG.standard_normal(shape).astype(dtype) * 3 + 2
    mask = random_mask((6, 9))
    bn = cbn.BatchNorm1d(4, momentum=0.2, dtype=dtype, running_var_ddof=ddof)
    bn.weight[:] = RNG.standard_normal(4)
    bn.bias[:] = RNG.standard_normal(4)
    y = bn(x, mask=mask)
    mean, var, count = reference_stats(x, mask, 1)
    expected = ((x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
                * bn.weight[:, None].astype(np.float64) + bn.bias[:, None])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)   # every position
    batch_var = var * count / (count - ddof)
    np.testing.assert_allclose(bn.running_mean, 0.2 * mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.running_var, 0.8 + 0.2 * batch_var, rtol=tol, atol=tol)
    assert bn.num_batches_tracked == 1


def test_cumulative_average_counts_valid_positions():
    bn = cbn.BatchNorm1d(3, momentum=None, dtype=np.float64)
    batches = [(RNG.standard_normal((5, 3, 8)), random_mask((5, 8))) for _ in range(3)]
    for x, mask in batches:
        bn(x, mask=mask)
    stats = [reference_stats(x, mask, 1) for x, mask in batches]
    np.testing.assert_allclose(bn.running_mean, np.mean([s[0] for s in stats], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.running_var,
                               np.mean([s[1] * s[2] / (s[2] - 1) for s in stats], axis=0),
                               rtol=1e-12)


def test_functions_take_the_mask():
    x = RNG.standard_normal((9, 5))
    mask = random_mask((9,))
    mean, var, count = reference_stats(x, mask, 1)
    running_mean, running_var = np.zeros(5), np.ones(5)
    y = cbn.batch_norm(x, running_mean, running_var, training=True, mask=mask)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(running_var, 0.9 + 0.1 * var * count / (count - 1),
                               rtol=1e-12)
    y2, save_mean, save_invstd = cbn.batch_norm_forward(x, mask=mask)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(save_mean, mean, rtol=1e-14)
    np.testing.assert_allclose(save_invstd, 1 / np.sqrt(var + 1e-5), rtol=1e-14)


def numeric_gradient(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape, axis", [((5, 3, 7), 1), ((9, 4), 1), ((4, 3, 2, 5), 1),
                                         ((6, 5, 3), -1), ((70, 3, 9), 1)])
def test_backward_is_the_exact_gradient(shape, axis, kind):
    """Finite differences of sum(y * g), masked positions included (their
    inputs move only their own outputs)."""
    mask = MASKS[kind](positions_shape(shape, axis))
    x = RNG.standard_normal(shape)
    weight, bias = RNG.standard_normal(shape[axis]), RNG.standard_normal(shape[axis])
    g = RNG.standard_normal(shape)

    def loss(values):
        return np.sum(cbn.batch_norm_forward(values, weight, bias, axis=axis,
                                             mask=mask)[0] * g)

    _, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis,
                                                       mask=mask)
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(g, x, save_mean, save_invstd,
                                                         weight, axis=axis, mask=mask)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), atol=1e-6)
    # the parameters' gradients are over every position
    x_hat = (np.moveaxis(x, axis, -1) - save_mean) * save_invstd
    np.testing.assert_allclose(grad_weight,
                               np.sum(x_hat * np.moveaxis(g, axis, -1), axis=tuple(
                                   range(len(shape) - 1))), rtol=1e-10)
    np.testing.assert_allclose(grad_bias, np.sum(np.moveaxis(g, axis, -1), axis=tuple(
        range(len(shape) - 1))), rtol=1e-10)
    layer = cbn.BatchNorm(shape[axis], axis=axis, dtype=np.float64)
    layer.weight[:], layer.bias[:] = weight, bias
    layer(x, mask=mask)
    np.testing.assert_allclose(layer.backward(g), dx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(layer.grad_weight, grad_weight, rtol=1e-12)


def test_backward_float32_and_relu():
    x = RNG.standard_normal((8, 3, 20)).astype(np.float32)
    mask = random_mask((8, 20))
    g = RNG.standard_normal(x.shape).astype(np.float32)
    layer = cbn.BatchNorm1d(3, activation="relu")
    y = layer(x, mask=mask)
    dx = layer.backward(g)
    reference = cbn.BatchNorm1d(3, dtype=np.float64)
    y64 = reference(x.astype(np.float64), mask=mask)
    np.testing.assert_allclose(y, np.maximum(y64, 0), atol=1e-5)
    dx64 = reference.backward(np.where(y64 > 0, g, 0).astype(np.float64))
    np.testing.assert_allclose(dx, dx64, atol=1e-4)


def test_the_mask_is_copied_for_the_backward():
    x = RNG.standard_normal((6, 2, 5))
    mask = random_mask((6, 5))
    g = RNG.standard_normal(x.shape)
    layer = cbn.BatchNorm1d(2, dtype=np.float64)
    layer(x, mask=mask)
    expected = cbn.batch_norm_backward(g, x, *cbn.batch_norm_forward(x, mask=mask)[1:],
                                       mask=mask)[0]
    mask[:] = True
    np.testing.assert_array_equal(layer.backward(g), expected)


def test_no_valid_position_is_an_empty_batch():
    x = RNG.standard_normal((4, 3, 5))
    layer = cbn.BatchNorm1d(3, dtype=np.float64)
    y = layer(x, mask=np.zeros((4, 5), bool))
    assert np.isnan(y).all()
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    mean, var = cbn.batch_stats(x, mask=np.zeros((4, 5), bool))
    assert np.isnan(mean).all() and np.isnan(var).all()
    assert cbn.Moments.of(x, mask=np.zeros((4, 5), bool)).count == 0


def test_eval_mode_ignores_the_mask_but_checks_it():
    x = RNG.standard_normal((4, 3, 5))
    layer = cbn.BatchNorm1d(3, dtype=np.float64)
    layer(x)
    layer.eval()
    mask = random_mask((4, 5))
    np.testing.assert_array_equal(layer(x, mask=mask), layer(x))
    with pytest.raises(ValueError, match=r"\(4, 7\)"):
        layer(x, mask=np.ones((4, 7), bool))
    np.testing.assert_array_equal(
        cbn.batch_norm(x, np.zeros(3), np.ones(3), mask=mask),
        cbn.batch_norm(x, np.zeros(3), np.ones(3)))


def state(layer):
    return {key: value.tobytes() for key, value in layer.state_dict().items()}


@pytest.mark.parametrize("mask, error, text", [
    (np.ones((3, 5), bool), ValueError, r"mask has shape \(3, 5\).*\(4, 5\).*\(4, 3, 5\)"),
    (np.ones((4, 5, 1), bool), ValueError, r"\(4, 5, 1\)"),
    (np.ones((4, 5)), TypeError, "boolean.*float64"),
    (np.ones((4, 5), np.int8), TypeError, "boolean.*int8"),
    (np.arange(20).reshape(4, 5) == 7, ValueError, "1 valid position"),
])
def test_bad_masks_raise_and_change_nothing(mask, error, text):
    x = RNG.standard_normal((4, 3, 5))
    layer = cbn.BatchNorm1d(3, dtype=np.float64)
    layer(x)
    before, g = state(layer), RNG.standard_normal(x.shape)
    expected_dx = cbn.BatchNorm1d(3, dtype=np.float64)
    expected_dx(x)
    with pytest.raises(error, match=text):
        layer(x * 2, mask=mask)
    assert state(layer) == before
    # the last good forward's backward is still there
    np.testing.assert_array_equal(layer.backward(g), expected_dx.backward(g))
    if "valid position" not in text:   # statistics of one value are fine
        with pytest.raises(error, match=text):
            cbn.batch_stats(x, mask=mask)


def test_moments_and_calibrate():
    batches = [(RNG.standard_normal((5, 3, 8)) + 4, random_mask((5, 8))) for _ in range(4)]
    moments = cbn.Moments(3)
    for x, mask in batches:
        moments.update(x, mask=mask)
    values = np.concatenate([valid_values(x, mask, 1) for x, mask in batches])
    assert moments.count == values.shape[0]
    np.testing.assert_allclose(moments.mean, values.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.var(0), values.var(axis=0), rtol=1e-12)
    one = cbn.Moments.of(*batches[0][:1], mask=batches[0][1])
    assert one.count == batches[0][1].sum()

    layer = cbn.BatchNorm1d(3, dtype=np.float64)
    layer.calibrate(batches)
    np.testing.assert_allclose(layer.running_mean, values.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, values.var(axis=0, ddof=1), rtol=1e-12)

    same_mask = batches[0][1]
    layer.calibrate([x for x, _ in batches], mask=same_mask)
    shared = np.concatenate([valid_values(x, same_mask, 1) for x, _ in batches])
    np.testing.assert_allclose(layer.running_mean, shared.mean(axis=0), rtol=1e-13)
    before = state(layer)
    with pytest.raises(ValueError, match="pair"):
        layer.calibrate(batches, mask=same_mask)
    with pytest.raises(TypeError, match="batch 1: .*boolean"):
        layer.calibrate([batches[0], (batches[1][0], batches[1][1].astype(int))])
    assert state(layer) == before


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_over_ranks_equals_one_process(ranks):
    sizes = [3, 0, 4][:ranks] if ranks == 3 else [2, 5]
    x = RNG.standard_normal((sum(sizes), 4, 6))
    mask = random_mask((sum(sizes), 6))
    g = RNG.standard_normal(x.shape)
    local = cbn.BatchNorm1d(4, dtype=np.float64)
    y = local(x, mask=mask)
    dx = local.backward(g)

    def work(comm):
        rank = comm.Get_rank()
        layer = cbn.SyncBatchNorm(4, comm=comm, dtype=np.float64)
        part = split(x, sizes)[rank]
        out = layer(part, mask=split(mask, sizes)[rank])
        grad = layer.backward(split(g, sizes)[rank])
        return out, grad, layer.running_mean, layer.running_var

    results = run_ranks(ranks, work)
    for rank, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        out, grad, running_mean, running_var = result
        np.testing.assert_allclose(out, split(y, sizes)[rank], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(grad, split(dx, sizes)[rank], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(running_mean, local.running_mean, rtol=1e-12)
        np.testing.assert_allclose(running_var, local.running_var, rtol=1e-12)


def test_infinite_padding_and_infinite_data():
    x = RNG.standard_normal((4, 2, 6))
    mask = random_mask((4, 6))
    mean, var = cbn.batch_stats(padded(x, mask, 1, np.inf), mask=mask)
    ref_mean, ref_var, _ = reference_stats(x, mask, 1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    x_inf = x.copy()
    x_inf[np.nonzero(mask)[0][0], :, np.nonzero(mask)[1][0]] = np.inf   # a valid value
    mean, _ = cbn.batch_stats(x_inf, mask=mask)
    assert np.all(mean == np.inf)


def test_masks_from_other_libraries_and_lists():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((5, 3, 6))
    mask = random_mask((5, 6))
    expected = np.stack(cbn.batch_stats(x, mask=mask))
    for other in (torch.from_numpy(mask), mask.tolist()):
        np.testing.assert_array_equal(np.stack(cbn.batch_stats(x, mask=other)), expected)
    with pytest.raises(TypeError, match="boolean.*int64"):
        cbn.batch_stats(x, mask=torch.from_numpy(mask.astype(np.int64)))
