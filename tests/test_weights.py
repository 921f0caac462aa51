"""cbn.save / cbn.load: safe weight files. Every kind round-trips with its
hyper-parameters, state and mode; a truncated, corrupted or foreign file
raises ValueError, and loading never unpickles."""
import io
import pickle
import zipfile

import numpy as np
import pytest

import cbn


def trained(cls, *args, **kwargs):
    layer = cls(*args, **kwargs)
    rng = np.random.default_rng(0)
    shape = {cbn.BatchNorm1d: (6, 4), cbn.BatchNorm3d: (2, 4, 2, 2, 2)}.get(cls, (3, 4, 2, 2))
    if layer.axis == -1:
        shape = shape[:1] + shape[2:] + shape[1:2]
    layer(rng.standard_normal(shape).astype(layer.dtype) * 3 + 1)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, 4)
    return layer


def same_layer(a, b):
    assert type(a) is type(b)
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].tobytes() == sb[key].tobytes()


LAYERS = [
    lambda: trained(cbn.BatchNorm2d, 4),
    lambda: trained(cbn.BatchNorm1d, 4, momentum=None, dtype=np.float64).eval(),
    lambda: trained(cbn.BatchNorm3d, 4, affine=False, eps=1e-3),
    lambda: trained(cbn.BatchNorm, 4, axis=-1, activation="relu", nonfinite="skip",
                    bias=False),
    lambda: trained(cbn.BatchNorm2d, 4, track_running_stats=False),
]


@pytest.mark.parametrize("make", LAYERS)
def test_layers_round_trip(make, tmp_path):
    layer = make()
    path = tmp_path / "weights"   # no suffix added
    cbn.save(path, layer)
    assert path.exists()
    back = cbn.load(path)
    same_layer(back, layer)
    assert back.training == layer.training and back.momentum == layer.momentum
    assert back.track_running_stats == layer.track_running_stats
    if type(layer) is cbn.BatchNorm2d and layer.running_mean is not None:
        x = np.random.default_rng(1).standard_normal((5, 4, 2, 2)).astype(np.float32)
        np.testing.assert_array_equal(back.eval()(x), layer.eval()(x))


def test_track_running_stats_switched_off_after_training_is_kept(tmp_path):
    layer = trained(cbn.BatchNorm2d, 4)
    layer.track_running_stats = False
    cbn.save(tmp_path / "w.npz", layer)
    back = cbn.load(tmp_path / "w.npz")
    assert back.track_running_stats is False and back.running_mean is not None
    same_layer(back, layer)


def test_frozen_and_converted_ranks_round_trip():
    frozen = trained(cbn.BatchNorm2d, 4, activation="relu", dtype=np.float64).freeze()
    buffer = io.BytesIO()
    cbn.save(buffer, frozen)
    buffer.seek(0)
    back = cbn.load(buffer)
    assert isinstance(back, cbn.FrozenBatchNorm) and repr(back) == repr(frozen)
    x = np.random.default_rng(2).standard_normal((3, 4, 2, 2))
    np.testing.assert_array_equal(back(x), frozen(x))
    with pytest.raises(ValueError, match="4D"):
        back(np.ones((3, 4)))


def test_sync_batch_norm_round_trips_without_its_communicator(tmp_path):
    class Comm:   # a world of one rank, enough to build and save
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def Allgather(self, send, recv):
            recv[...] = np.asarray(send).reshape(recv.shape)

        def Allreduce(self, send, recv, op=None):
            recv[...] = send

    sync = cbn.SyncBatchNorm.convert(trained(cbn.BatchNorm2d, 4), comm=Comm())
    sync.reduction = "allgather"
    cbn.save(tmp_path / "sync.npz", sync)
    back = cbn.load(tmp_path / "sync.npz")
    assert isinstance(back, cbn.SyncBatchNorm) and back._comm is None
    assert back.reduction == "allgather"
    same_layer(back, sync)
    with pytest.raises(ValueError, match="4D"):
        back.eval()(np.ones((3, 4)))


def test_state_dicts_round_trip(tmp_path):
    state = {"layer1.bn.weight": np.arange(3, dtype=np.float32),
             "layer1.bn.num_batches_tracked": np.array(7),
             "fc.weight": np.ones((2, 3))}
    cbn.save(tmp_path / "s.npz", state)
    back = cbn.load(tmp_path / "s.npz")
    assert list(back) == list(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])
        assert back[key].dtype == state[key].dtype
    with pytest.raises(TypeError, match="object"):
        cbn.save(tmp_path / "o.npz", {"a": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError, match="str"):
        cbn.save(tmp_path / "k.npz", {1: np.ones(2)})
    with pytest.raises(TypeError, match="state dict"):
        cbn.save(tmp_path / "x.npz", [1, 2])


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_loading_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"cbn.format": np.array("cbn-weights"), "cbn.version": np.array(1),
                      "cbn.kind": np.array("state_dict"),
                      "state.x": np.array([Evil()], dtype=object)})
    with pytest.raises(ValueError, match="cbn.load"):
        cbn.load(path)
    pickled = tmp_path / "layer.pkl"
    pickled.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="cbn.load"):
        cbn.load(pickled)


def test_foreign_and_broken_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.ones(3))
    with pytest.raises(ValueError, match="not written by cbn.save"):
        cbn.load(foreign)
    for name, data in [("empty", b""), ("text", b"hello"), ("npy", None)]:
        path = tmp_path / name
        if data is None:
            np.save(path, np.ones(3))
            path = tmp_path / "npy.npy"
        else:
            path.write_bytes(data)
        with pytest.raises(ValueError, match="cbn.load"):
            cbn.load(path)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"cbn.format": np.array("cbn-weights"), "cbn.version": np.array(2),
                       "cbn.kind": np.array("state_dict")})
    with pytest.raises(ValueError, match="version 2"):
        cbn.load(wrong)


def test_fuzzed_files_raise_value_error_or_load(tmp_path):
    """Truncations, flipped bytes and changed entries of real weight files:
    each either loads (the change missed everything checked) or raises
    ValueError; nothing else escapes."""
    rng = np.random.default_rng(3)
    sources = []
    for make in (LAYERS[0], LAYERS[3], lambda: trained(cbn.BatchNorm2d, 4).freeze()):
        buffer = io.BytesIO()
        cbn.save(buffer, make())
        sources.append(buffer.getvalue())
    outcomes = {"loaded": 0, "ValueError": 0}
    for k in range(600):
        data = bytearray(sources[k % len(sources)])
        mode = k % 3
        if mode == 0:
            data = data[:int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        try:
            cbn.load(io.BytesIO(bytes(data)))
            outcomes["loaded"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
    assert outcomes["ValueError"] > 300, outcomes


@pytest.mark.parametrize("entry, value", [
    ("hp.eps", np.array(-1.0)), ("hp.eps", np.array("x")), ("hp.dtype", np.array("int32")),
    ("hp.axis", np.array(1.5)), ("hp.momentum", np.array([0.1, 0.2])),
    ("hp.activation", np.array("gelu")), ("hp.nonfinite", np.array(3)),
    ("hp.ranks", np.array([4, 99])), ("hp.num_features", np.array(5)),
    ("state.weight", np.ones(5, np.float32)), ("cbn.kind", np.array("Linear")),
    ("state.running_mean", np.array(["a"] * 4)),
])
def test_changed_entries_raise_value_error(entry, value, tmp_path):
    buffer = io.BytesIO()
    cbn.save(buffer, trained(cbn.BatchNorm2d, 4))
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as archive, np.load(buffer) as original:
        entries = {name[:-4]: original[name[:-4]] for name in archive.namelist()}
    entries[entry] = value
    path = tmp_path / "changed.npz"
    np.savez(path, **entries)
    with pytest.raises(ValueError, match="cbn.load"):
        cbn.load(path)
