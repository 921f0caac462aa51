"""OpenVINO (CPU plugin): batch norm as one BatchNormInference op (also
followed by a ReLU, which the plugin fuses into one node), and the
pipeline's network as MatMul + Add -> BatchNormInference -> ReLU blocks.

Optional: ``openvino`` is None when it does not import. Models are built
with the ``openvino.opset13`` factory functions (``openvino.runtime`` is
gone in 2026 releases) with static shapes and compiled once per case for
"CPU" with INFERENCE_PRECISION_HINT f32 (no silent bf16 on CPUs that have
it) and INFERENCE_NUM_THREADS at the benchmark's thread count. The plugin's
TBB threads have no spinning setting. Input and output tensors share the
NumPy arrays' memory.

float64 is not supported: the plugin converts it to float32 and computes in
float32, which is a different computation.
"""
import numpy as np

from .peer_api import NotSupported, bound_call

try:
    import openvino
    from openvino import opset13 as ops
except ImportError:  # optional
    openvino = ops = None

NAME = "OpenVINO"
EPS = 1e-5




def version():
    return openvino.__version__.split("-")[0] if openvino is not None else None


def _compiled(model, threads):
    return openvino.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})


def fused_nodes(compiled):
    """Names of the compiled model's compute nodes (what the plugin fused into)."""
    skipped = {"Parameter", "Result", "Constant"}
    return [node.get_rt_info()["layerType"].astype(str)
            for node in compiled.get_runtime_model().get_ordered_ops()
            if node.get_type_name() not in skipped
            and node.get_rt_info()["layerType"].astype(str) not in skipped]


def batch_norm(x, params, axis, threads, relu=False):
    """BatchNormInference (then ReLU) on ``x``; channels-last input is given as
    its (N*H*W, C) view. Returns Built; ``.nodes`` on run lists the plugin's
    compute nodes."""
    if x.dtype != np.float32:
        raise NotSupported(f"{x.dtype} computed in float32")
    shape = x.shape
    if axis % x.ndim != 1:
        x = x.reshape(-1, x.shape[axis])
    out = np.empty_like(x)
    data = ops.parameter(list(x.shape), np.float32, name="x")
    node = ops.batch_norm_inference(data, params.weight, params.bias, params.running_mean,
                                    params.running_var, EPS)
    if relu:
        node = ops.relu(node)
    compiled = _compiled(openvino.Model([node], [data], "batch_norm"), threads)
    request = compiled.create_infer_request()
    request.set_input_tensor(openvino.Tensor(x, shared_memory=True))
    request.set_output_tensor(openvino.Tensor(out, shared_memory=True))

    def run():
        request.infer()
    run.nodes = fused_nodes(compiled)

    return bound_call(run, x, out, shape)


def network(blocks, batch, threads):
    """run(x) -> y for the pipeline's network (see peer_onnxruntime.network)."""
    data = ops.parameter([batch, blocks[0][0].shape[1]], np.float32, name="x")
    node = data
    for weight, bias, gamma, beta, mean, var, eps in blocks:
        node = ops.add(ops.matmul(node, weight, transpose_a=False, transpose_b=True), bias)
        node = ops.relu(ops.batch_norm_inference(node, gamma, beta, mean, var, float(eps)))
    request = _compiled(openvino.Model([node], [data], "network"), threads).create_infer_request()

    def run(x):
        request.set_input_tensor(openvino.Tensor(x, shared_memory=True))
        request.infer()
        return request.get_output_tensor().data
    return run
