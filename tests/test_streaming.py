"""Outputs too large for the cache are written with streaming stores.

The values must not change: an elementwise result on a large array equals
the same computation on pieces small enough to take the ordinary stores, bit
for bit, whatever the alignment of the arrays and the length of the runs.
"""
import numpy as np
import pytest

import cbn
from cbn._dispatch import kernels

from corpus import per_channel


def large_shapes(itemsize):
    """Layouts just over the streaming threshold; odd run lengths and row
    widths put the runs at every alignment."""
    n = kernels.stream_min_bytes() // itemsize + 1
    return [
        pytest.param((n // 1021 + 1, 1021), 1, id="NC"),
        pytest.param((n // (53 * 1237) + 1, 53, 1237), 1, id="NCL-odd-runs"),
        pytest.param((n // (7 * 33) + 1, 7, 33), 1, id="NCL-short-runs"),
        pytest.param((n // (16 * 30 * 30) + 1, 16, 30, 30), 1, id="NCHW"),
        pytest.param((n // (13 * 11 * 24) + 1, 13, 11, 24), -1, id="NHWC"),
    ]


CASES = [pytest.param(dtype, *p.values, id=f"{np.dtype(dtype).name}-{p.id}")
         for dtype in (np.float32, np.float64)
         for p in large_shapes(np.dtype(dtype).itemsize)]


def misaligned(rng, shape, dtype, offset=3.0):
    """A C-contiguous array whose data starts one element past an aligned address."""
    size = int(np.prod(shape))
    buffer = np.empty(size + 1, dtype)
    array = buffer[1:].reshape(shape)
    array[...] = rng.standard_normal(shape) + offset
    return array


def in_pieces(function, axis, *arrays):
    """``function`` applied to slices of the batch axis small enough that
    their outputs take ordinary stores, concatenated."""
    batch_axis = 0 if axis % arrays[0].ndim != 0 else 1
    length = arrays[0].shape[batch_axis]
    pieces = []
    for start in range(0, length, max(1, length // 8)):
        index = [slice(None)] * arrays[0].ndim
        index[batch_axis] = slice(start, start + max(1, length // 8))
        pieces.append(function(*(np.ascontiguousarray(a[tuple(index)]) for a in arrays)))
    return np.concatenate(pieces, axis=batch_axis)


@pytest.mark.parametrize("dtype, shape, axis", CASES)
def test_streamed_outputs_match_ordinary_stores(rng, dtype, shape, axis):
    x = misaligned(rng, shape, dtype)
    assert x.nbytes >= kernels.stream_min_bytes()
    num_channels = shape[axis]
    weight = rng.uniform(0.5, 2, num_channels)
    bias = rng.uniform(-1, 1, num_channels)
    out = misaligned(rng, shape, dtype)

    # Training forward, streamed, against inference with the batch statistics
    # on small pieces: the same per-channel arithmetic, elementwise.
    y, mean, invstd = cbn.batch_norm_forward(x, weight, bias, axis=axis, out=out)
    assert y is out
    var = 1.0 / invstd**2 - 1e-5
    expected = in_pieces(
        lambda piece: cbn.batch_norm(piece, mean, var, weight, bias, axis=axis), axis, x)
    np.testing.assert_allclose(y, expected, rtol=1e-6 if dtype == np.float64 else 1e-5,
                               atol=1e-6 if dtype == np.float64 else 1e-5)
    inference = cbn.batch_norm(x, mean, var, weight, bias, axis=axis)
    assert inference.tobytes() == expected.tobytes()

    # Inference-mode backward: dx = dy * invstd * weight, elementwise.
    dy = misaligned(rng, shape, dtype, offset=0.0)
    dx, _, _ = cbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                       training=False)
    expected_dx = in_pieces(
        lambda dy_piece, x_piece: cbn.batch_norm_backward(
            dy_piece, x_piece, mean, invstd, weight, axis=axis, training=False)[0],
        axis, dy, x)
    assert dx.tobytes() == expected_dx.tobytes()

    # Training-mode backward against the float64 formula.
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                                         axis=axis)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    x_hat = (x64 - per_channel(mean, x.ndim, axis)) * per_channel(invstd, x.ndim, axis)
    mean_dy = dy64.mean(axis=reduce_axes, keepdims=True)
    mean_dy_xhat = (dy64 * x_hat).mean(axis=reduce_axes, keepdims=True)
    expected_dx = ((dy64 - mean_dy - x_hat * mean_dy_xhat)
                   * per_channel(invstd * weight, x.ndim, axis))
    tolerance = 1e-9 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(dx, expected_dx, rtol=tolerance, atol=tolerance)
