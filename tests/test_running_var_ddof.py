"""running_var_ddof: the running average keeps the unbiased batch variance
(1, PyTorch's) or the biased one (0, as Keras, Flax and ONNX keep)."""
import pickle

import numpy as np
import pytest

import cbn


def batch(seed=0, shape=(6, 3, 4)):
    return np.random.default_rng(seed).standard_normal(shape) * 2 + 5


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_running_variance_uses_the_chosen_ddof(ddof, momentum):
    layer = cbn.BatchNorm1d(3, momentum=momentum, dtype=np.float64, running_var_ddof=ddof)
    expected_mean, expected_var = np.zeros(3), np.ones(3)
    for k in range(3):
        x = batch(k)
        y = layer(x)
        values = np.moveaxis(x, 1, -1).reshape(-1, 3)
        factor = 1 / (k + 1) if momentum is None else momentum
        expected_mean = (1 - factor) * expected_mean + factor * values.mean(0)
        expected_var = (1 - factor) * expected_var + factor * values.var(0, ddof=ddof)
        # normalization always uses the biased batch variance
        np.testing.assert_allclose(
            y, (x - values.mean(0)[:, None]) / np.sqrt(values.var(0)[:, None] + 1e-5),
            rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, expected_mean, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, expected_var, rtol=1e-13)


def test_settings_checked_shown_and_kept(tmp_path):
    for bad, error in [(2, ValueError), (-1, ValueError), (1.0, TypeError),
                       (True, TypeError), ("1", TypeError)]:
        with pytest.raises(error, match="running_var_ddof"):
            cbn.BatchNorm(3, running_var_ddof=bad)
    layer = cbn.BatchNorm2d(3, running_var_ddof=0)
    assert layer.running_var_ddof == 0
    assert "running_var_ddof=0" in repr(layer)
    assert "running_var_ddof" not in repr(cbn.BatchNorm2d(3))
    assert pickle.loads(pickle.dumps(layer)).running_var_ddof == 0
    cbn.save(tmp_path / "w.npz", layer)
    assert cbn.load(tmp_path / "w.npz").running_var_ddof == 0
    with pytest.raises(ValueError, match="running_var_ddof"):
        layer.running_var_ddof = 3
    assert layer.running_var_ddof == 0
    old_pickle = layer.__getstate__()
    del old_pickle["_running_var_ddof"]   # pickled before the setting existed
    restored = cbn.BatchNorm2d.__new__(cbn.BatchNorm2d)
    restored.__setstate__(old_pickle)
    assert restored.running_var_ddof == 1


@pytest.mark.torch
def test_to_torch_refuses_the_biased_variance():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="running_var_ddof=0"):
        cbn.BatchNorm2d(3, running_var_ddof=0).to_torch()


def test_calibrate_follows_it():
    data = [batch(k) for k in range(3)] + [batch(9, (1, 3, 1))]
    values = [np.moveaxis(x, 1, -1).reshape(-1, 3) for x in data]
    layer = cbn.BatchNorm1d(3, dtype=np.float64, running_var_ddof=0)
    layer.calibrate(data)
    np.testing.assert_allclose(layer.running_var, np.concatenate(values).var(0),
                               rtol=1e-12)
    layer.calibrate(data, mode="batch_average")   # a one-value batch has variance 0
    np.testing.assert_allclose(layer.running_var, np.mean([v.var(0) for v in values], 0),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="batch 3: 1 value per channel"):
        cbn.BatchNorm1d(3, dtype=np.float64).calibrate(data, mode="batch_average")
