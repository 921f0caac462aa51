"""ONNX Runtime (CPU): batch norm as one BatchNormalization node, and the
pipeline's network as Gemm -> BatchNormalization -> Relu blocks.

Optional: ``onnxruntime`` is None unless both onnx and onnxruntime import.
Models are built in memory with ``onnx.helper`` and shapes fixed per case,
so the runtime may plan for them. Input and output are NumPy buffers bound
with IOBinding: a call moves no data besides the kernel's own. The session
runs at the benchmark's thread count with the intra-op pool's spinning off
(``session.intra_op.allow_spinning`` = "0"), as cbn's threads do not spin
long either.
"""
import numpy as np

from .peer_api import bound_call

try:
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper
except ImportError:  # optional
    onnx = onnxruntime = None

NAME = "ONNX Runtime"
OPSET = 15
EPS = 1e-5



def version():
    return onnxruntime.__version__ if onnxruntime is not None else None


def _session(nodes, initializers, x_shape, y_shape, dtype, threads):
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "cbn_bench",
        [helper.make_tensor_value_info("x", element, list(x_shape))],
        [helper.make_tensor_value_info("y", element, list(y_shape))],
        [numpy_helper.from_array(np.ascontiguousarray(array), name)
         for name, array in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def _bound(session, x, out):
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu", 0, out.dtype, out.shape, out.ctypes.data)
    return binding


def batch_norm(x, params, axis, threads, relu=False):
    """One eval-mode BatchNormalization node on ``x`` (channels on ``axis``).

    Channels-last input is given as its (N*H*W, C) view, the same memory in
    the node's channels-first form.
    """
    shape = x.shape
    if axis % x.ndim != 1:
        x = x.reshape(-1, x.shape[axis])
    out = np.empty_like(x)
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"],
                              ["bn" if relu else "y"], epsilon=EPS)]
    if relu:
        nodes.append(helper.make_node("Relu", ["bn"], ["y"]))
    session = _session(nodes, {"scale": params.weight, "B": params.bias,
                               "mean": params.running_mean, "var": params.running_var},
                       x.shape, x.shape, x.dtype, threads)
    binding = _bound(session, x, out)

    def run():
        session.run_with_iobinding(binding)

    return bound_call(run, x, out, shape)


def network(blocks, batch, threads):
    """run(x) -> y for the pipeline's network at batch size ``batch``.

    ``blocks``: [(dense weight (out, in), dense bias, gamma, beta, mean, var,
    eps)] in float32. The input is bound per call (each batch is a new
    array); the output is one preallocated array, overwritten by each call.
    """
    nodes, initializers, name = [], {}, "x"
    for k, (weight, bias, gamma, beta, mean, var, eps) in enumerate(blocks):
        arrays = {"W": weight, "b": bias, "gamma": gamma, "beta": beta, "mean": mean,
                  "var": var}
        initializers.update({f"{key}{k}": value for key, value in arrays.items()})
        last = k == len(blocks) - 1
        nodes += [helper.make_node("Gemm", [name, f"W{k}", f"b{k}"], [f"dense{k}"], transB=1),
                  helper.make_node("BatchNormalization",
                                   [f"dense{k}", f"gamma{k}", f"beta{k}", f"mean{k}",
                                    f"var{k}"], [f"norm{k}"], epsilon=float(eps)),
                  helper.make_node("Relu", [f"norm{k}"], ["y" if last else f"h{k}"])]
        name = f"h{k}"
    x_shape = (batch, blocks[0][0].shape[1])
    out = np.empty((batch, blocks[-1][0].shape[0]), np.float32)
    session = _session(nodes, initializers, x_shape, out.shape, np.float32, threads)
    binding = _bound(session, np.zeros(x_shape, np.float32), out)

    def run(x):
        binding.bind_cpu_input("x", x)
        session.run_with_iobinding(binding)
        return out
    run.buffers = (out,)  # bound by pointer: lives as long as the call
    return run
