"""Arrays of more than 2**31 elements (opt-in: CBN_LARGE_TESTS=1; 17 GB).

The kernels index with Py_ssize_t; a 32-bit index anywhere would wrap before
the end of these arrays. The data are laid out so that every statistic and
output is known exactly, and the last element (index > 2**31) is checked.
"""
import os

import numpy as np
import pytest

import cbn

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(os.environ.get("CBN_LARGE_TESTS") != "1",
                       reason="opt-in: CBN_LARGE_TESTS=1 (needs about 17 GB of memory)"),
]

# (N, C, L): 2**31 + 1024 float32 elements, 8 GiB. Channel 0 alternates 11
# and 9 (mean 10, variance 1), channel 1 alternates 7 and 3 (mean 5, var 4).
SHAPE = (8, 2, 2**27 + 64)
MEAN, VAR = np.array([10.0, 5.0]), np.array([1.0, 4.0])


def alternating():
    x = np.empty(SHAPE, np.float32)
    x[:, 0, 0::2], x[:, 0, 1::2] = 11, 9
    x[:, 1, 0::2], x[:, 1, 1::2] = 7, 3
    return x


def check_output(y, eps=1e-5):
    # x = mean +- sqrt(var), so y = +-sqrt(var / (var + eps)) per element.
    step = np.sqrt(VAR / (VAR + eps))
    for c in range(2):
        for index in ((0, c, 0), (0, c, 1), (SHAPE[0] - 1, c, SHAPE[2] - 2),
                      (SHAPE[0] - 1, c, SHAPE[2] - 1)):
            sign = 1 if index[2] % 2 == 0 else -1
            assert y[index] == pytest.approx(sign * step[c], rel=1e-6), index
    assert np.ravel_multi_index((SHAPE[0] - 1, 1, SHAPE[2] - 1), SHAPE) > 2**31


def test_training_forward_beyond_two_to_the_31_elements():
    assert np.prod(SHAPE) > 2**31
    layer = cbn.BatchNorm(2, momentum=1.0)
    y = layer(alternating())
    check_output(y)
    n = np.prod(SHAPE) // 2
    np.testing.assert_allclose(layer.running_mean, MEAN, rtol=1e-7)
    np.testing.assert_allclose(layer.running_var, VAR * n / (n - 1), rtol=1e-7)


def test_eval_in_place_beyond_two_to_the_31_elements():
    layer = cbn.BatchNorm(2).eval()
    layer.running_mean[...] = MEAN
    layer.running_var[...] = VAR
    x = alternating()
    assert layer(x, out=x) is x
    check_output(x)
