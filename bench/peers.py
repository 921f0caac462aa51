"""The runtimes a user would pick instead of cbn for eval-mode batch norm:
ONNX Runtime, OpenVINO and oneDNN (through PyTorch), each optional.

``eval_calls`` builds each installed runtime's model for one case, checks
its output against cbn's once (so a mis-built model is caught before it is
timed) and returns the calls to time, or for each runtime that cannot run
the case, the reason ("n/a: ..." in the tables).
"""
import numpy as np

from . import peer_onednn, peer_onnxruntime, peer_openvino
from .peer_api import NotSupported

RUNTIMES = {"onnxruntime": peer_onnxruntime, "openvino": peer_openvino,
            "onednn": peer_onednn}
# The runtimes also timed with a fused ReLU (OpenVINO fuses BN + ReLU).
RELU_RUNTIMES = ("openvino",)
# allclose tolerances of the check against cbn's output, per dtype.
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


class Mismatch(AssertionError):
    """A runtime's output differs from cbn's: its model is built wrong."""


def names():
    return {key: module.NAME for key, module in RUNTIMES.items()}


def versions():
    """{key: version string or None when not installed}."""
    return {key: module.version() for key, module in RUNTIMES.items()}


def missing():
    """Display names of the runtimes that are not installed."""
    return [module.NAME for module in RUNTIMES.values() if module.version() is None]


def check(name, actual, expected):
    """Raise Mismatch unless ``actual`` is allclose to ``expected`` (cbn's)."""
    tolerance = TOLERANCE[np.dtype(expected.dtype).name]
    if actual.shape != expected.shape or not np.allclose(actual, expected, **tolerance):
        worst = (float(np.max(np.abs(actual - expected))) if actual.shape == expected.shape
                 else f"shape {actual.shape} != {expected.shape}")
        raise Mismatch(f"{name}'s output differs from cbn's (max difference {worst})")


def eval_calls(x, params, axis, threads, expected, relu=False):
    """({key: call to time}, {key: reason}) for every installed runtime
    (of RELU_RUNTIMES when ``relu``); ``expected`` is cbn's output."""
    calls, unsupported = {}, {}
    for key, module in RUNTIMES.items():
        if module.version() is None or (relu and key not in RELU_RUNTIMES):
            continue
        try:
            built = module.batch_norm(x, params, axis, threads, relu=relu)
        except NotSupported as reason:
            unsupported[key] = str(reason)
            continue
        check(module.NAME, built.output(), expected)
        calls[key] = built.run
    return calls, unsupported
