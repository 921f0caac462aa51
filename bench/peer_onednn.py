"""oneDNN through PyTorch's MKL-DNN tensors (``Tensor.to_mkldnn()``).

Optional: ``torch`` is None when PyTorch is not installed (or built without
MKL-DNN). The input is reordered into oneDNN's tensor once, outside the timed
call; the call is ``torch.nn.functional.batch_norm`` in eval mode on that
tensor, which runs oneDNN's batch normalization primitive and allocates
its output (as cbn's default call does). oneDNN's batch norm takes 4-D and
5-D tensors only: (N, C) runs as (N, C, 1, 1) and (N, C, L) as (N, C, L, 1),
the same memory; a channels-last array is given channels-first (the reorder
is the one outside the clock). float32 only. Its threads are PyTorch's
OpenMP threads (torch.set_num_threads), whose spinning only the
environment (OMP_WAIT_POLICY, before torch loads) could change.
"""
import re

import numpy as np

from .peer_api import Built, NotSupported

try:
    import torch
    if not torch.backends.mkldnn.is_available():
        torch = None
except ImportError:  # optional
    torch = None

NAME = "oneDNN"
EPS = 1e-5




def version():
    if torch is None:
        return None
    found = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


def batch_norm(x, params, axis, threads, relu=False):
    if x.dtype != np.float32:
        raise NotSupported(f"no {x.dtype} (MKL-DNN tensors are float32)")
    if relu:
        raise NotSupported("no fused ReLU in PyTorch's MKL-DNN batch norm")
    torch.set_num_threads(threads)
    tensor = torch.from_numpy(x).movedim(axis % x.ndim, 1)
    tensor = tensor.reshape(*tensor.shape, *[1] * (4 - tensor.ndim)).to_mkldnn()
    running_mean, running_var, weight, bias = (
        torch.from_numpy(array) for array in (params.running_mean, params.running_var,
                                              params.weight, params.bias))

    def run():
        return torch.nn.functional.batch_norm(tensor, running_mean, running_var, weight,
                                              bias, training=False, eps=EPS)

    def output():
        y = run().to_dense()
        # Back to x's shape and layout: drop the added dims, channel axis home.
        y = y.reshape(y.shape[:x.ndim]).movedim(1, axis % x.ndim)
        return y.numpy().copy()
    return Built(run, output)
