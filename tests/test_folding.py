"""Folding an eval-mode batch norm into a dense or convolution layer.

``BatchNorm.fold()`` is checked against the layer's own eval output and the
written-out formula; ``cbn.folding`` against the unfolded pipeline (the layer
applied after/before the dense layer or convolution), with convolutions and
transposed convolutions computed by the direct NumPy loops below, and, when
torch is installed, against ``torch.nn.utils.fusion`` and torch's own
ConvTranspose modules.
"""
import re

import numpy as np
import pytest

import cbn
from cbn.folding import fold_into_conv, fold_into_linear

from corpus import FakeTensor, assert_close, eval_oracle, expected_scale_shift

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]



def make_layer(num_features, rng, dtype=np.float64, affine=True, axis=1,
               eps=1e-3):
    """An eval-mode layer with non-trivial parameters and running statistics."""
    layer = cbn.BatchNorm(num_features, eps=eps, affine=affine, axis=axis,
                          dtype=dtype)
    if affine:
        layer.weight[...] = rng.uniform(0.5, 2.0, num_features) * rng.choice([-1, 1], num_features)
        layer.bias[...] = rng.normal(0, 1, num_features)
    layer.running_mean[...] = rng.normal(0, 2, num_features)
    layer.running_var[...] = rng.uniform(0.05, 3.0, num_features)
    return layer.eval()


def channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return shape


# ---------------------------------------------------------------------------
# Direct NumPy convolutions (stride 1, dilation 1, zero padding, groups), in
# PyTorch's weight layouts, computed in float64.


def _window(offset, size):
    return tuple(slice(o, o + s) for o, s in zip(offset, size))


def conv_nd(x, weight, bias=None, padding=0, groups=1):
    """Cross-correlation of x (N, Cin, *S) with weight (Cout, Cin/groups, *K)."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    n, d = x.shape[0], x.ndim - 2
    c_out, c_in_g = weight.shape[:2]
    kernel = weight.shape[2:]
    c_out_g = c_out // groups
    xp = np.pad(x, [(0, 0), (0, 0)] + [(padding, padding)] * d)
    out_size = tuple(xp.shape[2 + i] - kernel[i] + 1 for i in range(d))
    y = np.zeros((n, c_out) + out_size)
    for g in range(groups):
        xg = xp[:, g * c_in_g:(g + 1) * c_in_g]
        wg = weight[g * c_out_g:(g + 1) * c_out_g]
        for offset in np.ndindex(*kernel):
            patch = xg[(slice(None), slice(None)) + _window(offset, out_size)]
            tap = wg[(slice(None), slice(None)) + offset]
            y[:, g * c_out_g:(g + 1) * c_out_g] += np.einsum("nc...,oc->no...", patch, tap)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape([1, -1] + [1] * d)
    return y


def conv_transpose_nd(x, weight, bias=None, padding=0, groups=1):
    """Transposed convolution of x (N, Cin, *S) with weight (Cin, Cout/groups, *K):
    every input value scatters weight-scaled copies of the kernel, then
    ``padding`` is cropped from each side."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    n, d = x.shape[0], x.ndim - 2
    c_in, c_out_g = weight.shape[:2]
    kernel, size = weight.shape[2:], x.shape[2:]
    c_in_g = c_in // groups
    full = np.zeros((n, c_out_g * groups) + tuple(s + k - 1 for s, k in zip(size, kernel)))
    for g in range(groups):
        xg = x[:, g * c_in_g:(g + 1) * c_in_g]
        wg = weight[g * c_in_g:(g + 1) * c_in_g]
        for offset in np.ndindex(*kernel):
            tap = wg[(slice(None), slice(None)) + offset]
            full[(slice(None), slice(g * c_out_g, (g + 1) * c_out_g)) + _window(offset, size)] += \
                np.einsum("nc...,co->no...", xg, tap)
    y = full[(slice(None), slice(None))
             + tuple(slice(padding, s - padding) for s in full.shape[2:])]
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape([1, -1] + [1] * d)
    return y


def test_numpy_conv_by_hand():
    x = np.array([[[1.0, 2.0, 3.0]]])
    w = np.array([[[1.0, 0.0, -1.0]]])
    np.testing.assert_array_equal(conv_nd(x, w, padding=1), [[[-2.0, -2.0, 2.0]]])
    np.testing.assert_array_equal(conv_nd(x, w, [5.0]), [[[3.0]]])
    # Two groups: each output channel sees only its own input channel.
    x2 = np.array([[[1.0, 2.0], [10.0, 20.0]]])
    w2 = np.array([[[1.0, 1.0]], [[1.0, -1.0]]])
    np.testing.assert_array_equal(conv_nd(x2, w2, groups=2), [[[3.0], [-10.0]]])


def test_numpy_conv_transpose_by_hand():
    x = np.array([[[1.0, 2.0]]])
    w = np.array([[[1.0, 10.0, 100.0]]])
    np.testing.assert_array_equal(conv_transpose_nd(x, w), [[[1.0, 12.0, 120.0, 200.0]]])
    np.testing.assert_array_equal(conv_transpose_nd(x, w, padding=1), [[[12.0, 120.0]]])
    # Two groups, one output channel each: weight rows are input channels.
    x2 = np.array([[[1.0], [2.0]]])
    w2 = np.array([[[3.0]], [[5.0]]])
    np.testing.assert_array_equal(conv_transpose_nd(x2, w2, [1.0, 1.0], groups=2),
                                  [[[4.0], [11.0]]])


@pytest.mark.parametrize("spatial,kernel", [((7,), (3,)), ((5, 6), (3, 2))])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_numpy_conv_transpose_is_the_adjoint(spatial, kernel, groups, padding):
    # <conv(x, w), y> == <x, conv_transpose(y, w)> ties the two oracles together.
    rng = np.random.default_rng(1)
    c_in, c_out = 4, 6
    x = rng.normal(size=(2, c_in) + spatial)
    w = rng.normal(size=(c_out, c_in // groups) + kernel)
    y_shape = conv_nd(x, w, padding=padding, groups=groups).shape
    y = rng.normal(size=y_shape)
    lhs = np.vdot(conv_nd(x, w, padding=padding, groups=groups), y)
    rhs = np.vdot(x, conv_transpose_nd(y, w, padding=padding, groups=groups))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


# ---------------------------------------------------------------------------
# BatchNorm.fold()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [
    pytest.param((16, 5), 1, id="NC"),
    pytest.param((3, 4, 5, 6), 1, id="NCHW"),
    pytest.param((3, 5, 6, 4), -1, id="NHWC"),
])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_fold_reproduces_eval(dtype, shape, axis, affine):
    rng = np.random.default_rng(2)
    channels = shape[axis]
    layer = make_layer(channels, rng, dtype=dtype, affine=affine, axis=axis)
    x = rng.normal(1.0, 3.0, shape).astype(dtype)
    scale, shift = layer.fold()
    assert scale.shape == shift.shape == (channels,)
    assert scale.dtype == shift.dtype == np.dtype(dtype)
    bshape = channel_shape(len(shape), axis)
    folded = x.astype(np.float64) * scale.reshape(bshape) + shift.reshape(bshape)
    assert_close(folded, layer(x), dtype=dtype)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_fold_formula(affine):
    rng = np.random.default_rng(3)
    layer = make_layer(6, rng, affine=affine, eps=0.25)
    scale, shift = layer.fold()
    invstd = 1.0 / np.sqrt(layer.running_var + 0.25)
    gamma = layer.weight if affine else np.ones(6)
    beta = layer.bias if affine else np.zeros(6)
    np.testing.assert_allclose(scale, gamma * invstd, rtol=1e-14)
    np.testing.assert_allclose(shift, beta - layer.running_mean * gamma * invstd,
                               rtol=1e-13, atol=1e-14)


def test_fold_needs_eval_mode():
    layer = make_layer(3, np.random.default_rng(4)).train()
    with pytest.raises(ValueError, match="eval"):
        layer.fold()


def test_fold_needs_running_stats():
    layer = cbn.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.fold()


def test_fold_follows_later_edits_and_returns_copies(rng):
    layer = make_layer(3, rng, dtype=np.float64).eval()
    layer.fold()
    layer.running_var[1] = 9.0
    layer.weight[2] = -4.0
    scale, shift = layer.fold()
    expected = expected_scale_shift(layer.weight, layer.bias, layer.running_mean,
                                    layer.running_var, layer.eps)
    assert_close(scale, expected[0], dtype=np.float64)
    assert_close(shift, expected[1], dtype=np.float64)
    scale[...] = 0
    shift[...] = 0
    assert_close(layer.fold()[0], expected[0], dtype=np.float64)
    assert_close(layer(np.ones((2, 3))), eval_oracle(layer, np.ones((2, 3))), dtype=np.float64)


# ---------------------------------------------------------------------------
# fold_into_linear


def linear_case(rng, dtype, position, with_bias, affine, n_in=7, n_out=5):
    weight = rng.normal(0, 0.5, (n_out, n_in)).astype(dtype)
    bias = rng.normal(0, 1, n_out).astype(dtype) if with_bias else None
    layer = make_layer(n_out if position == "after" else n_in, rng, dtype=dtype,
                       affine=affine)
    x = rng.normal(0.5, 2.0, (11, n_in)).astype(dtype)
    return weight, bias, layer, x


def dense(x, weight, bias):
    y = x.astype(np.float64) @ weight.astype(np.float64).T
    return y if bias is None else y + bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_linear_matches_pipeline(dtype, position, with_bias, affine):
    rng = np.random.default_rng(5)
    weight, bias, layer, x = linear_case(rng, dtype, position, with_bias, affine)
    if position == "after":
        expected = layer(dense(x, weight, bias).astype(dtype))
    else:
        expected = dense(layer(x), weight, bias)
    new_w, new_b = fold_into_linear(weight, bias, layer, position=position)
    assert new_w.shape == weight.shape and new_b.shape == (weight.shape[0],)
    assert new_w.dtype == new_b.dtype == np.dtype(dtype)
    assert_close(dense(x, new_w, new_b), expected, dtype=dtype)


def test_linear_default_position_is_after():
    rng = np.random.default_rng(6)
    weight, bias, layer, _ = linear_case(rng, np.float64, "after", True, True, n_in=5)
    for got, want in zip(fold_into_linear(weight, bias, layer),
                         fold_into_linear(weight, bias, layer, position="after")):
        np.testing.assert_array_equal(got, want)
    # Square weight: "before" is a different fold, so the default is meaningful.
    assert not np.allclose(fold_into_linear(weight, bias, layer)[0],
                           fold_into_linear(weight, bias, layer, position="before")[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", ["after", "before"])
def test_linear_leaves_inputs_alone(dtype, position):
    rng = np.random.default_rng(7)
    weight, bias, layer, _ = linear_case(rng, dtype, position, True, True)
    saved = [a.copy() for a in (weight, bias, layer.weight, layer.bias,
                                layer.running_mean, layer.running_var)]
    new_w, new_b = fold_into_linear(weight, bias, layer, position=position)
    for before, after in zip(saved, (weight, bias, layer.weight, layer.bias,
                                     layer.running_mean, layer.running_var)):
        np.testing.assert_array_equal(before, after)
    assert not np.shares_memory(new_w, weight) and not np.shares_memory(new_b, bias)
    assert not layer.training


def test_linear_result_dtype_is_the_weights():
    rng = np.random.default_rng(8)
    layer32 = make_layer(4, rng, dtype=np.float32)
    for wdtype in (np.float16, np.float32, np.float64):
        weight = rng.normal(size=(4, 3)).astype(wdtype)
        new_w, new_b = fold_into_linear(weight, np.zeros(4, np.float64), layer32)
        assert new_w.dtype == new_b.dtype == np.dtype(wdtype)
    # A float64 weight keeps its precision through a float32 layer: only the
    # layer's float32 scale is rounded, not the weight.
    weight = rng.normal(size=(4, 3))
    new_w, _ = fold_into_linear(weight, None, layer32)
    scale = layer32.fold()[0].astype(np.float64)
    np.testing.assert_allclose(new_w, weight * scale[:, None], rtol=1e-15)


def test_linear_big_endian_and_lists():
    rng = np.random.default_rng(9)
    layer = make_layer(3, rng)
    weight = rng.normal(size=(3, 2))
    want_w, want_b = fold_into_linear(weight, None, layer)
    got_w, got_b = fold_into_linear(weight.astype(">f8"), None, layer)
    assert got_w.dtype.isnative and got_b.dtype.isnative
    np.testing.assert_array_equal(got_w, want_w)
    got_w, got_b = fold_into_linear(weight.tolist(), [0.0, 0.0, 0.0], layer)
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_b, want_b)


def test_linear_accepts_duck_typed_layers_and_tensors():
    class Frozen:  # a frozen batch norm: only fold()
        def fold(self):
            return np.array([2.0, -1.0]), np.array([0.5, 3.0])

    weight = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    bias = np.array([1.0, -1.0])
    new_w, new_b = fold_into_linear(FakeTensor(weight), FakeTensor(bias), Frozen())
    np.testing.assert_array_equal(new_w, [[2.0, 4.0, 6.0], [-4.0, -5.0, -6.0]])
    np.testing.assert_array_equal(new_b, [2.5, 4.0])

    class Frozen3:
        def fold(self):
            return np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, -2.0])

    # before: weight * scale per column; bias + weight @ shift = [1 - 6, 4 - 12]
    new_w, new_b = fold_into_linear(weight, None, Frozen3(), position="before")
    np.testing.assert_array_equal(new_w, [[2.0, -2.0, 1.5], [8.0, -5.0, 3.0]])
    np.testing.assert_array_equal(new_b, [-5.0, -8.0])
    with pytest.raises(ValueError, match=_msg("(2, 3)", "num_features=2")):
        fold_into_linear(weight, None, Frozen(), position="before")


def test_layers_with_an_activation_are_refused():
    class FrozenRelu:
        activation = "relu"

        def fold(self):
            return np.ones(2), np.zeros(2)

    weight = np.ones((2, 2, 3))
    with pytest.raises(ValueError, match="FrozenRelu.*activation='relu'"):
        fold_into_linear(weight[..., 0], None, FrozenRelu())
    with pytest.raises(ValueError, match="FrozenRelu.*activation='relu'"):
        fold_into_conv(weight, None, FrozenRelu())


def test_frozen_batch_norm():
    frozen_cls = getattr(cbn, "FrozenBatchNorm", None)
    if frozen_cls is None:
        pytest.skip("this cbn has no FrozenBatchNorm")
    rng = np.random.default_rng(21)
    weight, bias, layer, x = linear_case(rng, np.float64, "after", True, True)
    frozen = frozen_cls(layer.state_dict(), eps=layer.eps)
    expected = frozen(dense(x, weight, bias))
    assert_close(dense(x, *fold_into_linear(weight, bias, frozen)), expected, dtype=np.float64)
    relu = frozen_cls(layer.state_dict(), eps=layer.eps, activation="relu")
    with pytest.raises(ValueError, match="activation='relu'"):
        fold_into_linear(weight, bias, relu)


def _msg(*parts):
    return ".*".join(re.escape(str(p)) for p in parts)


def test_linear_errors():
    rng = np.random.default_rng(10)
    layer = make_layer(4, rng)
    w = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match=_msg("(4, 3, 1)")):
        fold_into_linear(w[..., None], None, layer)
    with pytest.raises(ValueError, match=_msg("(4,)")):
        fold_into_linear(w[:, 0], None, layer)
    with pytest.raises(TypeError, match="int64"):
        fold_into_linear(w.astype(np.int64), None, layer)
    if np.dtype(np.longdouble) != np.dtype(np.float64):  # not silently float64
        with pytest.raises(TypeError, match=str(np.dtype(np.longdouble))):
            fold_into_linear(w.astype(np.longdouble), None, layer)
    with pytest.raises(TypeError, match="complex128"):
        fold_into_linear(w.astype(complex), None, layer)
    with pytest.raises(TypeError, match="bool"):
        fold_into_linear(w, np.ones(4, bool), layer)
    with pytest.raises(ValueError, match=_msg("(5,)", "(4,)", "(4, 3)")):
        fold_into_linear(w, np.zeros(5), layer)
    with pytest.raises(ValueError, match=_msg("(3, 4)", "num_features=4")):
        fold_into_linear(w.T, None, layer)
    with pytest.raises(ValueError, match=_msg("(4, 3)", "num_features=4")):
        fold_into_linear(w, None, layer, position="before")
    with pytest.raises(ValueError, match="position.*'middle'"):
        fold_into_linear(w, None, layer, position="middle")
    with pytest.raises(TypeError, match="dict"):
        fold_into_linear(w, None, {"fold": 1})
    with pytest.raises(ValueError, match="eval"):
        fold_into_linear(w, None, make_layer(4, rng).train())
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_into_linear(w, None, cbn.BatchNorm1d(4, track_running_stats=False).eval())
    with pytest.raises(TypeError):
        fold_into_linear(w, None, layer, "after")  # position is keyword-only


# ---------------------------------------------------------------------------
# fold_into_conv

CONV_CASES = [
    # (input spatial size, kernel, in channels, out channels, groups, padding)
    pytest.param((9,), (3,), 4, 6, 1, 1, id="1d"),
    pytest.param((9,), (2,), 4, 6, 2, 0, id="1d-groups"),
    pytest.param((6, 7), (3, 3), 3, 5, 1, 1, id="2d"),
    pytest.param((6, 7), (3, 2), 4, 6, 2, 1, id="2d-groups"),
    pytest.param((6, 7), (3, 3), 4, 4, 4, 1, id="2d-depthwise"),
    pytest.param((4, 4, 5), (2, 3, 2), 2, 3, 1, 1, id="3d"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spatial,kernel,c_in,c_out,groups,padding", CONV_CASES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv_matches_pipeline(dtype, spatial, kernel, c_in, c_out, groups,
                               padding, with_bias):
    rng = np.random.default_rng(11)
    weight = rng.normal(0, 0.5, (c_out, c_in // groups) + kernel).astype(dtype)
    bias = rng.normal(0, 1, c_out).astype(dtype) if with_bias else None
    layer = make_layer(c_out, rng, dtype=dtype)
    x = rng.normal(0.5, 2.0, (2, c_in) + spatial).astype(dtype)
    expected = layer(conv_nd(x, weight, bias, padding, groups).astype(dtype))
    new_w, new_b = fold_into_conv(weight, bias, layer, groups=groups)
    assert new_w.shape == weight.shape and new_b.shape == (c_out,)
    assert new_w.dtype == new_b.dtype == np.dtype(dtype)
    assert_close(conv_nd(x, new_w, new_b, padding, groups), expected, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spatial,kernel,c_in,c_out,groups,padding", CONV_CASES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_conv_transpose_matches_pipeline(dtype, spatial, kernel, c_in, c_out,
                                         groups, padding, affine):
    rng = np.random.default_rng(12)
    weight = rng.normal(0, 0.5, (c_in, c_out // groups) + kernel).astype(dtype)
    bias = rng.normal(0, 1, c_out).astype(dtype)
    layer = make_layer(c_out, rng, dtype=dtype, affine=affine)
    x = rng.normal(0.5, 2.0, (2, c_in) + spatial).astype(dtype)
    expected = layer(conv_transpose_nd(x, weight, bias, padding, groups).astype(dtype))
    new_w, new_b = fold_into_conv(weight, bias, layer, transposed=True, groups=groups)
    assert new_w.shape == weight.shape and new_b.shape == (c_out,)
    assert_close(conv_transpose_nd(x, new_w, new_b, padding, groups), expected, dtype=dtype)


def test_conv_transpose_groups_matter():
    # 2 groups of 2 output channels: scaling by the output axis alone would be
    # the groups=1 fold, which gets a grouped transposed convolution wrong.
    rng = np.random.default_rng(13)
    weight = rng.normal(size=(4, 2, 3))
    layer = make_layer(4, rng)
    grouped, _ = fold_into_conv(weight, None, layer, transposed=True, groups=2)
    scale = layer.fold()[0]
    np.testing.assert_allclose(grouped[:2], weight[:2] * scale[:2, None], rtol=1e-15)
    np.testing.assert_allclose(grouped[2:], weight[2:] * scale[2:, None], rtol=1e-15)
    with pytest.raises(ValueError, match="num_features=4"):
        fold_into_conv(weight, None, layer, transposed=True)  # 2 output channels


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_leaves_inputs_alone(dtype):
    rng = np.random.default_rng(14)
    weight = rng.normal(size=(4, 2, 3, 3)).astype(dtype)
    bias = rng.normal(size=4).astype(dtype)
    layer = make_layer(4, rng, dtype=dtype)
    saved = weight.copy(), bias.copy(), layer.running_var.copy()
    for transposed, groups in [(False, 1), (True, 2)]:
        new_w, new_b = fold_into_conv(weight, bias, layer, transposed=transposed,
                                      groups=groups)
        assert not np.shares_memory(new_w, weight) and not np.shares_memory(new_b, bias)
    np.testing.assert_array_equal(saved[0], weight)
    np.testing.assert_array_equal(saved[1], bias)
    np.testing.assert_array_equal(saved[2], layer.running_var)


def test_conv_errors():
    rng = np.random.default_rng(15)
    layer = make_layer(4, rng)
    w = rng.normal(size=(4, 2, 3))
    with pytest.raises(ValueError, match=_msg("(4, 2)")):
        fold_into_conv(w[..., 0], None, layer)
    with pytest.raises(TypeError, match="int32"):
        fold_into_conv(w.astype(np.int32), None, layer)
    with pytest.raises(ValueError, match=_msg("(3,)", "(4,)", "(4, 2, 3)")):
        fold_into_conv(w, np.zeros(3), layer)
    with pytest.raises(ValueError, match=_msg("(5, 2, 3)", "num_features=4")):
        fold_into_conv(rng.normal(size=(5, 2, 3)), None, layer)
    with pytest.raises(ValueError,
                       match=_msg("(3, 2, 3)", "groups=3", "6 output", "num_features=4")):
        fold_into_conv(rng.normal(size=(3, 2, 3)), None, layer, transposed=True, groups=3)
    with pytest.raises(ValueError, match=_msg("groups=3", "(4, 2, 3)")):
        fold_into_conv(w, None, layer, groups=3)
    with pytest.raises(ValueError, match=_msg("groups=3", "(4, 2, 3)")):
        fold_into_conv(w, None, layer, transposed=True, groups=3)
    with pytest.raises(ValueError, match="groups.*0"):
        fold_into_conv(w, None, layer, groups=0)
    with pytest.raises(TypeError, match="groups.*float"):
        fold_into_conv(w, None, layer, groups=2.0)
    with pytest.raises(TypeError, match="transposed.*str"):
        fold_into_conv(w, None, layer, transposed="yes")
    with pytest.raises(TypeError, match="NoneType"):
        fold_into_conv(w, None, None)
    with pytest.raises(ValueError, match="eval"):
        fold_into_conv(w, None, make_layer(4, rng).train())
    with pytest.raises(TypeError):
        fold_into_conv(w, None, layer, position="before")  # no fold before a conv


# ---------------------------------------------------------------------------
# Against PyTorch (each test skips when torch is not installed)


def torch_bn_args(layer, torch, ones_for_plain=False):
    """fuse_*_bn_weights' bn arguments from a cbn layer."""
    t = torch.from_numpy
    weight, bias = layer.weight, layer.bias
    if weight is None and ones_for_plain:  # fuse_linear_bn_weights needs them
        weight = np.ones(layer.num_features, layer.dtype)
        bias = np.zeros(layer.num_features, layer.dtype)
    return (t(layer.running_mean.copy()), t(layer.running_var.copy()), layer.eps,
            None if weight is None else t(weight.copy()),
            None if bias is None else t(bias.copy()))


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_linear_against_torch(dtype, with_bias, affine):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_weights
    rng = np.random.default_rng(16)
    weight, bias, layer, _ = linear_case(rng, dtype, "after", with_bias, affine)
    want_w, want_b = fuse_linear_bn_weights(
        torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
        *torch_bn_args(layer, torch, ones_for_plain=True))
    got_w, got_b = fold_into_linear(weight, bias, layer)
    assert_close(got_w, want_w.detach().numpy(), dtype=dtype)
    assert_close(got_b, want_b.detach().numpy(), dtype=dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [(3,), (3, 2), (2, 2, 2)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_conv_against_torch(dtype, kernel, transposed, affine):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    rng = np.random.default_rng(17)
    weight = rng.normal(size=(3, 5) + kernel).astype(dtype)
    bias = rng.normal(size=5 if transposed else 3).astype(dtype)
    layer = make_layer(bias.shape[0], rng, dtype=dtype, affine=affine)
    for b in (bias, None):  # torch's fold is for groups=1 only when transposed
        want_w, want_b = fuse_conv_bn_weights(
            torch.from_numpy(weight), None if b is None else torch.from_numpy(b),
            *torch_bn_args(layer, torch), transpose=transposed)
        got_w, got_b = fold_into_conv(weight, b, layer, transposed=transposed)
        assert_close(got_w, want_w.detach().numpy(), dtype=dtype)
        assert_close(got_b, want_b.detach().numpy(), dtype=dtype)


@pytest.mark.torch
@pytest.mark.parametrize("c_in,c_out,groups", [(4, 6, 2), (4, 4, 4), (6, 3, 3), (3, 4, 1)])
@pytest.mark.parametrize("dims", [1, 2])
def test_grouped_conv_transpose_against_torch_modules(c_in, c_out, groups, dims):
    # torch.nn.utils.fusion mishandles groups > 1 for transposed convolutions,
    # so the oracle is torch's own ConvTranspose followed by its BatchNorm.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(18)
    conv_cls = torch.nn.ConvTranspose1d if dims == 1 else torch.nn.ConvTranspose2d
    bn_cls = torch.nn.BatchNorm1d if dims == 1 else torch.nn.BatchNorm2d
    conv = conv_cls(c_in, c_out, 3, padding=1, groups=groups).double()
    layer = make_layer(c_out, rng)
    bn = bn_cls(c_out, eps=layer.eps).double()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(torch.from_numpy(getattr(layer, name)))
    conv.eval(), bn.eval()
    x = torch.from_numpy(rng.normal(size=(2, c_in) + (5,) * dims))
    with torch.no_grad():
        expected = bn(conv(x)).numpy()
    new_w, new_b = fold_into_conv(conv.weight, conv.bias, layer, transposed=True,
                                  groups=groups)
    assert isinstance(new_w, np.ndarray) and isinstance(new_b, np.ndarray)
    F = torch.nn.functional
    fn = F.conv_transpose1d if dims == 1 else F.conv_transpose2d
    got = fn(x, torch.from_numpy(new_w), torch.from_numpy(new_b), padding=1,
             groups=groups).numpy()
    assert_close(got, expected, dtype=np.float64)


@pytest.mark.torch
@pytest.mark.parametrize("groups", [1, 2])
def test_numpy_convs_against_torch(groups):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(19)
    x = rng.normal(size=(2, 4, 5, 6))
    w = rng.normal(size=(6, 4 // groups, 3, 2))
    b = rng.normal(size=6)
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                    padding=1, groups=groups).numpy()
    np.testing.assert_allclose(conv_nd(x, w, b, 1, groups), want, rtol=1e-12, atol=1e-12)
    wt = rng.normal(size=(4, 6 // groups, 3, 2))
    want = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b),
                              padding=1, groups=groups).numpy()
    np.testing.assert_allclose(conv_transpose_nd(x, wt, b, 1, groups), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.torch
def test_torch_tensors_in():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(20)
    layer = make_layer(3, rng, dtype=np.float32)
    weight = rng.normal(size=(3, 4)).astype(np.float32)
    tensor = torch.from_numpy(weight.copy()).requires_grad_()
    got_w, got_b = fold_into_linear(tensor, None, layer)
    want_w, want_b = fold_into_linear(weight, None, layer)
    assert isinstance(got_w, np.ndarray) and got_w.dtype == np.float32
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_b, want_b)
