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
