"""cbn against PyTorch CPU: layers, the functional form, state dicts, repr and
errors. Skipped when torch is not importable (it is not a dependency of cbn)."""
import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

import cbn  # noqa: E402

from corpus import assert_close  # noqa: E402

pytestmark = pytest.mark.torch

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]

CBN_LAYERS = {"1d": cbn.BatchNorm1d, "2d": cbn.BatchNorm2d, "3d": cbn.BatchNorm3d}
TORCH_LAYERS = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d,
                "3d": torch.nn.BatchNorm3d}

# (layer kind, shape as cbn sees it, cbn's channel axis). For axis=-1 torch
# gets the same data with the channel axis moved to position 1.
LAYOUTS = [
    pytest.param("1d", (64, 5), 1, id="NC"),
    pytest.param("1d", (8, 4, 33), 1, id="NCL"),
    pytest.param("2d", (4, 3, 9, 10), 1, id="NCHW"),
    pytest.param("3d", (2, 3, 4, 5, 6), 1, id="NCDHW"),
    pytest.param("1d", (8, 33, 4), -1, id="NLC"),
    pytest.param("2d", (4, 9, 10, 3), -1, id="NHWC"),
    pytest.param("3d", (2, 4, 5, 6, 3), -1, id="NDHWC"),
]

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module", autouse=True)
def same_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(cbn.get_num_threads())
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# helpers

def make_data(rng, shape, axis, dtype, offset=0.0):
    """Channels with distinct means in [-1, 1] (+ offset) and spreads in [0.5, 2]."""
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    mean = rng.uniform(-1, 1, shape[axis]).reshape(bshape)
    std = rng.uniform(0.5, 2, shape[axis]).reshape(bshape)
    return (offset + mean + std * rng.standard_normal(shape)).astype(dtype)


def to_torch_layout(tensor, axis):
    """cbn's layout -> torch's (channels at position 1)."""
    return tensor if axis == 1 else tensor.movedim(axis, 1)


def from_torch_layout(tensor, axis):
    return tensor if axis == 1 else tensor.movedim(1, axis)


def numpy_of(value):
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return np.asarray(value)


def assert_result(actual, expected, x, what):
    """A cbn output: x's shape and dtype, and close to torch's."""
    assert isinstance(actual, np.ndarray), what
    assert actual.shape == x.shape, what
    assert actual.dtype == x.dtype, what
    assert_close(actual, numpy_of(expected), dtype=x.dtype, scale=1, err_msg=what)


def torch_dtype(dtype):
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def torch_step(module, x, dy, axis):
    """Forward and backward through a torch module, in cbn's layout.

    Returns (y, dx, grad_weight, grad_bias) as NumPy arrays (grads None when
    the module has no affine parameters)."""
    if module.weight is not None:
        module.weight.grad = None
        module.bias.grad = None
    xt = torch.tensor(x, requires_grad=True)
    y = from_torch_layout(module(to_torch_layout(xt, axis)), axis)
    y.backward(torch.from_numpy(dy))
    grads = (None, None)
    if module.weight is not None:
        grads = (module.weight.grad.numpy().copy(), module.bias.grad.numpy().copy())
    return (y.detach().numpy(), xt.grad.numpy()) + grads


def assert_same_state(ours, theirs, dtype, when):
    for key in STATE_KEYS:
        expected = getattr(theirs, key)
        actual = getattr(ours, key)
        if expected is None:
            assert actual is None, f"{key} {when}"
        elif key == "num_batches_tracked":
            assert actual == int(expected), f"{key} {when}"
        else:
            assert actual.dtype == np.dtype(dtype), f"{key} {when}"
            assert_close(actual, numpy_of(expected), kind="stats", dtype=dtype, scale=1,
                         err_msg=f"{key} {when}")


def cbn_state(layer):
    return {key: (None if getattr(layer, key) is None else np.copy(getattr(layer, key)))
            for key in STATE_KEYS}


def assert_state_unchanged(layer, before, when):
    for key, value in before.items():
        if value is None:
            assert getattr(layer, key) is None, f"{key} {when}"
        else:
            np.testing.assert_array_equal(getattr(layer, key), value,
                                          err_msg=f"{key} {when}")


def randomize(rng, ours, theirs, num_features):
    """Give both layers the same non-trivial parameters and running statistics."""
    values = {}
    if theirs.weight is not None:
        values["weight"] = rng.uniform(0.5, 1.5, num_features)
        values["bias"] = rng.uniform(-0.5, 0.5, num_features)
    if theirs.running_mean is not None:
        values["running_mean"] = rng.uniform(-0.5, 0.5, num_features)
        values["running_var"] = rng.uniform(0.5, 2.0, num_features)
    with torch.no_grad():
        for key, value in values.items():
            getattr(theirs, key).copy_(torch.from_numpy(value))
            setattr(ours, key, value)


def layer_pair(kind, num_features, dtype, axis=1, **kwargs):
    ours = CBN_LAYERS[kind](num_features, axis=axis, dtype=dtype, **kwargs)
    theirs = TORCH_LAYERS[kind](num_features, **kwargs).to(torch_dtype(dtype))
    return ours, theirs


# ---------------------------------------------------------------------------
# layers

@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "mNone"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, shape, axis", LAYOUTS)
def test_layer_matches_torch(rng, kind, shape, axis, dtype, affine, track, momentum):
    num_features = shape[axis]
    n = np.prod(shape) // num_features  # values per channel
    ours, theirs = layer_pair(kind, num_features, dtype, axis, momentum=momentum,
                              affine=affine, track_running_stats=track)
    randomize(rng, ours, theirs, num_features)
    assert_same_state(ours, theirs, dtype, "initially")

    for step in range(3):
        x = make_data(rng, shape, axis, dtype)
        dy = make_data(rng, shape, axis, dtype)
        y_t, dx_t, gw_t, gb_t = torch_step(theirs, x, dy, axis)
        y = ours(x)
        assert_result(y, y_t, x, f"training y, step {step}")
        dx = ours.backward(dy)
        assert_result(dx, dx_t, x, f"training dx, step {step}")
        if affine:
            # torch's float32 sums round off with the square root of the count
            assert_close(ours.grad_weight, gw_t, kind="grad", dtype=dtype, scale=np.sqrt(n),
                         err_msg=f"grad_weight, step {step}")
            assert_close(ours.grad_bias, gb_t, kind="grad", dtype=dtype, scale=np.sqrt(n),
                         err_msg=f"grad_bias, step {step}")
        else:
            assert ours.grad_weight is None and ours.grad_bias is None
        assert_same_state(ours, theirs, dtype, f"after training step {step}")
        if affine:  # the same SGD step on both sides (from cbn's gradients, so
            # torch's float32 rounding does not make the parameters drift apart)
            new_weight = ours.weight - 0.01 * ours.grad_weight
            new_bias = ours.bias - 0.01 * ours.grad_bias
            with torch.no_grad():
                theirs.weight.copy_(torch.from_numpy(new_weight))
                theirs.bias.copy_(torch.from_numpy(new_bias))
            ours.weight = new_weight
            ours.bias = new_bias

    assert ours.eval() is ours
    theirs.eval()
    before = cbn_state(ours)
    x = make_data(rng, shape, axis, dtype)
    dy = make_data(rng, shape, axis, dtype)
    y_t, dx_t, gw_t, gb_t = torch_step(theirs, x, dy, axis)
    y = ours(x)
    assert_result(y, y_t, x, "eval y")
    dx = ours.backward(dy)
    assert_result(dx, dx_t, x, "eval dx")
    if affine:
        assert_close(ours.grad_weight, gw_t, kind="grad", dtype=dtype, scale=np.sqrt(n),
                     err_msg="eval grad_weight")
        assert_close(ours.grad_bias, gb_t, kind="grad", dtype=dtype, scale=np.sqrt(n),
                     err_msg="eval grad_bias")
    assert_state_unchanged(ours, before, "after eval")
    assert_same_state(ours, theirs, dtype, "after eval")


@pytest.mark.parametrize("dtype", DTYPES)
def test_track_running_stats_switched_off_later_matches_torch(rng, dtype):
    """Buffers freeze in training, eval still normalizes with them."""
    shape, axis = (6, 4, 7), 1
    ours, theirs = layer_pair("1d", 4, dtype, momentum=0.3)
    randomize(rng, ours, theirs, 4)
    for _ in range(2):
        x = make_data(rng, shape, axis, dtype)
        assert_result(ours(x), torch_step(theirs, x, x, axis)[0], x, "tracking")
    ours.track_running_stats = False
    theirs.track_running_stats = False
    before = cbn_state(ours)
    x = make_data(rng, shape, axis, dtype)
    dy = make_data(rng, shape, axis, dtype)
    y_t, dx_t, _, _ = torch_step(theirs, x, dy, axis)
    assert_result(ours(x), y_t, x, "frozen training y")
    assert_result(ours.backward(dy), dx_t, x, "frozen training dx")
    assert_state_unchanged(ours, before, "after a frozen training step")
    assert_same_state(ours, theirs, dtype, "after a frozen training step")
    ours.eval()
    theirs.eval()
    x = make_data(rng, shape, axis, dtype, offset=2.0)  # batch stats would differ
    y_t, dx_t, _, _ = torch_step(theirs, x, dy, axis)
    assert_result(ours(x), y_t, x, "eval y with frozen buffers")
    assert_result(ours.backward(dy), dx_t, x, "eval dx with frozen buffers")


@pytest.mark.parametrize("start", [0, 1, 4, 99])
def test_cumulative_average_factor_matches_torch(rng, start):
    """momentum=None: the factor of the k-th batch is 1 / num_batches_tracked."""
    dtype, shape, axis, num_features = np.float64, (16, 3), 1, 3
    ours, theirs = layer_pair("1d", num_features, dtype, momentum=None)
    randomize(rng, ours, theirs, num_features)
    ours.num_batches_tracked = start
    theirs.num_batches_tracked.fill_(start)
    for k in range(1, 4):
        x = make_data(rng, shape, axis, dtype, offset=3.0)
        old_ours = ours.running_mean.copy()
        old_theirs = theirs.running_mean.numpy().copy()
        ours(x)
        theirs(torch.from_numpy(x))
        batch_mean = x.mean(axis=0)
        factor_ours = (ours.running_mean - old_ours) / (batch_mean - old_ours)
        factor_theirs = (theirs.running_mean.numpy() - old_theirs) / (batch_mean - old_theirs)
        np.testing.assert_allclose(factor_theirs, 1.0 / (start + k), rtol=1e-9)
        np.testing.assert_allclose(factor_ours, factor_theirs, rtol=1e-9,
                                   err_msg=f"factor after {start + k} batches")
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked) == start + k
        assert_same_state(ours, theirs, dtype, f"after {start + k} batches")


# ---------------------------------------------------------------------------
# functional

@pytest.mark.parametrize("mode", ["train", "train-no-running", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, shape, axis", LAYOUTS)
def test_batch_norm_matches_torch(rng, kind, shape, axis, dtype, affine, mode):
    num_features = shape[axis]
    training = mode != "eval"
    momentum, eps = 0.3, 1e-3
    weight = rng.uniform(0.5, 1.5, num_features).astype(dtype) if affine else None
    bias = rng.uniform(-0.5, 0.5, num_features).astype(dtype) if affine else None
    if mode == "train-no-running":
        running_mean = running_var = running_mean_t = running_var_t = None
    else:
        running_mean = rng.uniform(-0.5, 0.5, num_features).astype(dtype)
        running_var = rng.uniform(0.5, 2.0, num_features).astype(dtype)
        running_mean_t = torch.from_numpy(running_mean.copy())
        running_var_t = torch.from_numpy(running_var.copy())
        initial = (running_mean.copy(), running_var.copy())
    weight_t = None if weight is None else torch.from_numpy(weight)
    bias_t = None if bias is None else torch.from_numpy(bias)

    for call in range(2):  # the in-place updates accumulate
        x = make_data(rng, shape, axis, dtype)
        y_t = torch.nn.functional.batch_norm(
            to_torch_layout(torch.from_numpy(x), axis), running_mean_t, running_var_t,
            weight_t, bias_t, training, momentum, eps)
        y = cbn.batch_norm(x, running_mean, running_var, weight, bias, training,
                           momentum, eps, axis=axis)
        assert_result(y, from_torch_layout(y_t, axis), x, f"y, call {call}")
        if running_mean is not None:
            assert running_mean.dtype == running_var.dtype == np.dtype(dtype)
            assert_close(running_mean, numpy_of(running_mean_t), kind="stats", dtype=dtype,
                         scale=1, err_msg=f"running_mean, call {call}")
            assert_close(running_var, numpy_of(running_var_t), kind="stats", dtype=dtype,
                         scale=1, err_msg=f"running_var, call {call}")
    if mode == "eval":
        np.testing.assert_array_equal(running_mean, initial[0])
        np.testing.assert_array_equal(running_var, initial[1])


# ---------------------------------------------------------------------------
# state dicts

STATE_LAYOUTS = [
    pytest.param("1d", (16, 4, 5), id="1d"),
    pytest.param("2d", (4, 4, 5, 6), id="2d"),
    pytest.param("3d", (2, 4, 3, 4, 5), id="3d"),
]


def train_torch(rng, module, shape, dtype, steps=3):
    for _ in range(steps):
        module(torch.from_numpy(make_data(rng, shape, 1, dtype)))


def train_cbn(rng, layer, shape, dtype, steps=3):
    for _ in range(steps):
        layer(make_data(rng, shape, 1, dtype))


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, shape", STATE_LAYOUTS)
def test_torch_state_dict_loads_into_cbn(rng, kind, shape, dtype, affine, track):
    num_features = shape[1]
    ours, theirs = layer_pair(kind, num_features, dtype, affine=affine,
                              track_running_stats=track)
    if affine:
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, num_features)))
            theirs.bias.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, num_features)))
    train_torch(rng, theirs, shape, dtype)
    state = theirs.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())

    missing, unexpected = ours.load_state_dict(state)
    assert (list(missing), list(unexpected)) == ([], [])
    assert_same_state(ours, theirs, dtype, "after loading torch's state_dict")
    assert list(ours.state_dict()) == list(state)

    ours.eval()
    theirs.eval()
    x = make_data(rng, shape, 1, dtype)
    dy = make_data(rng, shape, 1, dtype)
    y_t, dx_t, _, _ = torch_step(theirs, x, dy, 1)
    assert_result(ours(x), y_t, x, "eval y")
    assert_result(ours.backward(dy), dx_t, x, "eval dx")


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, shape", STATE_LAYOUTS)
def test_cbn_state_dict_loads_into_torch(rng, kind, shape, dtype, affine, track):
    num_features = shape[1]
    ours, theirs = layer_pair(kind, num_features, dtype, affine=affine,
                              track_running_stats=track)
    if affine:
        ours.weight = rng.uniform(0.5, 1.5, num_features)
        ours.bias = rng.uniform(-0.5, 0.5, num_features)
    train_cbn(rng, ours, shape, dtype)
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    assert all(isinstance(value, np.ndarray) for value in state.values())

    result = theirs.load_state_dict(
        {key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    assert (list(result.missing_keys), list(result.unexpected_keys)) == ([], [])
    assert_same_state(ours, theirs, dtype, "after loading cbn's state_dict into torch")
    if track:
        assert theirs.num_batches_tracked.dtype == torch.int64
        assert int(theirs.num_batches_tracked) == 3

    ours.eval()
    theirs.eval()
    x = make_data(rng, shape, 1, dtype)
    dy = make_data(rng, shape, 1, dtype)
    y_t, dx_t, _, _ = torch_step(theirs, x, dy, 1)
    assert_result(ours(x), y_t, x, "eval y")
    assert_result(ours.backward(dy), dx_t, x, "eval dx")


# ---------------------------------------------------------------------------
# repr

REPR_ARGS = [
    pytest.param((64,), {}, id="defaults"),
    pytest.param((3,), dict(eps=1e-3, momentum=None), id="cumulative"),
    pytest.param((7,), dict(momentum=0.3, affine=False, track_running_stats=False),
                 id="plain"),
    pytest.param((5, 1e-4, 1.0, True, False), {}, id="positional"),
    pytest.param((2,), dict(eps=0.5, momentum=0.0, affine=False), id="frozen"),
]


@pytest.mark.parametrize("args, kwargs", REPR_ARGS)
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_repr_matches_torch(kind, args, kwargs):
    ours = repr(CBN_LAYERS[kind](*args, **kwargs))
    theirs = repr(TORCH_LAYERS[kind](*args, **kwargs))
    # PyTorch >= 2.x prints its own ``bias=`` flag, which cbn's repr leaves
    # out unless bias=False. Everything else must match.
    theirs = theirs.replace(", bias=True", "").replace(", bias=False", "")
    assert ours == theirs


def test_repr_is_the_documented_one():
    assert repr(cbn.BatchNorm2d(64)) == (
        "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)")


# ---------------------------------------------------------------------------
# one value per channel

SINGLE_VALUE = [
    pytest.param("1d", (1, 3), 1, id="NC"),
    pytest.param("1d", (1, 3, 1), 1, id="NCL"),
    pytest.param("2d", (1, 3, 1, 1), 1, id="NCHW"),
    pytest.param("3d", (1, 3, 1, 1, 1), 1, id="NCDHW"),
    pytest.param("2d", (1, 1, 1, 3), -1, id="NHWC"),
]


@pytest.mark.parametrize("kind, shape, axis", SINGLE_VALUE)
def test_single_value_per_channel_error_matches_torch(rng, kind, shape, axis):
    dtype = np.float32
    num_features = shape[axis]
    ours, theirs = layer_pair(kind, num_features, dtype, axis)
    randomize(rng, ours, theirs, num_features)
    x = make_data(rng, shape, axis, dtype)
    xt = to_torch_layout(torch.from_numpy(x), axis)

    with pytest.raises(ValueError) as torch_error:
        theirs(xt)
    prefix = str(torch_error.value).split(", got input size")[0]
    assert prefix == "Expected more than 1 value per channel when training"

    before = cbn_state(ours)
    with pytest.raises(ValueError) as error:
        ours(x)
    assert str(error.value).startswith(prefix + ", got input size")
    assert_state_unchanged(ours, before, "after the error")

    running_mean, running_var = ours.running_mean.copy(), ours.running_var.copy()
    with pytest.raises(ValueError) as error:
        cbn.batch_norm(x, running_mean, running_var, training=True, axis=axis)
    assert str(error.value).startswith(prefix + ", got input size")
    np.testing.assert_array_equal(running_mean, ours.running_mean)
    np.testing.assert_array_equal(running_var, ours.running_var)

    # In eval mode one value per channel is fine for both.
    ours.eval()
    theirs.eval()
    y_t = from_torch_layout(theirs(xt), axis)
    assert_result(ours(x), y_t, x, "eval y")
