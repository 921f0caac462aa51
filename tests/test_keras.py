"""Layers from Keras without Keras: ``BatchNorm.from_keras`` reads a built
``keras.layers.BatchNormalization`` through its attributes.

A fake layer class covers the mapping and every refusal whether or not Keras
is installed, against expected values computed here in NumPy from the
formulas Keras documents. Where Keras 3 and PyTorch are installed, real Keras
layers (torch backend, in a subprocess so that importing Keras changes
nothing in this process) are converted and both layers run on the same data:
inference outputs within 1e-6 of Keras's own, and training-mode outputs and
moving statistics.
"""
import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import numpy as np
import pytest

import cbn


class FakeVariable:
    """A Keras variable: values read out with .numpy()."""

    def __init__(self, values):
        self._values = np.array(values)

    def numpy(self):
        return self._values.copy()


class FakeKerasLayer:
    """The attributes of a built Keras 3 BatchNormalization; ``options`` sets
    others (tf.keras 2's renorm, virtual_batch_size, adjustment, fused...)."""

    def __init__(self, c=3, *, axis=-1, momentum=0.99, epsilon=1e-3, center=True,
                 scale=True, dtype=np.float32, seed=0, **options):
        rng = np.random.default_rng(seed)
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.center, self.scale = center, scale
        self.synchronized = False
        self.gamma = FakeVariable(rng.uniform(0.5, 2, c).astype(dtype)) if scale else None
        self.beta = FakeVariable(rng.uniform(-1, 1, c).astype(dtype)) if center else None
        self.moving_mean = FakeVariable(rng.uniform(-1, 1, c).astype(dtype))
        self.moving_variance = FakeVariable(rng.uniform(0.5, 2, c).astype(dtype))
        for name, value in options.items():
            setattr(self, name, value)


def keras_inference(x, keras_layer, axis):
    """gamma * (x - moving_mean) / sqrt(moving_var + epsilon) + beta, in
    float64 (Keras's documented inference output)."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]

    def vec(variable, fill):
        values = fill if variable is None else variable.numpy()
        return np.broadcast_to(np.asarray(values, np.float64), (x.shape[axis],)).reshape(shape)

    return ((x.astype(np.float64) - vec(keras_layer.moving_mean, 0))
            / np.sqrt(vec(keras_layer.moving_variance, 1) + keras_layer.epsilon)
            * vec(keras_layer.gamma, 1.0) + vec(keras_layer.beta, 0.0))


def channel_values(x, axis):
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False),
                                           (False, False)])
@pytest.mark.parametrize("axis, shape", [(-1, (4, 5, 3)), (1, (6, 3)), (3, (2, 4, 5, 3)),
                                         ([2], (2, 4, 3)), (-3, (2, 3, 4, 5))])
def test_fake_layer_maps_every_center_scale_combination(center, scale, axis, shape):
    keras_layer = FakeKerasLayer(3, axis=axis, momentum=0.9, epsilon=1e-2,
                                 center=center, scale=scale, dtype=np.float64)
    layer = cbn.BatchNorm.from_keras(keras_layer)
    channel_axis = axis[0] if isinstance(axis, list) else axis
    assert layer.axis == channel_axis
    assert not layer.training
    assert layer.momentum == pytest.approx(0.1, abs=1e-15)
    assert layer.eps == 1e-2
    assert layer.running_var_ddof == 0
    assert layer.dtype == np.float64
    assert layer.affine == (center or scale)
    assert (layer.bias is not None) == center
    if center and not scale:
        np.testing.assert_array_equal(layer.weight, np.ones(3))   # Keras's absent gamma
    x = np.random.default_rng(1).standard_normal(shape) * 2 + 1
    np.testing.assert_allclose(layer(x), keras_inference(x, keras_layer, channel_axis),
                               rtol=1e-13, atol=1e-13)

    # training: Keras's moving = momentum * moving + (1 - momentum) * batch,
    # with the biased batch variance
    layer.train()
    y = layer(x)
    values = channel_values(x, channel_axis)
    mean, var = values.mean(0), values.var(0)
    gamma = keras_layer.gamma.numpy() if scale else 1.0
    beta = keras_layer.beta.numpy() if center else 0.0
    expected = (values - mean) / np.sqrt(var + 1e-2) * gamma + beta
    np.testing.assert_allclose(channel_values(y, channel_axis), expected, rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(layer.running_mean,
                               0.9 * keras_layer.moving_mean.numpy() + 0.1 * mean,
                               rtol=1e-13)
    np.testing.assert_allclose(layer.running_var,
                               0.9 * keras_layer.moving_variance.numpy() + 0.1 * var,
                               rtol=1e-13)


def test_float32_layers_give_float32_layers_and_values_are_copied():
    keras_layer = FakeKerasLayer(4, dtype=np.float32)
    layer = cbn.BatchNorm2d.from_keras(keras_layer)
    assert type(layer) is cbn.BatchNorm2d
    assert layer.dtype == np.float32
    for name, key in [("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                      ("moving_variance", "running_var")]:
        np.testing.assert_array_equal(getattr(layer, key), getattr(keras_layer, name).numpy())
    layer.train()(np.ones((2, 3, 5, 4), np.float32))
    # the Keras layer's arrays are untouched by the layer's updates
    assert not np.shares_memory(layer.running_mean, keras_layer.moving_mean._values)
    mixed = FakeKerasLayer(4, dtype=np.float64)
    mixed.gamma = FakeVariable(mixed.gamma.numpy().astype(np.float32))
    assert cbn.BatchNorm.from_keras(mixed).dtype == np.float32
    half = FakeKerasLayer(4, dtype=np.float16)
    assert cbn.BatchNorm.from_keras(half).dtype == np.float32


def test_momentum_edges_and_plain_arrays():
    for keras_momentum, expected in [(0.0, 1.0), (1.0, 0.0), (0.99, 1 - 0.99), (1, 0.0)]:
        layer = cbn.BatchNorm.from_keras(FakeKerasLayer(momentum=keras_momentum))
        assert layer.momentum == expected
    # variables without .numpy() are read as array-likes
    keras_layer = FakeKerasLayer(2, dtype=np.float64)
    keras_layer.moving_mean = [0.5, -0.5]
    np.testing.assert_array_equal(cbn.BatchNorm.from_keras(keras_layer).running_mean,
                                  [0.5, -0.5])


def test_tf_keras_fused_layers_keep_the_unbiased_variance():
    # tf.keras 2's fused kernel keeps the Bessel-corrected batch variance in
    # moving_variance; its non-fused path and Keras 3 keep the biased one.
    assert cbn.BatchNorm.from_keras(FakeKerasLayer(fused=True)).running_var_ddof == 1
    assert cbn.BatchNorm.from_keras(FakeKerasLayer(fused=False)).running_var_ddof == 0
    assert cbn.BatchNorm.from_keras(FakeKerasLayer(fused=None)).running_var_ddof == 0


@pytest.mark.parametrize("options, error, words", [
    (dict(renorm=True), ValueError, "renorm=True"),
    (dict(virtual_batch_size=4), ValueError, "virtual_batch_size=4"),
    (dict(adjustment=lambda shape: (1, 0)), ValueError, "adjustment="),
    (dict(synchronized=True), ValueError, "synchronized=True"),
    (dict(axis=[1, 2]), ValueError, r"axis=\[1, 2\]"),
    (dict(axis=[]), ValueError, r"axis=\[\] names no axis"),
    (dict(axis=1.0), TypeError, "axis must be an int"),
    (dict(axis=True), TypeError, "axis must be an int"),
    (dict(center="yes"), TypeError, "center must be a bool"),
    (dict(scale=None), TypeError, "scale must be a bool"),
    (dict(momentum=1.5), ValueError, r"momentum=1.5 gives cbn momentum 1 - 1.5"),
    (dict(momentum=-0.1), ValueError, "momentum=-0.1"),
    (dict(momentum="0.9"), TypeError, "momentum must be a real number"),
    (dict(epsilon=0.0), ValueError, "from_keras: epsilon: eps must be a positive"),
    (dict(moving_mean=None), ValueError, "no moving_mean yet: it is not built"),
    (dict(gamma=None), ValueError, "no gamma yet"),
    (dict(beta=FakeVariable(np.zeros(4))), ValueError, r"'beta': \(4,\)"),
    (dict(moving_variance=FakeVariable(np.ones((3, 1)))), ValueError, "must be 1D"),
    (dict(moving_mean=FakeVariable(np.array(["a", "b", "c"]))), TypeError,
     "moving_mean must hold real numbers"),
])
def test_refusals_say_why(options, error, words):
    keras_layer = FakeKerasLayer(3, **options)
    with pytest.raises(error, match=words):
        cbn.BatchNorm.from_keras(keras_layer)


def test_empty_variables_and_objects_that_are_not_layers():
    empty = FakeKerasLayer(0)
    with pytest.raises(ValueError, match=r"\(0,\)"):
        cbn.BatchNorm.from_keras(empty)
    with pytest.raises(TypeError, match=r"has no attribute\(s\) \['axis', 'momentum'"):
        cbn.BatchNorm.from_keras(object())
    torch_like = FakeKerasLayer()
    del torch_like.epsilon
    with pytest.raises(TypeError, match=r"\['epsilon'\]"):
        cbn.BatchNorm.from_keras(torch_like)


GARBAGE = [None, "x", 1.5, -1, 0, [], [1, 2], np.array([1.0, 2.0]), np.ones((3, 1)),
           object(), float("nan"), float("inf"), True, b"ab", {"a": 1}]


@pytest.mark.parametrize("name", ["axis", "momentum", "epsilon", "center", "scale", "gamma",
                                  "beta", "moving_mean", "moving_variance", "renorm",
                                  "synchronized", "virtual_batch_size", "adjustment",
                                  "fused"])
def test_garbage_attributes_give_a_layer_or_a_clear_error(name):
    for value in GARBAGE:
        keras_layer = FakeKerasLayer(3)
        setattr(keras_layer, name, value)
        try:
            layer = cbn.BatchNorm.from_keras(keras_layer)
        except (TypeError, ValueError) as error:
            assert "BatchNorm.from_keras: " in str(error), (name, value, error)
        else:
            assert isinstance(layer, cbn.BatchNorm) and layer.num_features == 3, (name, value)


def test_synchronized_layers_become_sync_batch_norms():
    pytest.importorskip("mpi4py")
    layer = cbn.SyncBatchNorm.from_keras(FakeKerasLayer(synchronized=True))
    assert type(layer) is cbn.SyncBatchNorm
    assert layer.running_var_ddof == 0 and not layer.training


# ---------------------------------------------------------------------------
# Real Keras 3 layers (torch backend), when installed

KERAS_RUN = textwrap.dedent("""
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "torch"
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    import keras
    import torch
    import cbn

    cases = json.loads(sys.argv[3])
    results = {}
    rng = np.random.default_rng(7)
    for index, case in enumerate(cases):
        shape, axis, dtype = tuple(case["shape"]), case["axis"], case["dtype"]
        keras_layer = keras.layers.BatchNormalization(
            axis=axis, momentum=case["momentum"], epsilon=case["epsilon"],
            center=case["center"], scale=case["scale"], dtype=dtype)
        keras_layer.build(shape)
        c = shape[axis]
        keras_layer.set_weights([
            (rng.uniform(0.5, 2, c) if w.name == "moving_variance"
             else rng.uniform(-2, 2, c)).astype(dtype) for w in keras_layer.weights])
        layer = cbn.BatchNorm.from_keras(keras_layer)
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        out = {"cbn_dtype": str(layer.dtype), "x": x,
               "keras_eval": keras.ops.convert_to_numpy(keras_layer(x, training=False)),
               "cbn_eval": layer(x)}
        # training mode: output, moving statistics and the input's gradient
        layer.train()
        xt = torch.tensor(x, requires_grad=True)
        yt = keras_layer(xt, training=True)
        dy = rng.standard_normal(shape).astype(dtype)
        yt.backward(torch.tensor(dy))
        out["keras_train"] = yt.detach().numpy()
        out["keras_dx"] = xt.grad.numpy()
        out["keras_moving_mean"] = keras.ops.convert_to_numpy(keras_layer.moving_mean)
        out["keras_moving_variance"] = keras.ops.convert_to_numpy(
            keras_layer.moving_variance)
        out["cbn_train"] = layer(x)
        out["cbn_dx"] = layer.backward(dy)
        out["cbn_running_mean"] = layer.running_mean.copy()   # buffers: updated again
        out["cbn_running_var"] = layer.running_var.copy()
        out["keras_moving_mean"] = out["keras_moving_mean"].copy()
        out["keras_moving_variance"] = out["keras_moving_variance"].copy()
        if axis == -1:   # a masked step (Keras takes masks over the leading axes)
            lengths = rng.integers(0, shape[-2] + 1, size=shape[:-2])
            lengths.flat[0] = shape[-2]
            mask = np.arange(shape[-2]) < lengths[..., None]
            xt = torch.tensor(x, requires_grad=True)
            yt = keras_layer(xt, training=True, mask=torch.tensor(mask))
            yt.backward(torch.tensor(dy))
            out["keras_masked"] = yt.detach().numpy()
            out["keras_masked_dx"] = xt.grad.numpy()
            out["keras_masked_moving_variance"] = keras.ops.convert_to_numpy(
                keras_layer.moving_variance)
            out["cbn_masked"] = layer(x, mask=mask)
            out["cbn_masked_dx"] = layer.backward(dy)
            out["cbn_masked_running_var"] = layer.running_var
        for key, value in out.items():
            results[f"{index}/{key}"] = value
    np.savez(sys.argv[1], **results)
""")

KERAS_CASES = [
    dict(shape=[8, 5, 5, 4], axis=-1, dtype="float32", center=True, scale=True),
    dict(shape=[8, 4, 5, 5], axis=1, dtype="float32", center=True, scale=False),
    dict(shape=[16, 6], axis=1, dtype="float32", center=False, scale=True),
    dict(shape=[6, 3, 7], axis=-1, dtype="float32", center=False, scale=False),
    dict(shape=[4, 3, 4, 6], axis=3, dtype="float64", center=True, scale=True),
    dict(shape=[4, 5, 3], axis=-2, dtype="float64", center=True, scale=False),
]
for case_index, keras_case in enumerate(KERAS_CASES):
    keras_case.update(momentum=(0.99, 0.9, 0.5)[case_index % 3],
                      epsilon=(1e-3, 1e-5)[case_index % 2])


@pytest.fixture(scope="module")
def keras_results(tmp_path_factory):
    if find_spec("keras") is None or find_spec("torch") is None:
        pytest.skip("Keras 3 with PyTorch (its torch backend) is not installed")
    folder = tmp_path_factory.mktemp("keras")
    path = folder / "results.npz"
    cbn_root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    # KERAS_HOME: Keras writes its configuration file there on import
    run = subprocess.run([sys.executable, "-c", KERAS_RUN, str(path), cbn_root,
                          json.dumps(KERAS_CASES)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KERAS_HOME": str(folder)})
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("index", range(len(KERAS_CASES)))
def test_real_keras_layers_inference_within_1e_6(keras_results, index):
    case = KERAS_CASES[index]
    get = lambda key: keras_results[f"{index}/{key}"]
    assert str(get("cbn_dtype")) == case["dtype"]
    assert get("cbn_eval").dtype == get("keras_eval").dtype == np.dtype(case["dtype"])
    np.testing.assert_allclose(get("cbn_eval"), get("keras_eval"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", range(len(KERAS_CASES)))
def test_real_keras_layers_training_mode(keras_results, index):
    # Keras computes the batch variance as E[x^2] - E[x]^2 in the input's
    # dtype, so float32 agrees to a few float32 roundings of the data's scale.
    get = lambda key: keras_results[f"{index}/{key}"]
    tol = 2e-5 if KERAS_CASES[index]["dtype"] == "float32" else 1e-6
    np.testing.assert_allclose(get("cbn_train"), get("keras_train"), rtol=tol, atol=tol)
    np.testing.assert_allclose(get("cbn_dx"), get("keras_dx"), rtol=tol, atol=tol)
    np.testing.assert_allclose(get("cbn_running_mean"), get("keras_moving_mean"),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(get("cbn_running_var"), get("keras_moving_variance"),
                               rtol=tol, atol=tol)


MASKED_CASES = [index for index, case in enumerate(KERAS_CASES) if case["axis"] == -1]


@pytest.mark.parametrize("index", MASKED_CASES)
def test_real_keras_layers_masked_training(keras_results, index):
    """Keras 3's mask: statistics over the valid positions, every position
    normalized, the exact gradient, the moving variance of the valid ones."""
    get = lambda key: keras_results[f"{index}/{key}"]
    tol = 2e-5 if KERAS_CASES[index]["dtype"] == "float32" else 1e-6
    np.testing.assert_allclose(get("cbn_masked"), get("keras_masked"), rtol=tol, atol=tol)
    np.testing.assert_allclose(get("cbn_masked_dx"), get("keras_masked_dx"), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(get("cbn_masked_running_var"),
                               get("keras_masked_moving_variance"), rtol=tol, atol=tol)
