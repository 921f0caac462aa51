"""Property-based tests against the float64 NumPy reference.

Hypothesis draws the data: rank 2 to 5, any channel axis in [-rank, rank),
float16 / float32 / float64 in either byte order, 1 to 6 channels (up to 40
in large arrays) and sizes 1 to 6 on the other axes, with the occasional
empty axis and the occasional large array (10,000 to 60,000 values: several
work units, blocks and threads), and memory layouts made of a random axis
order (C, Fortran or any transpose), per-axis steps of 1, -1, 2 or -2 (the
gaps hold NaN, so a kernel that reads them is caught), unaligned buffers and
read-only views. Values are ``offset + scale * (shift_c + spread_c * z)``
with ``offset`` up to 1e6 in magnitude, ``scale`` log-uniform over 1e-20 to
1e30, ``z`` in [-4, 4] and per-channel shifts and spreads (a spread of 0
gives a constant channel). float16 cannot hold those ranges: its offsets go
to 3e4 and its scales from 1e-12 to 10, so that every value and every
variance stays finite. Weights and biases are in [-4, 4] (weights below 1e-30
in magnitude are 0, so that no weight * invstd is subnormal). Zero channels
(an axis of size 0 as the channel axis) are not drawn.

Properties, one test each:

- eval forward: ``cbn.batch_norm(training=False)``, a layer in eval mode and
  its frozen copy (optionally with the fused ReLU) against
  ``reference.batch_norm``; eval changes no state; the frozen layer gives the
  layer's bits.
- training forward and running statistics: three batches through
  ``cbn.batch_norm(training=True)`` (momentum in [0, 1]) and through a layer
  (momentum in [0, 1] or None, the cumulative average), and
  ``cbn.batch_norm_forward``: outputs against ``reference.batch_norm_forward``,
  saved statistics against the reference's, the running statistics against
  the update written out here in NumPy (unbiased variance for running_var,
  stored in the buffers' dtype after each batch), ``num_batches_tracked``.
  An empty batch returns an empty output and changes no statistics; a layer
  counts it in ``num_batches_tracked`` (PyTorch 2.13's rule).
- backward: ``cbn.batch_norm_backward`` with ``training=True`` and ``False``
  and ``layer.backward`` after a training and an eval forward (optionally
  through the fused ReLU) against ``reference.batch_norm_backward``.
- ``cbn.batch_stats`` against the reference's statistics; NaN for an empty
  batch.
- training with one value per channel raises ValueError (functions and
  layer) and changes nothing.

Checked in every test: the input (the whole buffer it lives in, gaps
included), ``dy`` and the parameters are never modified; outputs have the
input's shape and its dtype in native byte order; any layout gives the same
bits as a C-contiguous native copy of the input (README, Semantics).

The oracle. ``cbn.reference`` computes on the float64 values of the very
array cbn was given (after the cast to its dtype), so both see identical
inputs. For batch statistics it is called on the data minus a per-channel
shift (the naive mean), and the shift added back to the mean: the plain
two-pass formula loses the variance when |mean| / std approaches 1 / 2**-52,
while cbn's blocked scheme keeps it; shifting makes the oracle as accurate.

Tolerances (``rtol`` below is the relative tolerance of the suite's table,
tests/corpus.py, for outputs and gradients in the data's dtype: 2**-10 for
float16, 1e-5 for float32, 1e-11 for float64; ACC = 64 * 2**-52
bounds float64 accumulation). Per channel, with w the weight, b the bias,
invstd = 1 / sqrt(var + eps), yhat = (x - mean) * invstd, mag = max |x|,
dev = max |x - mean| and kappa = mag * invstd (how many output units the
data's magnitude spans):

- float64 variance (what cbn accumulates for every dtype): within
  ``var_err = 1e-11 * var + ACC * (dev**2 + mag*dev) + (ACC*mag)**2``. The
  last terms are the rounding of a mean of magnitude mag: squared in a
  two-pass formula, times the deviations where partial means are merged
  (Chan et al.), as cbn does across blocks and across the columns of short
  runs. At |mean| / std = 1e6 and dev = 4 std they allow about 6e-8
  relative, below the README's 1e-6 for float32; measured float64 errors
  there reach about 1e-11.
- normalized outputs y (forward, either mode):
  ``|y - y_ref| <= rtol*(|y_ref| + |w| + |b|) + (ACC*kappa + var_err/(var + eps)*|yhat|)*|w|``.
  The first term is the README's ``1e-5 * (1 + |y|)`` for float32 (scaled by
  the output's own unit |w| + |b|) and the rounding of float16 outputs; the
  second is the float64 rounding of a mean of magnitude mag, which no method
  avoids and which matters only for nearly constant channels at a large
  offset (it is below 1e-7 for float32 data with |mean| / std <= 1e6), and
  the variance's error. In eval mode the statistics are given: var_err = 0.
- statistics returned in the data's dtype (``batch_stats``): mean within
  ``RTOL_STATS * (|mean| + std) + ACC * mag``, variance within ``var_err``
  with RTOL_STATS in place of 1e-11 (RTOL_STATS: 2**-10, 1e-6 as in the
  README's Accuracy section, 1e-11); float64 statistics (``save_mean``,
  ``save_invstd``) use 1e-11 for every dtype, invstd within
  ``invstd * (1e-11 + var_err / (var + eps))``.
- running statistics: one ulp of the buffer's dtype per batch plus the
  statistics' bounds above, propagated through the update.
- gradients: dx within ``rtol * (|dx_ref| + invstd*|w|*(2*max|dy| +
  |yhat|*mean|dy*yhat|)) + ACC * kappa * invstd*|w|*max|dy|``; grad_bias within
  ``rtol * sum|dy|``; grad_weight within ``rtol * sum|yhat*dy| + ACC * kappa *
  sum|dy|``.
- Every bound also allows the dtype's smallest subnormal and FLOOR = 1e-300
  (float64 intermediates that underflow). Results whose reference exceeds
  the dtype's largest value may be inf of the right sign (a float32 variance
  of data scaled by 1e30, a float16 gradient); where the reference is NaN
  (0 * inf after a float32 running variance overflowed), so must cbn be.

Measured in the ci profile, the largest error / tolerance ratios are about
0.5 for float16 (half an ulp against one), 6e-3 for float32 and 4e-2 for
float64.

Profiles. By default the "cbn-ci" profile runs: derandomized, a fixed number
of examples per property (EXAMPLES below, 200 to 400), no deadline, no
example database; the module takes about 30 s on the project's 2-core
machine. ``CBN_HYPOTHESIS_PROFILE=
thorough`` selects "cbn-thorough": random seeds and 5000 examples per property
(about 7 minutes); any other registered profile name works too. The
profiles apply to this module's tests only. A failure prints the
``@reproduce_failure`` blob.
"""
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cbn
from cbn import reference

from corpus import F16, F32, F64, tolerance

# float16 results beyond 65504 are inf, as NumPy's cast makes them (and warns).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# ---------------------------------------------------------------------------
# Profiles

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large,
             HealthCheck.filter_too_much]
settings.register_profile("cbn-ci", derandomize=True, deadline=None, database=None,
                          print_blob=True, max_examples=250,
                          suppress_health_check=_SUPPRESS)
settings.register_profile("cbn-thorough", derandomize=False, deadline=None,
                          database=None, print_blob=True, max_examples=5000,
                          suppress_health_check=_SUPPRESS)

_PROFILE_NAME = os.environ.get("CBN_HYPOTHESIS_PROFILE", "ci")
_PROFILE = settings.get_profile(
    _PROFILE_NAME if _PROFILE_NAME.startswith("cbn-") or _PROFILE_NAME == "default"
    else "cbn-" + _PROFILE_NAME)
_CI = _PROFILE_NAME in ("ci", "cbn-ci")

# Examples per property in the ci profile (the other profiles set their own).
EXAMPLES = {
    "eval": 400,
    "train": 300,
    "backward": 400,
    "stats": 400,
    "single": 200,
}


def profile(name):
    """Settings for one property: the selected profile, with the ci profile's
    per-property example count."""
    if _CI:
        return settings(parent=_PROFILE, max_examples=EXAMPLES[name])
    return settings(parent=_PROFILE)


# ---------------------------------------------------------------------------
# Tolerances (see the module docstring)

# The relative tolerances of the suite's table (tests/corpus.py).
RTOL = {dtype: tolerance("output", dtype)[0] for dtype in (F16, F32, F64)}
RTOL_STATS = {dtype: tolerance("stats", dtype)[0] for dtype in (F16, F32, F64)}
RTOL_GRAD = {dtype: tolerance("grad", dtype)[0] for dtype in (F16, F32, F64)}
RTOL_F64_STATS = RTOL_STATS[F64]  # float64 statistics (save_mean, save_invstd)
ACC = 64 * np.finfo(np.float64).eps
FLOOR = 1e-300                  # absolute: float64 subnormal intermediates

# Data ranges per dtype: (largest |offset|, log10 of the smallest and the
# largest scale).
RANGES = {F16: (3e4, -12.0, 1.0), F32: (1e6, -20.0, 30.0), F64: (1e6, -20.0, 30.0)}

SMALL_MAX = 360                 # values of an array drawn element by element
BIG_MIN, BIG_MAX = 10_000, 60_000


# ---------------------------------------------------------------------------
# Strategies

@st.composite
def geometries(draw, rank=None, axis=None, channels=None, allow_empty=True,
               training=False):
    """(shape, axis). ``training``: never one value per channel."""
    if rank is None:
        rank = draw(st.integers(2, 5))
    if axis is None:
        axis = draw(st.integers(-rank, rank - 1))
    big = draw(st.integers(0, 7)) == 7
    if channels is None:
        channels = draw(st.integers(1, 40 if big else 6))
    sides = draw(st.lists(st.integers(1, 6), min_size=rank - 1, max_size=rank - 1))
    while math.prod(sides) * channels > SMALL_MAX:
        sides[sides.index(max(sides))] -= 1
    if big:
        k = draw(st.integers(0, rank - 2))
        target = draw(st.integers(BIG_MIN, BIG_MAX))
        others = math.prod(sides) // sides[k] * channels
        sides[k] = max(2, target // others)
    if allow_empty and draw(st.integers(0, 11)) == 11:
        sides[draw(st.integers(0, rank - 2))] = 0
    if training and math.prod(sides) == 1:
        sides[0] = 2
    ax = axis % rank
    return tuple(sides[:ax] + [channels] + sides[ax:]), axis


def per_channel(vector, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, dtype=np.float64).reshape(shape)


def channel_rows(a, axis):
    """(C, values per channel) float64 view of the data of each channel."""
    a = np.asarray(a, dtype=np.float64)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


@st.composite
def values(draw, shape, axis, dtype):
    """Native-order, C-contiguous data of ``dtype``: offset + scale * (shift_c +
    spread_c * z), all finite after the cast."""
    max_offset, lo, hi = RANGES[dtype]
    offset = draw(st.floats(-max_offset, max_offset))
    scale = 10.0 ** draw(st.floats(lo, hi))
    channels = shape[axis]
    shift = draw(hnp.arrays(F64, channels, elements=st.floats(-2, 2)))
    spread = draw(hnp.arrays(F64, channels, elements=st.floats(0, 2)))
    size = math.prod(shape)
    if size <= SMALL_MAX:
        z = draw(hnp.arrays(F64, shape, elements=st.floats(-4, 4)))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        kind = draw(st.sampled_from(["normal", "uniform", "few"]))
        if kind == "normal":
            z = np.clip(rng.standard_normal(shape), -4, 4)
        elif kind == "uniform":
            z = rng.uniform(-4, 4, shape)
        else:
            z = rng.integers(-2, 3, shape).astype(F64)
    ndim = len(shape)
    data = offset + scale * (per_channel(shift, ndim, axis)
                             + per_channel(spread, ndim, axis) * z)
    with np.errstate(over="ignore"):
        typed = data.astype(dtype)
    assume(np.isfinite(typed).all())
    note(f"data: offset={offset!r} scale={scale!r}")
    return typed


@st.composite
def laid_out(draw, data, byteorder_dtype):
    """(x, owner): an array equal to ``data`` of dtype ``byteorder_dtype`` (either
    byte order) in a drawn memory layout, and the buffer holding it."""
    ndim = data.ndim
    order = draw(st.sampled_from(["C", "F", "any"]))
    if order == "C":
        perm = list(range(ndim))
    elif order == "F":
        perm = list(range(ndim))[::-1]
    else:
        perm = list(draw(st.permutations(range(ndim))))
    steps = [draw(st.sampled_from([1, 1, 1, -1, 2, -2])) for _ in range(ndim)]
    unaligned = draw(st.integers(0, 5)) == 5
    readonly = draw(st.booleans())
    # The buffer, in memory order perm, with room for the steps.
    mem_shape = [data.shape[p] * abs(steps[p]) for p in perm]
    count = math.prod(mem_shape)
    if unaligned:
        raw = np.zeros(count * byteorder_dtype.itemsize + 1, np.uint8)
        owner = raw[1:].view(byteorder_dtype).reshape(mem_shape)
    else:
        owner = np.empty(mem_shape, byteorder_dtype)
    owner[...] = np.nan                    # gaps: a kernel that reads them sees NaN
    x = owner.transpose(np.argsort(perm))
    x = x[tuple(slice(None, None, step) for step in steps)]
    assert x.shape == data.shape
    x[...] = data
    if readonly:
        x.flags.writeable = False
    note(f"layout: shape={x.shape} dtype={x.dtype.str} strides={x.strides} "
         f"order={perm} steps={steps} unaligned={unaligned} readonly={readonly}")
    return x, owner


@st.composite
def dtypes(draw):
    """A float16/32/64 dtype in either byte order."""
    return draw(hnp.floating_dtypes(sizes=(16, 32, 64), endianness="?"))


@st.composite
def inputs(draw, geometry, dtype):
    """(x, owner) of ``geometry`` = (shape, axis) and ``dtype`` (any byte order)."""
    shape, axis = geometry
    data = draw(values(shape, axis, dtype.newbyteorder("=")))
    return draw(laid_out(data, dtype))


@st.composite
def gradients(draw, shape, dtype):
    """dy of ``shape``, values scaled by a drawn factor, in a drawn layout."""
    native = dtype.newbyteorder("=")
    size = math.prod(shape)
    if size <= SMALL_MAX:
        z = draw(hnp.arrays(F64, shape, elements=st.floats(-4, 4)))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        z = rng.uniform(-4, 4, shape)
    lo, hi = (-2.0, 1.0) if native == F16 else (-3.0, 3.0)
    factor = 10.0 ** draw(st.floats(lo, hi))
    return draw(laid_out((z * factor).astype(native), dtype))


def channel_vectors(channels, lo, hi):
    return hnp.arrays(F64, channels, elements=st.floats(lo, hi))


def weights(channels):
    """Weights in [-4, 4]; below 1e-30 in magnitude they are 0, so that no
    product with invstd is subnormal (whose rounding is absolute, not relative)."""
    return hnp.arrays(F64, channels, elements=st.floats(-4, 4).map(
        lambda v: v if abs(v) >= 1e-30 else 0.0))


EPSILONS = st.sampled_from([1e-5, 1e-3, 0.1, 1.0, 1e-9])
MOMENTA = st.one_of(st.sampled_from([0.1, 0.0, 1.0]), st.floats(0, 1))


# ---------------------------------------------------------------------------
# Oracle helpers

class Snapshot:
    """Bytes of arrays that a call must not modify."""

    def __init__(self, **arrays):
        self.arrays = {name: a for name, a in arrays.items() if a is not None}
        self.bytes = {name: a.tobytes() for name, a in self.arrays.items()}

    def check(self):
        for name, a in self.arrays.items():
            assert a.tobytes() == self.bytes[name], f"{name} was modified"


def oracle_stats(x64, axis):
    """Per-channel (mean, biased var) from reference.batch_stats on the data
    minus a per-channel shift (the naive mean), the shift added back."""
    ndim = x64.ndim
    if x64.size == 0:
        nan = np.full(x64.shape[axis], np.nan)
        return nan, nan.copy()
    rows = channel_rows(x64, axis)
    shift = rows.mean(axis=1)
    mean, var = reference.batch_stats(x64 - per_channel(shift, ndim, axis), axis=axis)
    return shift + mean, var


def var_error(rtol, var, mag, dev):
    """Bound on a variance's error: rtol relative, float64 sums of squared
    deviations (ACC * dev**2), the rounding of a mean of magnitude mag, squared
    ((ACC * mag)**2, two-pass) or times the deviations (ACC * mag * dev: Chan's
    merge of partial means, which carry that rounding)."""
    return rtol * var + ACC * (dev ** 2 + mag * dev) + (ACC * mag) ** 2


def magnitudes(x64, axis, mean):
    """Per channel: max |x| and max |x - mean|."""
    rows = channel_rows(x64, axis)
    if rows.shape[1] == 0:
        zeros = np.zeros(rows.shape[0])
        return zeros, zeros.copy()
    return np.abs(rows).max(axis=1), np.abs(rows - mean[:, None]).max(axis=1)


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def check_output(y, x):
    """Shape and dtype (native byte order) of an output of input x."""
    assert isinstance(y, np.ndarray)
    assert y.shape == x.shape, (y.shape, x.shape)
    assert y.dtype == native(x.dtype), (y.dtype, x.dtype)


def assert_within(got, want, tol, dtype, what):
    """|got - want| <= tol (plus the dtype's smallest subnormal and FLOOR);
    where want is inf or NaN, got must be the same;
    where want is within rounding of the dtype's largest value, inf of the
    right sign is accepted too."""
    got = np.asarray(got, dtype=np.float64)
    want = np.broadcast_to(np.asarray(want, dtype=np.float64), got.shape)
    # Rounding to the dtype also costs up to half its smallest subnormal, and
    # float64 intermediates that underflow lose digits below FLOOR.
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64)
                          + np.finfo(dtype).smallest_subnormal + FLOOR, got.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - want)
        # NaN is expected where the formula gives it (0 * inf in an update
        # after a float32 buffer overflowed).
        ok = (got == want) | (diff <= tol) | (np.isnan(got) & np.isnan(want))
        largest = np.finfo(dtype).max * (1 - 4 * RTOL[native(dtype)])
        ok |= (np.isfinite(want) & (np.abs(want) >= largest) & np.isinf(got)
               & (np.sign(got) == np.sign(want)))
    if not ok.all():
        bad = np.argwhere(~ok)
        i = tuple(bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} of {got.size} outside the tolerance; first at {i}: "
            f"got {got[i]!r}, want {want[i]!r}, |diff| {diff[i]!r}, tol {tol[i]!r}")


def same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert np.array_equal(a, b, equal_nan=True), f"{what}: differs from the C-contiguous copy"


def contiguous(x):
    """A C-contiguous, native, writeable copy of x."""
    return np.ascontiguousarray(x, dtype=native(x.dtype))


class Expected:
    """The float64 oracle of a forward on x (batch or given statistics) with
    tolerances per element."""

    def __init__(self, x, axis, weight, bias, eps, mean=None, var=None):
        self.x64 = np.asarray(x, dtype=np.float64)
        self.axis = axis
        self.dtype = native(x.dtype)
        ndim = x.ndim
        channels = x.shape[axis]
        self.batch = mean is None
        if self.batch:
            mean, var = oracle_stats(self.x64, axis)
        self.mean, self.var = np.asarray(mean, F64), np.asarray(var, F64)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.invstd = 1.0 / np.sqrt(self.var + eps)
        self.w = np.ones(channels) if weight is None else np.asarray(weight, F64)
        self.b = np.zeros(channels) if bias is None else np.asarray(bias, F64)
        self.mag, self.dev = magnitudes(self.x64, axis, self.mean)
        if not self.batch:  # the given mean is part of the magnitude
            self.mag = np.maximum(self.mag, np.abs(self.mean))
        self.kappa = self.mag * self.invstd
        with np.errstate(divide="ignore", invalid="ignore"):
            # Bound on the float64 variance's error, relative to var + eps.
            self.var_err = (var_error(RTOL_F64_STATS, self.var, self.mag, self.dev)
                            if self.batch else np.zeros(channels))
            self.rel_var = self.var_err / (self.var + eps)
        pc = lambda v: per_channel(v, ndim, axis)
        self.pc = pc
        if self.batch and x.size:
            # reference.batch_norm_forward on the shifted data: y does not
            # depend on the shift.
            shifted = self.x64 - pc(self.mean)
            self.y, _, _ = reference.batch_norm_forward(shifted, weight, bias, eps, axis=axis)
        else:
            self.y = reference.batch_norm(self.x64, self.mean, self.var, weight, bias,
                                          eps=eps, axis=axis)
        self.yhat = (self.x64 - pc(self.mean)) * pc(self.invstd)

    def tol_y(self):
        rtol = RTOL[self.dtype]
        pc = self.pc
        return (rtol * (np.abs(self.y) + pc(np.abs(self.w)) + pc(np.abs(self.b)))
                + (ACC * pc(self.kappa) + pc(self.rel_var) * np.abs(self.yhat))
                * pc(np.abs(self.w)))

    def check_y(self, y, what, relu=False):
        want = np.maximum(self.y, 0) if relu else self.y
        assert_within(y, want, self.tol_y(), self.dtype, what)

    def check_saved(self, save_mean, save_invstd, what):
        """float64 batch statistics of batch_norm_forward."""
        assert save_mean.dtype == F64 and save_invstd.dtype == F64, what
        std = np.sqrt(self.var)
        assert_within(save_mean, self.mean,
                      RTOL_F64_STATS * (np.abs(self.mean) + std) + ACC * self.mag,
                      F64, f"{what} save_mean")
        assert_within(save_invstd, self.invstd,
                      self.invstd * (RTOL_F64_STATS + self.rel_var),
                      F64, f"{what} save_invstd")


def expected_gradients(dy, x64, axis, mean, invstd, weight, training, kappa):
    """(dx, grad_weight, grad_bias) from the reference and their tolerances."""
    dtype = native(dy.dtype)
    rtol = RTOL_GRAD[dtype]
    dy64 = np.asarray(dy, F64)
    ndim = x64.ndim
    pc = lambda v: per_channel(v, ndim, axis)
    dx, gw, gb = reference.batch_norm_backward(dy64, x64, mean, invstd, weight,
                                               axis=axis, training=training)
    w = np.ones(x64.shape[axis]) if weight is None else np.asarray(weight, F64)
    yhat = (x64 - pc(mean)) * pc(invstd)
    dy_rows = channel_rows(dy64, axis)
    max_dy = np.abs(dy_rows).max(axis=1)
    sum_abs_dy = np.abs(dy_rows).sum(axis=1)
    proj = np.abs(channel_rows(dy64 * yhat, axis)).mean(axis=1)
    unit = pc(invstd * np.abs(w))
    if training:
        tol_dx = (rtol * (np.abs(dx) + unit * (2 * pc(max_dy) + np.abs(yhat) * pc(proj)))
                  + ACC * unit * pc(kappa * max_dy))
    else:
        tol_dx = rtol * np.abs(dx) + ACC * unit * pc(max_dy)
    tol_gw = (rtol * np.abs(channel_rows(dy64 * yhat, axis)).sum(axis=1)
              + ACC * kappa * sum_abs_dy)
    tol_gb = rtol * sum_abs_dy
    return (dx, tol_dx), (gw, tol_gw), (gb, tol_gb)


def check_gradients(result, expected, dtype, what):
    dx, gw, gb = result
    for got, (want, tol), name in zip((dx, gw, gb), expected, ("dx", "grad_weight", "grad_bias")):
        assert got.dtype == native(dtype), (what, name, got.dtype)
        assert_within(got, want, tol, dtype, f"{what} {name}")


def values_per_channel(shape, axis):
    return math.prod(shape) // shape[axis]


# ---------------------------------------------------------------------------
# (a) eval forward

@profile("eval")
@given(st.data())
def test_eval_forward_matches_reference(data):
    dtype = data.draw(dtypes(), "dtype")
    shape, axis = data.draw(geometries(), "geometry")
    x, owner = data.draw(inputs((shape, axis), dtype), "x")
    channels = shape[axis]
    max_offset, lo, hi = RANGES[native(dtype)]
    # Running statistics at the data's scale; the variance spans a factor 1e4.
    scale = 10.0 ** data.draw(st.floats(lo, min(hi, 15.0)), "stats scale")
    running_mean = (data.draw(st.floats(-max_offset, max_offset), "mean offset")
                    + scale * data.draw(channel_vectors(channels, -4, 4), "mean"))
    running_var = (scale * data.draw(channel_vectors(channels, 0.01, 10), "std")) ** 2
    affine = data.draw(st.booleans(), "affine")
    weight = data.draw(weights(channels), "weight") if affine else None
    bias = data.draw(channel_vectors(channels, -4, 4), "bias") if affine else None
    eps = data.draw(EPSILONS, "eps")
    relu = data.draw(st.booleans(), "relu")
    activation = "relu" if relu else None
    layer_dtype = data.draw(st.sampled_from([F32, F64]), "layer dtype")
    guard = Snapshot(owner=owner, running_mean=running_mean, running_var=running_var,
                     weight=weight, bias=bias)

    # The function, with float64 statistics and parameters.
    y = cbn.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                       eps=eps, axis=axis, activation=activation)
    check_output(y, x)
    Expected(x, axis, weight, bias, eps, running_mean, running_var).check_y(
        y, "batch_norm(training=False)", relu)
    same_bits(y, cbn.batch_norm(contiguous(x), running_mean, running_var, weight, bias,
                                eps=eps, axis=axis, activation=activation),
              "batch_norm(training=False)")

    # A layer in eval mode: its parameters and buffers in its own dtype.
    layer = cbn.BatchNorm(channels, eps=eps, affine=affine, axis=axis, dtype=layer_dtype,
                          activation=activation)
    with np.errstate(over="ignore"):
        layer.running_mean = running_mean.astype(layer_dtype)
        layer.running_var = running_var.astype(layer_dtype)
    if affine:
        layer.weight, layer.bias = weight, bias
    layer.num_batches_tracked = 7
    layer.eval()
    before = {k: np.copy(v) for k, v in layer.state_dict().items()}
    y = layer(x)
    check_output(y, x)
    lw = None if not affine else layer.weight.astype(F64)
    lb = None if not affine else layer.bias.astype(F64)
    Expected(x, axis, lw, lb, eps, layer.running_mean.astype(F64),
             layer.running_var.astype(F64)).check_y(y, "layer eval", relu)
    for key, value in layer.state_dict().items():
        assert np.array_equal(value, before[key], equal_nan=True), f"eval changed {key}"
    same_bits(y, layer(contiguous(x)), "layer eval")
    same_bits(y, layer.freeze()(x), "frozen layer")
    guard.check()


# ---------------------------------------------------------------------------
# (b) training forward and running statistics

class RunningModel:
    """The running-statistics update written out in NumPy, float64 arithmetic
    stored in the buffers' dtype after each batch, with error bounds."""

    def __init__(self, mean, var, dtype):
        self.dtype = np.dtype(dtype)
        self.mean = np.asarray(mean, F64).copy()
        self.var = np.asarray(var, F64).copy()
        self.tol_mean = np.zeros_like(self.mean)
        self.tol_var = np.zeros_like(self.var)
        self.ulp = 2 * np.finfo(self.dtype).eps

    def update(self, expected, n, factor):
        """One batch: expected (an Expected of the batch), n values per channel."""
        if n == 0:
            return
        keep = 1.0 - factor
        mean, var = expected.mean, expected.var
        std = np.sqrt(var)
        err_mean = RTOL_F64_STATS * (np.abs(mean) + std) + ACC * expected.mag
        err_var = expected.var_err
        unbiased = var * (n / (n - 1))
        with np.errstate(over="ignore", invalid="ignore"):
            new_mean = keep * self.mean + factor * mean
            new_var = keep * self.var + factor * unbiased
            stored_mean = new_mean.astype(self.dtype).astype(F64)
            stored_var = new_var.astype(self.dtype).astype(F64)
            self.tol_mean = (keep * self.tol_mean + factor * err_mean
                             + 4 * np.finfo(F64).eps * (np.abs(keep * self.mean)
                                                        + np.abs(factor * mean))
                             + self.ulp * np.abs(stored_mean))
            self.tol_var = (keep * self.tol_var + factor * err_var * (n / (n - 1))
                            + 4 * np.finfo(F64).eps * new_var
                            + self.ulp * np.abs(stored_var))
        self.mean, self.var = stored_mean, stored_var

    def check(self, running_mean, running_var, what):
        assert_within(running_mean, self.mean, self.tol_mean, self.dtype,
                      f"{what} running_mean")
        assert_within(running_var, self.var, self.tol_var, self.dtype,
                      f"{what} running_var")


@st.composite
def batches(draw, count=3):
    """``count`` batches of one dtype family, rank, axis and channel count, with
    their own sizes, values and layouts."""
    rank = draw(st.integers(2, 5))
    axis = draw(st.integers(-rank, rank - 1))
    shape, _ = draw(geometries(rank, axis, training=True))
    channels = shape[axis]
    result = []
    for _ in range(count):
        dtype = draw(dtypes())
        geometry = draw(geometries(rank, axis, channels, training=True))
        x, owner = draw(inputs(geometry, dtype))
        result.append((x, owner))
    return axis, channels, result


@profile("train")
@given(st.data())
def test_training_forward_and_running_stats(data):
    axis, channels, xs = data.draw(batches(), "batches")
    affine = data.draw(st.booleans(), "affine")
    weight = data.draw(weights(channels), "weight") if affine else None
    bias = data.draw(channel_vectors(channels, -4, 4), "bias") if affine else None
    eps = data.draw(EPSILONS, "eps")
    buffer_dtype = data.draw(st.sampled_from([F32, F64]), "buffer dtype")
    momentum = data.draw(MOMENTA, "momentum")
    layer_momentum = data.draw(st.one_of(st.none(), MOMENTA), "layer momentum")
    start_mean = data.draw(channel_vectors(channels, -10, 10), "start mean")
    start_var = data.draw(channel_vectors(channels, 0.1, 10), "start var")

    # The functions: batch_norm(training=True) updating float32/float64 buffers,
    # and batch_norm_forward.
    running_mean = start_mean.astype(buffer_dtype)
    running_var = start_var.astype(buffer_dtype)
    model = RunningModel(running_mean, running_var, buffer_dtype)
    guard = Snapshot(weight=weight, bias=bias)
    for i, (x, owner) in enumerate(xs):
        what = f"batch {i} of shape {x.shape}"
        snapshot = Snapshot(owner=owner)
        expected = Expected(x, axis, weight, bias, eps)
        n = values_per_channel(x.shape, axis)
        before = (running_mean.copy(), running_var.copy())
        y = cbn.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                           momentum=momentum, eps=eps, axis=axis)
        check_output(y, x)
        if n:
            expected.check_y(y, f"batch_norm(training=True) {what}")
        model.update(expected, n, momentum)
        model.check(running_mean, running_var, f"batch_norm(training=True) {what}")
        if n == 0:  # an empty batch changes nothing
            assert np.array_equal(before[0], running_mean, equal_nan=True), what
            assert np.array_equal(before[1], running_var, equal_nan=True), what
        # The same call on a C-contiguous copy, from the same buffers.
        rm, rv = before[0].copy(), before[1].copy()
        same_bits(y, cbn.batch_norm(contiguous(x), rm, rv, weight, bias, training=True,
                                    momentum=momentum, eps=eps, axis=axis),
                  f"batch_norm(training=True) {what}")
        assert np.array_equal(rm, running_mean, equal_nan=True), what
        assert np.array_equal(rv, running_var, equal_nan=True), what

        y, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, eps, axis=axis)
        check_output(y, x)
        assert save_mean.shape == save_invstd.shape == (channels,)
        if n:
            expected.check_y(y, f"batch_norm_forward {what}")
            expected.check_saved(save_mean, save_invstd, f"batch_norm_forward {what}")
        else:
            assert np.isnan(save_mean).all() and np.isnan(save_invstd).all(), what
        y2, mean2, invstd2 = cbn.batch_norm_forward(contiguous(x), weight, bias, eps,
                                                    axis=axis)
        same_bits(y, y2, f"batch_norm_forward {what}")
        same_bits(save_mean, mean2, f"batch_norm_forward save_mean {what}")
        same_bits(save_invstd, invstd2, f"batch_norm_forward save_invstd {what}")
        snapshot.check()
    guard.check()

    # The layer, with its own momentum (None: the cumulative average).
    layer_dtype = data.draw(st.sampled_from([F32, F64]), "layer dtype")
    layer = cbn.BatchNorm(channels, eps=eps, momentum=layer_momentum, affine=affine,
                          axis=axis, dtype=layer_dtype)
    layer.running_mean, layer.running_var = start_mean, start_var
    if affine:
        layer.weight, layer.bias = weight, bias
    lw = None if not affine else layer.weight.astype(F64)
    lb = None if not affine else layer.bias.astype(F64)
    model = RunningModel(layer.running_mean, layer.running_var, layer_dtype)
    tracked = 0
    for i, (x, owner) in enumerate(xs):
        what = f"layer batch {i} of shape {x.shape} momentum={layer_momentum}"
        snapshot = Snapshot(owner=owner)
        expected = Expected(x, axis, lw, lb, eps)
        n = values_per_channel(x.shape, axis)
        y = layer(x)
        check_output(y, x)
        if n:
            expected.check_y(y, what)
            factor = 1.0 / (tracked + 1) if layer_momentum is None else layer_momentum
            model.update(expected, n, factor)
        tracked += 1   # an empty batch counts too, as in PyTorch 2.13
        model.check(layer.running_mean, layer.running_var, what)
        assert layer.num_batches_tracked == tracked, what
        snapshot.check()


# ---------------------------------------------------------------------------
# (c) backward

def check_empty_backward(x, dy, axis, weight, bias, eps):
    """An empty batch: empty input gradients, zero parameter gradients."""
    channels = x.shape[axis]
    _, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, eps, axis=axis)
    for training, (mean, invstd) in ((True, (save_mean, save_invstd)),
                                     (False, (np.zeros(channels), np.ones(channels)))):
        dx, grad_weight, grad_bias = cbn.batch_norm_backward(
            dy, x, mean, invstd, weight, axis=axis, training=training)
        check_output(dx, x)
        assert grad_weight.shape == grad_bias.shape == (channels,)
        assert not grad_weight.any() and not grad_bias.any()
    layer = cbn.BatchNorm(channels, eps=eps, axis=axis)
    for mode in (True, False):
        layer.train(mode)
        check_output(layer(x), x)
        check_output(layer.backward(dy), x)
        assert not layer.grad_weight.any() and not layer.grad_bias.any()
    assert layer.num_batches_tracked == 1   # the training call counts (PyTorch 2.13)
    assert not layer.running_mean.any() and (layer.running_var == 1).all()


@profile("backward")
@given(st.data())
def test_backward_matches_reference(data):
    dtype = data.draw(dtypes(), "dtype")
    shape, axis = data.draw(geometries(training=True), "geometry")
    x, owner = data.draw(inputs((shape, axis), dtype), "x")
    dy, dy_owner = data.draw(gradients(shape, dtype), "dy")
    channels = shape[axis]
    n = values_per_channel(shape, axis)
    affine = data.draw(st.booleans(), "affine")
    weight = data.draw(weights(channels), "weight") if affine else None
    bias = data.draw(channel_vectors(channels, -4, 4), "bias") if affine else None
    eps = data.draw(EPSILONS, "eps")
    guard = Snapshot(owner=owner, dy_owner=dy_owner, weight=weight, bias=bias)
    x64 = np.asarray(x, F64)
    if n == 0:
        check_empty_backward(x, dy, axis, weight, bias, eps)
        guard.check()
        return

    # Training: the forward's own statistics, as a network would pass them.
    expected = Expected(x, axis, weight, bias, eps)
    _, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, eps, axis=axis)
    result = cbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight, axis=axis,
                                     training=True)
    check_output(result[0], x)
    check_gradients(result, expected_gradients(dy, x64, axis, save_mean, save_invstd,
                                               weight, True, expected.kappa),
                    dtype, "batch_norm_backward(training=True)")
    again = cbn.batch_norm_backward(contiguous(dy), contiguous(x), save_mean, save_invstd,
                                    weight, axis=axis, training=True)
    for a, b, name in zip(result, again, ("dx", "grad_weight", "grad_bias")):
        same_bits(a, b, f"batch_norm_backward(training=True) {name}")

    # Inference: running statistics, constants of the forward.
    running_mean = expected.mean + np.nan_to_num(np.sqrt(expected.var)) * data.draw(
        channel_vectors(channels, -1, 1), "mean offset")
    running_var = np.nan_to_num(expected.var, nan=1.0) * data.draw(
        channel_vectors(channels, 0.5, 2), "var factor")
    invstd = 1.0 / np.sqrt(running_var + eps)
    result = cbn.batch_norm_backward(dy, x, running_mean, invstd, weight, axis=axis,
                                     training=False)
    check_output(result[0], x)
    kappa = np.maximum(expected.mag, np.abs(running_mean)) * invstd
    check_gradients(result, expected_gradients(dy, x64, axis, running_mean, invstd,
                                               weight, False, kappa),
                    dtype, "batch_norm_backward(training=False)")

    # The layer, after a training and an eval forward, maybe through a ReLU.
    relu = data.draw(st.booleans(), "relu")
    layer = cbn.BatchNorm(channels, eps=eps, affine=affine, axis=axis, dtype=F64,
                          activation="relu" if relu else None)
    if affine:
        layer.weight, layer.bias = weight, bias
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        if mode == "eval":
            layer.running_mean, layer.running_var = running_mean, running_var
        y = layer(x)
        dx = layer.backward(dy)
        check_output(dx, x)
        # The fused ReLU passes the gradient where cbn's own output is > 0 (or NaN).
        masked = np.where(y <= 0, native(dtype).type(0), dy) if relu else dy
        if mode == "train":
            stats = (expected.mean, expected.invstd, expected.kappa)
        else:
            stats = (running_mean, invstd, kappa)
        want = expected_gradients(masked, x64, axis, stats[0], stats[1], weight,
                                  mode == "train", stats[2])
        grads = (dx, layer.grad_weight, layer.grad_bias) if affine else (dx,)
        for got, (value, tol), name in zip(grads, want, ("dx", "grad_weight", "grad_bias")):
            assert_within(got, value, tol, dtype, f"layer {mode} backward {name}")
        if not affine:
            assert layer.grad_weight is None and layer.grad_bias is None
    guard.check()


# ---------------------------------------------------------------------------
# batch_stats

@profile("stats")
@given(st.data())
def test_batch_stats_match_reference(data):
    dtype = data.draw(dtypes(), "dtype")
    shape, axis = data.draw(geometries(), "geometry")
    x, owner = data.draw(inputs((shape, axis), dtype), "x")
    guard = Snapshot(owner=owner)
    mean, var = cbn.batch_stats(x, axis=axis)
    channels = shape[axis]
    assert mean.shape == var.shape == (channels,)
    assert mean.dtype == var.dtype == native(dtype)
    x64 = np.asarray(x, F64)
    want_mean, want_var = oracle_stats(x64, axis)
    if values_per_channel(shape, axis) == 0:
        assert np.isnan(mean).all() and np.isnan(var).all()
    else:
        mag, dev = magnitudes(x64, axis, want_mean)
        rtol = RTOL_STATS[native(dtype)]
        tiny = np.finfo(dtype).smallest_subnormal
        assert_within(mean, want_mean,
                      rtol * (np.abs(want_mean) + np.sqrt(want_var)) + ACC * mag + tiny,
                      dtype, "batch_stats mean")
        assert_within(var, want_var, var_error(rtol, want_var, mag, dev) + tiny,
                      dtype, "batch_stats var")
    again = cbn.batch_stats(contiguous(x), axis=axis)
    same_bits(mean, again[0], "batch_stats mean")
    same_bits(var, again[1], "batch_stats var")
    guard.check()


# ---------------------------------------------------------------------------
# One value per channel in training

@st.composite
def single_value_geometries(draw):
    rank = draw(st.integers(2, 5))
    axis = draw(st.integers(-rank, rank - 1))
    channels = draw(st.integers(1, 6))
    shape = [1] * rank
    shape[axis] = channels
    return tuple(shape), axis


@profile("single")
@given(st.data())
def test_training_with_one_value_per_channel_raises(data):
    dtype = data.draw(dtypes(), "dtype")
    shape, axis = data.draw(single_value_geometries(), "geometry")
    x, owner = data.draw(inputs((shape, axis), dtype), "x")
    channels = shape[axis]
    guard = Snapshot(owner=owner)
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cbn.batch_norm(x, running_mean, running_var, training=True, axis=axis)
    assert not running_mean.any() and (running_var == 1).all()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cbn.batch_norm(x, None, None, training=True, axis=axis)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cbn.batch_norm_forward(x, axis=axis)
    layer = cbn.BatchNorm(channels, axis=axis)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(x)
    assert layer.num_batches_tracked == 0
    assert not layer.running_mean.any() and (layer.running_var == 1).all()
    with pytest.raises(ValueError, match="backward called before any forward"):
        layer.backward(np.zeros(shape, native(dtype)))
    # Eval mode with running statistics is fine with one value.
    y = layer.eval()(x)
    check_output(y, x)
    # Without running statistics eval uses the batch's: PyTorch's check applies.
    untracked = cbn.BatchNorm(channels, track_running_stats=False, axis=axis).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        untracked(x)
    guard.check()
