"""The BatchNorm layer's semantics, one test per rule.

PyTorch's rules (biased variance to normalize, unbiased running_var, the
momentum update, cumulative averages, track_running_stats, eval purity, the
single-value and empty-batch cases), the public API (train/eval, parameters,
buffers, reset, repr, rank checks), NumPy extras (channels-last, dtypes, odd
memory layouts), backward, NaN/inf isolation and state_dict.

Expected values come from float64 NumPy formulas written out here or from
``cbn.reference``, never from cbn's compiled path.
"""
import re

import numpy as np
import pytest

import cbn
from cbn import reference

from corpus import DTYPES, SMALL_LAYOUTS, assert_close, layer_state, make_input, per_channel

EPS = 1e-5

LAYOUTS = SMALL_LAYOUTS

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------
# Helpers







def batch_moments(x, axis):
    """Per-channel float64 mean, biased variance and count, two-pass NumPy."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    mean = x.mean(axis=axes)
    var = ((x - per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    return mean, var, x.size // x.shape[axis]


def normalized(x, mean, var, axis, weight=None, bias=None, eps=EPS):
    """float64 (x - mean) / sqrt(var + eps) * weight + bias."""
    x = np.asarray(x, dtype=np.float64)
    y = (x - per_channel(mean, x.ndim, axis)) / np.sqrt(per_channel(var, x.ndim, axis) + eps)
    if weight is not None:
        y = y * per_channel(weight, x.ndim, axis)
    if bias is not None:
        y = y + per_channel(bias, x.ndim, axis)
    return y


def make_layer(num_features, axis=1, dtype=np.float32, rng=None, cls=cbn.BatchNorm, **kwargs):
    """A layer; with ``rng``, non-trivial weight and bias."""
    layer = cls(num_features, axis=axis, dtype=dtype, **kwargs)
    if rng is not None and layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2.0, num_features)
        layer.bias[...] = rng.uniform(-1.0, 1.0, num_features)
    return layer


def params64(layer):
    if not layer.affine:
        return None, None
    return layer.weight.astype(np.float64), layer.bias.astype(np.float64)




# ---------------------------------------------------------------------------
# PyTorch's statistics rules

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_training_normalizes_with_biased_variance(rng, shape, axis, dtype):
    x = make_input(rng, shape, axis, dtype)
    layer = make_layer(shape[axis], axis, dtype, rng)
    y = layer(x)
    mean, var, _ = batch_moments(x, axis)
    weight, bias = params64(layer)
    assert_close(y, normalized(x, mean, var, axis, weight, bias), dtype=dtype)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_running_var_uses_unbiased_variance(rng, shape, axis):
    # momentum=1: the running stats are exactly the last batch's.
    layer = make_layer(shape[axis], axis, np.float64, momentum=1.0)
    x = make_input(rng, shape, axis, np.float64)
    layer(x)
    mean, var, n = batch_moments(x, axis)
    np.testing.assert_allclose(layer.running_var, var * n / (n - 1), rtol=1e-12)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, 0.0, 1.0])
def test_running_stats_follow_the_momentum_update(rng, momentum, dtype):
    shape, axis = (4, 3, 5, 2), 1
    layer = make_layer(3, axis, dtype, momentum=momentum)
    expected_mean, expected_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = make_input(rng, shape, axis, dtype, offset=2.0 * step)
        layer(x)
        mean, var, n = batch_moments(x, axis)
        expected_mean = (1 - momentum) * expected_mean + momentum * mean
        expected_var = (1 - momentum) * expected_var + momentum * var * n / (n - 1)
        assert layer.running_mean.dtype == dtype and layer.running_var.dtype == dtype
        assert_close(layer.running_mean, expected_mean, kind="stats", dtype=dtype)
        assert_close(layer.running_var, expected_var, kind="stats", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_none_is_the_cumulative_average(rng, dtype):
    layer = make_layer(4, 1, dtype, momentum=None)
    batch_means, batch_vars = [], []
    for k in range(1, 6):
        x = make_input(rng, (5, 4, 3), 1, dtype, offset=float(k))
        layer(x)
        mean, var, n = batch_moments(x, 1)
        batch_means.append(mean)
        batch_vars.append(var * n / (n - 1))
        assert layer.num_batches_tracked == k
        assert_close(layer.running_mean, np.mean(batch_means, axis=0), kind="stats", dtype=dtype)
        assert_close(layer.running_var, np.mean(batch_vars, axis=0), kind="stats", dtype=dtype)
    # After a reset the average restarts: one batch gives exactly its stats.
    layer.reset_running_stats()
    x = make_input(rng, (5, 4, 3), 1, dtype, offset=-7.0)
    layer(x)
    mean, var, n = batch_moments(x, 1)
    assert layer.num_batches_tracked == 1
    assert_close(layer.running_mean, mean, kind="stats", dtype=dtype)
    assert_close(layer.running_var, var * n / (n - 1), kind="stats", dtype=dtype)


@pytest.mark.parametrize("training", [True, False])
def test_layer_without_tracking_uses_batch_stats_in_train_and_eval(rng, training):
    layer = make_layer(3, 1, np.float64, rng, track_running_stats=False)
    assert layer.running_mean is None
    assert layer.running_var is None
    assert layer.num_batches_tracked is None
    layer.train(training)
    x = make_input(rng, (6, 3, 4), 1, np.float64, offset=5.0)
    y = layer(x)
    mean, var, _ = batch_moments(x, 1)
    weight, bias = params64(layer)
    assert_close(y, normalized(x, mean, var, 1, weight, bias), dtype=np.float64)
    assert layer.running_mean is None
    assert layer.running_var is None
    assert layer.num_batches_tracked is None


def test_disabling_tracking_later_freezes_buffers_but_eval_uses_them(rng):
    layer = make_layer(3, 1, np.float64, rng)
    layer(make_input(rng, (6, 3, 4), 1, np.float64, offset=4.0, scale=3.0))
    frozen_mean = layer.running_mean.copy()
    frozen_var = layer.running_var.copy()
    assert layer.num_batches_tracked == 1
    layer.track_running_stats = False
    weight, bias = params64(layer)

    x = make_input(rng, (6, 3, 4), 1, np.float64, offset=-2.0)
    y_train = layer(x)
    mean, var, _ = batch_moments(x, 1)
    assert_close(y_train, normalized(x, mean, var, 1, weight, bias), dtype=np.float64)
    assert layer.running_mean.tobytes() == frozen_mean.tobytes()
    assert layer.running_var.tobytes() == frozen_var.tobytes()
    assert layer.num_batches_tracked == 1

    layer.eval()
    y_eval = layer(x)
    assert_close(y_eval, normalized(x, frozen_mean, frozen_var, 1, weight, bias), dtype=np.float64)
    assert layer.running_mean.tobytes() == frozen_mean.tobytes()
    assert layer.running_var.tobytes() == frozen_var.tobytes()


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"affine": False}, id="no-affine"),
    pytest.param({"track_running_stats": False}, id="no-tracking"),
    pytest.param({"dtype": np.float64, "axis": -1}, id="float64-channels-last"),
])
def test_eval_never_changes_any_state(rng, kwargs):
    axis = kwargs.get("axis", 1)
    shape = (5, 4, 3) if axis == 1 else (5, 3, 4)
    layer = cbn.BatchNorm(4, **kwargs)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, 4)
        layer.bias[...] = rng.uniform(-1, 1, 4)
    layer(make_input(rng, shape, axis, np.float32, offset=3.0))
    layer.eval()
    before = layer_state(layer)
    for step in range(3):
        layer(make_input(rng, shape, axis, np.float32, offset=float(step)))
        layer(make_input(rng, shape, axis, np.float64))
    layer(make_input(rng, (1,) + shape[1:], axis, np.float32))  # one row: fine in eval
    assert layer_state(layer) == before


SINGLE_VALUE_SHAPES = [
    pytest.param((1, 3), 1, id="NC"),
    pytest.param((1, 3, 1), 1, id="NCL"),
    pytest.param((1, 3, 1, 1), 1, id="NCHW"),
    pytest.param((1, 1, 1, 3), -1, id="NHWC"),
    pytest.param((1, 3, 1, 1, 1), 1, id="NCDHW"),
]
SINGLE_VALUE_MESSAGE = r"^Expected more than 1 value per channel when training, got input size"
# In eval mode (no running statistics) the layer is not training: the message
# says what the values are for instead.
SINGLE_VALUE_EVAL_MESSAGE = (r"^Expected more than 1 value per channel to compute batch "
                             r"statistics \(.*eval mode.*\), got input size")


@pytest.mark.parametrize("shape, axis", SINGLE_VALUE_SHAPES)
def test_single_value_per_channel_in_training_raises(rng, shape, axis):
    layer = make_layer(3, axis, np.float32, rng)
    before = layer_state(layer)
    with pytest.raises(ValueError, match=SINGLE_VALUE_MESSAGE):
        layer(np.ones(shape, np.float32))
    assert layer_state(layer) == before
    # A layer without running stats uses batch stats in eval, so it raises too.
    untracked = make_layer(3, axis, np.float32, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=SINGLE_VALUE_EVAL_MESSAGE):
        untracked(np.ones(shape, np.float32))


@pytest.mark.parametrize("shape, axis", SINGLE_VALUE_SHAPES)
def test_single_value_per_channel_in_training_raises_in_functions(shape, axis):
    x = np.ones(shape, np.float32)
    running_mean, running_var = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=SINGLE_VALUE_MESSAGE):
        cbn.batch_norm(x, running_mean, running_var, training=True, axis=axis)
    assert running_mean.tolist() == [0, 0, 0] and running_var.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=SINGLE_VALUE_MESSAGE):
        cbn.batch_norm_forward(x, axis=axis)


def test_single_value_per_channel_is_fine_in_eval(rng):
    layer = make_layer(3, 1, np.float64, rng)
    layer(make_input(rng, (8, 3), 1, np.float64, offset=1.0))
    layer.eval()
    x = make_input(rng, (1, 3), 1, np.float64)
    weight, bias = params64(layer)
    expected = normalized(x, layer.running_mean, layer.running_var, 1, weight, bias)
    assert_close(layer(x), expected, dtype=np.float64)


EMPTY_SHAPES = [
    pytest.param((0, 3), 1, id="NC"),
    pytest.param((0, 3, 4, 4), 1, id="NCHW"),
    pytest.param((0, 4, 4, 3), -1, id="NHWC"),
    pytest.param((2, 3, 0), 1, id="NCL-L0"),
    pytest.param((0, 3, 5), 1, id="NCL-N0"),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", EMPTY_SHAPES)
def test_empty_batch_returns_empty_output_and_keeps_stats(rng, shape, axis, dtype, training):
    """An empty batch changes no statistics; in training it counts in
    num_batches_tracked, as in PyTorch 2.13."""
    layer = make_layer(3, axis, np.float32, rng)
    full_shape = tuple(3 if d == 0 and i != axis % len(shape) else d for i, d in enumerate(shape))
    layer(make_input(rng, full_shape, axis, np.float32, offset=2.0))  # non-trivial stats
    layer.train(training)
    before = layer_state(layer)
    y = layer(np.empty(shape, dtype))
    assert y.shape == shape
    assert y.dtype == dtype
    after = layer_state(layer)
    assert after.pop("num_batches_tracked") == (2 if training else 1)
    before.pop("num_batches_tracked")
    assert after == before


def test_an_empty_batch_counts_in_the_cumulative_average(rng):
    """PyTorch 2.13: with momentum=None, an empty batch then a batch of 8
    whose mean is 10.5 leaves running_mean at 5.25 (factor 1/2), not 10.5."""
    layer = cbn.BatchNorm1d(1, momentum=None)
    layer(np.empty((0, 1), np.float32))
    assert layer.num_batches_tracked == 1
    layer(np.arange(7.0, 15.0, dtype=np.float32).reshape(8, 1))
    assert layer.num_batches_tracked == 2
    assert layer.running_mean[0] == np.float32(5.25)


@pytest.mark.parametrize("shape, axis", EMPTY_SHAPES)
def test_empty_batch_in_functional_batch_norm_keeps_stats(shape, axis):
    running_mean, running_var = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    y = cbn.batch_norm(np.empty(shape, np.float32), running_mean, running_var,
                       training=True, axis=axis)
    assert y.shape == shape and y.dtype == np.float32
    assert running_mean.tolist() == [1.0, 2.0, 3.0]
    assert running_var.tolist() == [4.0, 5.0, 6.0]


# ---------------------------------------------------------------------------
# Layer API

def test_train_and_eval_return_the_layer_and_set_training():
    layer = cbn.BatchNorm2d(3)
    assert layer.training is True
    assert layer.eval() is layer
    assert layer.training is False
    assert layer.train() is layer
    assert layer.training is True
    assert layer.train(False) is layer
    assert layer.training is False
    assert layer.train(True) is layer
    assert layer.training is True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [cbn.BatchNorm, cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
def test_weight_and_bias_start_at_one_and_zero(cls, dtype):
    layer = cls(5, dtype=dtype)
    for name, value in (("weight", 1.0), ("bias", 0.0)):
        array = getattr(layer, name)
        assert isinstance(array, np.ndarray), name
        assert array.shape == (5,) and array.dtype == dtype, name
        assert np.all(array == value), name


@pytest.mark.parametrize("training", [True, False])
def test_affine_false_has_no_parameters_and_no_parameter_gradients(rng, training):
    layer = make_layer(3, 1, np.float64, affine=False)
    assert layer.weight is None and layer.bias is None
    x = make_input(rng, (6, 3, 2), 1, np.float64)
    dy = rng.standard_normal(x.shape)
    layer(x)
    layer.train(training)
    y = layer(x)
    dx = layer.backward(dy)
    assert layer.grad_weight is None and layer.grad_bias is None
    assert dx.shape == x.shape
    if training:
        mean, var, _ = batch_moments(x, 1)
        assert_close(y, normalized(x, mean, var, 1), dtype=np.float64)
    assert "weight" not in layer.state_dict() and "bias" not in layer.state_dict()


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_start_at_zero_and_one(dtype):
    layer = cbn.BatchNorm(4, dtype=dtype)
    assert layer.running_mean.shape == (4,) and layer.running_mean.dtype == dtype
    assert layer.running_var.shape == (4,) and layer.running_var.dtype == dtype
    assert np.all(layer.running_mean == 0)
    assert np.all(layer.running_var == 1)
    assert layer.num_batches_tracked == 0
    assert isinstance(layer.num_batches_tracked, int)


def test_num_batches_tracked_counts_training_batches(rng):
    layer = cbn.BatchNorm(3)
    for k in range(1, 4):
        layer(make_input(rng, (4, 3), 1, np.float32))
        assert layer.num_batches_tracked == k
        assert isinstance(layer.num_batches_tracked, int)
    layer.eval()
    layer(make_input(rng, (4, 3), 1, np.float32))
    assert layer.num_batches_tracked == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_reset_running_stats_keeps_parameters(rng, dtype):
    layer = make_layer(4, 1, dtype, rng)
    for _ in range(2):
        layer(make_input(rng, (5, 4, 3), 1, dtype, offset=3.0))
    weight, bias = layer.weight.copy(), layer.bias.copy()
    layer.reset_running_stats()
    assert np.all(layer.running_mean == 0) and layer.running_mean.dtype == dtype
    assert np.all(layer.running_var == 1) and layer.running_var.dtype == dtype
    assert layer.num_batches_tracked == 0
    assert layer.weight.tobytes() == weight.tobytes()
    assert layer.bias.tobytes() == bias.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_reset_parameters_resets_parameters_and_running_stats(rng, dtype):
    layer = make_layer(4, 1, dtype, rng)
    for _ in range(2):
        layer(make_input(rng, (5, 4, 3), 1, dtype, offset=3.0))
    layer.reset_parameters()
    assert np.all(layer.weight == 1) and layer.weight.dtype == dtype
    assert np.all(layer.bias == 0) and layer.bias.dtype == dtype
    assert np.all(layer.running_mean == 0)
    assert np.all(layer.running_var == 1)
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("make, expected", [
    (lambda: cbn.BatchNorm2d(64),
     "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"),
    (lambda: cbn.BatchNorm1d(3, eps=1e-3, momentum=None, affine=False, track_running_stats=False),
     "BatchNorm1d(3, eps=0.001, momentum=None, affine=False, track_running_stats=False)"),
    (lambda: cbn.BatchNorm3d(8, momentum=0.01),
     "BatchNorm3d(8, eps=1e-05, momentum=0.01, affine=True, track_running_stats=True)"),
    (lambda: cbn.BatchNorm(5, eps=0.5, momentum=0.25),
     "BatchNorm(5, eps=0.5, momentum=0.25, affine=True, track_running_stats=True)"),
])
def test_repr(make, expected):
    assert repr(make()) == expected


@pytest.mark.parametrize("cls, shape, message", [
    (cbn.BatchNorm1d, (2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
    (cbn.BatchNorm1d, (2, 3, 4, 4, 4), "expected 2D or 3D input (got 5D input)"),
    (cbn.BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
    (cbn.BatchNorm2d, (2, 3, 4, 4, 4), "expected 4D input (got 5D input)"),
    (cbn.BatchNorm3d, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
    (cbn.BatchNorm3d, (2, 3), "expected 5D input (got 2D input)"),
])
def test_rank_checks(cls, shape, message):
    layer = cls(3)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        layer(np.ones(shape, np.float32))


@pytest.mark.parametrize("cls, shape", [
    (cbn.BatchNorm1d, (4, 3)), (cbn.BatchNorm1d, (4, 3, 5)),
    (cbn.BatchNorm2d, (4, 3, 2, 2)), (cbn.BatchNorm3d, (4, 3, 2, 2, 2)),
])
def test_rank_checks_accept_the_right_ranks(rng, cls, shape):
    x = make_input(rng, shape, 1, np.float64)
    y = cls(3, dtype=np.float64)(x)
    mean, var, _ = batch_moments(x, 1)
    assert_close(y, normalized(x, mean, var, 1), dtype=np.float64)


# ---------------------------------------------------------------------------
# Channels-last, dtypes, memory layouts

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 4, 5, 6), (2, 3, 4, 5, 3)],
                         ids=["NC", "NCL", "NCHW", "NCDHW"])
def test_channels_last_equals_transposed_channels_first(rng, shape, dtype):
    ndim, num_channels = len(shape), shape[1]
    to_last = (0,) + tuple(range(2, ndim)) + (1,)
    x = make_input(rng, shape, 1, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    first = make_layer(num_channels, 1, dtype, rng)
    last = make_layer(num_channels, -1, dtype)
    last.weight[...] = first.weight
    last.bias[...] = first.bias
    for training in (True, False):
        first.train(training)
        last.train(training)
        y_first = first(x)
        y_last = last(np.ascontiguousarray(x.transpose(to_last)))
        assert y_last.shape == tuple(shape[i] for i in to_last)
        assert_close(np.moveaxis(y_last, -1, 1), y_first, dtype=dtype, scale=1)
        dx_first = first.backward(dy)
        dx_last = last.backward(np.ascontiguousarray(dy.transpose(to_last)))
        assert_close(np.moveaxis(dx_last, -1, 1), dx_first, kind="grad", dtype=dtype, scale=1)
        assert_close(last.grad_weight, first.grad_weight, kind="grad", dtype=dtype, scale=10)
        assert_close(last.grad_bias, first.grad_bias, kind="grad", dtype=dtype, scale=10)
        assert_close(last.running_mean, first.running_mean, kind="stats", dtype=dtype, scale=1)
        assert_close(last.running_var, first.running_var, kind="stats", dtype=dtype, scale=1)
    # and both against the oracle
    weight, bias = params64(first)
    expected = normalized(x, first.running_mean, first.running_var, 1, weight, bias)
    assert_close(np.moveaxis(y_last, -1, 1), expected, dtype=dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", [np.float16, np.float32, np.float64])
def test_output_has_input_shape_and_dtype(rng, in_dtype, layer_dtype, training):
    layer = make_layer(4, 1, layer_dtype, rng)
    layer(make_input(rng, (6, 4, 3, 2), 1, np.float64, offset=1.5))
    layer.train(training)
    running_mean = layer.running_mean.astype(np.float64)
    running_var = layer.running_var.astype(np.float64)
    x = make_input(rng, (5, 4, 3, 2), 1, in_dtype)
    dy = rng.standard_normal(x.shape).astype(in_dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == in_dtype
    weight, bias = params64(layer)
    mean, var, n = batch_moments(x, 1)
    if training:
        assert_close(y, normalized(x, mean, var, 1, weight, bias), dtype=in_dtype)
        assert_close(layer.running_mean, 0.9 * running_mean + 0.1 * mean, kind="stats",
                     dtype=layer_dtype)
        assert_close(layer.running_var, 0.9 * running_var + 0.1 * var * n / (n - 1),
                     kind="stats", dtype=layer_dtype)
    else:
        assert_close(y, normalized(x, running_mean, running_var, 1, weight, bias), dtype=in_dtype)
    dx = layer.backward(dy)
    assert dx.shape == x.shape and dx.dtype == in_dtype
    for name in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        assert getattr(layer, name).dtype == layer_dtype, name


def test_float64_input_in_float32_layer_is_computed_in_float64(rng):
    # With a mean of 1e3 and a spread of ~1, a float32 computation would be off
    # by ~1e-4; float64 stays near 1e-12.
    layer = make_layer(3, 1, np.float32, rng)
    weight, bias = params64(layer)
    x = make_input(rng, (6, 3, 5), 1, np.float64, offset=1e3)
    y = layer(x)
    assert y.dtype == np.float64
    mean, var, n = batch_moments(x, 1)
    np.testing.assert_allclose(y, normalized(x, mean, var, 1, weight, bias),
                               rtol=1e-10, atol=1e-10)
    assert layer.running_mean.dtype == np.float32 and layer.running_var.dtype == np.float32
    np.testing.assert_allclose(layer.running_mean, (0.1 * mean).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(layer.running_var,
                               (0.9 + 0.1 * var * n / (n - 1)).astype(np.float32), rtol=1e-6)
    layer.eval()
    y = layer(x)
    expected = normalized(x, layer.running_mean.astype(np.float64),
                          layer.running_var.astype(np.float64), 1, weight, bias)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_input_and_gradient_are_never_modified(rng, dtype, training):
    layer = make_layer(4, 1, np.float32, rng)
    layer.train(training)
    x = make_input(rng, (5, 4, 3, 2), 1, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    x_before, dy_before = x.copy(), dy.copy()
    y = layer(x)
    dx = layer.backward(dy)
    assert x.tobytes() == x_before.tobytes()
    assert dy.tobytes() == dy_before.tobytes()
    assert not np.shares_memory(y, x)
    assert not np.shares_memory(dx, dy) and not np.shares_memory(dx, x)


def _strided(x):
    big = np.zeros((2 * x.shape[0],) + x.shape[1:], x.dtype)
    big[::2] = x
    return big[::2]


def _last_axis_strided(x):
    big = np.zeros(x.shape[:-1] + (3 * x.shape[-1],), x.dtype)
    big[..., ::3] = x
    return big[..., ::3]


def _readonly(x):
    x = x.copy()
    x.setflags(write=False)
    return x


def _transposed_view(x):
    return np.ascontiguousarray(np.moveaxis(x, 0, -1)).transpose(
        (x.ndim - 1,) + tuple(range(x.ndim - 1)))


ODD_LAYOUTS = [
    pytest.param(_readonly, id="read-only"),
    pytest.param(np.asfortranarray, id="fortran"),
    pytest.param(_strided, id="strided-batch"),
    pytest.param(_last_axis_strided, id="strided-last-axis"),
    pytest.param(_transposed_view, id="transposed-view"),
    pytest.param(lambda x: x.astype(x.dtype.newbyteorder(">")), id="big-endian"),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((5, 4, 3, 6), 1), ((5, 3, 6, 4), -1), ((7, 4), 1)],
                         ids=["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("odd", ODD_LAYOUTS)
def test_odd_memory_layouts_give_the_plain_result(rng, odd, shape, axis, dtype, training):
    x = make_input(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x_odd, dy_odd = odd(x), odd(dy)
    assert np.array_equal(x_odd, x) and np.array_equal(dy_odd, dy)  # same values
    x_odd_before = x_odd.copy()
    plain = make_layer(4, axis, np.float32, rng)
    other = make_layer(4, axis, np.float32)
    other.weight[...] = plain.weight
    other.bias[...] = plain.bias
    plain.train(training)
    other.train(training)
    y_plain, y_odd = plain(x), other(x_odd)
    assert y_odd.shape == y_plain.shape
    assert y_odd.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y_odd, y_plain)
    np.testing.assert_array_equal(other.running_mean, plain.running_mean)
    np.testing.assert_array_equal(other.running_var, plain.running_var)
    np.testing.assert_array_equal(other.backward(dy_odd), plain.backward(dy))
    np.testing.assert_array_equal(other.grad_weight, plain.grad_weight)
    np.testing.assert_array_equal(other.grad_bias, plain.grad_bias)
    assert x_odd.tobytes() == x_odd_before.tobytes()
    assert x_odd.dtype == x_odd_before.dtype


# ---------------------------------------------------------------------------
# Backward

def reference_grads(layer, x, dy, axis, training):
    weight = None if not layer.affine else layer.weight.astype(np.float64)
    if training:
        _, mean, invstd = reference.batch_norm_forward(x, weight, None, layer.eps, axis=axis)
    else:
        mean = layer.running_mean.astype(np.float64)
        invstd = 1.0 / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
    return reference.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                         training=training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_backward_matches_reference(rng, shape, axis, dtype, affine, training):
    layer = make_layer(shape[axis], axis, dtype, rng, affine=affine)
    layer(make_input(rng, shape, axis, dtype, offset=1.0, scale=2.0))  # non-trivial stats
    layer.train(training)
    x = make_input(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    stats = (layer.running_mean.copy(), layer.running_var.copy())
    y = layer(x)
    if not training:
        assert np.array_equal(layer.running_mean, stats[0])
        weight, bias = params64(layer)
        expected_y = reference.batch_norm(x, stats[0].astype(np.float64),
                                          stats[1].astype(np.float64), weight, bias,
                                          training=False, eps=EPS, axis=axis)
        assert_close(y, expected_y, dtype=dtype)
    dx = layer.backward(dy)
    dx_ref, grad_weight_ref, grad_bias_ref = reference_grads(layer, x, dy, axis, training)
    assert dx.dtype == dtype and dx.shape == shape
    assert_close(dx, dx_ref, kind="grad", dtype=dtype)
    if affine:
        assert layer.grad_weight.dtype == dtype and layer.grad_bias.dtype == dtype
        assert layer.grad_weight.shape == (shape[axis],)
        assert_close(layer.grad_weight, grad_weight_ref, kind="grad", dtype=dtype)
        assert_close(layer.grad_bias, grad_bias_ref, kind="grad", dtype=dtype)
    else:
        assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("training", [True, False])
def test_backward_twice_gives_the_same_result(rng, training):
    layer = make_layer(3, 1, np.float32, rng)
    layer(make_input(rng, (4, 3, 5), 1, np.float32, offset=1.0))
    layer.train(training)
    x = make_input(rng, (4, 3, 5), 1, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer(x)
    dx1 = layer.backward(dy)
    dx1_copy = dx1.copy()
    grad_weight1, grad_bias1 = layer.grad_weight.copy(), layer.grad_bias.copy()
    dx2 = layer.backward(dy)
    assert dx2 is not dx1
    np.testing.assert_array_equal(dx2, dx1_copy)
    np.testing.assert_array_equal(dx1, dx1_copy)
    np.testing.assert_array_equal(layer.grad_weight, grad_weight1)
    np.testing.assert_array_equal(layer.grad_bias, grad_bias1)
    dx_ref, _, _ = reference_grads(layer, x, dy, 1, training)
    assert_close(dx2, dx_ref, kind="grad", dtype=np.float32)


# ---------------------------------------------------------------------------
# NaN and inf stay in their channel

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((6, 4), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)],
                         ids=["NC", "NCHW", "NHWC"])
def test_nonfinite_values_stay_in_their_channel(rng, shape, axis, dtype, bad):
    num_channels, bad_channel, good = 4, 2, [0, 1, 3]
    ndim = len(shape)
    x = make_input(rng, shape, axis, dtype)
    index = [1] * ndim
    index[axis] = bad_channel
    x[tuple(index)] = bad
    dy = rng.standard_normal(shape).astype(dtype)
    x_good = np.take(x, good, axis=axis)
    dy_good = np.take(dy, good, axis=axis)

    # training: output, running stats and gradients
    layer = make_layer(num_channels, axis, dtype, rng)
    weight, bias = params64(layer)
    y = layer(x)
    dx = layer.backward(dy)
    mean, var, n = batch_moments(x_good, axis)
    y_good = np.take(y, good, axis=axis)
    assert np.isfinite(y_good).all()
    assert_close(y_good, normalized(x_good, mean, var, axis, weight[good], bias[good]),
                 dtype=dtype)
    assert not np.isfinite(y[tuple(index)])
    assert np.isfinite(layer.running_mean[good]).all()
    assert np.isfinite(layer.running_var[good]).all()
    assert_close(layer.running_mean[good], 0.1 * mean, kind="stats", dtype=dtype)
    assert_close(layer.running_var[good], 0.9 + 0.1 * var * n / (n - 1), kind="stats", dtype=dtype)
    assert not np.isfinite(layer.running_mean[bad_channel])
    _, ref_mean, ref_invstd = reference.batch_norm_forward(x_good, weight[good], None, EPS,
                                                           axis=axis)
    dx_ref, grad_weight_ref, grad_bias_ref = reference.batch_norm_backward(
        dy_good, x_good, ref_mean, ref_invstd, weight[good], axis=axis, training=True)
    dx_good = np.take(dx, good, axis=axis)
    assert np.isfinite(dx_good).all()
    assert_close(dx_good, dx_ref, kind="grad", dtype=dtype)
    assert_close(layer.grad_weight[good], grad_weight_ref, kind="grad", dtype=dtype)
    assert_close(layer.grad_bias[good], grad_bias_ref, kind="grad", dtype=dtype)

    # eval with clean running stats: only the bad element is non-finite
    clean = make_layer(num_channels, axis, dtype, rng)
    clean(make_input(rng, shape, axis, dtype, offset=1.0))
    clean.eval()
    y = clean(x)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(x))
    weight, bias = params64(clean)
    expected = normalized(x_good, clean.running_mean[good], clean.running_var[good], axis,
                          weight[good], bias[good])
    assert_close(np.take(y, good, axis=axis), expected, dtype=dtype)


# ---------------------------------------------------------------------------
# state_dict and load_state_dict

@pytest.mark.parametrize("affine, track, keys", [
    (True, True, ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
    (False, True, ["running_mean", "running_var", "num_batches_tracked"]),
    (True, False, ["weight", "bias"]),
    (False, False, []),
])
def test_state_dict_keys_and_order(affine, track, keys):
    layer = cbn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    assert list(layer.state_dict()) == keys


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_values_are_copies(rng, dtype):
    layer = make_layer(3, 1, dtype, rng)
    layer(make_input(rng, (4, 3), 1, dtype, offset=2.0))
    before = layer_state(layer)
    state = layer.state_dict()
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert isinstance(state[key], np.ndarray) and state[key].dtype == dtype, key
        np.testing.assert_array_equal(state[key], getattr(layer, key))
        assert not np.shares_memory(state[key], getattr(layer, key)), key
        state[key][...] = 123.0
    state["num_batches_tracked"][...] = 99
    assert layer_state(layer) == before


def test_num_batches_tracked_in_state_dict_is_a_0d_int64_array(rng):
    layer = cbn.BatchNorm(3)
    for _ in range(2):
        layer(make_input(rng, (4, 3), 1, np.float32))
    count = layer.state_dict()["num_batches_tracked"]
    assert isinstance(count, np.ndarray)
    assert count.shape == () and count.dtype == np.int64
    assert int(count) == 2


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="default"),
    pytest.param({"dtype": np.float64}, id="float64"),
    pytest.param({"affine": False}, id="no-affine"),
    pytest.param({"track_running_stats": False}, id="no-tracking"),
    pytest.param({"momentum": None, "axis": -1}, id="cumulative-channels-last"),
])
def test_load_state_dict_round_trip_gives_identical_outputs(rng, kwargs):
    axis = kwargs.get("axis", 1)
    shape = (5, 4, 3, 2) if axis == 1 else (5, 3, 2, 4)
    source = make_layer(4, rng=rng, **kwargs)
    for step in range(3):
        source(make_input(rng, shape, axis, np.float32, offset=float(step)))
    target = make_layer(4, **kwargs)
    result = target.load_state_dict(source.state_dict())
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert target.num_batches_tracked == source.num_batches_tracked
    source.eval()
    target.eval()
    x = make_input(rng, shape, axis, np.float32)
    np.testing.assert_array_equal(target(x), source(x))
    for key, value in source.state_dict().items():
        assert target.state_dict()[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_strict_rejects_a_missing_key(rng, key):
    source = make_layer(3, rng=rng)
    source(make_input(rng, (4, 3), 1, np.float32, offset=2.0))
    state = source.state_dict()
    del state[key]
    target = cbn.BatchNorm(3)
    before = layer_state(target)
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(state)
    assert layer_state(target) == before
    result = target.load_state_dict(state, strict=False)
    assert key in list(result.missing_keys)
    np.testing.assert_array_equal(getattr(target, key), getattr(cbn.BatchNorm(3), key))
    for other in state:
        if other != "num_batches_tracked":
            np.testing.assert_array_equal(getattr(target, other), state[other])
    assert target.num_batches_tracked == 1


def test_load_state_dict_strict_rejects_an_unexpected_key(rng):
    source = make_layer(3, rng=rng)
    state = source.state_dict()
    state["running_std"] = np.ones(3)
    target = cbn.BatchNorm(3)
    before = layer_state(target)
    with pytest.raises(ValueError, match="running_std"):
        target.load_state_dict(state)
    assert layer_state(target) == before
    result = target.load_state_dict(state, strict=False)
    assert list(result.unexpected_keys) == ["running_std"]
    np.testing.assert_array_equal(target.weight, source.weight)
    np.testing.assert_array_equal(target.bias, source.bias)


def test_load_state_dict_tolerates_missing_num_batches_tracked(rng):
    source = make_layer(3, rng=rng)
    source(make_input(rng, (4, 3), 1, np.float32, offset=2.0))
    state = source.state_dict()
    del state["num_batches_tracked"]
    target = cbn.BatchNorm(3)
    target.num_batches_tracked = 7
    target.load_state_dict(state)  # strict
    assert target.num_batches_tracked == 7
    for key in state:
        np.testing.assert_array_equal(getattr(target, key), state[key])


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_state_dict_accepts_array_likes(dtype):
    layer = cbn.BatchNorm(3, dtype=dtype)
    layer.load_state_dict({
        "weight": [1.5, 2.5, 3.5], "bias": (-1, 0, 1), "running_mean": [0.25, 0.5, 0.75],
        "running_var": np.array([2, 3, 4], np.int32), "num_batches_tracked": 5,
    })
    assert layer.weight.tolist() == [1.5, 2.5, 3.5] and layer.weight.dtype == dtype
    assert layer.bias.tolist() == [-1, 0, 1] and layer.bias.dtype == dtype
    assert layer.running_mean.tolist() == [0.25, 0.5, 0.75] and layer.running_mean.dtype == dtype
    assert layer.running_var.tolist() == [2, 3, 4] and layer.running_var.dtype == dtype
    assert layer.num_batches_tracked == 5


def test_load_state_dict_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    torch_layer = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        torch_layer.weight.copy_(torch.tensor([1.5, 2.5, 3.5]))
        torch_layer.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    torch_layer(torch.randn(4, 3, 2, 2) * 3 + 1)
    layer = cbn.BatchNorm2d(3)
    layer.load_state_dict(torch_layer.state_dict())
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(layer, key),
                                      getattr(torch_layer, key).detach().numpy())
    assert layer.num_batches_tracked == 1


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("key, bad", [
    ("weight", np.ones(4)), ("bias", np.ones((3, 1))), ("running_mean", np.ones(2)),
    ("running_var", np.ones(())), ("running_var", [1.0, 2.0]),
])
def test_load_state_dict_rejects_wrong_shapes_and_changes_nothing(rng, key, bad, strict):
    layer = make_layer(3, rng=rng)
    layer(make_input(rng, (4, 3), 1, np.float32, offset=2.0))
    before = layer_state(layer)
    state = {"weight": np.full(3, 7.0), "bias": np.full(3, 8.0),
             "running_mean": np.full(3, 9.0), "running_var": np.full(3, 10.0),
             "num_batches_tracked": np.array(11)}
    state[key] = bad
    shape_text = re.escape(str(np.shape(bad)))
    with pytest.raises(ValueError, match=rf"{key}.*{shape_text}"):
        layer.load_state_dict(state, strict=strict)
    assert layer_state(layer) == before


def test_load_state_dict_copies_into_the_layers_own_arrays(rng):
    layer = cbn.BatchNorm(3)
    keys = ("weight", "bias", "running_mean", "running_var")
    arrays = {key: getattr(layer, key) for key in keys}
    values = {key: rng.uniform(0.5, 2, 3).astype(np.float32) for key in arrays}
    layer.load_state_dict(dict(values, num_batches_tracked=np.array(4)))
    for key, array in arrays.items():
        assert getattr(layer, key) is array, key
        np.testing.assert_array_equal(array, values[key])
    assert layer.num_batches_tracked == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_uses_the_weight_of_its_forward(rng, dtype):
    # An optimizer may edit layer.weight in place between forward and backward.
    x = make_input(rng, (8, 3), 1, np.float64)
    dy = rng.standard_normal((8, 3))
    layer = make_layer(3, dtype=dtype, rng=rng)
    weight = layer.weight.astype(np.float64)
    layer(x)
    layer.weight *= 2
    _, mean, invstd = reference.batch_norm_forward(x)
    expected = reference.batch_norm_backward(dy, x, mean, invstd, weight)[0]
    assert_close(layer.backward(dy), expected, kind="grad",
                 dtype=np.float64 if dtype == np.float64 else np.float32)
