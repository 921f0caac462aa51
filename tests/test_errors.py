"""Bad input: a clear error, and nothing lost.

Every kind of bad input, for the layer and for the public functions
``batch_norm``, ``batch_stats``, ``batch_norm_forward`` and
``batch_norm_backward``. Each test checks the exception type and that the
message names the offending shape, dtype or value; the layer tests also check
that a failed call leaves every piece of state bit-identical, including what
the next ``backward`` uses.
"""
import re
from types import SimpleNamespace

import numpy as np
import pytest

import cbn
from cbn import reference

from corpus import assert_close, layer_state

SHAPE = (4, 3, 5)  # the valid input of every test: N=4, C=3, L=5

BAD_DTYPES = [
    pytest.param(np.dtype(np.int32), id="int32"),
    pytest.param(np.dtype(np.int64), id="int64"),
    pytest.param(np.dtype(np.uint8), id="uint8"),
    pytest.param(np.dtype(np.bool_), id="bool"),
    pytest.param(np.dtype(np.complex64), id="complex64"),
    pytest.param(np.dtype(np.complex128), id="complex128"),
    pytest.param(np.dtype(object), id="object"),
    pytest.param(np.dtype("U3"), id="str"),
    pytest.param(np.dtype("S3"), id="bytes"),
]


def shape_text(shape):
    """Regex matching a shape as Python prints it: (4, 3, 5), (3,), ()."""
    return re.escape(str(tuple(shape)))


def dtype_text(dtype):
    return re.escape(str(np.dtype(dtype)))


def make_input(rng, shape, dtype=np.float32, offset=0.0):
    return (offset + 1.5 * rng.standard_normal(shape)).astype(dtype)


def bad_array(dtype, shape=SHAPE):
    return np.zeros(shape).astype(dtype)


# ---------------------------------------------------------------------------
# Layer

def prepared_layer(rng, cls=cbn.BatchNorm, shape=SHAPE, training=True, **kwargs):
    """A layer with non-trivial parameters and statistics after a successful
    forward and backward; returns (layer, x, dy, dx)."""
    axis = kwargs.get("axis", 1)
    num_channels = shape[axis]
    layer = cls(num_channels, **kwargs)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, num_channels)
        layer.bias[...] = rng.uniform(-1, 1, num_channels)
    layer(make_input(rng, shape, offset=2.0))
    layer.train(training)
    x = make_input(rng, shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    layer(x)
    dx = layer.backward(dy)
    return layer, x, dy, dx


def _load(values):
    """A load_state_dict call with a valid state but for ``values`` (None: key absent)."""
    def call(layer, x, dy):
        state = {"weight": np.full(3, 7.0), "bias": np.full(3, 8.0),
                 "running_mean": np.full(3, 9.0), "running_var": np.full(3, 10.0),
                 "num_batches_tracked": np.array(11)}
        state.update(values)
        for key in [key for key, value in state.items() if value is None]:
            del state[key]
        layer.load_state_dict(state)
    return call


# (id, layer kwargs, bad call, exception, message regex, also an error in eval mode)
LAYER_FAILURES = [
    ("forward-wrong-channel-count", {}, lambda bn, x, dy: bn(np.ones((4, 5, 5), np.float32)),
     ValueError, shape_text((4, 5, 5)), True),
    ("forward-wrong-channel-count-channels-last", {"axis": -1},
     lambda bn, x, dy: bn(np.ones((4, 5, 4), np.float32)), ValueError, shape_text((4, 5, 4)),
     True),
    ("forward-channels-last-input", {}, lambda bn, x, dy: bn(np.ones((4, 5, 3), np.float32)),
     ValueError, shape_text((4, 5, 3)) + r".*axis -1 has length 3: did you mean axis=-1\?$",
     True),
    ("forward-channels-first-input", {"axis": -1},
     lambda bn, x, dy: bn(np.ones((4, 3, 5), np.float32)), ValueError,
     r"did you mean axis=1\?$", True),
    ("forward-None", {}, lambda bn, x, dy: bn(None),
     TypeError, r"^input: expected an array, got None$", True),
    ("forward-int-input", {}, lambda bn, x, dy: bn(np.ones(SHAPE, np.int64)),
     TypeError, r"int64.*float dtype.*input\.astype\(np\.float32\)", True),
    ("backward-None", {}, lambda bn, x, dy: bn.backward(None),
     TypeError, r"^dy: expected an array, got None$", True),
    ("backward-int-dy-suggests-float", {}, lambda bn, x, dy: bn.backward(np.ones(SHAPE, int)),
     TypeError, r"float dtype.*dy\.astype\(np\.float32\)", True),
    ("forward-1d", {}, lambda bn, x, dy: bn(np.ones(3, np.float32)),
     ValueError, shape_text((3,)), True),
    ("forward-0d", {}, lambda bn, x, dy: bn(np.ones((), np.float32)),
     ValueError, shape_text(()), True),
    ("forward-axis-out-of-range", {"axis": 2}, lambda bn, x, dy: bn(np.ones((4, 5), np.float32)),
     ValueError, r"axis.*2.*" + shape_text((4, 5)), True),
    ("forward-single-value-per-channel", {}, lambda bn, x, dy: bn(np.ones((1, 3, 1), np.float32)),
     ValueError, r"^Expected more than 1 value per channel when training, got input size.*"
     + shape_text((1, 3, 1)), False),
    ("backward-wrong-shape", {}, lambda bn, x, dy: bn.backward(np.ones((4, 3, 6), np.float32)),
     ValueError, shape_text((4, 3, 6)) + ".*" + shape_text(SHAPE), True),
    ("backward-transposed", {}, lambda bn, x, dy: bn.backward(np.ascontiguousarray(dy.T)),
     ValueError, shape_text((5, 3, 4)), True),
    ("backward-int-dy", {}, lambda bn, x, dy: bn.backward(np.ones(SHAPE, np.int32)),
     TypeError, "int32", True),
    ("backward-complex-dy", {}, lambda bn, x, dy: bn.backward(dy.astype(np.complex64)),
     TypeError, "complex64", True),
    ("set-weight-wrong-size", {}, lambda bn, x, dy: setattr(bn, "weight", np.ones(4)),
     ValueError, r"weight.*" + shape_text((4,)), True),
    ("set-bias-wrong-size", {}, lambda bn, x, dy: setattr(bn, "bias", np.ones((3, 1))),
     ValueError, r"bias.*" + shape_text((3, 1)), True),
    ("set-running-mean-wrong-size", {}, lambda bn, x, dy: setattr(bn, "running_mean", np.ones(2)),
     ValueError, r"running_mean.*" + shape_text((2,)), True),
    ("set-running-var-wrong-size", {}, lambda bn, x, dy: setattr(bn, "running_var", np.ones(5)),
     ValueError, r"running_var.*" + shape_text((5,)), True),
    ("set-weight-complex", {}, lambda bn, x, dy: setattr(bn, "weight", np.ones(3, np.complex128)),
     TypeError, "complex128", True),
    ("set-eps-zero", {}, lambda bn, x, dy: setattr(bn, "eps", 0.0), ValueError, r"eps.*0", True),
    ("set-eps-nan", {}, lambda bn, x, dy: setattr(bn, "eps", float("nan")),
     ValueError, r"eps.*nan", True),
    ("set-momentum-above-one", {}, lambda bn, x, dy: setattr(bn, "momentum", 1.5),
     ValueError, r"momentum.*1\.5", True),
    ("load-wrong-size", {}, _load({"running_var": np.ones(2)}),
     ValueError, r"running_var.*" + shape_text((2,)), True),
    ("load-missing-key", {}, _load({"bias": None}), ValueError, "bias", True),
    ("load-unexpected-key", {}, _load({"gamma": np.ones(3)}), ValueError, "gamma", True),
    ("load-complex", {}, _load({"weight": np.ones(3, np.complex64)}),
     TypeError, "complex64", True),
]
for _param in BAD_DTYPES:
    _dtype = _param.values[0]
    LAYER_FAILURES.append((
        f"forward-dtype-{_param.id}", {},
        (lambda dt: lambda bn, x, dy: bn(bad_array(dt)))(_dtype),
        TypeError, dtype_text(_dtype), True))


@pytest.mark.parametrize("kwargs, call, exc, match, training", [
    pytest.param(*case[1:5], training, id=f"{case[0]}-{'train' if training else 'eval'}")
    for case in LAYER_FAILURES for training in (True, False) if training or case[5]])
def test_failed_layer_call_changes_nothing(rng, kwargs, call, exc, match, training):
    shape = SHAPE if kwargs.get("axis", 1) in (1, 2) else (4, 5, 3)
    layer, x, dy, dx = prepared_layer(rng, shape=shape, training=training, **kwargs)
    x_before, dy_before = x.copy(), dy.copy()
    before = layer_state(layer)
    with pytest.raises(exc, match=match):
        call(layer, x, dy)
    assert layer_state(layer) == before
    # backward still sees the earlier, successful forward
    np.testing.assert_array_equal(layer.backward(dy), dx)
    assert layer_state(layer) == before
    assert x.tobytes() == x_before.tobytes() and dy.tobytes() == dy_before.tobytes()


@pytest.mark.parametrize("cls, shape, bad_shape, message", [
    (cbn.BatchNorm1d, (4, 3), (4, 3, 2, 2), "expected 2D or 3D input (got 4D input)"),
    (cbn.BatchNorm2d, (4, 3, 2, 2), (4, 3, 5), "expected 4D input (got 3D input)"),
    (cbn.BatchNorm3d, (4, 3, 2, 2, 2), (4, 3, 2, 2), "expected 5D input (got 4D input)"),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_failed_rank_check_changes_nothing(rng, cls, shape, bad_shape, message, training):
    layer, x, dy, dx = prepared_layer(rng, cls, shape, training)
    before = layer_state(layer)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        layer(np.ones(bad_shape, np.float32))
    assert layer_state(layer) == before
    np.testing.assert_array_equal(layer.backward(dy), dx)


def test_backward_before_any_forward(rng):
    layer = cbn.BatchNorm(3)
    before = layer_state(layer)
    dy = np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"(?i)backward.*forward"):
        layer.backward(dy)
    assert layer_state(layer) == before
    # a failed first forward does not count as a forward
    with pytest.raises(ValueError, match=shape_text((4, 5, 5))):
        layer(np.ones((4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"(?i)backward.*forward"):
        layer.backward(dy)
    assert layer_state(layer) == before


@pytest.mark.parametrize("value, exc, match", [
    (0, ValueError, r"num_features.*\b0\b"),
    (-1, ValueError, r"num_features.*-1"),
    (2.5, TypeError, r"num_features.*float"),
    (True, TypeError, r"num_features.*bool"),
    ("3", TypeError, r"num_features.*str"),
    (None, TypeError, r"num_features.*None"),
])
def test_bad_num_features(value, exc, match):
    with pytest.raises(exc, match=match):
        cbn.BatchNorm(value)


@pytest.mark.parametrize("cls", [cbn.BatchNorm, cbn.BatchNorm2d])
@pytest.mark.parametrize("dtype, match", [
    (np.int32, "int32"), (np.float16, "float16"), (np.complex64, "complex64"),
    (np.bool_, "bool"), ("not-a-dtype", "not-a-dtype"),
])
def test_bad_layer_dtype(cls, dtype, match):
    with pytest.raises(TypeError, match=match):
        cls(3, dtype=dtype)


@pytest.mark.parametrize("value, exc, match", [
    (0.0, ValueError, r"eps.*\b0(\.0)?\b"),
    (-1e-5, ValueError, r"eps.*-1e-05"),
    (float("nan"), ValueError, r"eps.*nan"),
    ("1e-5", TypeError, r"eps.*str"),
    (None, TypeError, r"eps.*None"),
    ([1e-5], TypeError, r"eps.*list"),
    (1e-5j, TypeError, r"eps.*complex"),
])
def test_bad_eps_for_the_layer(value, exc, match):
    with pytest.raises(exc, match=match):
        cbn.BatchNorm(3, eps=value)


@pytest.mark.parametrize("value, exc, match", [
    (-0.1, ValueError, r"momentum.*-0\.1"),
    (1.5, ValueError, r"momentum.*1\.5"),
    (float("nan"), ValueError, r"momentum.*nan"),
    ("0.1", TypeError, r"momentum.*str"),
    ([0.1], TypeError, r"momentum.*list"),
])
def test_bad_momentum_for_the_layer(value, exc, match):
    with pytest.raises(exc, match=match):
        cbn.BatchNorm(3, momentum=value)


def test_momentum_none_is_allowed_for_the_layer():
    layer = cbn.BatchNorm(3, momentum=None)
    assert layer.momentum is None
    layer.momentum = None
    assert layer.momentum is None


@pytest.mark.parametrize("axis, match", [
    (1.0, r"axis.*float"), ("1", r"axis.*str"), (None, r"axis.*None"),
])
def test_non_integer_axis_for_the_layer(axis, match):
    with pytest.raises(TypeError, match=match):
        cbn.BatchNorm(3, axis=axis)


# ---------------------------------------------------------------------------
# Functions

@pytest.fixture
def ctx(rng):
    """Valid arguments for every function; tests break one of them."""
    x = make_input(rng, SHAPE)
    weight = rng.uniform(0.5, 2, 3)
    bias = rng.uniform(-1, 1, 3)
    _, mean, invstd = cbn.batch_norm_forward(x, weight, bias)
    return SimpleNamespace(
        x=x, dy=rng.standard_normal(SHAPE).astype(np.float32),
        running_mean=rng.uniform(-1, 1, 3), running_var=rng.uniform(0.5, 2, 3),
        weight=weight, bias=bias, mean=mean, invstd=invstd)


def _call(name, **overrides):
    """A call of function ``name`` with valid ctx arguments, some overridden.

    Overrides are values, or callables of ctx."""
    def call(c):
        resolved = {key: value(c) if callable(value) else value
                    for key, value in overrides.items()}
        args = {
            "batch_norm": dict(x=c.x, running_mean=c.running_mean, running_var=c.running_var,
                               weight=c.weight, bias=c.bias, training=True),
            "batch_norm_eval": dict(x=c.x, running_mean=c.running_mean,
                                    running_var=c.running_var, weight=c.weight, bias=c.bias,
                                    training=False),
            "batch_stats": dict(x=c.x),
            "batch_norm_forward": dict(x=c.x, weight=c.weight, bias=c.bias),
            "batch_norm_backward": dict(dy=c.dy, x=c.x, save_mean=c.mean,
                                        save_invstd=c.invstd, weight=c.weight),
        }[name]
        args.update(resolved)
        func = getattr(cbn, "batch_norm" if name == "batch_norm_eval" else name)
        return func(**args)
    return call


ALL_FUNCTIONS = ["batch_norm", "batch_norm_eval", "batch_stats", "batch_norm_forward",
                 "batch_norm_backward"]
OUT_FUNCTIONS = ["batch_norm", "batch_norm_eval", "batch_norm_forward", "batch_norm_backward"]
EPS_FUNCTIONS = ["batch_norm", "batch_norm_eval", "batch_norm_forward"]


def _overlapping(c):
    """A C-contiguous array of x's shape sharing all but one element with x."""
    base = np.empty(c.x.size + 1, np.float32)
    base[:-1] = c.x.ravel()
    c.x = base[:-1].reshape(SHAPE)
    return base[1:].reshape(SHAPE)


def _readonly_out(c):
    out = np.empty(SHAPE, np.float32)
    out.setflags(write=False)
    return out


FUNCTION_FAILURES = []


def failure(case_id, call, exc, match):
    FUNCTION_FAILURES.append(pytest.param(call, exc, match, id=case_id))


for _name in ALL_FUNCTIONS:
    # wrong rank
    failure(f"{_name}-1d", _call(_name, x=np.ones(3, np.float32), dy=np.ones(3, np.float32))
            if _name == "batch_norm_backward" else _call(_name, x=np.ones(3, np.float32)),
            ValueError, shape_text((3,)))
    failure(f"{_name}-0d", _call(_name, x=np.ones((), np.float32), dy=np.ones((), np.float32))
            if _name == "batch_norm_backward" else _call(_name, x=np.ones((), np.float32)),
            ValueError, shape_text(()))
    # bad axis
    failure(f"{_name}-axis-3", _call(_name, axis=3), ValueError, r"axis.*3.*" + shape_text(SHAPE))
    failure(f"{_name}-axis--4", _call(_name, axis=-4), ValueError,
            r"axis.*-4.*" + shape_text(SHAPE))
    failure(f"{_name}-axis-float", _call(_name, axis=1.0), TypeError, r"axis.*float")
    failure(f"{_name}-axis-str", _call(_name, axis="1"), TypeError, r"axis.*str")
    failure(f"{_name}-axis-None", _call(_name, axis=None), TypeError, r"axis.*None")
    # bad dtypes of x
    for _param in BAD_DTYPES:
        _dtype = _param.values[0]
        failure(f"{_name}-x-{_param.id}", _call(_name, x=bad_array(_dtype)),
                TypeError, dtype_text(_dtype))

for _name in ["batch_norm", "batch_norm_eval", "batch_norm_forward", "batch_norm_backward"]:
    # wrong channel count: x has 5 channels, the per-channel vectors 3
    failure(f"{_name}-wrong-channel-count",
            _call(_name, x=np.ones((4, 5, 5), np.float32), dy=np.ones((4, 5, 5), np.float32))
            if _name == "batch_norm_backward" else _call(_name, x=np.ones((4, 5, 5), np.float32)),
            ValueError, shape_text((3,)) + r".*\(5,\)")
    for _key, _bad in [("weight", np.ones(4)), ("weight", np.ones((3, 1))), ("bias", np.ones(2))]:
        if _name == "batch_norm_backward" and _key == "bias":
            continue
        failure(f"{_name}-{_key}-shape-{np.shape(_bad)}", _call(_name, **{_key: _bad}),
                ValueError, _key + ".*" + shape_text(np.shape(_bad)))
    failure(f"{_name}-weight-complex", _call(_name, weight=np.ones(3, np.complex128)),
            TypeError, r"weight.*complex128")

for _name in ["batch_norm", "batch_norm_eval"]:
    for _key, _bad in [("running_mean", np.zeros(4)), ("running_var", np.ones(2)),
                       ("running_var", np.ones((3, 1)))]:
        failure(f"{_name}-{_key}-shape-{np.shape(_bad)}", _call(_name, **{_key: _bad}),
                ValueError, _key + ".*" + shape_text(np.shape(_bad)))
    failure(f"{_name}-only-running-mean", _call(_name, running_var=None),
            ValueError, r"running_mean.*running_var")
    failure(f"{_name}-only-running-var", _call(_name, running_mean=None),
            ValueError, r"running_mean.*running_var")
    failure(f"{_name}-running-mean-complex",
            _call(_name, running_mean=np.zeros(3, np.complex128)),
            TypeError, r"running_mean.*complex128")

failure("batch_norm-eval-without-running-stats",
        _call("batch_norm_eval", running_mean=None, running_var=None),
        ValueError, r"running_mean.*running_var.*training=False")

for _value, _match in [(-0.1, r"momentum.*-0\.1"), (1.5, r"momentum.*1\.5"),
                       (float("nan"), r"momentum.*nan")]:
    failure(f"batch_norm-momentum-{_value}", _call("batch_norm", momentum=_value),
            ValueError, _match)
failure("batch_norm-momentum-str", _call("batch_norm", momentum="0.1"),
        TypeError, r"momentum.*str")

for _name in EPS_FUNCTIONS:
    for _value, _match in [(0.0, r"eps.*\b0(\.0)?\b"), (-1e-5, r"eps.*-1e-05"),
                           (float("nan"), r"eps.*nan")]:
        failure(f"{_name}-eps-{_value}", _call(_name, eps=_value), ValueError, _match)
    for _value, _match in [("1e-5", r"eps.*str"), (None, r"eps.*None"),
                           ([1e-5], r"eps.*list")]:
        failure(f"{_name}-eps-{type(_value).__name__}", _call(_name, eps=_value),
                TypeError, _match)

# batch_norm_backward's own arguments
failure("batch_norm_backward-dy-shape", _call("batch_norm_backward", dy=np.ones((4, 3, 6))),
        ValueError, shape_text((4, 3, 6)) + ".*" + shape_text(SHAPE))
failure("batch_norm_backward-dy-transposed",
        _call("batch_norm_backward", dy=lambda c: np.ascontiguousarray(c.dy.T)),
        ValueError, shape_text((5, 3, 4)))
for _param in BAD_DTYPES:
    _dtype = _param.values[0]
    failure(f"batch_norm_backward-dy-{_param.id}",
            _call("batch_norm_backward", dy=bad_array(_dtype)), TypeError, dtype_text(_dtype))
for _key in ["save_mean", "save_invstd"]:
    failure(f"batch_norm_backward-{_key}-shape",
            _call("batch_norm_backward", **{_key: np.ones(4)}), ValueError,
            _key + ".*" + shape_text((4,)))

for _name in OUT_FUNCTIONS:
    failure(f"{_name}-out-shape", _call(_name, out=np.empty((4, 3, 6), np.float32)),
            ValueError, r"out.*" + shape_text((4, 3, 6)))
    failure(f"{_name}-out-dtype", _call(_name, out=np.empty(SHAPE, np.float64)),
            TypeError, r"out.*float64")
    failure(f"{_name}-out-strided", _call(_name, out=np.empty((4, 3, 10), np.float32)[..., ::2]),
            ValueError, r"out.*contiguous")
    failure(f"{_name}-out-fortran", _call(_name, out=np.empty(SHAPE, np.float32, order="F")),
            ValueError, r"out.*contiguous")
    failure(f"{_name}-out-read-only", _call(_name, out=_readonly_out),
            ValueError, r"out.*read-?only")
    failure(f"{_name}-out-overlaps-x", _call(_name, out=_overlapping),
            ValueError, r"out.*overlap")
    failure(f"{_name}-out-list", _call(_name, out=[[0.0] * 5] * 3),
            TypeError, r"out.*list")


def _overlapping_dy(c):
    base = np.empty(c.dy.size + 1, np.float32)
    base[:-1] = c.dy.ravel()
    c.dy = base[:-1].reshape(SHAPE)
    return base[1:].reshape(SHAPE)


# dy is an input of the backward as much as x is
failure("batch_norm_backward-out-overlaps-dy",
        _call("batch_norm_backward", out=_overlapping_dy),
        ValueError, r"out.*overlap")


@pytest.mark.parametrize("call, exc, match", FUNCTION_FAILURES)
def test_bad_function_input(ctx, call, exc, match):
    originals = {key: np.array(value, copy=True) for key, value in vars(ctx).items()}
    with pytest.raises(exc, match=match):
        call(ctx)
    # nothing the caller passed in was changed (running stats included)
    for key, value in originals.items():
        current = getattr(ctx, key)
        assert current.tobytes() == value.tobytes(), key


def _fresh(c):
    return SimpleNamespace(**{key: np.array(value, copy=True) for key, value in vars(c).items()})


def _reference_output(name, c):
    if name in ("batch_norm", "batch_norm_eval"):
        return reference.batch_norm(c.x, c.running_mean.copy(), c.running_var.copy(), c.weight,
                                    c.bias, training=(name == "batch_norm"))
    if name == "batch_norm_forward":
        return reference.batch_norm_forward(c.x, c.weight, c.bias)[0]
    return reference.batch_norm_backward(c.dy, c.x, c.mean, c.invstd, c.weight)[0]


# Training forwards refuse out=x (a backward would need x): test_functional.py.
GOOD_OUTS = [(name, target) for name in OUT_FUNCTIONS for target in ("separate", "x")
             if target == "separate" or name not in ("batch_norm", "batch_norm_forward")]


@pytest.mark.parametrize("name, target", GOOD_OUTS)
def test_good_out_is_accepted(ctx, name, target):
    """The checks above reject only bad out=: a separate array works, and x
    itself except in training forwards."""
    expected = _reference_output(name, ctx)
    c = _fresh(ctx)
    out = np.empty(SHAPE, np.float32) if target == "separate" else c.x
    result = _call(name, out=out)(c)
    result = result[0] if isinstance(result, tuple) else result
    assert result is out
    assert_close(result, expected, dtype=np.float32, scale=1)


def test_functions_reject_bad_vectors_before_copying_a_huge_input():
    """A broadcast view of 2**40 rows costs nothing unless copied: a call whose
    per-channel arguments do not match it fails without the copy."""
    x = np.broadcast_to(np.float32(0), (2**40, 4))
    three = np.zeros(3)
    calls = [lambda: cbn.batch_norm(x, three, three + 1),
             lambda: cbn.batch_norm(x, three, three + 1, training=True),
             lambda: cbn.batch_norm_forward(x, three),
             lambda: cbn.batch_norm_backward(x, x, three, three + 1),
             lambda: cbn.batch_stats(x, out=(three, three.copy()))]
    for call in calls:
        with pytest.raises(ValueError, match=r"\(3,\), expected \(4,\)"):
            call()


# ---------------------------------------------------------------------------
# Messages that say the fix

@pytest.mark.parametrize("cls, shape, axis, match", [
    (cbn.BatchNorm2d, (8, 32, 32, 3), 1, r"axis -1 has length 3: did you mean axis=-1\?$"),
    (cbn.BatchNorm1d, (8, 20, 3), 1, r"axis -1 has length 3: did you mean axis=-1\?$"),
    (cbn.BatchNorm2d, (8, 3, 32, 32), -1, r"axis 1 has length 3: did you mean axis=1\?$"),
    (cbn.BatchNorm2d, (8, 3, 3, 32), -1,
     r"axis 1 and 2 have length 3: did you mean axis=1 or axis=2\?$"),
])
def test_wrong_channel_count_names_the_matching_axis(cls, shape, axis, match):
    layer = cls(3, axis=axis)
    before = layer_state(layer)
    with pytest.raises(ValueError, match=re.escape(str(shape)) + ".*" + match):
        layer(np.ones(shape, np.float32))
    assert layer_state(layer) == before


CHANNELS_LAST = (8, 6, 6, 3)   # axis 1 (the default) has 6 channels, axis -1 has 3


@pytest.mark.parametrize("call", [
    pytest.param(lambda x, v: cbn.batch_norm(x, v, v + 1), id="batch_norm-eval"),
    pytest.param(lambda x, v: cbn.batch_norm(x, v, v + 1, training=True), id="batch_norm-train"),
    pytest.param(lambda x, v: cbn.batch_norm(x, None, None, v, training=True),
                 id="batch_norm-weight"),
    pytest.param(lambda x, v: cbn.batch_norm_forward(x, v, v), id="batch_norm_forward"),
    pytest.param(lambda x, v: cbn.batch_norm_backward(x, x, v, v + 1), id="batch_norm_backward"),
])
def test_functions_name_the_axis_matching_the_per_channel_vectors(rng, call):
    x = make_input(rng, CHANNELS_LAST)
    vector = np.zeros(3)
    x_before = x.copy()
    with pytest.raises(ValueError, match=r"has shape \(3,\), expected \(6,\) for 6 channels "
                                         r"\(input of shape \(8, 6, 6, 3\)\); axis -1 has "
                                         r"length 3: did you mean axis=-1\?$"):
        call(x, vector)
    assert x.tobytes() == x_before.tobytes() and not vector.any()


def test_running_buffer_of_the_wrong_length_names_the_matching_axis(rng):
    running_mean, running_var = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"running_mean has shape \(3,\).*did you mean "
                                         r"axis=-1\?$"):
        cbn.batch_norm(make_input(rng, CHANNELS_LAST), running_mean, running_var,
                       training=True)
    assert not running_mean.any() and (running_var == 1).all()


@pytest.mark.parametrize("shape", [(8, 5, 5), (3, 5, 5)], ids=["no-axis", "batch-axis"])
def test_wrong_channel_count_without_a_matching_axis_suggests_none(shape):
    """The batch axis is never suggested, however long it is."""
    with pytest.raises(ValueError, match=r"with 5$"):
        cbn.BatchNorm1d(3)(np.ones(shape, np.float32))


@pytest.mark.parametrize("name", ["batch_norm", "batch_norm_eval", "batch_stats",
                                  "batch_norm_forward", "batch_norm_backward"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_data_suggests_a_float_dtype(ctx, name, dtype):
    originals = {key: np.array(value, copy=True) for key, value in vars(ctx).items()}
    with pytest.raises(TypeError, match=rf"^input has dtype {np.dtype(dtype)}; .*"
                                        r"convert it to a float dtype first, "
                                        r"e\.g\. input\.astype\(np\.float32\)$"
                       if name != "batch_norm_backward" else r"x\.astype\(np\.float32\)"):
        _call(name, x=np.ones(SHAPE, dtype))(ctx)
    for key, value in originals.items():
        assert getattr(ctx, key).tobytes() == value.tobytes(), key


def test_complex_data_gets_no_float_suggestion():
    with pytest.raises(TypeError, match=r"complex64; cbn supports .* data$"):
        cbn.batch_norm(np.ones(SHAPE, np.complex64), np.zeros(3), np.ones(3))


@pytest.mark.parametrize("name, slot", [
    ("batch_norm", "x"), ("batch_norm_eval", "x"), ("batch_stats", "x"),
    ("batch_norm_forward", "x"), ("batch_norm_backward", "dy"),
    ("batch_norm_backward", "x"), ("batch_norm_backward", "save_mean"),
    ("batch_norm_backward", "save_invstd"),
])
def test_none_says_an_array_was_expected(ctx, name, slot):
    originals = {key: np.array(value, copy=True) for key, value in vars(ctx).items()}
    label = "input" if slot == "x" and name != "batch_norm_backward" else slot
    with pytest.raises(TypeError, match=rf"^{label}: expected an array, got None$"):
        _call(name, **{slot: None})(ctx)
    for key, value in originals.items():
        assert getattr(ctx, key).tobytes() == value.tobytes(), key


def _model_state_dict(affine_only=False):
    """A small convolutional network's state dict, as PyTorch names it."""
    def bn(prefix):
        entries = {f"{prefix}.weight": np.ones(4), f"{prefix}.bias": np.zeros(4)}
        if not affine_only:
            entries.update({f"{prefix}.running_mean": np.zeros(4),
                            f"{prefix}.running_var": np.ones(4),
                            f"{prefix}.num_batches_tracked": np.array(3)})
        return entries
    return {"conv1.weight": np.ones((4, 3, 3, 3)), **bn("bn1"),
            "layer1.0.conv1.weight": np.ones((4, 4, 3, 3)), **bn("layer1.0.bn1"),
            "fc.weight": np.ones((10, 4)), "fc.bias": np.zeros(10)}


@pytest.mark.parametrize("affine_only", [False, True], ids=["tracking", "affine-only"])
def test_from_state_dict_of_a_model_lists_the_prefixes(affine_only):
    state = _model_state_dict(affine_only)
    before = {key: value.copy() for key, value in state.items()}
    with pytest.raises(ValueError) as info:
        cbn.BatchNorm2d.from_state_dict(state)
    message = str(info.value)
    assert "no batch-norm entries" in message
    assert "prefixes ['bn1', 'layer1.0.bn1']" in message
    assert "prefix='bn1'" in message
    assert "conv1" not in message.split("prefixes")[1]
    for key, value in before.items():
        np.testing.assert_array_equal(state[key], value)
    # the suggested prefix works
    layer = cbn.BatchNorm2d.from_state_dict(state, prefix="layer1.0.bn1")
    assert layer.num_features == 4


def test_from_state_dict_of_a_model_lists_the_tracking_prefixes_only():
    """With running statistics present, affine 1-D entries of other modules
    (a linear layer's bias) are not mistaken for batch norms."""
    with pytest.raises(ValueError, match=r"prefixes \['bn1', 'layer1\.0\.bn1'\]: pass one "
                                         r"as prefix=, e\.g\. prefix='bn1'$"):
        cbn.BatchNorm.from_state_dict(_model_state_dict())


def test_from_state_dict_with_a_wrong_prefix_lists_the_prefixes():
    with pytest.raises(ValueError, match=r"under prefix 'layer2\.'.*\['bn1', 'layer1\.0\.bn1'\]"):
        cbn.BatchNorm.from_state_dict(_model_state_dict(), prefix="layer2")


def test_from_state_dict_without_batch_norms_lists_nothing():
    with pytest.raises(ValueError, match=r"expected keys among \[[^]]*\]$"):
        cbn.BatchNorm.from_state_dict({"fc.weight": np.ones((2, 3))})


def test_single_value_in_eval_with_batch_statistics_does_not_say_training(rng):
    """A layer without running statistics normalizes with the batch's in eval
    mode too; one value per channel has no variance there either, and the
    message says so without claiming the layer is training."""
    layer, x, dy, dx = prepared_layer(rng, track_running_stats=False, training=False)
    before = layer_state(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones((1, 3, 1), np.float32))
    message = str(info.value)
    assert message.startswith("Expected more than 1 value per channel to compute batch "
                              "statistics")
    assert "training" not in message and "(1, 3, 1)" in message
    assert layer_state(layer) == before
    np.testing.assert_array_equal(layer.backward(dy), dx)
    # in training mode, the message is PyTorch's
    layer.train()
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when "
                                         r"training, got input size \(1, 3, 1\)$"):
        layer(np.ones((1, 3, 1), np.float32))
