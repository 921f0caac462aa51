"""The pipeline benchmark: the network of examples/inference_pipeline.py
(three dense -> batch norm -> ReLU blocks) on streams of batches.

cbn's four ways from the example (plain, fused, frozen, folded) run against
PyTorch eager on the same model (grad mode off) and the same model run
whole by ONNX Runtime and OpenVINO (built once per batch size, checked
against cbn's plain way before timing), on a quiet machine and with a busy
core. ``measure`` runs in a child process per import order (import_order.py),
so that the import order is the only difference between them.
"""
import contextlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

import cbn

from . import peer_onnxruntime, peer_openvino, torch_ops
from .busy import BusyCore
from .load import CpuLoad

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inference_pipeline.py"
SCENARIOS = ("quiet", "busy core")
PEER_NETWORKS = {"ONNX Runtime": peer_onnxruntime, "OpenVINO": peer_openvino}
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def load_example():
    """The example script as a module (its network and its four ways)."""
    spec = importlib.util.spec_from_file_location("cbn_example_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_blocks(network):
    """The network as arrays, for the runtimes that build their own model."""
    return [(weight, bias, norm.weight, norm.bias, norm.running_mean, norm.running_var,
             norm.eps) for weight, bias, norm in network]


def _torch_run(model):
    torch = torch_ops.torch

    def run(x):
        return model(torch.from_numpy(x)).numpy()
    return run


def _checked(runs, batch, rng, inputs):
    """Raise AssertionError unless every way agrees with the plain way."""
    x = (rng.standard_normal((batch, inputs)) * 2 + 1).astype(np.float32)
    expected = np.array(runs["plain"](x), copy=True)
    for name, run in runs.items():
        y = np.asarray(run(x))
        if not np.allclose(y, expected, **TOLERANCE):
            raise AssertionError(f"pipeline batch {batch}: {name} differs from plain "
                                 f"(max {float(np.max(np.abs(y - expected))):.3g})")


def measure(batches, rounds, threads=None, scenarios=SCENARIOS):
    """{"rows": [...], "ways": [...], "notes": [...]}: one row per (batch
    size, scenario) with the median seconds per batch of every way.
    ``batches``: [(batch size, batches per stream)]."""
    example = load_example()
    cbn.set_num_threads(threads)
    threads = cbn.get_num_threads()
    notes = []
    if torch_ops.torch is not None:
        torch_ops.set_num_threads(threads)
        torch_ops.torch.set_grad_enabled(False)  # inference: no graph (torch.no_grad)
        network, model = example.from_torch()
    else:
        network, model = example.from_generator(), None
        notes.append("PyTorch is not installed: no PyTorch column")
    runs = {name: make(network) for name, make in example.WAYS.items()}
    if model is not None:
        runs["PyTorch"] = _torch_run(model)
    peers = {name: module for name, module in PEER_NETWORKS.items()
             if module.version() is not None}
    notes += [f"{name} is not installed" for name in PEER_NETWORKS if name not in peers]
    blocks = peer_blocks(network)
    rng = np.random.default_rng(example.SEED)
    rows = []
    for batch, stream in batches:
        batch_runs = dict(runs, **{name: module.network(blocks, batch, threads)
                                   for name, module in peers.items()})
        _checked(batch_runs, batch, rng, example.SIZES[0])
        for scenario in scenarios:
            with BusyCore() if scenario == "busy core" else contextlib.nullcontext():
                load = CpuLoad()
                seconds = example.time_streams(batch_runs, batch, stream, rng, rounds)
                rows.append({"batch": batch, "batches": stream, "scenario": scenario,
                             "seconds": seconds, "machine_load": load.lap()})
            print(f"pipeline batch {batch}, {scenario}: done", file=sys.stderr, flush=True)
    return {"rows": rows, "ways": list(batch_runs), "threads": threads, "rounds": rounds,
            "sizes": list(example.SIZES), "notes": notes}

