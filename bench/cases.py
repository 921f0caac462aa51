"""What the benchmark runs: the suite (cache-sized, medium and large cases),
the small calls and the thread rows, for the full run and for ``--quick``.

Sizes are judged against this machine's caches (cache.py): a case is
"cache-resident" at RESIDENT_BYTES or less (input and output stay in L3 and
mostly in L2 between calls) and "large" at LARGE_L3_FACTOR times the
last-level cache or more (every call reads from memory); the large shapes
grow their batch dimension until they are, so the copy-limit targets judge
memory-bound calls on any machine.
"""
from collections import namedtuple

import numpy as np

from .cache import DEFAULT_BYTES, last_level_cache_bytes

OPS = ("train forward", "inference", "backward")
DTYPES = (np.float32, np.float64)

# Channel axis of each layout; NHWC is channels last (axis=-1).
LAYOUT_AXIS = {"NC": 1, "NCL": 1, "NCHW": 1, "NHWC": -1}

RESIDENT_BYTES = 8 << 20
LARGE_L3_FACTOR = 2
L3_BYTES = last_level_cache_bytes() or DEFAULT_BYTES
LARGE_BYTES = LARGE_L3_FACTOR * L3_BYTES


class Case(namedtuple("Case", "shape layout dtype")):
    """One array of the suite: its shape, layout tag and dtype."""

    @property
    def axis(self):
        return LAYOUT_AXIS[self.layout]

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def ops(self):
        """The ops of OPS that apply: training needs more than one value per channel."""
        return OPS if int(np.prod(self.shape)) > self.channels else ("inference",)

    @property
    def dtype_name(self):
        return np.dtype(self.dtype).name

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def large(self):
        return self.nbytes >= LARGE_BYTES

    @property
    def resident(self):
        return self.nbytes <= RESIDENT_BYTES

    @property
    def size_class(self):
        return "large" if self.large else "resident" if self.resident else "medium"

    @property
    def name(self):
        return f"{shape_name(self.shape)} {self.layout} {self.dtype_name}"


def shape_name(shape):
    return "x".join(map(str, shape))


def at_least(shape, nbytes, itemsize=4):
    """``shape`` with its batch dimension doubled until it holds ``nbytes``."""
    batch, *rest = shape
    while batch * int(np.prod(rest)) * itemsize < nbytes:
        batch *= 2
    return (batch, *rest)


def suite(shapes):
    """Every (shape, layout) of ``shapes`` in both dtypes."""
    return [Case(shape, layout, dtype) for dtype in DTYPES for shape, layout in shapes]


# Cache-sized and medium cases: a single sample, a small batch, (N, C) as a
# dense layer's output, feature maps in both layouts.
SMALL_SHAPES = [
    ((1, 64), "NC"),
    ((32, 256), "NC"),
    ((256, 512), "NC"),
    ((256, 1024), "NC"),
    ((1024, 256), "NC"),
    ((8, 64, 28, 28), "NCHW"),
    ((32, 64, 28, 28), "NCHW"),
    ((32, 28, 28, 64), "NHWC"),
    ((32, 64, 56, 56), "NCHW"),
    ((32, 56, 56, 64), "NHWC"),
]
# Large in float32 already (so in float64 too) on this machine's L3.
LARGE_SHAPES = [
    (at_least((4096, 4096), LARGE_BYTES), "NC"),
    (at_least((256, 256, 256), LARGE_BYTES), "NCL"),
    (at_least((64, 128, 56, 56), LARGE_BYTES), "NCHW"),
    (at_least((64, 56, 56, 128), LARGE_BYTES), "NHWC"),
]
FULL_SUITE = suite(SMALL_SHAPES + LARGE_SHAPES)

QUICK_SUITE = suite([
    ((32, 256), "NC"),
    ((2048, 256), "NC"),
    ((32, 64, 256), "NCL"),
    ((8, 32, 32, 32), "NCHW"),
    ((8, 32, 32, 32), "NHWC"),
])


# Small calls, timed in microseconds with many calls per sample. ``form`` is
# the API used: the BatchNorm layer or the functions.
SmallCall = namedtuple("SmallCall", "form op shape target_us")

SMALL_CALLS = [
    SmallCall("layer", "inference", (1, 64), 3.0),
    SmallCall("function", "inference", (1, 64), 2.0),
    SmallCall("function", "train forward", (32, 256), 10.0),
    SmallCall("function", "backward", (32, 256), 10.0),
    SmallCall("layer", "train forward", (32, 256), 10.0),
    SmallCall("layer", "backward", (32, 256), 10.0),
]


def small_call_name(call):
    return f"small {call.form} {call.op} {shape_name(call.shape)} float32"


# Thread scaling: cache-resident float32 arrays large enough to split, each op
# with out= at 1 and at 2 threads.
SCALING_CASES = [Case((256, 1024), "NC", np.float32),
                 Case((8, 64, 28, 28), "NCHW", np.float32)]
SCALING_THREADS = (1, 2)
SCALING_TARGET = 1.7


def scaling_name(case, op):
    return f"threads {case.name} {op}"


# The default thread setting against one thread, calls of every size
# (float32, out=); --quick leaves out the large array.
DEFAULT_THREAD_CASES = [Case((1, 64), "NC", np.float32),
                        Case((32, 256), "NC", np.float32),
                        Case((256, 512), "NC", np.float32),
                        Case((256, 1024), "NC", np.float32),
                        Case((8, 64, 28, 28), "NCHW", np.float32),
                        Case(LARGE_SHAPES[0][0], "NC", np.float32)]
QUICK_DEFAULT_THREAD_CASES = [Case((32, 256), "NC", np.float32),
                              Case((8, 64, 28, 28), "NCHW", np.float32)]


# Python threads sharing one eval layer or its frozen form (float32, out=).
PYTHON_THREADS = [("layer", (32, 512)), ("frozen", (32, 512)),
                  ("layer", (256, 512)), ("frozen", (256, 512))]
QUICK_PYTHON_THREADS = [("frozen", (32, 512))]
