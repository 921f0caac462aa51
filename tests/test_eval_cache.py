"""The eval cache never serves stale parameters: every kind of edit (in place,
through views, by assignment, load_state_dict, eps, a training step, reloads
racing with calls) reaches the next eval call, fold() and freeze(); assigned
parameter arrays are copied when unaligned.

Expected values are written out with float64 NumPy from the formulas, never
computed by cbn.
"""
import sys

import numpy as np
import pytest

import cbn

from corpus import (
    LAYER_DTYPES,
    affine_of,
    assert_close,
    eval_oracle,
    expected_scale_shift,
    make_input,
    make_layer,
)


def _assign_new(layer, name, factor):
    setattr(layer, name, getattr(layer, name) * factor + 0.25)


def _shared_then_edited(layer):
    array = np.full(layer.num_features, 2.5, layer.dtype)
    layer.running_var = array
    layer(np.ones((2, layer.num_features), layer.dtype))  # cache the new array
    array[0] = 0.125   # the layer may keep the caller's array: edit it behind its back


def _load(layer):
    state = layer.state_dict()
    state["running_mean"] = state["running_mean"] - 1.5
    state["weight"] = state["weight"][::-1].copy()
    layer.load_state_dict(state)


def _flip_sign_bit(layer):
    """Flip running_mean[0]'s sign through a uint8 view of its bytes."""
    raw = layer.running_mean.view(np.uint8)
    top = layer.running_mean.itemsize - 1 if sys.byteorder == "little" else 0
    raw[top] ^= 0x80


def _training_step(layer):
    layer.train()
    layer(np.random.default_rng(3).normal(4, 2, (5, layer.num_features)).astype(layer.dtype))
    layer.eval()


EDITS = [
    pytest.param(lambda bn: bn.running_mean.__setitem__(0, bn.running_mean[0] + 1),
                 id="running_mean[0]+=1"),
    pytest.param(lambda bn: bn.running_var.__imul__(3), id="running_var*=3"),
    pytest.param(lambda bn: bn.weight.__imul__(2), id="weight*=2"),
    pytest.param(lambda bn: bn.bias.__iadd__(0.5), id="bias+=0.5"),
    pytest.param(lambda bn: np.copyto(bn.running_var, np.arange(1, bn.num_features + 1)),
                 id="copyto"),
    pytest.param(lambda bn: bn.weight[1:].__setitem__(Ellipsis, -3.0), id="through-a-view"),
    pytest.param(lambda bn: bn.bias.reshape(1, -1)[0, -1:].__setitem__(Ellipsis, 9.0),
                 id="through-a-reshaped-view"),
    pytest.param(_flip_sign_bit, id="through-a-byte-view"),
    pytest.param(_load, id="load_state_dict"),
    pytest.param(lambda bn: bn.reset_running_stats(), id="reset_running_stats"),
    pytest.param(lambda bn: bn.reset_parameters(), id="reset_parameters"),
    pytest.param(lambda bn: _assign_new(bn, "running_mean", -1), id="assign-running_mean"),
    pytest.param(lambda bn: _assign_new(bn, "running_var", 2), id="assign-running_var"),
    pytest.param(lambda bn: _assign_new(bn, "weight", -2), id="assign-weight"),
    pytest.param(lambda bn: _assign_new(bn, "bias", 3), id="assign-bias"),
    pytest.param(lambda bn: setattr(bn, "running_var", bn.running_var.tolist()[::-1]),
                 id="assign-list"),
    pytest.param(_shared_then_edited, id="assigned-array-edited-later"),
    pytest.param(lambda bn: setattr(bn, "eps", 0.5), id="eps"),
    pytest.param(_training_step, id="training-step"),
    pytest.param(lambda bn: bn.running_var.__setitem__(1, 0.0), id="var-to-zero"),
    pytest.param(lambda bn: bn.weight.__setitem__(0, -bn.weight[0]), id="sign-flip"),
    pytest.param(lambda bn: bn.weight.__setitem__(slice(None), bn.bias.copy()),
                 id="weight-becomes-bias"),
]


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("edit", EDITS)
def test_eval_cache_is_never_stale(rng, edit, dtype):
    c = 5
    for with_out in (False, True):
        layer = make_layer(c, rng, dtype=dtype).eval()
        x = make_input(rng, (7, c, 3), 1, dtype)
        out = np.empty_like(x) if with_out else None
        for _ in range(2):  # warm the cache
            before = layer(x, out=out).copy()
        assert_close(before, eval_oracle(layer, x), dtype=dtype)
        edit(layer)
        assert not layer.training
        expected = eval_oracle(layer, x)
        assert not np.allclose(expected, before)  # the edit matters
        y = layer(x, out=out)
        assert_close(y, expected, dtype=dtype)
        assert_close(layer(x), expected, dtype=dtype)  # and stays fresh
        # the frozen form and fold() see the edit too
        np.testing.assert_array_equal(layer.freeze()(x), y)
        scale, shift = layer.fold()
        ref = expected_scale_shift(*affine_of(layer), layer.running_mean,
                                   layer.running_var, layer.eps)
        assert_close(scale, ref[0], dtype=dtype)
        assert_close(shift, ref[1], dtype=dtype)


def test_eval_cache_sees_an_eps_change_in_the_last_bit():
    layer = cbn.BatchNorm(1, dtype=np.float64).eval()
    layer.running_var[0] = 0.0  # the output is x / sqrt(eps)
    x = np.ones((2, 1))
    old, new = 0.3, float(np.nextafter(0.3, 1.0))
    assert 1.0 / np.sqrt(old) != 1.0 / np.sqrt(new)  # visible in double
    layer.eps = old
    assert layer(x)[0, 0] == 1.0 / np.sqrt(old)
    assert layer.fold()[0][0] == 1.0 / np.sqrt(old)
    layer.eps = new
    assert layer(x)[0, 0] == 1.0 / np.sqrt(new)
    assert layer.fold()[0][0] == 1.0 / np.sqrt(new)


def test_switching_the_activation_reaches_the_next_eval_call(rng):
    """Switching the activation between warm eval calls takes effect at once."""
    layer = make_layer(3, rng, dtype=np.float64).eval()
    x = make_input(rng, (6, 3), 1, np.float64)
    y = layer(x)
    layer.activation = "relu"
    np.testing.assert_array_equal(layer(x), np.maximum(y, 0))
    layer.activation = None
    np.testing.assert_array_equal(layer(x), y)


def test_edits_after_freeze_reach_the_layer_not_the_frozen_copy(rng):
    layer = make_layer(3, rng, dtype=np.float64).eval()
    x = make_input(rng, (4, 3), 1, np.float64)
    layer(x)
    frozen = layer.freeze()
    y_frozen = frozen(x)
    layer.running_mean[...] = 0.0
    layer.running_var[...] = 1.0
    assert_close(layer(x), eval_oracle(layer, x), dtype=np.float64)
    np.testing.assert_array_equal(frozen(x), y_frozen)
    assert not np.allclose(frozen(x), layer(x))


def test_eval_cache_is_not_left_stale_by_reloads_racing_with_calls():
    # load_state_dict copies release the GIL, so a reload can land while the
    # cache reads the arrays; once the writer is done, the next call must use
    # the final values. (Before the cache built its parameters and snapshot
    # from one copy, this failed in about half of the runs.)
    import threading
    C = 2048
    layer = cbn.BatchNorm(C).eval()
    x = np.ones((1, C), np.float32)
    first = {key: value.copy() for key, value in layer.state_dict().items()}
    second = {**first, "running_var": np.full(C, 4, np.float32),
              "weight": np.full(C, 3, np.float32)}
    stop = threading.Event()

    def reader():
        out = np.empty_like(x)
        while not stop.is_set():
            layer(x, out=out)

    for final in range(3):
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        for i in range(400 + final):
            layer.load_state_dict(second if i % 2 == 0 else first)
        stop.set()
        for thread in readers:
            thread.join()
        stop.clear()
        expected = (1 - 0) / np.sqrt(layer.running_var.astype(np.float64) + 1e-5) \
            * layer.weight
        np.testing.assert_allclose(layer(x)[0], expected, rtol=1e-6)


def test_unaligned_parameter_arrays_are_copied_on_assignment(rng):
    layer = cbn.BatchNorm(4).eval()
    raw = np.zeros(4 * 4 + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, count=4, offset=1)
    assert not unaligned.flags.aligned
    layer.weight = unaligned + 0  # an aligned temporary...
    layer.weight = np.frombuffer(np.full(4, 2.0, np.float32).tobytes().rjust(17, b"\0"),
                                 np.float32, count=4, offset=1)  # ...and an unaligned one
    assert layer.weight.flags.aligned
    x = make_input(rng, (5, 4), 1, np.float32)
    np.testing.assert_allclose(layer(x), 2 * x / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(layer.fold()[0], 2 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_internal_inference_calls_refuse_missing_parameters():
    from cbn._dispatch import kernels
    x = np.ones((2, 4, 3))
    with pytest.raises(TypeError):
        kernels.normalize(x, 1, kernels.Accepts(), None, False, None)
    with pytest.raises(TypeError, match="running_var"):
        kernels.inference_params(None, None, np.zeros(4), None, 1e-5)
    with pytest.raises(ValueError, match="running_var"):
        kernels.inference_params(None, None, np.zeros(4), np.ones(3), 1e-5)
    with pytest.raises(TypeError, match="cannot be changed"):
        params = kernels.inference_params(None, None, np.zeros(4), np.ones(4), 1e-5)
        params.__init__(np.zeros(4), np.ones(4), np.ones(4), np.zeros(4))
