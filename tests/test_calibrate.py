"""BatchNorm.calibrate in one process: population and batch-average
statistics, all-or-nothing errors, progress. (Across ranks: test_sync.py
and test_mpi.py.)"""
import math
import sys
import types

import numpy as np
import pytest

import cbn


def batches(seed=0, sizes=(5, 0, 17, 3, 9), shape=(4, 3, 3), dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n,) + shape) * 2 + 50).astype(dtype) for n in sizes]


def state_bytes(layer):
    return {key: value.tobytes() for key, value in layer.state_dict().items()}


def per_channel(x, axis=1):
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_population_is_the_whole_data_as_one_batch(dtype):
    data = batches()
    layer = cbn.BatchNorm2d(4, dtype=dtype)
    returned = layer.calibrate(data)
    values = per_channel(np.concatenate(data))
    for c in range(4):
        mean = math.fsum(values[:, c]) / len(values)
        var = math.fsum((values[:, c] - mean) ** 2) / (len(values) - 1)
        assert layer.running_mean[c] == dtype(mean) or \
            abs(layer.running_mean[c] - mean) <= 1e-13 * abs(mean)
        assert abs(layer.running_var[c] - var) <= (1e-7 if dtype == np.float32 else 1e-11) * var
    assert returned.count == len(values)
    assert layer.running_mean.dtype == dtype


def test_batch_average_is_the_equal_weight_average_of_batches():
    data = batches(1)
    layer = cbn.BatchNorm2d(4, dtype=np.float64)
    layer.calibrate(data, mode="batch_average")
    kept = [per_channel(x) for x in data if x.shape[0]]
    np.testing.assert_allclose(layer.running_mean, np.mean([v.mean(0) for v in kept], 0),
                               rtol=1e-13)
    np.testing.assert_allclose(layer.running_var,
                               np.mean([v.var(0, ddof=1) for v in kept], 0), rtol=1e-12)


@pytest.mark.torch
def test_batch_average_matches_pytorch_cumulative_average():
    torch = pytest.importorskip("torch")
    data = [x for x in batches(2, sizes=(6, 4, 11, 2)) if x.shape[0]]
    module = torch.nn.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    module.reset_running_stats()
    with torch.no_grad():
        for x in data:
            module(torch.from_numpy(x.astype(np.float64)))
    layer = cbn.BatchNorm2d(4, dtype=np.float64)
    layer.calibrate(data, mode="batch_average")
    np.testing.assert_allclose(layer.running_mean, module.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, module.running_var.numpy(), rtol=1e-12)


def test_what_stays_unchanged():
    layer = cbn.BatchNorm2d(4, momentum=0.3)
    layer.weight[:] = 2
    layer.bias[:] = 1
    layer(batches()[0])
    layer.eval()
    before = layer.state_dict()
    layer.calibrate(batches(3))
    after = layer.state_dict()
    for key in ("weight", "bias", "num_batches_tracked"):
        np.testing.assert_array_equal(after[key], before[key])
    assert not layer.training and layer.momentum == 0.3
    assert not np.array_equal(after["running_mean"], before["running_mean"])


def test_eval_uses_the_calibrated_statistics():
    data = batches(4)
    layer = cbn.BatchNorm2d(4).eval()
    layer.calibrate(data)
    x = data[2]
    expected = cbn.batch_norm(x, layer.running_mean, layer.running_var)
    np.testing.assert_array_equal(layer(x), expected)


def test_from_moments_and_channels_last():
    data = [np.moveaxis(x, 1, -1).copy() for x in batches(5)]
    layer = cbn.BatchNorm(4, axis=-1, dtype=np.float64)
    moments = cbn.Moments(4)
    for x in data:
        moments.update(x, axis=-1)
    layer.calibrate(moments)
    other = cbn.BatchNorm(4, axis=-1, dtype=np.float64)
    other.calibrate(data)
    assert state_bytes(layer) == state_bytes(other)
    with pytest.raises(ValueError, match="batch_average"):
        layer.calibrate(moments, mode="batch_average")
    with pytest.raises(ValueError, match="3 channels"):
        layer.calibrate(cbn.Moments(3))


def test_a_bad_batch_names_its_index_and_changes_nothing():
    layer = cbn.BatchNorm2d(4, nonfinite="raise")
    layer.calibrate(batches(6))
    before = state_bytes(layer)
    good = batches(7)

    def generator(bad):
        yield from good[:3]
        yield bad
        yield good[3]

    wrong_channels = np.ones((2, 5, 3, 3), np.float32)
    nan_batch = good[0].copy()
    nan_batch[0, 1, 0, 0] = np.nan
    for bad, error, text in [
        (wrong_channels, ValueError, r"batch 3: .*expects 4 channels"),
        (np.ones((2, 4, 3), np.float32), ValueError, r"batch 3: expected 4D"),
        (np.ones((2, 4, 3, 3), np.int32), TypeError, r"batch 3: .*int32"),
        (nan_batch, FloatingPointError, r"batch 3: .*not finite in 1 channel\(s\) \[1\]"),
    ]:
        with pytest.raises(error, match=text):
            layer.calibrate(generator(bad))
        assert state_bytes(layer) == before


def test_nonfinite_propagate_and_skip():
    data = batches(8)
    data[1] = np.full((2, 4, 3, 3), np.nan, np.float32)
    data[1][:, 2:] = 1.0
    propagate = cbn.BatchNorm2d(4)
    propagate.calibrate(data)
    assert np.isnan(propagate.running_mean[:2]).all()
    assert np.isfinite(propagate.running_mean[2:]).all()
    skip = cbn.BatchNorm2d(4, nonfinite="skip")
    skip.calibrate(data)
    np.testing.assert_array_equal(skip.running_mean[:2], [0, 0])
    np.testing.assert_array_equal(skip.running_var[:2], [1, 1])
    np.testing.assert_array_equal(skip.running_mean[2:], propagate.running_mean[2:])


def test_refusals():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        cbn.BatchNorm2d(4, track_running_stats=False).calibrate(batches())
    layer = cbn.BatchNorm2d(4)
    before = state_bytes(layer)
    with pytest.raises(ValueError, match="mode"):
        layer.calibrate(batches(), mode="mean")
    with pytest.raises(TypeError, match="iterable of batches"):
        layer.calibrate(np.ones((3, 4, 2, 2), np.float32))
    with pytest.raises(TypeError, match="iterable of batches"):
        layer.calibrate(5)
    with pytest.raises(ValueError, match="at least 2"):
        layer.calibrate([np.ones((1, 4, 1, 1), np.float32)])
    with pytest.raises(ValueError, match="at least 2"):
        layer.calibrate([])
    with pytest.raises(ValueError, match="no batch"):
        layer.calibrate([np.ones((0, 4, 1, 1), np.float32)], mode="batch_average")
    with pytest.raises(ValueError, match="batch 0: 1 value per channel"):
        layer.calibrate([np.ones((1, 4, 1, 1), np.float32)], mode="batch_average")
    with pytest.raises(TypeError, match="progress"):
        layer.calibrate(batches(), progress="yes")
    assert state_bytes(layer) == before


def test_progress_counter_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    cbn.BatchNorm2d(4).calibrate(batches(), progress=True)
    err = capsys.readouterr().err
    assert "calibrate: batch 5/5" in err


def test_progress_uses_tqdm_when_installed(monkeypatch):
    seen = []

    class FakeBar:
        def __init__(self, total=None, **kwargs):
            seen.append(("total", total))

        def update(self, k):
            seen.append(("update", k))

        def close(self):
            seen.append(("close", None))

    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeBar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    cbn.BatchNorm2d(4).calibrate(iter(batches()), progress=True)
    assert seen[0] == ("total", None)
    assert seen.count(("update", 1)) == 5 and seen[-1] == ("close", None)
