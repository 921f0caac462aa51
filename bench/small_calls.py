"""Small calls: per-call overhead, timed in microseconds.

Inference pipelines push many small batches through a layer, and training
steps on small layers are dominated by Python-side work, so these rows time
one call on small float32 arrays, many calls per sample (``timeit``-style),
cbn against the NumPy formula and PyTorch.
"""
import numpy as np

from . import cbn_calls, numpy_formula, torch_ops
from .cases import Case, small_call_name
from .load import CpuLoad
from .suite import make_data
from .timing import per_call


def _calls(call, rng):
    """{implementation: callable} for one small call."""
    x, dy, params = make_data(Case(call.shape, "NC", np.float32), rng)
    has_torch = torch_ops.torch is not None
    if call.form == "layer":
        calls = {"cbn": cbn_calls.layer_call(call.op, x, dy, params)}
        if has_torch:
            calls["torch"] = torch_ops.layer_call(call.op, x, dy, params)
    else:
        calls = {"cbn": cbn_calls.call(call.op, x, dy, params, 1)}
        if has_torch:
            calls["torch"] = torch_ops.call(call.op, x, dy, params, 1)
    # NumPy has no layer: the formula is the same for both forms.
    calls["numpy"] = numpy_formula.call(call.op, x, dy, params, 1)
    return calls


def run(small_calls, samples, sample_seconds):
    """One row dict per small call: seconds per call of each implementation."""
    rng = np.random.default_rng(20261123)
    rows = []
    for call in small_calls:
        calls = _calls(call, rng)
        load = CpuLoad()
        medians = dict(zip(calls, per_call(list(calls.values()), samples, sample_seconds)))
        rows.append({
            "name": small_call_name(call), "form": call.form, "op": call.op,
            "shape": list(call.shape), "dtype": "float32",
            "seconds": {"cbn": medians["cbn"], "numpy": medians["numpy"],
                        "torch": medians.get("torch")},
            "target_us": call.target_us, "machine_load": load.lap(),
        })
    return rows
