"""Arrays of other libraries, read and written through DLPack without a copy.

A PyTorch CPU tensor (or any object with ``__dlpack__``, standing in here for
a JAX CPU array) is read where it lies: the kernels see its memory, ``out=``
and running statistics given as tensors are written in place, and results
are NumPy arrays. A tensor that requires grad is refused with a TypeError
that says to detach it.

That no copy is made is checked two ways, both on the real call path: the
memory NumPy allocates during a call (tracemalloc traces NumPy's data
buffers), against a control that must copy; and a layer's backward, which
reads the input its forward kept, seeing an in-place change made to the
tensor in between.
"""
import tracemalloc

import numpy as np
import pytest

import cbn

from corpus import layer_state

torch = pytest.importorskip("torch")

SHAPE = (16, 4, 8)


def data(rng, shape=SHAPE, dtype=np.float32, offset=0.0):
    return (offset + rng.standard_normal(shape)).astype(dtype)


class DLPackOnly:
    """An array known only through DLPack (like a JAX CPU array): no
    ``__array__``, no ``numpy()``."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class LegacyDLPack(DLPackOnly):
    """A producer of the unversioned protocol, which carries no writeable
    flag: NumPy reads it as read-only."""

    def __dlpack__(self, stream=None):
        return self._array.__dlpack__(stream=stream)


def numpy_allocated_during(call):
    """Peak bytes traced while ``call()`` runs (NumPy's data buffers
    included), and its result."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before, result


def pointer(array):
    return array.__array_interface__["data"][0]


# ---------------------------------------------------------------------------
# Results are NumPy arrays, equal to those of the same data as NumPy arrays

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensors_in_numpy_out(rng, training, dtype):
    x = data(rng, dtype=dtype)
    weight, bias = rng.uniform(0.5, 2, 4), rng.uniform(-1, 1, 4)
    mean, var = rng.uniform(-1, 1, 4), rng.uniform(0.5, 2, 4)
    expected = cbn.batch_norm(x, mean.copy(), var.copy(), weight, bias, training=training)
    got = cbn.batch_norm(torch.from_numpy(x.copy()), torch.from_numpy(mean.copy()),
                         torch.from_numpy(var.copy()), torch.from_numpy(weight),
                         torch.from_numpy(bias), training=training)
    assert type(got) is np.ndarray and got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


def test_layer_calls_take_tensors(rng):
    x, dy = data(rng), data(rng)
    ours, theirs = cbn.BatchNorm(4), cbn.BatchNorm(4)
    y = ours(torch.from_numpy(x.copy()))
    dx = ours.backward(torch.from_numpy(dy.copy()))
    assert type(y) is np.ndarray and type(dx) is np.ndarray
    np.testing.assert_array_equal(y, theirs(x))
    np.testing.assert_array_equal(dx, theirs.backward(dy))
    assert layer_state(ours) == layer_state(theirs)
    ours.eval()
    theirs.eval()
    np.testing.assert_array_equal(ours(torch.from_numpy(x.copy())), theirs(x))


# ---------------------------------------------------------------------------
# No copy

def test_eval_forward_copies_neither_input_nor_out(rng):
    x = torch.from_numpy(data(rng, (256, 4, 1024)))   # 4 MiB
    out = torch.empty_like(x)
    mean, var = np.zeros(4), np.ones(4)
    nbytes = x.numel() * x.element_size()
    allocated, result = numpy_allocated_during(
        lambda: cbn.batch_norm(x, mean, var, out=out))
    assert allocated < nbytes // 8
    assert pointer(result) == out.data_ptr()
    np.testing.assert_allclose(out.numpy(), x.numpy() / np.sqrt(1 + 1e-5), rtol=1e-6)
    # the control: an input that must be copied (a transposed view) shows
    transposed = torch.from_numpy(data(rng, (1024, 4, 256))).permute(2, 1, 0)
    allocated, _ = numpy_allocated_during(
        lambda: cbn.batch_norm(transposed, mean, var, out=out))
    assert allocated >= nbytes


def test_layer_backward_copies_neither_dy_nor_out(rng):
    layer = cbn.BatchNorm(4)
    x = torch.from_numpy(data(rng, (256, 4, 1024)))
    layer(x)
    dy = torch.from_numpy(data(rng, (256, 4, 1024)))
    dx = torch.empty_like(dy)
    allocated, result = numpy_allocated_during(lambda: layer.backward(dy, out=dx))
    assert allocated < dx.numel() * dx.element_size() // 8
    assert pointer(result) == dx.data_ptr()


def test_the_kernels_read_the_tensors_memory(rng):
    """A training forward keeps its input for backward: for a tensor, its
    memory, so a change made to the tensor in place shows in the backward
    exactly as the same change to a NumPy input (never copied) does."""
    x, dy = data(rng), data(rng)
    tensor, array = torch.from_numpy(x.copy()), x.copy()
    on_tensor, on_array = cbn.BatchNorm(4), cbn.BatchNorm(4)
    on_tensor(tensor)
    on_array(array)
    before = on_array.backward(dy)
    tensor.mul_(3)
    array *= 3
    after = on_array.backward(dy)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(on_tensor.backward(dy), after)


def test_a_dlpack_only_object_is_read_without_a_copy(rng):
    x = data(rng, (256, 4, 1024))
    out = np.empty_like(x)
    allocated, result = numpy_allocated_during(
        lambda: cbn.batch_norm(DLPackOnly(x), np.zeros(4), np.ones(4), out=out))
    assert allocated < x.nbytes // 8
    assert result is out
    np.testing.assert_allclose(out, x / np.sqrt(1 + 1e-5), rtol=1e-6)


# ---------------------------------------------------------------------------
# Written in place: out= and running statistics

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_statistics_as_tensors_are_updated_in_place(rng, dtype):
    x = data(rng, offset=2.0)
    mean_t, var_t = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    mean_np, var_np = np.zeros(4, np_dtype), np.ones(4, np_dtype)
    cbn.batch_norm(torch.from_numpy(x), mean_t, var_t, training=True, momentum=0.5)
    cbn.batch_norm(x, mean_np, var_np, training=True, momentum=0.5)
    assert np.all(mean_np > 0.5)   # the update is visible
    np.testing.assert_array_equal(mean_t.numpy(), mean_np)
    np.testing.assert_array_equal(var_t.numpy(), var_np)


def test_running_statistics_of_a_dlpack_only_object(rng):
    x = data(rng, offset=2.0)
    mean, var = np.zeros(4, np.float32), np.ones(4, np.float32)
    cbn.batch_norm(x, DLPackOnly(mean), DLPackOnly(var), training=True)
    assert np.all(mean > 0.1)
    # the unversioned protocol carries no writeable flag: read-only
    frozen_mean = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"running_mean is read-only"):
        cbn.batch_norm(x, LegacyDLPack(frozen_mean), DLPackOnly(var.copy()), training=True)
    assert not frozen_mean.any()


def test_a_failed_call_leaves_tensor_running_statistics_alone(rng):
    mean, var = torch.full((4,), 0.25), torch.full((4,), 2.0)
    with pytest.raises(ValueError, match=r"weight has shape \(3,\)"):
        cbn.batch_norm(torch.from_numpy(data(rng)), mean, var, weight=torch.ones(3),
                       training=True)
    assert torch.equal(mean, torch.full((4,), 0.25))
    assert torch.equal(var, torch.full((4,), 2.0))


def test_out_tensor_in_place_over_the_input_in_eval(rng):
    x = data(rng)
    tensor = torch.from_numpy(x.copy())
    result = cbn.batch_norm(tensor, np.zeros(4), np.ones(4), out=tensor)
    assert pointer(result) == tensor.data_ptr()
    np.testing.assert_array_equal(tensor.numpy(), cbn.batch_norm(x, np.zeros(4), np.ones(4)))


def test_out_tensor_over_the_input_is_refused_in_training(rng):
    tensor = torch.from_numpy(data(rng))
    before = tensor.clone()
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="out overlaps the input"):
        cbn.batch_norm(tensor, mean, var, training=True, out=tensor)
    assert torch.equal(tensor, before)
    assert torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.ones(4))
    layer = cbn.BatchNorm(4)
    state = layer_state(layer)
    with pytest.raises(ValueError, match="out overlaps the input"):
        layer(tensor, out=tensor)
    assert layer_state(layer) == state and torch.equal(tensor, before)


def test_out_tensor_overlapping_a_tensor_running_statistic_is_refused(rng):
    storage = torch.zeros(4 * 16)
    mean, var = storage[:4], torch.ones(4)
    out = storage[2:2 + 16].reshape(4, 4)
    with pytest.raises(ValueError, match="out partially overlaps"):
        cbn.batch_norm(torch.from_numpy(data(rng, (4, 4))), mean, var, training=True,
                       out=out)
    assert not storage.any()


def test_eval_layer_out_over_its_tensor_input_then_backward_is_refused(rng):
    layer = cbn.BatchNorm(4).eval()
    tensor = torch.from_numpy(data(rng))
    layer(tensor, out=tensor)
    with pytest.raises(ValueError, match=r"out=x"):
        layer.backward(np.ones(SHAPE, np.float32))


def test_batch_stats_out_tensors(rng):
    x = data(rng)
    mean, var = torch.empty(4), torch.empty(4)
    result = cbn.batch_stats(torch.from_numpy(x), out=(mean, var))
    expected = cbn.batch_stats(x)
    np.testing.assert_array_equal(mean.numpy(), expected[0])
    np.testing.assert_array_equal(var.numpy(), expected[1])
    assert pointer(result[0]) == mean.data_ptr()


# ---------------------------------------------------------------------------
# Tensors that require grad

def _grad(tensor):
    return tensor.clone().requires_grad_()


@pytest.mark.parametrize("slot", ["x", "weight", "bias", "running_mean", "out"])
def test_functions_refuse_tensors_that_require_grad(rng, slot):
    args = {"x": torch.from_numpy(data(rng)), "running_mean": torch.zeros(4),
            "running_var": torch.ones(4), "weight": torch.ones(4), "bias": torch.zeros(4),
            "out": torch.zeros(SHAPE)}
    args[slot] = _grad(args[slot])
    before = {key: value.detach().clone() for key, value in args.items()}
    name = "input" if slot == "x" else slot   # the executor's name for x
    with pytest.raises(TypeError, match=rf"^{name} is a Tensor that requires grad.*"
                                        rf"{name}\.detach\(\)$"):
        cbn.batch_norm(training=True, **args)
    for key, value in args.items():
        assert torch.equal(value.detach(), before[key]), key


def test_backward_refuses_a_dy_that_requires_grad(rng):
    x = data(rng)
    _, mean, invstd = cbn.batch_norm_forward(x)
    with pytest.raises(TypeError, match=r"dy\.detach\(\)"):
        cbn.batch_norm_backward(_grad(torch.from_numpy(data(rng))), x, mean, invstd)


def test_layer_refuses_tensors_that_require_grad(rng):
    layer = cbn.BatchNorm(4)
    x, dy = data(rng), data(rng)
    layer(x)
    expected_dx = layer.backward(dy)
    state = layer_state(layer)
    with pytest.raises(TypeError, match=r"input\.detach\(\)"):
        layer(_grad(torch.from_numpy(x)))
    with pytest.raises(TypeError, match=r"dy\.detach\(\)"):
        layer.backward(_grad(torch.from_numpy(dy)))
    with pytest.raises(TypeError, match=r"weight\.detach\(\)"):
        layer.weight = torch.ones(4, requires_grad=True)
    assert layer_state(layer) == state
    np.testing.assert_array_equal(layer.backward(dy), expected_dx)
    # detached, the same tensors are fine
    layer.weight = torch.ones(4, requires_grad=True).detach()
    layer(_grad(torch.from_numpy(x)).detach())


def test_frozen_layer_reads_and_writes_tensors(rng):
    layer = cbn.BatchNorm(4)
    layer(data(rng, offset=1.0))
    frozen = layer.eval().freeze()
    x = data(rng)
    out = torch.zeros(SHAPE)
    result = frozen(torch.from_numpy(x.copy()), out=out)
    assert pointer(result) == out.data_ptr()
    np.testing.assert_array_equal(out.numpy(), frozen(x))
