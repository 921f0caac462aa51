"""Layers from PyTorch without PyTorch: ``BatchNorm.from_torch`` (duck-typed,
tested with a fake module class and, when torch is installed, with real
``torch.nn.BatchNorm*d`` modules) and ``BatchNorm.from_state_dict`` (a layer's
own state dict or one entry of a whole model's, selected by ``prefix``).

Whether the new layer "behaves like the module" is checked by running both on
the same data: outputs, running statistics, batch counts and gradients in
training mode, outputs in eval mode.
"""
from collections import OrderedDict

import numpy as np
import pytest

import cbn

from corpus import assert_close, make_input

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CBN_CLASSES = {"BatchNorm1d": cbn.BatchNorm1d, "BatchNorm2d": cbn.BatchNorm2d,
               "BatchNorm3d": cbn.BatchNorm3d}
SHAPES = {"BatchNorm1d": (8, 4, 5), "BatchNorm2d": (3, 4, 5, 6), "BatchNorm3d": (2, 4, 3, 4, 5)}


def random_state(rng, c, dtype=np.float64, affine=True, track=True, count=3):
    state = OrderedDict()
    if affine:
        state["weight"] = rng.uniform(0.5, 2.0, c).astype(dtype)
        state["bias"] = rng.uniform(-1.0, 1.0, c).astype(dtype)
    if track:
        state["running_mean"] = rng.uniform(-1.0, 1.0, c).astype(dtype)
        state["running_var"] = rng.uniform(0.5, 2.0, c).astype(dtype)
        state["num_batches_tracked"] = np.array(count, np.int64)
    return state


def eval_oracle(x, state, eps, axis=1):
    """Eval output from a state dict, in float64."""
    c = x.shape[axis]
    bshape = [1] * x.ndim
    bshape[axis] = c

    def vec(key, fill):
        return np.asarray(state.get(key, np.full(c, fill)), np.float64).reshape(bshape)

    return ((x.astype(np.float64) - vec("running_mean", 0.0))
            / np.sqrt(vec("running_var", 1.0) + eps) * vec("weight", 1.0) + vec("bias", 0.0))


def assert_state_equals(layer, state):
    for key in STATE_KEYS:
        if key not in state:
            assert getattr(layer, key) is None, key
        elif key == "num_batches_tracked":
            assert layer.num_batches_tracked == int(state[key])
        else:
            np.testing.assert_array_equal(getattr(layer, key),
                                          np.asarray(state[key]).astype(layer.dtype),
                                          err_msg=key)


# ---------------------------------------------------------------------------
# from_torch with a module that is not torch

class FakeModule:
    """The attributes of a torch.nn.BatchNorm*d, with NumPy arrays."""

    def __init__(self, state, num_features, eps=1e-5, momentum=0.1, training=True):
        self._state = state
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = "weight" in state
        self.track_running_stats = "running_mean" in state
        self.training = training

    def state_dict(self):
        return OrderedDict((key, value.copy()) for key, value in self._state.items())


def fake_named(name):
    return type(name, (FakeModule,), {})


@pytest.mark.parametrize("name, expected_cls", [
    ("BatchNorm1d", cbn.BatchNorm1d), ("BatchNorm2d", cbn.BatchNorm2d),
    ("BatchNorm3d", cbn.BatchNorm3d), ("FakeModule", cbn.BatchNorm),
    ("SyncBatchNorm", cbn.BatchNorm),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_from_torch_with_a_fake_module(rng, name, expected_cls, training):
    state = random_state(rng, 4, np.float32)
    module = fake_named(name)(state, 4, eps=1e-3, momentum=0.25, training=training)
    layer = cbn.BatchNorm.from_torch(module)
    assert type(layer) is expected_cls
    assert layer.training is training
    assert (layer.num_features, layer.eps, layer.momentum) == (4, 1e-3, 0.25)
    assert layer.affine and layer.track_running_stats
    assert layer.dtype == np.float32 and layer.axis == 1 and layer.activation is None
    assert_state_equals(layer, state)
    # copies: editing the module's arrays later changes nothing
    for value in state.values():
        value[...] = 0
    assert layer.running_var[0] != 0 and layer.weight[0] != 0


@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)],
                         ids=["affine-track", "noaffine", "notrack"])
def test_from_torch_fake_module_configurations(rng, affine, track):
    state = random_state(rng, 3, np.float64, affine=affine, track=track)
    module = fake_named("BatchNorm1d")(state, 3, momentum=None, training=False)
    layer = cbn.BatchNorm.from_torch(module)
    assert type(layer) is cbn.BatchNorm1d
    assert layer.affine is affine and layer.track_running_stats is track
    assert layer.momentum is None and layer.dtype == np.float64
    assert_state_equals(layer, state)
    x = make_input(rng, (6, 3), 1, np.float64)
    if track:
        np.testing.assert_allclose(layer(x), eval_oracle(x, state, 1e-5), rtol=1e-12,
                                   atol=1e-12)


def test_from_torch_fake_module_without_any_state(rng):
    """affine=False and track_running_stats=False: a torch module whose
    state_dict() is empty is still a batch norm."""
    module = fake_named("BatchNorm2d")(OrderedDict(), 3, training=True)
    module.affine = False
    module.track_running_stats = False
    layer = cbn.BatchNorm.from_torch(module)
    assert type(layer) is cbn.BatchNorm2d
    assert layer.num_features == 3
    assert not layer.affine and not layer.track_running_stats
    assert layer.running_mean is None and layer.weight is None


@pytest.mark.parametrize("missing", ["num_features", "eps", "momentum", "affine",
                                     "track_running_stats", "training", "state_dict"])
def test_from_torch_names_a_missing_attribute(rng, missing):
    attributes = {"num_features": 3, "eps": 1e-5, "momentum": 0.1, "affine": True,
                  "track_running_stats": True, "training": True,
                  "state_dict": lambda self: random_state(np.random.default_rng(0), 3)}
    del attributes[missing]
    module = type("BatchNorm2d", (), attributes)()
    with pytest.raises(TypeError, match=missing):
        cbn.BatchNorm.from_torch(module)


def test_from_torch_keywords_and_subclasses(rng):
    state = random_state(rng, 4, np.float64)
    module = fake_named("BatchNorm1d")(state, 4)
    layer = cbn.BatchNorm.from_torch(module, axis=-1, dtype=np.float32, activation="relu")
    assert (layer.axis, layer.dtype, layer.activation) == (-1, np.float32, "relu")
    assert layer.running_mean.dtype == np.float32
    # called on a cbn subclass, that subclass
    assert type(cbn.BatchNorm2d.from_torch(fake_named("Whatever")(state, 4))) is cbn.BatchNorm2d
    # a float32 module gives float32, a float64 one float64
    f32 = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in state.items()}
    assert cbn.BatchNorm.from_torch(FakeModule(f32, 4)).dtype == np.float32
    assert cbn.BatchNorm.from_torch(FakeModule(state, 4)).dtype == np.float64


# ---------------------------------------------------------------------------
# from_torch with real torch modules

TORCH_CONFIGS = [
    pytest.param({}, True, False, id="default-train"),
    pytest.param({}, False, False, id="default-eval"),
    pytest.param({"affine": False}, True, False, id="noaffine"),
    pytest.param({"track_running_stats": False}, True, False, id="notrack-train"),
    pytest.param({"track_running_stats": False}, False, False, id="notrack-eval"),
    pytest.param({"momentum": None}, True, False, id="momentum-none"),
    pytest.param({"eps": 1e-2, "momentum": 0.4}, True, True, id="f64-eps-momentum"),
    pytest.param({"momentum": None}, False, True, id="f64-momentum-none-eval"),
    pytest.param({"affine": False, "track_running_stats": False}, True, False,
                 id="noaffine-notrack"),
]


def _torch_module(torch, kind, kwargs, double, rng):
    module = getattr(torch.nn, kind)(4, **kwargs)
    if double:
        module = module.double()
    if module.weight is not None:
        with torch.no_grad():
            module.weight.uniform_(-2, 2)
            module.bias.uniform_(-1, 1)
    shape = SHAPES[kind]
    dtype = np.float64 if double else np.float32
    module.train()
    for k in range(2):  # non-trivial running statistics and batch count
        module(torch.from_numpy(make_input(rng, shape, 1, dtype, offset=k)))
    return module


def _compare_steps(torch, layer, module, rng, dtype, shape, steps=2):
    for _ in range(steps):
        x = make_input(rng, shape, 1, dtype, offset=0.5)
        dy = rng.standard_normal(shape).astype(dtype)
        if module.weight is not None:
            module.weight.grad = module.bias.grad = None
        xt = torch.tensor(x, requires_grad=True)
        yt = module(xt)
        yt.backward(torch.from_numpy(dy))
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == dtype
        assert_close(y, yt.detach().numpy(), dtype=dtype, scale=1)
        assert_close(dx, xt.grad.numpy(), kind="grad", dtype=dtype, scale=10)
        if module.weight is not None:
            terms = np.sqrt(x.size // shape[1])
            assert_close(layer.grad_weight, module.weight.grad.numpy(), kind="grad",
                         dtype=dtype, scale=terms)
            assert_close(layer.grad_bias, module.bias.grad.numpy(), kind="grad", dtype=dtype,
                         scale=terms)
        for key in ("running_mean", "running_var"):
            theirs = getattr(module, key)
            if theirs is None:
                assert getattr(layer, key) is None
            else:
                assert_close(getattr(layer, key), theirs.numpy(), kind="stats", dtype=dtype,
                             scale=1, err_msg=key)
        if module.num_batches_tracked is None:
            assert layer.num_batches_tracked is None
        else:
            assert layer.num_batches_tracked == int(module.num_batches_tracked)


@pytest.mark.parametrize("kwargs, training, double", TORCH_CONFIGS)
@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_from_torch_module_behaves_like_the_module(rng, kind, kwargs, training, double):
    torch = pytest.importorskip("torch")
    module = _torch_module(torch, kind, kwargs, double, rng)
    module.train(training)
    dtype = np.float64 if double else np.float32
    layer = cbn.BatchNorm.from_torch(module)
    assert type(layer) is CBN_CLASSES[kind]
    assert layer.training is training
    assert layer.dtype == dtype
    assert layer.num_features == 4
    assert layer.eps == module.eps and layer.momentum == module.momentum
    assert layer.affine is module.affine
    assert layer.track_running_stats is module.track_running_stats
    for key in STATE_KEYS:
        theirs = getattr(module, key)
        if theirs is None:
            assert getattr(layer, key) is None, key
        elif key == "num_batches_tracked":
            assert layer.num_batches_tracked == int(theirs) == 2
        else:
            np.testing.assert_array_equal(getattr(layer, key), theirs.detach().numpy(),
                                          err_msg=key)
            assert not np.shares_memory(getattr(layer, key), theirs.detach().numpy())
    shape = SHAPES[kind]
    _compare_steps(torch, layer, module, rng, dtype, shape)   # in the module's mode
    layer.train()
    module.train()
    _compare_steps(torch, layer, module, rng, dtype, shape)   # training steps
    layer.eval()
    module.eval()
    _compare_steps(torch, layer, module, rng, dtype, shape, steps=1)


def test_from_torch_module_with_tracking_switched_off_later(rng):
    """A module built with running statistics whose track_running_stats was
    set to False afterwards keeps its buffers: training uses batch statistics
    and leaves them alone, eval uses them. The layer must do the same."""
    torch = pytest.importorskip("torch")
    module = _torch_module(torch, "BatchNorm2d", {}, True, rng)
    module.track_running_stats = False
    layer = cbn.BatchNorm.from_torch(module)
    assert layer.track_running_stats is False
    np.testing.assert_array_equal(layer.running_mean, module.running_mean.numpy())
    _compare_steps(torch, layer, module, rng, np.float64, SHAPES["BatchNorm2d"])
    layer.eval()
    module.eval()
    _compare_steps(torch, layer, module, rng, np.float64, SHAPES["BatchNorm2d"], steps=1)


def test_from_torch_channels_last_and_relu(rng):
    torch = pytest.importorskip("torch")
    module = _torch_module(torch, "BatchNorm2d", {}, True, rng).eval()
    layer = cbn.BatchNorm.from_torch(module, axis=-1, activation="relu")
    assert layer.training is False
    x = make_input(rng, (3, 5, 6, 4), -1, np.float64)
    expected = torch.relu(module(torch.from_numpy(x).movedim(-1, 1))).movedim(1, -1)
    np.testing.assert_allclose(layer(x), expected.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_from_torch_freeze_matches_the_eval_module(rng):
    torch = pytest.importorskip("torch")
    module = _torch_module(torch, "BatchNorm3d", {}, False, rng).eval()
    frozen = cbn.BatchNorm.from_torch(module).freeze()
    x = make_input(rng, SHAPES["BatchNorm3d"], 1, np.float32)
    assert_close(frozen(x), module(torch.from_numpy(x)).detach().numpy(), dtype=np.float32,
                 scale=1)
    # and rank checks carry over from BatchNorm3d
    with pytest.raises(ValueError):
        frozen(np.ones((2, 4), np.float32))


# ---------------------------------------------------------------------------
# from_state_dict

@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)],
                         ids=["affine-track", "noaffine", "notrack"])
@pytest.mark.parametrize("cls", [cbn.BatchNorm, cbn.BatchNorm1d])
def test_from_state_dict_infers_the_configuration(rng, cls, affine, track):
    state = random_state(rng, 5, np.float64, affine=affine, track=track, count=9)
    layer = cls.from_state_dict(state)
    assert type(layer) is cls
    assert layer.num_features == 5
    assert layer.affine is affine and layer.track_running_stats is track
    assert layer.training is True  # a new layer starts in training mode
    assert (layer.eps, layer.momentum, layer.axis) == (1e-5, 0.1, 1)
    assert layer.activation is None and layer.dtype == np.float64
    assert_state_equals(layer, state)
    for value in state.values():  # copied
        value[...] = 0
    if track:
        assert layer.running_var[0] != 0 and layer.num_batches_tracked == 9


def test_from_state_dict_keywords(rng):
    state = random_state(rng, 3, np.float64)
    layer = cbn.BatchNorm.from_state_dict(state, eps=1e-2, momentum=None, axis=-1,
                                          dtype=np.float32, activation="relu")
    assert (layer.eps, layer.momentum, layer.axis, layer.activation) == (1e-2, None, -1, "relu")
    assert layer.dtype == np.float32 and layer.weight.dtype == np.float32
    x = make_input(rng, (4, 2, 3), -1, np.float32)
    expected = np.maximum(eval_oracle(x, state, 1e-2, axis=-1), 0)
    assert_close(layer.eval()(x), expected, dtype=np.float32, scale=1)
    # dtype inference: float32 arrays -> float32
    f32 = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in state.items()}
    assert cbn.BatchNorm.from_state_dict(f32).dtype == np.float32
    # a state dict without a batch count starts counting at 0
    del state["num_batches_tracked"]
    assert cbn.BatchNorm.from_state_dict(state).num_batches_tracked == 0


def _model_state(rng):
    """A model's state dict in the layout of Sequential(Linear, BatchNorm1d(3),
    ReLU, BatchNorm1d(4)), plus a module nested under the batch norm "1"."""
    state = OrderedDict()
    state["0.weight"] = rng.normal(size=(3, 2))
    state["0.bias"] = rng.normal(size=3)
    for key, value in random_state(rng, 3).items():
        state[f"1.{key}"] = value
    for key, value in random_state(rng, 4).items():
        state[f"3.{key}"] = value
    state["1.inner.weight"] = rng.normal(size=7)   # nested under the prefix: ignored
    state["11.weight"] = rng.normal(size=6)        # "11" is not under "1"
    return state


@pytest.mark.parametrize("prefix", ["1", "1."])
def test_from_state_dict_with_a_prefix(rng, prefix):
    state = _model_state(rng)
    layer = cbn.BatchNorm.from_state_dict(state, prefix=prefix)
    assert layer.num_features == 3
    assert_state_equals(layer, {k[2:]: v for k, v in state.items()
                                if k.startswith("1.") and k.count(".") == 1})
    other = cbn.BatchNorm1d.from_state_dict(state, prefix="3")
    assert other.num_features == 4 and type(other) is cbn.BatchNorm1d


@pytest.mark.parametrize("state, prefix", [
    pytest.param({"weight": np.ones(3), "bias": np.zeros(3), "momentum": np.ones(3)}, "",
                 id="unknown-key"),
    pytest.param({"1.weight": np.ones(3), "1.bias": np.zeros(3), "1.extra": np.ones(3)}, "1",
                 id="unknown-key-under-prefix"),
    pytest.param({}, "", id="empty"),
    pytest.param({"0.weight": np.ones(3), "0.bias": np.zeros(3)}, "1", id="nothing-under-prefix"),
    pytest.param({"1.inner.weight": np.ones(3)}, "1", id="only-nested"),
    pytest.param({"weight": np.ones(3), "running_mean": np.ones(3)}, "",
                 id="weight-mean-without-var"),
    pytest.param({"bias": np.ones(3)}, "", id="bias-without-weight"),
    pytest.param({"running_mean": np.ones(3)}, "", id="mean-without-var"),
    pytest.param({"weight": np.ones(3), "bias": np.zeros(4)}, "", id="lengths-affine"),
    pytest.param({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
                  "running_var": np.ones(2)}, "", id="lengths-stats"),
    pytest.param({"num_batches_tracked": np.array(1)}, "", id="only-count"),
])
def test_from_state_dict_rejects_bad_state_dicts(state, prefix):
    with pytest.raises(ValueError):
        cbn.BatchNorm.from_state_dict(state, prefix=prefix)


def test_from_state_dict_of_a_torch_model(rng):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.ReLU(), torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    bn = model[1]
    bn.add_module("inner", torch.nn.Linear(2, 2))  # nested under the prefix: ignored
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn.train()
    for _ in range(3):
        bn(torch.from_numpy(make_input(rng, (8, 3), 1, np.float32, offset=2.0)))
    bn.eval()  # the layer still starts in training mode
    for prefix in ("1", "1."):
        layer = cbn.BatchNorm.from_state_dict(model.state_dict(), prefix=prefix,
                                              eps=bn.eps, momentum=bn.momentum)
        assert type(layer) is cbn.BatchNorm and layer.training is True
        assert layer.num_features == 3 and layer.dtype == np.float32
        assert layer.num_batches_tracked == 3
        for key in ("weight", "bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(layer, key),
                                          getattr(bn, key).detach().numpy(), err_msg=key)
        x = make_input(rng, (8, 3), 1, np.float32)
        assert_close(layer.eval()(x), bn(torch.from_numpy(x)).detach().numpy(),
                     dtype=np.float32, scale=1)
    nested = cbn.BatchNorm2d.from_state_dict(model.state_dict(), prefix="3.0")
    assert nested.num_features == 4
    with pytest.raises(ValueError):
        cbn.BatchNorm.from_state_dict(model.state_dict(), prefix="3")  # only nested entries
    with pytest.raises(ValueError):
        cbn.BatchNorm.from_state_dict(model.state_dict(), prefix="0")  # a Linear: no bn keys
    # a frozen layer from the same state dict
    frozen = cbn.FrozenBatchNorm(model.state_dict(), prefix="1", eps=bn.eps)
    assert_close(frozen(x), bn(torch.from_numpy(x)).detach().numpy(), dtype=np.float32,
                 scale=1)
