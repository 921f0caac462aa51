"""cbn.Moments: exact merges in any chunking and order, against an exactly
rounded two-pass reference (math.fsum), and its errors."""
import math
import pickle

import numpy as np
import pytest

import cbn


def fsum_reference(values):
    """Mean and biased variance of a 1D float64 array, each exactly rounded
    sum (two passes)."""
    mean = math.fsum(values) / values.size
    return mean, math.fsum((values - mean) ** 2) / values.size


def columns(x, axis):
    """The float64 values of each channel of ``x``."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64).T


def random_chunks(rng, x, count):
    """``x`` split along axis 0 into ``count`` chunks of random sizes,
    empty ones included."""
    cuts = np.sort(rng.integers(0, x.shape[0] + 1, count - 1))
    return np.split(x, cuts)


def check_exact(moments, x, axis, var_tol):
    for c, values in enumerate(columns(x, axis)):
        mean, var = fsum_reference(values)
        std = math.sqrt(var)
        assert abs(moments.mean[c] - mean) <= 1e-13 * (abs(mean) + std), c
        assert abs(moments.var()[c] - var) <= var_tol * var, c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_any_chunking_and_order_is_exact(dtype, seed):
    rng = np.random.default_rng(seed)
    offset = 10.0 ** rng.uniform(0, 6)   # |mean| / std up to 1e6
    std = 10.0 ** rng.uniform(-3, 3)
    n = int(rng.integers(2, 6000))
    x = (rng.standard_normal((n, 3)) * std + offset * std).astype(dtype)
    chunks = random_chunks(rng, x, int(rng.integers(1, min(1000, n) + 1)))
    order = rng.permutation(len(chunks))
    merged = cbn.Moments.merge_all(cbn.Moments.of(chunks[k]) for k in order)
    assert merged.count == n
    check_exact(merged, np.concatenate([chunks[k] for k in order]), 1, 1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_value_chunks_at_offset_1e6(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1000, 2)) - 1e6).astype(dtype)
    merged = cbn.Moments(2)
    for k in rng.permutation(1000):
        merged.update(x[k:k + 1])
    check_exact(merged, x, 1, 1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_chunks_within_1e_11(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40_000, 2)) * 0.5 + 3e5).astype(dtype)
    chunks = np.split(x, np.sort(rng.integers(0, 40_000, 20)))
    merged = cbn.Moments.merge_all(cbn.Moments.of(c) for c in chunks if len(c) >= 1000)
    kept = np.concatenate([c for c in chunks if len(c) >= 1000])
    check_exact(merged, kept, 1, 1e-11)


def test_sum_of_squares_would_fail_where_moments_hold():
    """The reason for (count, mean, M2): at offset 1e8 (beyond the 1e6 that
    the 1e-10 bound covers) float64 sums of x and x**2 lose the variance,
    the merge keeps it to about 2e-10 with chunks of 100 values."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 1)) + 1e8
    chunks = np.split(x, 40)
    naive = np.sum(x ** 2) / x.size - np.mean(x) ** 2
    _, exact = fsum_reference(x[:, 0])
    assert abs(naive - exact) > 0.1 * exact
    merged = cbn.Moments.merge_all(cbn.Moments.of(c) for c in chunks)
    assert abs(merged.var()[0] - exact) <= 1e-9 * exact


@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1),
                                         ((7, 3), 1), ((2, 3, 9), 1)])
def test_layouts_and_dtypes(shape, axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 2 + 5
    for dtype in (np.float16, np.float32, np.float64):
        data = x.astype(dtype)
        m = cbn.Moments.of(data, axis=axis)
        assert m.mean.dtype == np.float64 and m.m2.dtype == np.float64
        assert m.count == data.size // 3
        check_exact(m, data, axis, 1e-12)
    strided = x.astype(np.float32)[::2]
    check_exact(cbn.Moments.of(strided, axis=axis), strided, axis, 1e-12)


def test_same_chunks_same_order_same_bits():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 4)) * 1e-3 + 1e3
    chunks = random_chunks(rng, x, 50)
    a = cbn.Moments.merge_all(cbn.Moments.of(c) for c in chunks).to_array()
    b = cbn.Moments(4)
    for c in chunks:
        b.update(c)
    assert a.tobytes() == b.to_array().tobytes()


def test_empty_objects_and_batches():
    m = cbn.Moments(3)
    assert m.count == 0 and m.num_features == 3
    assert np.isnan(m.var()).all() and np.isnan(m.var(ddof=1)).all()
    m.update(np.empty((0, 3), np.float32))
    assert m.count == 0
    one = cbn.Moments.of(np.array([[1.0, 2.0, 3.0]]))
    assert one.count == 1
    np.testing.assert_array_equal(one.var(), np.zeros(3))
    assert np.isnan(one.var(ddof=1)).all()
    assert one.merge(cbn.Moments(3)).to_array().tobytes() == one.to_array().tobytes()
    assert cbn.Moments(3).merge(one).to_array().tobytes() == one.to_array().tobytes()


def test_var_ddof():
    x = np.arange(10.0).reshape(5, 2)
    m = cbn.Moments.of(x)
    np.testing.assert_allclose(m.var(), x.var(axis=0), rtol=1e-15)
    np.testing.assert_allclose(m.var(ddof=1), x.var(axis=0, ddof=1), rtol=1e-15)
    assert np.isnan(m.var(ddof=5)).all()
    with pytest.raises(TypeError, match="ddof"):
        m.var(ddof="1")


def test_merge_leaves_both_unchanged_and_update_returns_self():
    rng = np.random.default_rng(4)
    a = cbn.Moments.of(rng.standard_normal((10, 2)))
    b = cbn.Moments.of(rng.standard_normal((7, 2)))
    before = a.to_array(), b.to_array()
    merged = a.merge(b)
    assert merged.count == 17 and merged is not a and merged is not b
    np.testing.assert_array_equal(a.to_array(), before[0])
    np.testing.assert_array_equal(b.to_array(), before[1])
    assert a.update(np.ones((3, 2))) is a and a.count == 13


def test_attributes_cannot_be_changed_behind_its_back():
    m = cbn.Moments.of(np.ones((3, 2)))
    with pytest.raises(ValueError):
        m.mean[0] = 5
    with pytest.raises(AttributeError):
        m.count = 4


def test_wire_format_and_pickle():
    rng = np.random.default_rng(5)
    m = cbn.Moments.of(rng.standard_normal((9, 4)) + 3)
    packed = m.to_array()
    assert packed.shape == (9,) and packed.dtype == np.float64 and packed[0] == 9
    back = cbn.Moments.from_array(packed)
    assert back.to_array().tobytes() == packed.tobytes()
    for copy in (pickle.loads(pickle.dumps(m)), pickle.loads(pickle.dumps(cbn.Moments(2)))):
        assert isinstance(copy, cbn.Moments)
    assert pickle.loads(pickle.dumps(m)).to_array().tobytes() == packed.tobytes()
    assert repr(m) == "Moments(num_features=4, count=9)"


@pytest.mark.parametrize("bad, error", [
    (np.zeros(4), ValueError), (np.zeros((3, 3)), ValueError), (np.zeros(1), ValueError),
    (np.array([-1.0, 0, 0]), ValueError), (np.array([1.5, 0, 0]), ValueError),
    (np.array([np.nan, 0, 0]), ValueError), ([1.0, 0, 0], TypeError),
    (np.array(["1", "0", "0"]), TypeError),
])
def test_from_array_rejects(bad, error):
    with pytest.raises(error):
        cbn.Moments.from_array(bad)


def test_errors_leave_the_object_unchanged():
    m = cbn.Moments.of(np.ones((4, 3)))
    before = m.to_array()
    with pytest.raises(ValueError, match=r"expects 3 channels.*\(4, 5\)"):
        m.update(np.ones((4, 5)))
    with pytest.raises(ValueError, match="axis"):
        m.update(np.ones((4, 3)), axis=4)
    with pytest.raises(TypeError):
        m.update(["a", "b", "c"])
    with pytest.raises(TypeError):
        m.update(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match="4 channels into moments of 3"):
        m.merge(cbn.Moments(4))
    with pytest.raises(TypeError, match="Moments"):
        m.merge(np.ones(3))
    np.testing.assert_array_equal(m.to_array(), before)
    with pytest.raises(ValueError, match="at least one"):
        cbn.Moments.merge_all([])
    with pytest.raises(TypeError, match="position 1"):
        cbn.Moments.merge_all([m, "x"])
    with pytest.raises(ValueError, match="position 1"):
        cbn.Moments.merge_all([m, cbn.Moments(2)])
    with pytest.raises(ValueError):
        cbn.Moments(0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        cbn.Moments.of(np.ones(3))


@pytest.mark.parametrize("shape, axis", [((6, 2), 1), ((3, 2, 40), 1), ((3, 4, 2), -1)])
@pytest.mark.parametrize("where", [0, 1, -1])
def test_an_infinite_value_gives_an_infinite_mean_wherever_it_sits(shape, axis, where):
    """As one sum over the data would (NumPy's and PyTorch's mean): inf, not
    the NaN of inf - inf, in the first value of a block or elsewhere, and
    through merges; the variance is NaN."""
    x = np.ones(shape)
    index = [slice(None)] * len(shape)
    index[axis] = 1
    channel = x[tuple(index)]   # a view
    channel[list(np.ndindex(channel.shape))[where]] = np.inf
    assert np.isinf(x).sum() == 1
    whole = cbn.Moments.of(x, axis=axis)
    parts = cbn.Moments.merge_all(cbn.Moments.of(c, axis=axis) for c in np.array_split(x, 3))
    mean, var = cbn.batch_stats(x, axis=axis)
    for got in (whole.mean, parts.mean, mean):
        assert got[0] == 1 and got[1] == np.inf
    assert np.isnan(whole.var()[1]) and np.isnan(var[1])
    assert np.mean(np.moveaxis(x, axis, -1)[..., 1]) == np.inf
