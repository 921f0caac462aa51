"""What a peer runtime's module (peer_*.py) provides, and what it returns.

Each module has NAME, ``version()`` (None when the runtime is not
installed) and ``batch_norm(x, params, axis, threads, relu=False)``, which
builds the runtime's model for one case once and returns a Built: ``run``,
the call the benchmark times, and ``output()``, one call's result as a
NumPy array of x's shape, for the check against cbn. A case the runtime
cannot run as asked raises NotSupported with the reason the table prints.
Runtimes that run whole models also have ``network(blocks, batch, threads)``
(see pipeline.py).
"""
from collections import namedtuple

Built = namedtuple("Built", "run output")


class NotSupported(Exception):
    """The runtime cannot run this case as asked; the message says why."""


def bound_call(run, x, out, shape):
    """The Built of a runtime that reads x and writes out through raw
    pointers (ONNX Runtime's IOBinding, OpenVINO's shared tensors): run
    holds both arrays, so they live as long as the call; output() is one
    call's result in x's ``shape``."""
    run.buffers = (x, out)

    def output():
        run()
        return out.reshape(shape).copy()
    return Built(run, output)
