"""cbn's executor: every call of the package, validated and run in one place.

Design: the Python layer (layer.py, frozen.py, functional.py) passes the
caller's objects here untouched. Plain ones (C-contiguous, aligned, native
float32/float64 NumPy arrays, exact Python numbers) are read directly, which
keeps small calls cheap; anything else is first handed to cbn._convert, which
only converts (to arrays and numbers) and rejects kinds cbn does not take.
Every rule about a call (ranks, channel counts, per-channel shapes, eps and
momentum ranges, out= overlaps, the running-statistics update, nonfinite
statistics, gradients of weight and bias) is then checked here, once, for both
kinds of input. The inner kernels are reached through the table of the SIMD
build cbn._dispatch chose (_kernel_table.h); this module is compiled once.

    _threads.pxi     thread count per call
    _view.pxi        from an input to its (outer, C, inner) block (the one entry)
    _rules.pxi       argument rules: numbers, per-channel vectors, out=
    _inference.pxi   ChannelParams and the layer's eval cache
    _calls.pxi       the operations: statistics, forwards, backwards
    _moments.pxi     merges of moments across batches and processes
"""
cimport numpy as cnp
from cpython.float cimport PyFloat_AsDouble, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_CheckExact
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport NAN, isfinite, sqrt
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

import numpy

from . import _convert

cnp.import_array()

float32_dtype = numpy.dtype(numpy.float32)
float64_dtype = numpy.dtype(numpy.float64)


from cbn._kernel_table cimport (CBN_KERNEL_TABLE_NAME, CBN_KERNEL_TABLE_VERSION,
                                cbn_kernel_table)


# The kernels in use; set by cbn._dispatch before any call.
cdef const cbn_kernel_table* K = NULL
cdef object kernels_module = None


def use_kernels(module):
    """Call the kernels of ``module`` (a cbn._kernels* build) from now on."""
    global K, kernels_module
    capsule = module.kernel_table()
    table = <const cbn_kernel_table*>PyCapsule_GetPointer(capsule, CBN_KERNEL_TABLE_NAME)
    if table.version != CBN_KERNEL_TABLE_VERSION:
        raise ImportError(f"{module.__name__} was built for another version of cbn "
                          "(kernel table mismatch); reinstall cbn")
    global threads_supported
    kernels_module = module  # keeps the table's module alive
    K = table
    threads_supported = table.threads_supported


def simd_target():
    """The instruction set of the kernels in use."""
    return K.simd_target.decode()


def stream_min_bytes():
    """Outputs of at least this many bytes are written with streaming stores."""
    return K.stream_min_bytes


cdef int check_scratch(int status) except -1:
    """Turn a kernel's failure into MemoryError (with the GIL held)."""
    if status < 0:
        raise MemoryError("cbn: cannot allocate the kernels' scratch space")
    return 0


cdef extern from *:
    """
    /* Found by threadpoolctl (cbn._threads): marks this library as cbn's. */
    #if defined(__GNUC__)
    __attribute__((visibility("default")))
    #endif
    int cbn_thread_pool_marker(void) { return 1; }
    """


include "_threads.pxi"
include "_view.pxi"
include "_rules.pxi"
include "_inference.pxi"
include "_calls.pxi"
include "_moments.pxi"
