"""cbn.dask: moments of Dask arrays and eval layers applied block by block.

The moments are checked against an exactly rounded two-pass reference
(math.fsum) and against ``cbn.Moments.of`` of the whole array, and their
bits are compared between the synchronous scheduler, the threaded one at
several worker counts and a two-process distributed cluster on the loopback
interface. ``apply`` must give the bits of the layer called on the computed
array. The opt-in large test (CBN_LARGE_TESTS=1) takes the moments of a
4 GiB file in a process that never holds more than a few blocks.
"""
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cbn

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
cbn_dask = pytest.importorskip("cbn.dask")

# The exactness bound of cbn.Moments: the mean within 1e-13 * (|mean| + std)
# and the variance within 1e-10 relative of the exactly rounded reference.
MEAN_BOUND, VAR_BOUND = 1e-13, 1e-10

# (shape, chunks, axis): chunks split the channel axis, are uneven, empty.
CASES = [
    ((300, 7), (64, 7), 1),
    ((97, 5), (10, 2), 1),                          # channels split 2 + 2 + 1
    ((40, 6, 50), (7, 4, 13), 1),
    ((12, 5, 9, 8), (5, 2, 4, 8), 1),               # NCHW
    ((12, 9, 8, 5), (5, 4, 3, 2), -1),              # NHWC, channels split
    ((20, 4, 3), ((0, 6, 0, 14), (1, 3), (3,)), 1),  # empty blocks
    ((30, 3, 4, 5), ((30,), (3,), (4,), (5,)), 1),  # one block
]
CASE_IDS = [f"{'x'.join(map(str, shape))}-axis{axis}-{i}"
            for i, (shape, _, axis) in enumerate(CASES)]


def make_data(shape, axis, dtype, seed):
    """Values with a per-channel offset of about 1e3 and std about 1 to 5."""
    rng = np.random.default_rng(seed)
    C = shape[axis]
    along = [1] * len(shape)
    along[axis] = C
    offset = rng.uniform(-1e3, 1e3, C).reshape(along)
    spread = rng.uniform(1, 5, C).reshape(along)
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


def fsum_reference(a, axis):
    """(count, mean, biased var) per channel: exactly rounded sums, two passes."""
    columns = np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]).astype(np.float64)
    count = columns.shape[0]
    mean = np.array([math.fsum(column) / count for column in columns.T])
    var = np.array([math.fsum((column - m) ** 2) / count
                    for column, m in zip(columns.T, mean)])
    return count, mean, var


def assert_within_bound(moments, a, axis):
    count, mean, var = fsum_reference(a, axis)
    assert moments.count == count
    assert np.all(np.abs(moments.mean - mean) <= MEAN_BOUND * (np.abs(mean) + np.sqrt(var)))
    assert np.all(np.abs(moments.var() - var) <= VAR_BOUND * var)


def bits(moments):
    return moments.to_array().tobytes()


def run_with_timeout(function, seconds=120):
    """``function()`` in a thread, failing the test instead of hanging."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(function).result(timeout=seconds)


@pytest.fixture(scope="module")
def client():
    """A two-process distributed cluster on the loopback interface, closed
    whatever happens."""
    distributed = pytest.importorskip("distributed")
    cluster = run_with_timeout(lambda: distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=40), 120)
    try:
        client = distributed.Client(cluster, timeout="60s", set_as_default=False)
        try:
            yield client
        finally:
            client.close(timeout=30)
    finally:
        cluster.close(timeout=30)


# ---------------------------------------------------------------------------
# moments


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "chunks", "axis"), CASES, ids=CASE_IDS)
def test_moments_are_exact_and_the_same_for_every_scheduler(shape, chunks, axis, dtype):
    a = make_data(shape, axis, dtype, seed=len(CASES) * shape[0] + shape[axis])
    x = da.from_array(a, chunks=chunks)
    with dask.config.set(scheduler="sync"):
        sync = cbn_dask.moments(x, axis=axis)
    assert isinstance(sync, cbn.Moments)
    assert sync.num_features == a.shape[axis]
    assert_within_bound(sync, a, axis)
    assert_within_bound(cbn.Moments.of(a, axis=axis), a, axis)   # the same bound
    for workers in (1, 2, 4):
        with dask.config.set(scheduler="threads", num_workers=workers):
            assert bits(cbn_dask.moments(x, axis=axis)) == bits(sync), workers


def test_moments_are_the_same_on_a_distributed_cluster(client):
    with dask.config.set(scheduler=client):
        for k, (shape, chunks, axis) in enumerate(CASES):
            for dtype in (np.float32, np.float64):
                a = make_data(shape, axis, dtype, seed=k)
                x = da.from_array(a, chunks=chunks)
                on_cluster = run_with_timeout(lambda x=x, axis=axis:
                                              cbn_dask.moments(x, axis=axis))
                with dask.config.set(scheduler="sync"):
                    assert bits(on_cluster) == bits(cbn_dask.moments(x, axis=axis)), k
                assert_within_bound(on_cluster, a, axis)


def test_moments_of_many_blocks_at_a_large_offset():
    # 600 blocks: a tree of four levels; an offset of 1e6 std, where sums of
    # squares would have lost the variance.
    a = make_data((600, 3, 20), 1, np.float64, seed=7)
    a += np.array([1e6, -3e6, 0.0])[:, None]
    x = da.from_array(a, chunks=(1, 3, 20))
    with dask.config.set(scheduler="threads", num_workers=2):
        threaded = cbn_dask.moments(x)
    with dask.config.set(scheduler="sync"):
        assert bits(cbn_dask.moments(x)) == bits(threaded)
    assert_within_bound(threaded, a, 1)


def test_moments_of_float16_and_of_a_transposed_dask_array():
    a = make_data((50, 4, 6), 1, np.float16, seed=3)
    assert_within_bound(cbn_dask.moments(da.from_array(a, chunks=(7, 3, 4))), a, 1)
    t = da.from_array(a, chunks=(7, 3, 4)).transpose(0, 2, 1)   # channels last, lazily
    assert_within_bound(cbn_dask.moments(t, axis=2), a, 1)


def test_moments_of_an_empty_array_have_count_zero():
    m = cbn_dask.moments(da.zeros((0, 3, 5), chunks=(1, 2, 5)))
    assert m.count == 0 and m.num_features == 3


def test_moments_with_unknown_chunk_sizes_off_the_channel_axis():
    a = make_data((60, 3), 1, np.float64, seed=5)
    x = da.from_array(a, chunks=(16, 3))
    x = x[x[:, 0] > x[:, 0].mean()]            # unknown row chunks
    assert np.isnan(x.shape[0])
    kept = a[a[:, 0] > a[:, 0].mean()]
    assert_within_bound(cbn_dask.moments(x), kept, 1)


@pytest.mark.parametrize(("x", "kwargs", "error", "match"), [
    (np.ones((4, 3)), {}, TypeError, r"NumPy array: use cbn\.Moments\.of"),
    ([[1.0, 2.0]], {}, TypeError, "expects a Dask array, got list"),
    (da.ones(5), {}, ValueError, "at least 2 dimensions"),
    (da.ones((4, 3)), {"axis": 2}, ValueError, "axis 2 is out of bounds"),
    (da.ones((4, 3)), {"axis": -3}, ValueError, "axis -3 is out of bounds"),
    (da.ones((4, 3)), {"axis": 1.0}, TypeError, "axis must be an integer"),
    (da.ones((4, 3), dtype=np.int64), {}, TypeError, "dtype int64"),
    (da.ones((4, 0)), {}, ValueError, "no channels"),
], ids=["numpy", "list", "1d", "axis", "negative-axis", "float-axis", "int", "no-channels"])
def test_moments_refuse_what_they_cannot_take(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        cbn_dask.moments(x, **kwargs)


def test_moments_refuse_unknown_channel_chunks():
    x = da.from_array(np.ones((4, 6)), chunks=(2, 3))
    x = x[:, x[0] > 0]
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        cbn_dask.moments(x)


def test_calibrate_from_dask_moments_equals_calibrate_from_the_batches():
    a = make_data((64, 5, 6, 6), 1, np.float32, seed=11)
    x = da.from_array(a, chunks=(10, 2, 6, 3))
    from_dask, from_batches = cbn.BatchNorm2d(5), cbn.BatchNorm2d(5)
    from_dask.calibrate(cbn_dask.moments(x))
    from_batches.calibrate([a[k:k + 16] for k in range(0, 64, 16)])
    count, mean, var = fsum_reference(a, 1)
    np.testing.assert_allclose(from_dask.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(from_dask.running_var, var * count / (count - 1), rtol=1e-6)
    # float32 statistics from float64 moments: equal to within one rounding
    np.testing.assert_allclose(from_dask.running_mean, from_batches.running_mean, rtol=2e-7)
    np.testing.assert_allclose(from_dask.running_var, from_batches.running_var, rtol=2e-7)


# ---------------------------------------------------------------------------
# apply


def eval_layer(C, *, axis=1, dtype=np.float32, seed=0, **options):
    rng = np.random.default_rng(seed)
    layer = cbn.BatchNorm(C, axis=axis, dtype=dtype, **options)
    layer.running_mean[...] = rng.uniform(-50, 50, C)
    layer.running_var[...] = rng.uniform(0.5, 4, C)
    if layer.weight is not None:
        layer.weight[...] = rng.uniform(-2, 2, C)
    if layer.bias is not None:
        layer.bias[...] = rng.uniform(-1, 1, C)
    return layer.eval()


LAYERS = {
    "eval": dict(),
    "eval-relu": dict(activation="relu"),
    "eval-float64-params": dict(dtype=np.float64),
    "eval-no-affine": dict(affine=False),
    "eval-no-bias": dict(bias=False),
    "frozen": dict(frozen=True),
    "frozen-relu": dict(frozen=True, activation="relu"),
}
APPLY_CASES = [
    ((6, 5, 7, 4), (4, 2, 3, 4), 1),       # NCHW, channels split 2 + 2 + 1
    ((6, 7, 4, 5), (4, 3, 4, 2), -1),      # channels last, split
    ((50, 9), (13, 4), 1),
    ((10, 6, 33), ((3, 0, 7), (6,), (16, 17)), 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "chunks", "axis"), APPLY_CASES,
                         ids=["NCHW", "NHWC", "NC", "NCL-empty-block"])
@pytest.mark.parametrize("form", list(LAYERS))
def test_apply_gives_the_bits_of_the_layer_on_the_whole_array(form, shape, chunks, axis,
                                                               dtype):
    options = dict(LAYERS[form])
    frozen = options.pop("frozen", False)
    layer = eval_layer(shape[axis], axis=axis, seed=len(form), **options)
    if frozen:
        layer = layer.freeze()
    a = make_data(shape, axis, dtype, seed=1) / 20
    x = da.from_array(a, chunks=chunks)
    y = cbn_dask.apply(layer, x)
    assert y.dtype == a.dtype and y.shape == a.shape and y.chunks == x.chunks
    with dask.config.set(scheduler="threads", num_workers=2):
        computed = y.compute()
    expected = layer(a)
    assert computed.dtype == expected.dtype
    assert computed.tobytes() == expected.tobytes()
    if "relu" in form:
        assert (computed == 0).any() and (computed > 0).any()


def test_apply_on_a_distributed_cluster(client):
    layer = eval_layer(5, activation="relu", seed=3)
    a = make_data((6, 5, 7, 4), 1, np.float32, seed=2) / 20
    y = cbn_dask.apply(layer, da.from_array(a, chunks=(4, 2, 3, 4)))
    computed = run_with_timeout(lambda: client.compute(y).result(timeout=120))
    assert computed.tobytes() == layer(a).tobytes()


def test_apply_keeps_float16_and_a_layer_changed_later_does_not_change_it():
    layer = eval_layer(4, seed=4)
    a = make_data((8, 4, 5), 1, np.float16, seed=4) / 20
    y = cbn_dask.apply(layer, da.from_array(a, chunks=(3, 3, 2)))
    expected = layer(a)
    layer.running_mean[...] += 1
    layer.train()
    computed = y.compute()
    assert computed.dtype == np.float16
    assert computed.tobytes() == expected.tobytes()


def test_apply_leaves_a_frozen_layer_as_it_was():
    # A frozen layer with a ReLU keeps its last output for backward: the
    # blocks' calls must not replace it.
    frozen = eval_layer(3, activation="relu", seed=5).freeze()
    a = make_data((8, 3, 4), 1, np.float32, seed=5) / 20
    dy = np.ones_like(a)
    before = frozen(a)
    expected = frozen.backward(dy)
    assert (expected == 0).any()
    other = make_data((8, 3, 4), 1, np.float32, seed=6) / 20
    cbn_dask.apply(frozen, da.from_array(other, chunks=(3, 2, 4))).compute()
    assert frozen.backward(dy).tobytes() == expected.tobytes()
    assert frozen(a).tobytes() == before.tobytes()


def test_apply_refuses_what_it_cannot_apply():
    x = da.ones((4, 3, 2), chunks=2, dtype=np.float32)
    with pytest.raises(ValueError, match="training mode"):
        cbn_dask.apply(cbn.BatchNorm(3), x)
    with pytest.raises(ValueError, match="running statistics"):
        cbn_dask.apply(cbn.BatchNorm(3, track_running_stats=False).eval(), x)
    with pytest.raises(TypeError, match="got function"):
        cbn_dask.apply(lambda block: block, x)
    with pytest.raises(TypeError, match="got str"):
        cbn_dask.apply("BatchNorm", x)
    layer = cbn.BatchNorm(3).eval()
    with pytest.raises(TypeError, match=r"NumPy array: use the layer itself"):
        cbn_dask.apply(layer, np.ones((4, 3)))
    with pytest.raises(ValueError, match="expects 3 channels"):
        cbn_dask.apply(layer, da.ones((4, 5)))
    with pytest.raises(ValueError, match="4D"):
        cbn_dask.apply(cbn.BatchNorm2d(3).eval(), x)       # the layer's own rank rule
    with pytest.raises(TypeError, match="dtype int64"):
        cbn_dask.apply(layer, da.ones((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        cbn_dask.apply(layer, da.ones(3))


# ---------------------------------------------------------------------------
# import


def run_python(code, tmp_path):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


def test_import_cbn_does_not_import_dask(tmp_path):
    result = run_python("""
        import sys
        import cbn
        assert not any(name == "dask" or name.startswith("dask.") for name in sys.modules)
        import cbn.dask
        assert cbn.dask.moments is not None and "dask.array" in sys.modules
    """, tmp_path)
    assert result.returncode == 0, result.stderr


def test_import_cbn_dask_without_dask_says_what_to_install(tmp_path):
    result = run_python("""
        import sys
        sys.modules["dask"] = None   # as if Dask were not installed
        import cbn
        try:
            import cbn.dask
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("imported")
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'pip install "cbn[dask]"' in result.stdout


# ---------------------------------------------------------------------------
# opt-in: 4 GiB on disk in a process holding a few blocks

LARGE_SHAPE = (16640, 8, 8192)   # float32, 4.06 GiB: 65 blocks of
LARGE_ROWS = 256                 # 256 rows, 64 MiB
LARGE_OFFSETS = np.linspace(-1e3, 1e3, 8)

# The child reports the peak resident set of its own image (VmHWM): its
# ru_maxrss would not do, as Linux carries the larger of the pre-exec peak
# over an exec, and before its exec the child was a copy of this pytest
# process (measured: a child started from a process that had touched 2 GiB
# reports 2 GiB in ru_maxrss, 9 MiB in VmHWM). Both are printed.
LARGE_CHILD = """
import json, resource, sys
import numpy as np
import dask, dask.array as da
import cbn.dask

class RowBlocks:
    # The file as an array-like read block by block with read() (np.fromfile)
    # rather than mapped: mapped pages of a file count in the process's
    # resident set, read blocks are freed once their moments are taken.
    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.ndim = len(shape)
        self.row_items = int(np.prod(shape[1:]))

    def __getitem__(self, index):
        rows, rest = index[0], index[1:]
        start, stop, _ = rows.indices(self.shape[0])
        block = np.fromfile(self.path, self.dtype, (stop - start) * self.row_items,
                            offset=start * self.row_items * self.dtype.itemsize)
        return block.reshape((stop - start, *self.shape[1:]))[(slice(None), *rest)]

path, shape, rows = sys.argv[1], tuple(json.loads(sys.argv[2])), int(sys.argv[3])
x = da.from_array(RowBlocks(path, shape, np.float32), chunks=(rows, -1, -1),
                  asarray=False, meta=np.empty((0, 0, 0), np.float32))
with dask.config.set(scheduler="threads", num_workers=2):
    m = cbn.dask.moments(x)
with open("/proc/self/status") as status:
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"moments": m.to_array().tolist(), "peak_bytes": peak_kib * 1024,
                  "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_large_file(path):
    """The file written block by block through np.memmap; returns the float64
    (count, mean, m2) per channel, merged over blocks in the test's own code."""
    N, C, L = LARGE_SHAPE
    assert N % LARGE_ROWS == 0
    total = (0, np.zeros(C), np.zeros(C))
    np.memmap(path, np.float32, "w+", shape=LARGE_SHAPE).flush()   # sized once
    for start in range(0, N, LARGE_ROWS):
        rng = np.random.default_rng(start)
        block = rng.standard_normal((LARGE_ROWS, C, L), dtype=np.float32)
        block *= 3
        block += LARGE_OFFSETS[:, None].astype(np.float32)
        view = np.memmap(path, np.float32, "r+", offset=start * C * L * 4,
                         shape=block.shape)
        view[...] = block
        view.flush()
        del view
        values = block.astype(np.float64)
        mean = values.mean(axis=(0, 2))
        m2 = ((values - mean[:, None]) ** 2).sum(axis=(0, 2))
        total = chan_merge(total, (LARGE_ROWS * L, mean, m2))
    return total


def chan_merge(a, b):
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta ** 2 * (na * nb / n)


@pytest.mark.large
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(os.environ.get("CBN_LARGE_TESTS") != "1",
                    reason="opt-in: CBN_LARGE_TESTS=1 (writes 4 GiB to a temporary "
                           "directory)")
def test_moments_of_a_4_gib_file_in_under_1_gib_of_memory(tmp_path):
    nbytes = int(np.prod(LARGE_SHAPE)) * 4
    assert nbytes >= 4 * 2**30
    if shutil.disk_usage(tmp_path).free < nbytes + 2**30:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB free in {tmp_path}")
    path = tmp_path / "data.f32"
    try:
        count, mean, m2 = write_large_file(path)
        result = subprocess.run(
            [sys.executable, "-c", LARGE_CHILD, str(path), json.dumps(LARGE_SHAPE),
             str(LARGE_ROWS)], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    finally:
        path.unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    got = cbn.Moments.from_array(np.array(report["moments"]))
    assert report["peak_bytes"] < 2**30, report
    assert got.count == count == LARGE_SHAPE[0] * LARGE_SHAPE[2]
    var = m2 / count
    assert np.all(np.abs(got.mean - mean) <= MEAN_BOUND * (np.abs(mean) + np.sqrt(var)))
    assert np.all(np.abs(got.var() - var) <= VAR_BOUND * var)
