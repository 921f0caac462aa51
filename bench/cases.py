"""What the benchmark runs: the suite of large cases, the small calls and the
thread-scaling rows, for the full run and for ``--quick``."""
from collections import namedtuple

import numpy as np

OPS = ("train forward", "inference", "backward")
DTYPES = (np.float32, np.float64)

# Channel axis of each layout; NHWC is channels last (axis=-1).
LAYOUT_AXIS = {"NC": 1, "NCL": 1, "NCHW": 1, "NHWC": -1}

# An array of at least this many bytes is "large": well beyond the L2 cache
# of the machines cbn targets, so the copy-limit targets apply to it.
LARGE_BYTES = 16 << 20


class Case(namedtuple("Case", "shape layout dtype")):
    """One array of the suite: its shape, layout tag and dtype."""

    @property
    def axis(self):
        return LAYOUT_AXIS[self.layout]

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
    def name(self):
        return f"{shape_name(self.shape)} {self.layout} {self.dtype_name}"


def shape_name(shape):
    return "x".join(map(str, shape))


def suite(shapes):
    """Every (shape, layout) of ``shapes`` in both dtypes."""
    return [Case(shape, layout, dtype) for dtype in DTYPES for shape, layout in shapes]


FULL_SUITE = suite([
    ((4096, 4096), "NC"),
    ((256, 256, 256), "NCL"),
    ((32, 64, 56, 56), "NCHW"),
    ((32, 56, 56, 64), "NHWC"),
    ((64, 128, 56, 56), "NCHW"),
    ((64, 56, 56, 128), "NHWC"),
])

QUICK_SUITE = suite([
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


# Python threads sharing one eval layer or its frozen form (float32, out=).
PYTHON_THREADS = [("layer", (32, 512)), ("frozen", (32, 512)),
                  ("layer", (256, 512)), ("frozen", (256, 512))]
QUICK_PYTHON_THREADS = [("frozen", (32, 512))]
