"""Fuzzed bad input: thousands of garbage calls, each
rejected cleanly.

A deterministic generator builds garbage for every public entry point: wrong
ranks and channel counts, 0-d and 1-d arrays, Python lists and scalars, None,
object, string and other non-float arrays, huge declared sizes (broadcast
views of 2**40 rows, which cost nothing unless copied), non-array weights,
biases and running statistics, bad hyper-parameters, malformed state dicts
and fake PyTorch modules, and out= arrays of the wrong shape, dtype or
contiguity, read-only, or overlapping an input in an unsupported way. Each
case replaces one argument of a valid call (and ``PAIRS`` more cases replace
two) and requires that:

- the call raises ValueError or TypeError, nothing else and never nothing;
- the message names what was wrong: the offending shape, dtype or value (each
  garbage value carries the strings one of which must appear);
- no array passed in changed, and a layer's or frozen layer's whole state is
  bit-identical afterwards: weight, bias, running statistics,
  num_batches_tracked, gradients, what the next backward uses, the cached
  eval parameters (``fold()``, ``freeze()`` and an eval call), then a
  further training step; all compared with an untouched twin.

``BAD_INPUTS`` is the number of bad calls tried (see ``test_bad_input_count``,
which prints it).

Huge inputs whose per-channel arguments have the wrong length are also in
test_errors.py (``test_functions_reject_bad_vectors_before_copying_a_huge_input``).
"""
import math
import re
import warnings
import zlib

import numpy as np
import pytest

import cbn

from corpus import FakeTensor, layer_state

C = 3
NAN, INF = float("nan"), float("inf")
HUGE = 2 ** 40   # rows of the huge broadcast views (terabytes if copied)
PAIRS = 600      # extra function calls with two garbage arguments at once


# ---------------------------------------------------------------------------
# Garbage values

class G:
    """One garbage value: ``make(world)`` returns the argument overrides of
    the call (usually one), ``tokens`` the strings one of which the error
    message must contain."""

    __slots__ = ("label", "make", "tokens")

    def __init__(self, label, make, tokens):
        self.label = label
        self.make = make
        self.tokens = tuple(dict.fromkeys(str(t) for t in tokens if str(t)))


def mentions(message, token):
    """``token`` appears in ``message``; a short one (such as "0" or "()")
    only standing alone, not inside a longer word or number."""
    if len(token) > 3:
        return token in message
    return re.search(r"(?<![\w.])" + re.escape(token) + r"(?![\w.])", message) is not None


def value_tokens(value):
    """Names of a non-array value: its type, repr and what NumPy makes of it."""
    tokens = [type(value).__name__, repr(value), str(value)]
    try:
        tokens.append(str(np.dtype(value)))   # dtype arguments, as NumPy names them
    except Exception:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(value)
    except Exception:
        return tokens
    return tokens + [str(array.dtype), str(array.shape), f"{array.ndim}D"]


def one(slot, label, factory, tokens=None):
    """Garbage for one argument: ``factory()`` makes a fresh value per call."""
    def make(world):
        return {slot: factory()}
    sample = factory()
    if tokens is None:
        tokens = value_tokens(sample)
    elif not isinstance(sample, np.ndarray):
        tokens = list(tokens) + [type(sample).__name__]   # a non-array: its kind
    return G(f"{slot}={label}", make, tokens)


def fixed(slot, value, tokens=None):
    return one(slot, repr(value)[:40], lambda: value, tokens)




BAD_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.bool_, np.complex64, np.complex128, np.clongdouble,
              np.longdouble, object, "U3", "S3", "M8[s]", "m8[ns]", [("a", "f4")],
              "V4", ">i4", ">c8"]

NON_ARRAYS = [None, 0, 1.5, True, "abc", b"abc", 1j, Ellipsis, len, float]


def kind_garbage(slot):
    """Non-arrays for an array argument: nothing NumPy makes a float array of
    rank >= 2 from."""
    out = [fixed(slot, value) for value in NON_ARRAYS]
    out += [one(slot, "object()", object, ["object"]),
            one(slot, "dict", lambda: {"a": 1.0}, ["dict", "object"]),
            one(slot, "set", lambda: {1.0, 2.0}, ["set", "object"]),
            one(slot, "ragged-list", lambda: [[1.0], [1.0, 2.0]], ["list"]),
            one(slot, "str-list", lambda: [["a", "b", "c"]] * 4, ["<U1"]),
            one(slot, "generator", lambda: (float(i) for i in range(3)),
                ["generator", "object"])]
    return out


def rank_garbage(slot, dtype):
    """0-d and 1-d arrays and lists (an input needs batch and channels)."""
    dt = np.dtype(dtype)
    return [
        one(slot, "0d", lambda: np.array(1.5, dt), ["()", "0D"]),
        one(slot, "1d-C", lambda: np.ones(C, dt), [f"({C},)", "1D"]),
        one(slot, "1d-empty", lambda: np.ones(0, dt), ["(0,)", "1D"]),
        one(slot, "1d-7", lambda: np.ones(7, dt), ["(7,)", "1D"]),
        one(slot, "1d-list", lambda: [1.0] * C, [f"({C},)", "1D"]),
        one(slot, "1d-huge", lambda: np.broadcast_to(dt.type(0), (HUGE,)),
            [f"({HUGE},)", "1D"]),
    ]


def dtype_garbage(slot, shape):
    """Arrays (and lists) of a valid shape but not float16/32/64 data."""
    out = [one(slot, f"dtype-{np.dtype(dt)}", (lambda dt=dt: np.zeros(shape, dt)),
               [str(np.dtype(dt))]) for dt in BAD_DTYPES]
    out += [one(slot, "int-list", lambda: np.zeros(shape, int).tolist(), ["int64"]),
            one(slot, "bool-list", lambda: np.zeros(shape, bool).tolist(), ["bool"]),
            one(slot, "complex-list", lambda: np.zeros(shape, complex).tolist(),
                ["complex128"]),
            one(slot, "fake-tensor-int", lambda: FakeTensor(np.zeros(shape, np.int32)),
                ["int32"])]
    huge = (HUGE,) + tuple(shape[1:])
    out += [one(slot, "huge-int32", lambda: np.broadcast_to(np.int32(0), huge), ["int32"]),
            one(slot, "huge-bool", lambda: np.broadcast_to(np.False_, huge), ["bool"])]
    return out


def with_channels(shape, axis, count):
    shape = list(shape)
    shape[axis] = count
    return tuple(shape)


def channel_garbage(slot, shape, axis, dtype):
    """Arrays with the wrong channel count (where the count is fixed)."""
    out = []
    for count in (0, 1, 2, 4, 5):
        bad = with_channels(shape, axis, count)
        out.append(one(slot, f"channels-{count}", (lambda bad=bad: np.ones(bad, dtype)),
                       [str(bad), f"({count},)"]))
    bad = with_channels(shape, axis, 4)
    out.append(one(slot, "channels-list", lambda: np.ones(bad).tolist(),
                   [str(bad), "(4,)"]))
    return out


def single_value_garbage(slot, shape, axis, dtype):
    """One value per channel: nothing to take a batch variance of."""
    single = tuple(C if k == axis % len(shape) else 1 for k in range(len(shape)))
    return [one(slot, "single-value", lambda: np.ones(single, dtype), [str(single)])]


def rank_class_garbage(slot, ranks, dtype):
    """Inputs of a rank a BatchNorm1d/2d/3d refuses, channels right."""
    out = []
    for ndim in range(2, 7):
        if ndim in ranks:
            continue
        shape = (2, C) + (2,) * (ndim - 2)
        out.append(one(slot, f"rank-{ndim}", (lambda shape=shape: np.ones(shape, dtype)),
                       [f"got {ndim}D", str(shape)]))
    huge_ndim = 2 if 2 not in ranks else 6
    huge = (HUGE, C) + (1,) * (huge_ndim - 2)
    out.append(one(slot, "rank-huge", lambda: np.broadcast_to(np.float32(0), huge),
                   [f"got {huge_ndim}D", str(huge)]))
    return out


def shape_garbage(slot, shape, dtype):
    """Arrays of a float dtype whose shape is not ``shape`` (for dy)."""
    shapes = [shape[:-1] + (shape[-1] + 1,), (shape[0] + 1,) + shape[1:], shape[::-1],
              (math.prod(shape),), (1,) + shape, shape + (1,)]
    out = []
    for bad in dict.fromkeys(s for s in shapes if s != shape):
        out.append(one(slot, f"shape-{bad}", (lambda bad=bad: np.ones(bad, dtype)),
                       [str(bad)]))
    return out


def vector_garbage(slot, none_ok=True):
    """Bad per-channel vectors (weight, bias, running stats, saved stats)."""
    out = []
    for bad in [(2,), (4,), (0,), (1,), (C, 1), (1, C), (), (C, C)]:
        out.append(one(slot, f"shape-{bad}", (lambda bad=bad: np.ones(bad)), [str(bad)]))
    for dt in [np.bool_, np.complex64, np.complex128, object, "U3", "S3", "M8[s]",
               [("a", "f8")]]:
        out.append(one(slot, f"dtype-{np.dtype(dt)}", (lambda dt=dt: np.zeros(C, dt)),
                       [str(np.dtype(dt))]))
    out += [fixed(slot, "abc"), fixed(slot, 1.0), fixed(slot, 1j),
            one(slot, "short-list", lambda: [1.0, 2.0], ["(2,)"]),
            one(slot, "nested-list", lambda: [[1.0] * C], [f"(1, {C})"]),
            one(slot, "ragged-list", lambda: [[1.0], [1.0, 2.0]], ["list"]),
            one(slot, "str-list", lambda: ["a"] * C, ["<U1"]),
            one(slot, "complex-list", lambda: [1j] * C, ["complex128"]),
            one(slot, "dict", dict, ["dict", "object"]),
            one(slot, "object()", object, ["object"]),
            one(slot, "huge", lambda: np.broadcast_to(np.float64(0), (HUGE,)),
                [f"({HUGE},)"]),
            one(slot, "fake-tensor-short", lambda: FakeTensor(np.ones(C + 1)),
                [f"({C + 1},)"]),
            one(slot, "fake-tensor-complex", lambda: FakeTensor(np.ones(C, complex)),
                ["complex128"])]
    if not none_ok:
        out.append(fixed(slot, None, ["None", "object"]))
    return out


def buffer_garbage(slot):
    """Running statistics a training call cannot update in place."""
    def readonly():
        array = np.zeros(C)
        array.flags.writeable = False
        return array
    return [one(slot, "int", lambda: np.zeros(C, np.int64), ["int64"]),
            one(slot, "int32", lambda: np.ones(C, np.int32), ["int32"]),
            one(slot, "list", lambda: [0.0] * C, ["list"]),
            one(slot, "tuple", lambda: (0.0,) * C, ["tuple"]),
            one(slot, "read-only", readonly, ["read-only"]),
            one(slot, "broadcast", lambda: np.broadcast_to(np.float64(0), (C,)),
                ["read-only"])]


def scalar_garbage(slot, values):
    return [fixed(slot, value) for value in values]


EPS_BAD = [0, 0.0, -0.0, -1e-5, NAN, INF, -INF, "1e-5", None, [1e-5], 1j, True, False,
           np.array([1e-5]), np.float64(NAN), np.float32(-1), b"1", 10 ** 400]
MOMENTUM_BAD = [-0.1, 1.5, 2, -1, NAN, INF, -INF, "0.1", [0.1], 1j, True, False,
                np.float64(1.5), 10 ** 400]
TRAINING_BAD = [1, 0, "yes", "", None, [True], 1.0, np.array([True, False])]
ACTIVATION_BAD = ["gelu", "RELU", "", "relu ", 1, True, ["relu"], b"relu", 0.0]
THREADS_BAD = [0, -1, 257, 2 ** 70, -2 ** 70, 1.5, "2", True, False, [2], np.float64(2),
               1j, np.array([2, 3]), b"2"]
NUM_FEATURES_BAD = [0, -1, 2.5, True, False, "3", None, [3], np.float64(3), 1j,
                    -2 ** 70, np.array([3, 3]), 2 ** 40]
DTYPE_BAD = [np.int32, np.int64, np.float16, "float16", np.complex64, np.bool_, bool,
             int, "not-a-dtype", "U3", object, np.longdouble, [np.float32], "f4,f4", 1,
             np.uint8, "M8[s]", "f4" * 10]
AXIS_KIND_BAD = [1.0, "1", None, True, [1], np.float64(1), 1j, b"1"]
PREFIX_BAD = [1, None, b"bn", ["bn"], 1.5]
MODE_BAD = ["yes", 1, 0, None, [True], 1.0, np.array([True, False])]
POSITION_BAD = ["middle", "", "AFTER", None, 1, b"after", ["after"]]
TRANSPOSED_BAD = ["yes", 1, 0, None, 1.0, [True]]
GROUPS_BAD = [0, -1, 1.5, "1", True, None, 2, 2 ** 70, [1]]


def axis_garbage(slot, shape):
    """Axes out of range for ``shape`` and axes that are not integers."""
    ndim = len(shape)
    out = [fixed(slot, value, [f"axis {value}", str(shape)])
           for value in (ndim, -ndim - 1, 2 ** 70, -2 ** 70, 2 ** 63)]
    return out + [fixed(slot, value) for value in AXIS_KIND_BAD]


def pair_out_garbage(slot, dtype):
    """Bad ``out`` of batch_stats: a (mean, var) pair of (C,) arrays."""
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32

    def readonly():
        array = np.zeros(C, dtype)
        array.flags.writeable = False
        return array

    def same():
        array = np.zeros(C, dtype)
        return (array, array)

    def overlapping():
        base = np.zeros(C + 1, dtype)
        return (base[:-1], base[1:])

    return [one(slot, "array", lambda: np.zeros(C, dtype), ["pair", "ndarray"]),
            one(slot, "triple", lambda: (np.zeros(C, dtype),) * 3, ["pair", "3"]),
            one(slot, "single", lambda: (np.zeros(C, dtype),), ["pair", "1"]),
            fixed(slot, "ab", ["pair", "str"]),
            one(slot, "dict", lambda: {0: np.zeros(C, dtype), 1: np.zeros(C, dtype)},
                ["pair", "dict"]),
            one(slot, "wrong-shape", lambda: (np.zeros(C + 1, dtype), np.zeros(C, dtype)),
                [f"({C + 1},)"]),
            one(slot, "2d", lambda: (np.zeros(C, dtype), np.zeros((C, 1), dtype)),
                [f"({C}, 1)"]),
            one(slot, "wrong-dtype", lambda: (np.zeros(C, other), np.zeros(C, other)),
                [str(np.dtype(other))]),
            one(slot, "int", lambda: (np.zeros(C, dtype), np.zeros(C, np.int32)),
                ["int32"]),
            one(slot, "read-only", lambda: (readonly(), np.zeros(C, dtype)), ["read-only"]),
            one(slot, "list-member", lambda: ([0.0] * C, np.zeros(C, dtype)), ["list"]),
            one(slot, "same-array", same, ["separate"]),
            one(slot, "overlapping", overlapping, ["separate"])]


# -- out= arrays

def out_garbage(slot, shape, dtype):
    """``out`` of the wrong shape, dtype, contiguity or kind, or read-only."""
    dt = np.dtype(dtype)
    other = np.float64 if dt == np.float32 else np.float32
    out = []
    for bad in dict.fromkeys([shape[:-1] + (shape[-1] + 1,), shape[:-1],
                              (math.prod(shape),), shape[::-1], (), (1,) + shape]):
        if bad != shape:
            out.append(one(slot, f"shape-{bad}", (lambda bad=bad: np.empty(bad, dt)),
                           [str(bad)]))
    for bad_dt in [other, np.float16, np.int32, np.complex64, np.bool_, object,
                   dt.newbyteorder(">")]:
        out.append(one(slot, f"dtype-{np.dtype(bad_dt)}",
                       (lambda bad_dt=bad_dt: np.empty(shape, bad_dt)),
                       [str(np.dtype(bad_dt))]))

    def strided():
        return np.empty(shape[:-1] + (2 * shape[-1],), dt)[..., ::2]

    def readonly():
        array = np.empty(shape, dt)
        array.flags.writeable = False
        return array

    out += [one(slot, "strided", strided, ["contiguous"]),
            one(slot, "fortran", lambda: np.empty(shape, dt, order="F"), ["contiguous"]),
            one(slot, "transposed", lambda: np.empty(shape[::-1], dt).T, ["contiguous"]),
            one(slot, "read-only", readonly, ["read-only"]),
            one(slot, "broadcast", lambda: np.broadcast_to(dt.type(0), shape),
                ["contiguous", "read-only"]),
            one(slot, "huge", lambda: np.broadcast_to(dt.type(0), (HUGE,) + shape[1:]),
                [str((HUGE,) + shape[1:])]),
            one(slot, "list", lambda: np.zeros(shape).tolist(), ["list"]),
            one(slot, "tuple", lambda: (0.0,) * 3, ["tuple"]),
            fixed(slot, 0.0, ["float"]), fixed(slot, "out", ["str"]),
            one(slot, "dict", dict, ["dict"]),
            one(slot, "fake-tensor", lambda: FakeTensor(np.empty(shape, dt)),
                ["FakeTensor"])]
    return out


def overlapping_pair(array):
    """(a, b): a copy of ``array`` and an array of its shape, both views of one
    buffer, shifted by one element."""
    base = np.empty(array.size + 1, array.dtype)
    base[:-1] = array.ravel()
    return base[:-1].reshape(array.shape), base[1:].reshape(array.shape)


def out_overlapping(input_slot, out_slot="out"):
    """``out`` sharing all but one element with the input in ``input_slot``."""
    def make(world):
        data, out = overlapping_pair(np.asarray(world.args[input_slot]))
        return {input_slot: data, out_slot: out}
    return G(f"{out_slot}-overlaps-{input_slot}", make, ["overlap"])


def out_is(input_slot, out_slot="out"):
    """``out`` the very input array (refused by training forwards)."""
    def make(world):
        return {out_slot: world.args[input_slot]}
    return G(f"{out_slot}-is-{input_slot}", make, ["overlap"])


# ---------------------------------------------------------------------------
# Worlds: the objects a bad call may touch, and how to check them afterwards

def bits(array):
    array = np.asarray(array)
    return (array.dtype.str, array.shape, array.tobytes())


def make_data(rng, shape, axis, dtype, offset=0.0):
    channel = [1] * len(shape)
    channel[axis] = shape[axis]
    mean = rng.uniform(-2, 2, shape[axis]).reshape(channel)
    return (offset + mean + 1.5 * rng.standard_normal(shape)).astype(dtype)


def seeded(*names):
    return np.random.default_rng(zlib.crc32("/".join(map(str, names)).encode()))


def arrays_in(value, found):
    """Small ndarrays reachable from ``value`` (through tuples, lists, dicts
    and fake tensors): the arrays a failed call must leave as they were."""
    if isinstance(value, np.ndarray):
        if value.nbytes <= 1 << 20 and value.dtype != object:
            found.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            arrays_in(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            arrays_in(item, found)
    elif isinstance(value, FakeTensor):
        arrays_in(value.array, found)
    elif isinstance(value, FakeModule):
        arrays_in(value.__dict__, found)
    return found


class World:
    """What one case calls: ``args`` (the valid call's arguments) and the
    objects whose state must survive a failed call."""

    fingerprint_cache = {}

    def __init__(self, key, args, obj=None, data=None):
        self.key = key
        self.args = args
        self.obj = obj      # a layer or frozen layer, or None
        self.data = data    # (x, dy) a layer's next good calls use

    def fingerprint(self):
        """Everything observable about ``obj``, then the results of good calls
        (which change it: call last)."""
        obj = self.obj
        if obj is None:
            return None
        x, dy = self.data
        if isinstance(obj, cbn.FrozenBatchNorm):
            state = {key: bits(value) for key, value in obj.state_dict().items()}
            result = [state, bits(obj.scale), bits(obj.shift), [bits(a) for a in obj.fold()],
                      obj.num_features, obj.axis, obj.eps, obj.dtype, obj.activation]
            if obj.activation is not None:   # masks with the setup's forward
                result.append(bits(obj.backward(dy)))
            result += [bits(obj(x)), bits(obj.backward(dy))]
            return result
        result = [layer_state(obj), obj.activation, obj.dtype, repr(obj)]
        result += [bits(obj.backward(dy)), layer_state(obj)]
        if obj.running_mean is not None:
            obj.eval()
            result += [[bits(a) for a in obj.fold()], bits(obj(x)),
                       [bits(a) for a in obj.freeze().fold()]]
        obj.train()
        result += [bits(obj(x)), bits(obj.backward(dy)), layer_state(obj)]
        return result

    def expected_fingerprint(self, rebuild):
        """The fingerprint of an untouched world built the same way."""
        if self.key not in World.fingerprint_cache:
            World.fingerprint_cache[self.key] = rebuild().fingerprint()
        return World.fingerprint_cache[self.key]


# -- layers

LAYER_CONFIGS = {
    # name: (class, kwargs, input shape, channel axis, input dtype)
    "plain": (cbn.BatchNorm, {}, (4, C, 5), 1, np.float32),
    "axis-1": (cbn.BatchNorm, {"axis": -1}, (4, 5, C), -1, np.float32),
    "relu": (cbn.BatchNorm, {"activation": "relu"}, (4, C, 5), 1, np.float32),
    "f64": (cbn.BatchNorm, {"dtype": np.float64}, (4, C, 5), 1, np.float64),
    "cma": (cbn.BatchNorm, {"momentum": None}, (6, C), 1, np.float64),
    "noaffine": (cbn.BatchNorm, {"affine": False}, (4, C, 5), 1, np.float32),
    "notrack": (cbn.BatchNorm, {"track_running_stats": False}, (4, C, 5), 1, np.float32),
    "1d": (cbn.BatchNorm1d, {}, (4, C, 5), 1, np.float32),
    "2d": (cbn.BatchNorm2d, {}, (2, C, 2, 3), 1, np.float32),
    "3d": (cbn.BatchNorm3d, {}, (2, C, 2, 2, 2), 1, np.float32),
}
RANKS = {"1d": (2, 3), "2d": (4,), "3d": (5,)}


def layer_world(config, training):
    """A layer after a training step, then a forward and backward in the
    given mode, so every piece of state is set."""
    cls, kwargs, shape, axis, dtype = LAYER_CONFIGS[config]
    rng = seeded("layer", config)
    layer = cls(C, **kwargs)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, C)
        layer.bias[...] = rng.uniform(-1, 1, C)
    layer(make_data(rng, shape, axis, dtype, offset=2.0))
    layer.train(training)
    # x sits in a buffer one element longer, for an out= that overlaps it
    x_buffer = np.zeros(math.prod(shape) + 1, dtype)
    x = x_buffer[:-1].reshape(shape)
    x[...] = make_data(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer(x)
    layer.backward(dy)
    return World(("layer", config, training), {"x": x, "dy": dy, "x_buffer": x_buffer},
                 layer, (x, dy))


def frozen_world(config):
    """A frozen layer made by freeze() after a forward (for a ReLU's backward)."""
    cls, kwargs, shape, axis, dtype = LAYER_CONFIGS[config]
    world = layer_world(config, False)
    frozen = world.obj.freeze()
    x, dy = world.data
    frozen(x)
    return World(("frozen", config), {"x": x, "dy": dy}, frozen, (x, dy))


def state_of(config):
    return layer_world(config, True).obj.state_dict()


# -- functions

FUNC_VARIANTS = {
    # name: (shape, axis, dtype, activation)
    "NCL-f32": ((4, C, 5), 1, np.float32, None),
    "NLC-f64": ((4, 5, C), -1, np.float64, None),
    "NC-relu": ((6, C), 1, np.float32, "relu"),
}


def function_world(variant):
    shape, axis, dtype, activation = FUNC_VARIANTS[variant]
    rng = seeded("function", variant)
    x = make_data(rng, shape, axis, dtype, offset=1.0)
    weight, bias = rng.uniform(0.5, 2, C), rng.uniform(-1, 1, C)
    _, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis)
    args = {"x": x, "dy": rng.standard_normal(shape).astype(dtype),
            "running_mean": rng.uniform(-1, 1, C), "running_var": rng.uniform(0.5, 2, C),
            "weight": weight, "bias": bias, "save_mean": save_mean,
            "save_invstd": save_invstd, "axis": axis, "activation": activation}
    return World(("function", variant), args)


# ---------------------------------------------------------------------------
# Cases

class Case:
    __slots__ = ("entry", "garbage", "build", "call", "args")

    def __init__(self, entry, garbage, build, call, args):
        self.entry = entry        # the entry point's name, for grouping
        self.garbage = garbage    # a G, or a tuple of them (pairs)
        self.build = build        # () -> World
        self.call = call          # (world, kwargs) -> anything
        self.args = args          # world -> the valid call's keyword arguments

    @property
    def garbages(self):
        return self.garbage if isinstance(self.garbage, tuple) else (self.garbage,)

    @property
    def label(self):
        return " & ".join(g.label for g in self.garbages)


CASES = []


def add(entry, garbage_list, build, call, args):
    for garbage in garbage_list:
        CASES.append(Case(entry, garbage, build, call, args))


def run_case(case):
    """None when the case passes, else what went wrong."""
    world = case.build()
    kwargs = case.args(world)
    for garbage in case.garbages:
        kwargs.update(garbage.make(world))
    watched = arrays_in(kwargs, []) + arrays_in(world.args, [])
    before = [bits(a) for a in watched]
    tokens = [t for g in case.garbages for t in g.tokens]
    problem = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.call(world, kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if not any(mentions(message, token) for token in tokens):
            problem = (f"{type(exc).__name__} message {message!r} names none of "
                       f"{tokens}")
    except Exception as exc:
        problem = f"raised {type(exc).__name__}: {exc}"
    else:
        problem = "no exception"
    if problem is None and caught:
        problem = f"warned: {[str(w.message) for w in caught]}"
    if problem is None and [bits(a) for a in watched] != before:
        problem = "an array passed in was modified"
    if problem is None and world.obj is not None:
        try:
            same = world.fingerprint() == world.expected_fingerprint(case.build)
        except Exception as exc:
            problem = f"state check failed: {type(exc).__name__}: {exc}"
        else:
            if not same:
                problem = "state changed (compared with an untouched twin)"
    return problem


def no_args(world):
    return {}


def world_args(*names):
    return lambda world: {name: world.args[name] for name in names}


# -- functions -------------------------------------------------------------

def function_cases():
    pair_pools = []
    for variant, (shape, axis, dtype, _activation) in FUNC_VARIANTS.items():
        build = (lambda variant=variant: function_world(variant))
        x_all = (kind_garbage("x") + rank_garbage("x", dtype) + dtype_garbage("x", shape)
                 + channel_garbage("x", shape, axis, dtype))
        x_train = x_all + single_value_garbage("x", shape, axis, dtype)
        outs = out_garbage("out", shape, dtype)

        train_args = world_args("x", "running_mean", "running_var", "weight", "bias",
                                "axis", "activation")
        pools = {
            "x": x_train,
            "running_mean": (vector_garbage("running_mean") + buffer_garbage("running_mean")
                             + [fixed("running_mean", None, ["running_mean"])]),
            "running_var": (vector_garbage("running_var") + buffer_garbage("running_var")
                            + [fixed("running_var", None, ["running_var"])]),
            "weight": vector_garbage("weight"), "bias": vector_garbage("bias"),
            "training": scalar_garbage("training", TRAINING_BAD),
            "momentum": scalar_garbage("momentum", MOMENTUM_BAD + [None]),
            "eps": scalar_garbage("eps", EPS_BAD), "axis": axis_garbage("axis", shape),
            "out": outs + [out_is("x"), out_overlapping("x"), out_overlapping_running()],
            "activation": scalar_garbage("activation", ACTIVATION_BAD),
        }
        train_call = (lambda world, kwargs: cbn.batch_norm(**{"training": True, **kwargs}))
        for pool in pools.values():
            add("batch_norm", pool, build, train_call, train_args)
        pair_pools.append(("batch_norm", build, train_call, train_args, pools))

        eval_call = (lambda world, kwargs: cbn.batch_norm(**{"training": False, **kwargs}))
        eval_pools = {
            "x": x_all,
            "running_mean": vector_garbage("running_mean") + [
                fixed("running_mean", None, ["running_mean"])],
            "running_var": vector_garbage("running_var") + [
                fixed("running_var", None, ["running_var"])],
            "both-none": [G("running stats both None",
                            lambda world: {"running_mean": None, "running_var": None},
                            ["running_mean"])],
            "weight": vector_garbage("weight"), "bias": vector_garbage("bias"),
            "momentum": scalar_garbage("momentum", MOMENTUM_BAD),
            "eps": scalar_garbage("eps", EPS_BAD), "axis": axis_garbage("axis", shape),
            "out": outs + [out_overlapping("x")],
            "activation": scalar_garbage("activation", ACTIVATION_BAD),
        }
        for pool in eval_pools.values():
            add("batch_norm", pool, build, eval_call, train_args)
        pair_pools.append(("batch_norm", build, eval_call, train_args, eval_pools))

        stats_pools = {
            "x": kind_garbage("x") + rank_garbage("x", dtype) + dtype_garbage("x", shape),
            "axis": axis_garbage("axis", shape), "out": pair_out_garbage("out", dtype),
        }
        stats_call = (lambda world, kwargs: cbn.batch_stats(**kwargs))
        for pool in stats_pools.values():
            add("batch_stats", pool, build, stats_call, world_args("x", "axis"))
        pair_pools.append(("batch_stats", build, stats_call, world_args("x", "axis"),
                           stats_pools))

        forward_pools = {
            "x": x_train, "weight": vector_garbage("weight"), "bias": vector_garbage("bias"),
            "eps": scalar_garbage("eps", EPS_BAD), "axis": axis_garbage("axis", shape),
            "out": outs + [out_is("x"), out_overlapping("x")],
        }
        forward_call = (lambda world, kwargs: cbn.batch_norm_forward(**kwargs))
        forward_args = world_args("x", "weight", "bias", "axis")
        for pool in forward_pools.values():
            add("batch_norm_forward", pool, build, forward_call, forward_args)
        pair_pools.append(("batch_norm_forward", build, forward_call, forward_args,
                           forward_pools))

        backward_pools = {
            "dy": (kind_garbage("dy") + rank_garbage("dy", dtype) + dtype_garbage("dy", shape)
                   + shape_garbage("dy", shape, dtype)),
            "x": (kind_garbage("x") + rank_garbage("x", dtype) + dtype_garbage("x", shape)
                  + channel_garbage("x", shape, axis, dtype)),
            "save_mean": vector_garbage("save_mean", none_ok=False),
            "save_invstd": vector_garbage("save_invstd", none_ok=False),
            "weight": vector_garbage("weight"),
            "axis": axis_garbage("axis", shape),
            "training": scalar_garbage("training", TRAINING_BAD),
            "out": outs + [out_overlapping("x"), out_overlapping("dy")],
        }
        backward_call = (lambda world, kwargs: cbn.batch_norm_backward(**kwargs))
        backward_args = world_args("dy", "x", "save_mean", "save_invstd", "weight", "axis")
        for pool in backward_pools.values():
            add("batch_norm_backward", pool, build, backward_call, backward_args)
        pair_pools.append(("batch_norm_backward", build, backward_call, backward_args,
                           backward_pools))

    # Pairs: two arguments garbage at once, drawn with a fixed seed.
    rng = seeded("pairs")
    for k in range(PAIRS):
        entry, build, call, args, pools = pair_pools[k % len(pair_pools)]
        first, second = rng.choice(sorted(pools), size=2, replace=False)
        if {first, second} & {"both-none"} and {first, second} & {"running_mean",
                                                                   "running_var"}:
            continue  # both write the same argument
        garbage = (pools[first][rng.integers(len(pools[first]))],
                   pools[second][rng.integers(len(pools[second]))])
        if "out" in (first, second) and any(g.label.startswith("out-") for g in garbage):
            continue  # overlap cases replace x or dy themselves
        CASES.append(Case(entry + " (pairs)", garbage, build, call, args))


def out_overlapping_running():
    """``out`` whose last elements are the running mean (written after y)."""
    def make(world):
        x = world.args["x"]
        base = np.zeros(x.size + C, x.dtype)
        out = base[:x.size].reshape(x.shape)
        return {"out": out, "running_mean": base[x.size - C:x.size],
                "running_var": np.ones(C, x.dtype)}
    return G("out-overlaps-running_mean", make, ["overlap"])


# -- layers ----------------------------------------------------------------

def layer_cases():
    for config, (cls, kwargs, shape, axis, dtype) in LAYER_CONFIGS.items():
        for training in (True, False):
            build = (lambda config=config, training=training: layer_world(config, training))
            batch_stats_forward = training or "track_running_stats" in kwargs
            entry = f"{cls.__name__}.forward"

            x_pool = (kind_garbage("x") + rank_garbage("x", dtype) + dtype_garbage("x", shape)
                      + channel_garbage("x", shape, axis, dtype))
            if config in RANKS:
                x_pool += rank_class_garbage("x", RANKS[config], dtype)
            if batch_stats_forward:
                x_pool += single_value_garbage("x", shape, axis, dtype)
            out_pool = out_garbage("out", shape, dtype) + [out_overlapping("x")]
            if training:
                out_pool.append(out_is("x"))
            for k, garbage in enumerate(x_pool + out_pool):
                if k % 2:
                    call = (lambda world, kw: world.obj.forward(**kw))
                else:
                    call = (lambda world, kw: world.obj(**kw))
                CASES.append(Case(entry, garbage, build, call, world_args("x")))

            dy_pool = (kind_garbage("dy") + rank_garbage("dy", dtype)
                       + dtype_garbage("dy", shape) + shape_garbage("dy", shape, dtype))
            backward_out = (out_garbage("out", shape, dtype)
                            + [out_overlapping_saved_input(), out_overlapping("dy")])
            add(f"{cls.__name__}.backward", dy_pool + backward_out, build,
                lambda world, kw: world.obj.backward(**kw), world_args("dy"))

            add(f"{cls.__name__}.load_state_dict",
                load_garbage(config) + [fixed("state_dict", value)
                                        for value in (None, [], "abc", 3)]
                + [one("state_dict", "pairs", lambda: [("weight", np.ones(C))], ["list"]),
                   one("state_dict", "array", lambda: np.zeros(C), ["ndarray"])],
                build, lambda world, kw: world.obj.load_state_dict(**kw),
                lambda world: {"state_dict": world.obj.state_dict(), "strict": True})

            setters = []
            for name in ("weight", "bias", "running_mean", "running_var"):
                present = (name in ("weight", "bias") and "affine" not in kwargs) or (
                    name.startswith("running") and "track_running_stats" not in kwargs)
                if present:
                    setters += vector_garbage(name, none_ok=False)
                else:
                    setters.append(one(name, "array", lambda: np.ones(C), ["None"]))
            setters += (scalar_garbage("eps", EPS_BAD)
                        + scalar_garbage("momentum", MOMENTUM_BAD)
                        + scalar_garbage("activation", ACTIVATION_BAD))
            add(f"{cls.__name__} attributes", setters, build, set_attributes, no_args)
            add(f"{cls.__name__}.train", scalar_garbage("mode", MODE_BAD), build,
                lambda world, kw: world.obj.train(**kw), no_args)

            misuse = []
            if training or "track_running_stats" in kwargs:
                misuse.append(G("fold()", lambda world: {"method": "fold"},
                                ["eval", "running statistics"]))
            if "track_running_stats" in kwargs:
                misuse.append(G("freeze()", lambda world: {"method": "freeze"},
                                ["running statistics"]))
            add(f"{cls.__name__}.fold/freeze", misuse, build,
                lambda world, kw: getattr(world.obj, kw["method"])(), no_args)

        # backward before any forward, and after an eval forward over its input
        add(f"{cls.__name__}.backward",
            [G("before-forward", lambda world: {}, ["forward"])],
            lambda cls=cls, kwargs=kwargs: World(None, {"layer": cls(C, **kwargs)}),
            lambda world, kw, shape=shape, dtype=dtype: unchanged(
                world.args["layer"], lambda layer: layer.backward(np.ones(shape, dtype))),
            no_args)
        if "track_running_stats" not in kwargs:
            add(f"{cls.__name__}.backward",
                [G("after-eval-out=x", lambda world: {}, ["out=x"])],
                (lambda config=config: layer_world(config, False)),
                backward_after_in_place, no_args)


def unchanged(obj, call):
    """call(obj), which must raise, with obj's state checked around it."""
    def state():
        if isinstance(obj, cbn.FrozenBatchNorm):
            return ([bits(a) for a in obj.state_dict().values()], bits(obj.scale),
                    bits(obj.shift), obj._saved_output)
        return layer_state(obj), obj._last
    before = state()
    try:
        call(obj)
    finally:
        assert state() == before, "a failed call changed the state"


def backward_after_in_place(world, kwargs):
    x, dy = world.data
    data = x.copy()
    world.obj(data, out=data)
    try:
        world.obj.backward(dy)
    finally:
        world.obj(x)   # the twin's last forward was on x
        world.obj.backward(dy)


def set_attributes(world, kwargs):
    for name, value in kwargs.items():
        setattr(world.obj, name, value)


def out_overlapping_saved_input():
    """``out`` of backward sharing all but one element with the forward's
    input (layer_world keeps that input in a buffer one element longer)."""
    def make(world):
        x = world.data[0]
        return {"out": world.args["x_buffer"][1:].reshape(x.shape)}
    return G("out-overlaps-saved-x", make, ["overlap"])


def load_garbage(config):
    """Bad state dicts for a layer of ``config`` (strict loads)."""
    good = state_of(config)
    keys = [key for key in good if key != "num_batches_tracked"]
    out = []
    for key in keys:
        out.append(G(f"missing-{key}", (lambda world, key=key: {
            "state_dict": {k: v for k, v in good.items() if k != key}}), [key]))
        for garbage in vector_garbage(key, none_ok=False):
            out.append(G(f"state[{garbage.label}]", (lambda world, key=key, garbage=garbage: {
                "state_dict": dict(good, **garbage.make(world))}), garbage.tokens))
    for extra in ("gamma", "weight.extra", "", "running_mean "):
        out.append(G(f"unexpected-{extra!r}", (lambda world, extra=extra: {
            "state_dict": dict(good, **{extra: np.ones(C)})}), [repr(extra)]))
    out.append(G("unexpected-int-key", lambda world: {"state_dict": {**good, 1: np.ones(C)}},
                 ["[1]"]))
    for label, value, tokens in nbt_garbage():
        if "num_batches_tracked" not in good:
            tokens = ["num_batches_tracked"]   # unexpected for this layer
        out.append(G(f"num_batches_tracked={label}", (lambda world, value=value: {
            "state_dict": dict(good, num_batches_tracked=value())}), tokens))
    for key in keys:   # non-strict loads still check what they copy
        out.append(G(f"non-strict-{key}-short", (lambda world, key=key: {
            "state_dict": {key: np.ones(C + 1)}, "strict": False}), [f"({C + 1},)"]))
    return out


def nbt_garbage():
    return [("-1", lambda: -1, ["-1"]), ("array(-5)", lambda: np.array(-5), ["-5"]),
            ("1.5", lambda: 1.5, ["float64"]), ("pair", lambda: np.array([1, 2]), ["(2,)"]),
            ("str", lambda: "x", ["<U1"]), ("None", lambda: None, ["None"]),
            ("bool", lambda: np.array(True), ["bool"]), ("2**70", lambda: 2 ** 70, ["object"]),
            ("empty", lambda: np.array([], np.int64), ["(0,)"]),
            ("complex", lambda: 1j, ["complex128"]),
            ("uint64-2**63", lambda: np.array(2 ** 63, np.uint64), [str(2 ** 63)])]


# -- constructors ----------------------------------------------------------

def fresh(world_args_dict=None):
    return lambda: World(None, dict(world_args_dict or {}))


def constructor_cases():
    for cls in (cbn.BatchNorm, cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d):
        name = cls.__name__
        pool = (scalar_garbage("num_features", NUM_FEATURES_BAD)
                + scalar_garbage("eps", EPS_BAD) + scalar_garbage("momentum", MOMENTUM_BAD)
                + scalar_garbage("axis", AXIS_KIND_BAD) + scalar_garbage("dtype", DTYPE_BAD)
                + scalar_garbage("activation", ACTIVATION_BAD))
        add(f"{name}()", pool, fresh(), lambda world, kw, cls=cls: cls(**kw),
            lambda world: {"num_features": C})

        state_pool = state_dict_garbage("state_dict", require_running=False)
        options = (scalar_garbage("prefix", PREFIX_BAD) + scalar_garbage("eps", EPS_BAD)
                   + scalar_garbage("momentum", MOMENTUM_BAD)
                   + scalar_garbage("axis", AXIS_KIND_BAD) + scalar_garbage("dtype", DTYPE_BAD)
                   + scalar_garbage("activation", ACTIVATION_BAD))
        add(f"{name}.from_state_dict", state_pool + options, fresh(),
            lambda world, kw, cls=cls: cls.from_state_dict(**kw),
            lambda world: {"state_dict": state_of("plain")})

    for cls in (cbn.BatchNorm, cbn.BatchNorm2d):
        add(f"{cls.__name__}.from_torch", torch_garbage(), fresh(),
            lambda world, kw, cls=cls: cls.from_torch(**kw),
            lambda world: {"module": FakeBatchNorm2d(state_of("plain"))})

    for name, make in (("FrozenBatchNorm()", cbn.FrozenBatchNorm),
                       ("FrozenBatchNorm.from_state_dict", cbn.FrozenBatchNorm.from_state_dict)):
        pool = (state_dict_garbage("state_dict", require_running=True)
                + scalar_garbage("prefix", PREFIX_BAD) + scalar_garbage("eps", EPS_BAD)
                + scalar_garbage("axis", AXIS_KIND_BAD) + scalar_garbage("dtype", DTYPE_BAD)
                + scalar_garbage("activation", ACTIVATION_BAD))
        add(name, pool, fresh(), lambda world, kw, make=make: make(**kw),
            lambda world: {"state_dict": state_of("plain")})

    add("set_num_threads", scalar_garbage("n", THREADS_BAD), fresh(), set_threads, no_args)


def set_threads(world, kwargs):
    before = cbn.get_num_threads()
    try:
        cbn.set_num_threads(**kwargs)
    finally:
        after = cbn.get_num_threads()
        cbn.set_num_threads(None)
        assert after == before, f"the thread count changed from {before} to {after}"


def state_dict_garbage(slot, require_running):
    """Bad state dicts for from_state_dict and FrozenBatchNorm."""
    good = state_of("plain")
    out = [fixed(slot, value) for value in (None, [], "abc", 3, 1.5)]
    out += [one(slot, "pairs", lambda: [("weight", np.ones(C))], ["list"]),
            one(slot, "array", lambda: np.zeros(C), ["ndarray"]),
            one(slot, "empty", dict, ["entries", "running_mean"]),
            one(slot, "only-count", lambda: {"num_batches_tracked": np.array(3)},
                ["num_batches_tracked", "running_mean"]),
            one(slot, "unexpected", lambda: dict(good, gamma=np.ones(C)), ["gamma"]),
            one(slot, "other-prefix", lambda: {f"bn.{k}": v for k, v in good.items()},
                ["entries", "running_mean"])]
    for missing in ("weight", "bias", "running_mean", "running_var"):
        partner = {"weight": "bias", "bias": "weight", "running_mean": "running_var",
                   "running_var": "running_mean"}[missing]
        if missing == "bias" or (require_running and missing == "weight"):
            # a weight without a bias is PyTorch's bias=False; a frozen
            # layer's weight and bias are optional (1 and 0)
            continue
        out.append(one(slot, f"missing-{missing}",
                       (lambda missing=missing: {k: v for k, v in good.items()
                                                 if k != missing}),
                       [missing, partner]))
    if require_running:
        out.append(one(slot, "no-running-stats",
                       lambda: {"weight": np.ones(C), "bias": np.zeros(C)}, ["running_mean"]))
    for key in ("weight", "bias", "running_mean", "running_var"):
        for garbage in vector_garbage(key, none_ok=False):
            if garbage.label.endswith("=huge"):
                continue   # a consistent huge state dict is valid (see the module doc)
            out.append(G(f"state[{garbage.label}]", (
                lambda world, key=key, garbage=garbage: {
                    slot: dict(good, **garbage.make(world))}), garbage.tokens + (key,)))
        out.append(one(slot, f"{key}-huge-alone", (lambda key=key: dict(
            good, **{key: np.broadcast_to(np.float32(0), (HUGE,))})), [f"({HUGE},)"]))
    for label, value, tokens in nbt_garbage():
        out.append(one(slot, f"num_batches_tracked={label}", (
            lambda value=value: dict(good, num_batches_tracked=value())), tokens))
    out.append(one(slot, "all-2d", lambda: {k: (v.reshape(1, -1) if v.ndim else v)
                                             for k, v in good.items()}, [f"(1, {C})"]))
    out.append(one(slot, "all-empty", lambda: {k: (v[:0] if v.ndim else v)
                                                for k, v in good.items()}, ["(0,)"]))
    return out


class FakeModule:
    """Looks like a torch.nn.BatchNorm*d to from_torch (no torch needed)."""

    def __init__(self, state, **attrs):
        self.num_features, self.eps, self.momentum = C, 1e-5, 0.1
        self.affine = self.track_running_stats = self.training = True
        self._state = state
        self.__dict__.update(attrs)

    def state_dict(self):
        return self._state


FakeBatchNorm2d = type("BatchNorm2d", (FakeModule,), {})


def torch_garbage():
    good = state_of("plain")
    out = [fixed("module", value) for value in (None, 3, "bn")]
    out.append(one("module", "object()", object, ["num_features"]))
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                 "training", "state_dict"):
        def without(attr=attr):
            cls = type("BatchNorm2d", (), {})
            module = cls()
            for name in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                         "training"):
                if name != attr:
                    setattr(module, name, getattr(FakeModule(good), name))
            if attr != "state_dict":
                module.state_dict = lambda: good
            return module
        out.append(one("module", f"without-{attr}", without, [attr]))

    for value in NUM_FEATURES_BAD[:8]:
        out.append(one("module", f"num_features={value!r}",
                       (lambda value=value: FakeBatchNorm2d(good, num_features=value)),
                       value_tokens(value) + ["num_features"]))
    for count in (2, 4):
        out.append(one("module", f"num_features={count}",
                       (lambda count=count: FakeBatchNorm2d(good, num_features=count)),
                       [f"({C},)"]))
    for value in ("abc", None, [1e-5], 0, -1.0, NAN, INF, b"x"):
        out.append(one("module", f"eps={value!r}",
                       (lambda value=value: FakeBatchNorm2d(good, eps=value)),
                       value_tokens(value) + ["eps", "float"]))
    for value in ("abc", [0.1], 1.5, -1, NAN, INF):
        out.append(one("module", f"momentum={value!r}",
                       (lambda value=value: FakeBatchNorm2d(good, momentum=value)),
                       value_tokens(value) + ["momentum", "float"]))
    out.append(one("module", "affine=False-with-weight",
                   lambda: FakeBatchNorm2d(good, affine=False), ["weight"]))
    out.append(one("module", "affine-without-weight", lambda: FakeBatchNorm2d(
        {k: v for k, v in good.items() if k not in ("weight", "bias")}), ["weight"]))
    out.append(one("module", "state_dict-not-callable",
                   lambda: FakeBatchNorm2d(good, state_dict=3), ["int"]))
    for garbage in state_dict_garbage("state", require_running=False):
        if garbage.label in ("state=empty", "state=only-count"):
            continue   # modules without arrays are valid (affine and tracking off)
        tokens = garbage.tokens + (("weight",) if garbage.label == "state=other-prefix"
                                   else ())
        out.append(G(f"module.state_dict()->{garbage.label}", (
            lambda world, garbage=garbage: {"module": FakeBatchNorm2d(
                garbage.make(world)["state"])}), tokens))
    out += (scalar_garbage("axis", AXIS_KIND_BAD) + scalar_garbage("dtype", DTYPE_BAD)
            + scalar_garbage("activation", ACTIVATION_BAD))
    return out


# -- frozen layers and folding ----------------------------------------------

def frozen_cases():
    for config in ("plain", "axis-1", "relu", "f64", "2d"):
        cls, kwargs, shape, axis, dtype = LAYER_CONFIGS[config]
        build = (lambda config=config: frozen_world(config))
        x_pool = (kind_garbage("x") + rank_garbage("x", dtype) + dtype_garbage("x", shape)
                  + channel_garbage("x", shape, axis, dtype))
        if config in RANKS:
            x_pool += rank_class_garbage("x", RANKS[config], dtype)
        out_pool = out_garbage("out", shape, dtype) + [out_overlapping("x")]
        for k, garbage in enumerate(x_pool + out_pool):
            if k % 2:
                call = (lambda world, kw: world.obj.forward(**kw))
            else:
                call = (lambda world, kw: world.obj(**kw))
            CASES.append(Case("FrozenBatchNorm.forward", garbage, build, call,
                              world_args("x")))
        dy_pool = (kind_garbage("dy") + rank_garbage("dy", dtype) + dtype_garbage("dy", shape)
                   + channel_garbage("dy", shape, axis, dtype))
        if config == "relu":   # the mask needs dy of the forward's shape
            dy_pool += shape_garbage("dy", shape, dtype)
        dy_pool.append(out_overlapping("dy"))
        add("FrozenBatchNorm.backward", dy_pool + out_garbage("out", shape, dtype), build,
            lambda world, kw: world.obj.backward(**kw), world_args("dy"))
    add("FrozenBatchNorm.backward", [G("relu-before-forward", lambda world: {}, ["forward"])],
        lambda: World(None, {"frozen": cbn.BatchNorm(C, activation="relu").eval().freeze()}),
        lambda world, kw: unchanged(
            world.args["frozen"], lambda frozen: frozen.backward(np.ones((4, C, 5), np.float32))),
        no_args)


class FakeFold:
    """A layer-like object whose fold() returns ``result``."""

    activation = None

    def __init__(self, result):
        self._result = result

    def fold(self):
        return self._result


def layer_garbage(slot):
    """Objects that are not an eval-mode batch norm without activation."""
    return [fixed(slot, None, ["NoneType"]), fixed(slot, 3, ["int"]),
            one(slot, "object()", object, ["object"]),
            one(slot, "training-layer", lambda: cbn.BatchNorm(C), ["eval"]),
            one(slot, "no-running-stats",
                lambda: cbn.BatchNorm(C, track_running_stats=False).eval(),
                ["running statistics"]),
            one(slot, "relu-layer", lambda: cbn.BatchNorm(C, activation="relu").eval(),
                ["activation"]),
            one(slot, "relu-frozen",
                lambda: cbn.BatchNorm(C, activation="relu").eval().freeze(), ["activation"]),
            one(slot, "fold-not-callable", lambda: type("L", (), {"fold": 3})(), ["fold"]),
            one(slot, "fold->3", lambda: FakeFold(3), ["fold", "int"]),
            one(slot, "fold->triple", lambda: FakeFold((np.ones(C),) * 3), ["fold", "tuple"]),
            one(slot, "fold->ints", lambda: FakeFold((np.ones(C, int), np.zeros(C, int))),
                ["int64"]),
            one(slot, "fold->strings", lambda: FakeFold(("abc", "def")), ["<U3"]),
            one(slot, "fold->2d", lambda: FakeFold((np.ones((C, 1)), np.zeros((C, 1)))),
                [f"({C}, 1)"]),
            one(slot, "fold->mismatch", lambda: FakeFold((np.ones(C), np.zeros(C + 1))),
                [f"({C + 1},)"]),
            one(slot, "fold->other-count", lambda: FakeFold((np.ones(C + 1), np.zeros(C + 1))),
                [f"num_features={C + 1}"])]


def weight_garbage(slot, good_shape, feature_axis):
    """Dense or convolution weights that are not float arrays of a fitting
    shape (``feature_axis``: the axis that must match the batch norm)."""
    out = [fixed(slot, value) for value in (None, "abc", 1.5, 1j)]
    out += [one(slot, "object()", object, ["object"]),
            one(slot, "ragged", lambda: [[1.0], [1.0, 2.0]], ["list"])]
    for dt in (np.int32, np.int64, np.bool_, np.complex64, object, "U3", np.longdouble):
        out.append(one(slot, f"dtype-{np.dtype(dt)}",
                       (lambda dt=dt: np.zeros(good_shape, dt)), [str(np.dtype(dt))]))
    out.append(one(slot, "int-list", lambda: np.zeros(good_shape, int).tolist(), ["int64"]))
    wrong = list(good_shape)
    wrong[feature_axis] += 1
    huge = list(good_shape)
    huge[feature_axis] = HUGE
    other_rank = good_shape + (1,) if len(good_shape) == 2 else good_shape[:2]
    for bad in (tuple(wrong), good_shape[:1], (), other_rank):
        out.append(one(slot, f"shape-{bad}", (lambda bad=bad: np.ones(bad)), [str(bad)]))
    out.append(one(slot, "huge", lambda: np.broadcast_to(np.float64(0), tuple(huge)),
                   [str(tuple(huge))]))
    return out


def bias_garbage(slot, count):
    out = [fixed(slot, value) for value in ("abc", 1.5, 1j)]
    out += [one(slot, "object()", object, ["object"])]
    for bad in ((count + 1,), (count, 1), (), (0,)):
        out.append(one(slot, f"shape-{bad}", (lambda bad=bad: np.ones(bad)), [str(bad)]))
    for dt in (np.int32, np.bool_, np.complex128, object, "U3"):
        out.append(one(slot, f"dtype-{np.dtype(dt)}", (lambda dt=dt: np.zeros(count, dt)),
                       [str(np.dtype(dt))]))
    out.append(one(slot, "int-list", lambda: [1] * count, ["int64"]))
    return out


def folding_cases():
    for config in ("plain", "f64"):
        def build(config=config):
            world = layer_world(config, False)
            rng = seeded("fold", config)
            world.args.update(
                dense_after=rng.standard_normal((C, 4)), dense_before=rng.standard_normal((5, C)),
                bias_after=rng.standard_normal(C), bias_before=rng.standard_normal(5),
                conv=rng.standard_normal((C, 2, 3, 3)), conv_t=rng.standard_normal((2, C, 3, 3)),
                conv_bias=rng.standard_normal(C))
            return world

        for position, shape, count, feature_axis in (("after", (C, 4), C, 0),
                                                     ("before", (5, C), 5, 1)):
            args = (lambda world, position=position: {
                "weight": world.args[f"dense_{position}"],
                "bias": world.args[f"bias_{position}"], "layer": world.obj,
                "position": position})
            pool = (weight_garbage("weight", shape, feature_axis) + bias_garbage("bias", count)
                    + layer_garbage("layer"))
            if position == "after":
                pool += scalar_garbage("position", POSITION_BAD)
            add("fold_into_linear", pool, build,
                lambda world, kw: cbn.fold_into_linear(**kw), args)

        for transposed, key, feature_axis in ((False, "conv", 0), (True, "conv_t", 1)):
            args = (lambda world, key=key, transposed=transposed: {
                "weight": world.args[key], "bias": world.args["conv_bias"],
                "layer": world.obj, "transposed": transposed})
            shape = (C, 2, 3, 3) if not transposed else (2, C, 3, 3)
            pool = (weight_garbage("weight", shape, feature_axis) + bias_garbage("bias", C)
                    + layer_garbage("layer") + scalar_garbage("groups", GROUPS_BAD))
            if not transposed:
                pool += scalar_garbage("transposed", TRANSPOSED_BAD)
            add("fold_into_conv", pool, build, lambda world, kw: cbn.fold_into_conv(**kw), args)


function_cases()
layer_cases()
constructor_cases()
frozen_cases()
folding_cases()

BAD_INPUTS = len(CASES)
ENTRIES = sorted({case.entry for case in CASES})


def test_bad_input_count():
    """How many bad inputs are tried, at least 5000 (each test below runs
    its entry point's share and requires every one rejected cleanly)."""
    print(f"\n{BAD_INPUTS} bad inputs over {len(ENTRIES)} entry points")
    assert BAD_INPUTS >= 5000
    counts = dict.fromkeys(ENTRIES, 0)
    for case in CASES:
        counts[case.entry] += 1
    public = ["batch_norm", "batch_stats", "batch_norm_forward", "batch_norm_backward",
              "fold_into_linear", "fold_into_conv", "set_num_threads",
              "BatchNorm()", "BatchNorm.forward", "BatchNorm.backward",
              "BatchNorm.load_state_dict", "BatchNorm.from_state_dict",
              "BatchNorm.from_torch", "BatchNorm.fold/freeze", "BatchNorm attributes",
              "BatchNorm.train", "BatchNorm1d.forward", "BatchNorm2d.forward",
              "BatchNorm3d.forward", "FrozenBatchNorm()", "FrozenBatchNorm.forward",
              "FrozenBatchNorm.backward", "FrozenBatchNorm.from_state_dict"]
    assert all(counts.get(entry, 0) > 0 for entry in public), counts


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_input_is_rejected_cleanly(entry, restore_threads):
    failures = []
    tried = 0
    for case in CASES:
        if case.entry != entry:
            continue
        tried += 1
        problem = run_case(case)
        if problem is not None:
            failures.append(f"{case.label}: {problem}")
    assert tried > 0
    assert not failures, (f"{len(failures)} of {tried} bad calls of {entry} not rejected "
                          "cleanly:\n  " + "\n  ".join(failures[:40]))
