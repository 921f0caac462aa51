"""nonfinite="propagate" | "raise" | "skip": what a layer does with batch
statistics that are not finite (NaN or inf in the input)."""
import copy
import pickle

import numpy as np
import pytest

import cbn

from corpus import make_input

LAYOUTS = [((16, 5), 1), ((4, 5, 6, 6), 1), ((3, 4, 4, 5), -1), ((2, 5, 40), 1)]
# Exact float32/float64 arrays are read as they are; float16 and views of an
# ndarray subclass are converted first.
INPUTS = [pytest.param(lambda a: a, id="plain"),
          pytest.param(lambda a: a.astype(np.float16), id="float16"),
          pytest.param(lambda a: a.view(type("Sub", (np.ndarray,), {})), id="subclass")]


def poisoned(rng, shape, axis):
    """Data with a NaN in channel 1 and an inf in channel 3."""
    x = make_input(rng, shape, axis, np.float32, offset=3.0)
    channels = np.moveaxis(x, axis, 0)
    channels[1].flat[2] = np.nan
    channels[3].flat[0] = np.inf
    return x


def state(layer):
    return [np.asarray(v).tobytes() for v in (
        layer.weight, layer.bias, layer.running_mean, layer.running_var,
        layer.num_batches_tracked)]


def layer_for(shape, axis, nonfinite, rng, **kwargs):
    layer = cbn.BatchNorm(shape[axis], axis=axis, nonfinite=nonfinite, **kwargs)
    layer.weight[...] = rng.uniform(0.5, 2, shape[axis])
    # some history, so that "unchanged" is not just the initial values
    layer(make_input(rng, shape, axis, np.float32, offset=1.0))
    return layer


def test_default_is_propagate_as_pytorch():
    assert cbn.BatchNorm(3).nonfinite == "propagate"


@pytest.mark.parametrize("wrap", INPUTS)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_propagate_poisons_only_the_channels_with_nonfinite_values(rng, shape, axis, wrap):
    layer = layer_for(shape, axis, "propagate", rng)
    before = layer.running_mean.copy()
    layer(wrap(poisoned(rng, shape, axis)))
    bad = np.isin(np.arange(shape[axis]), [1, 3])
    assert not np.isfinite(layer.running_mean[bad]).all()
    assert np.isfinite(layer.running_mean[~bad]).all()
    assert not np.array_equal(layer.running_mean[~bad], before[~bad])


@pytest.mark.parametrize("wrap", INPUTS)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("tracking", [True, False])
def test_raise_names_the_channels_and_changes_nothing(rng, shape, axis, wrap, tracking):
    layer = layer_for(shape, axis, "raise", rng, track_running_stats=tracking)
    good = make_input(rng, shape, axis, np.float32)
    layer(good)
    dy = np.ones(shape, np.float32)
    dx_before = layer.backward(dy)
    kept = state(layer) if tracking else None
    with pytest.raises(FloatingPointError, match=r"2 channel\(s\) \[1, 3\]"):
        layer(wrap(poisoned(rng, shape, axis)))
    if tracking:
        assert state(layer) == kept
    # backward still belongs to the last good forward
    np.testing.assert_array_equal(layer.backward(dy), dx_before)
    layer(good)  # and the layer goes on working


def test_raise_is_silent_for_finite_data_and_in_eval_with_running_stats(rng):
    layer = layer_for((16, 5), 1, "raise", rng)
    layer(make_input(rng, (16, 5), 1, np.float32))
    layer.eval()
    y = layer(poisoned(rng, (16, 5), 1))  # no batch statistics: nothing to judge
    assert np.isnan(y[:, 1]).any() and np.isfinite(y[:, 0]).all()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("wrap", INPUTS)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_skip_leaves_the_nonfinite_channels_running_stats_alone(rng, shape, axis, wrap,
                                                                 momentum):
    seed = int(rng.integers(1 << 30))
    skip = layer_for(shape, axis, "skip", np.random.default_rng(seed), momentum=momentum)
    propagate = layer_for(shape, axis, "propagate", np.random.default_rng(seed),
                          momentum=momentum)
    before_mean, before_var = skip.running_mean.copy(), skip.running_var.copy()
    x = poisoned(rng, shape, axis)
    y_skip, y_propagate = skip(wrap(x)), propagate(wrap(x))
    np.testing.assert_array_equal(np.asarray(y_skip), np.asarray(y_propagate))
    bad = np.isin(np.arange(shape[axis]), [1, 3])
    np.testing.assert_array_equal(skip.running_mean[bad], before_mean[bad])
    np.testing.assert_array_equal(skip.running_var[bad], before_var[bad])
    np.testing.assert_array_equal(skip.running_mean[~bad], propagate.running_mean[~bad])
    np.testing.assert_array_equal(skip.running_var[~bad], propagate.running_var[~bad])
    assert skip.num_batches_tracked == propagate.num_batches_tracked == 2


def test_one_nan_batch_no_longer_poisons_the_model_for_good(rng):
    layer = cbn.BatchNorm(4, nonfinite="skip")
    for step in range(20):
        x = make_input(rng, (32, 4), 1, np.float32, offset=2.0)
        if step == 3:
            x[0, 2] = np.nan
        layer(x)
    assert np.isfinite(layer.running_mean).all() and np.isfinite(layer.running_var).all()
    layer.eval()
    assert np.isfinite(layer(make_input(rng, (8, 4), 1, np.float32))).all()


@pytest.mark.parametrize("value, error", [("ignore", ValueError), ("RAISE", ValueError),
                                          (None, TypeError), (1, TypeError)])
def test_bad_nonfinite_values_are_refused(value, error):
    with pytest.raises(error, match="nonfinite"):
        cbn.BatchNorm(3, nonfinite=value)
    layer = cbn.BatchNorm(3)
    with pytest.raises(error, match="nonfinite"):
        layer.nonfinite = value
    assert layer.nonfinite == "propagate"


def test_nonfinite_survives_pickle_and_deepcopy_and_shows_in_repr():
    layer = cbn.BatchNorm(3, nonfinite="skip")
    assert "nonfinite='skip'" in repr(layer)
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert copied.nonfinite == "skip"
