"""PyTorch CPU's batch normalization, called the way a PyTorch user would.

Optional: ``torch`` is None when PyTorch is not installed. Tensors share the
NumPy arrays' memory (``torch.from_numpy``); a channels-last input is the
permuted tensor (channel axis moved to dim 1, memory left channels-last),
which PyTorch recognizes and runs with its channels-last kernels.

Forward (training and inference): ``torch.nn.functional.batch_norm``, which
allocates its output as cbn's default call does.

Backward: ``torch.ops.aten.native_batch_norm_backward``, the kernel autograd
runs for batch norm, given the saved mean and invstd of PyTorch's own
forward. It returns the same three gradients as ``cbn.batch_norm_backward``
(grad_input, grad_weight, grad_bias) in freshly allocated tensors. Timing
``y.backward(dy, retain_graph=True)`` instead would add autograd's graph walk
and accumulation into ``x.grad`` (an extra pass over memory) to PyTorch's time.
"""
try:
    import torch
except ImportError:  # PyTorch is optional
    torch = None

EPS = 1e-5
MOMENTUM = 0.1


def version():
    return torch.__version__ if torch is not None else None


def set_num_threads(n):
    if torch is not None:
        torch.set_num_threads(n)


def as_tensor(array, axis):
    """A tensor sharing ``array``'s memory with the channel axis at dim 1."""
    tensor = torch.from_numpy(array)
    return tensor if axis % array.ndim == 1 else tensor.movedim(axis, 1)


def call(op, x, dy, params, axis):
    """PyTorch's call for ``op``; ``params`` as in ``cbn_calls.Params`` (PyTorch
    gets its own copies of the running statistics)."""
    x_t = as_tensor(x, axis)
    weight, bias = torch.from_numpy(params.weight), torch.from_numpy(params.bias)
    running_mean = torch.from_numpy(params.running_mean.copy())
    running_var = torch.from_numpy(params.running_var.copy())
    functional = torch.nn.functional.batch_norm
    if op == "train forward":
        return lambda: functional(x_t, running_mean, running_var, weight, bias,
                                  training=True, momentum=MOMENTUM, eps=EPS)
    if op == "inference":
        return lambda: functional(x_t, running_mean, running_var, weight, bias,
                                  training=False, eps=EPS)
    dy_t = as_tensor(dy, axis)
    aten = torch.ops.aten
    # The statistics PyTorch's own training forward saves for its backward.
    _, save_mean, save_invstd = aten.native_batch_norm(
        x_t, weight, bias, running_mean, running_var, True, MOMENTUM, EPS)
    return lambda: aten.native_batch_norm_backward(
        dy_t, x_t, weight, running_mean, running_var, save_mean, save_invstd,
        True, EPS, [True, True, True])


def layer_call(op, x, dy, params):
    """``torch.nn.BatchNorm1d``'s call for ``op``, channels on axis 1.

    The training forward records the autograd graph (the parameters require
    grad, as in a training step); inference runs with the parameters frozen;
    the backward is ``y.backward(dy, retain_graph=True)`` on the output of a
    training forward of a leaf ``x`` that requires grad (gradients accumulate
    into .grad, as in a training step).
    """
    x_t, dy_t = torch.from_numpy(x), torch.from_numpy(dy)
    layer = torch.nn.BatchNorm1d(x.shape[1], eps=EPS, momentum=MOMENTUM,
                                 dtype=x_t.dtype).train(op != "inference")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(params.weight))
        layer.bias.copy_(torch.from_numpy(params.bias))
        layer.running_mean.copy_(torch.from_numpy(params.running_mean))
        layer.running_var.copy_(torch.from_numpy(params.running_var))
    if op == "inference":
        layer.requires_grad_(False)
    elif op == "backward":
        y = layer(x_t.clone().requires_grad_(True))
        return lambda: y.backward(dy_t, retain_graph=True)
    return lambda: layer(x_t)
