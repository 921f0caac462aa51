"""The benchmark: its logic on synthetic rows and tiny cases, and
``bench/run.py --quick`` end to end, once.

No timing assertions (the machines are noisy): the targets are judged on
made-up rows, the peers' models are built and checked on tiny arrays, and
the quick run must time every case and print every table. The performance
targets themselves are checked by running the benchmark.
"""
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
OPS = {"train forward", "inference", "backward"}
LAYOUTS = {"NC", "NCL", "NCHW", "NHWC"}
DTYPES = {"float32", "float64"}


def _load_bench():
    """The bench package from its folder (the repository root stays off
    sys.path, where the source tree's cbn/ would shadow the installed one)."""
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "bench", REPO / "bench" / "__init__.py",
            submodule_search_locations=[str(REPO / "bench")])
        sys.modules["bench"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench"])
    return sys.modules["bench"]


_load_bench()
from bench import (  # noqa: E402  (after the package is loaded from its folder)
    busy,
    cbn_calls,
    import_order,
    load,
    masked,
    peers,
    pipeline,
    tables,
    targets,
    timing,
)
from bench.cases import L3_BYTES, LARGE_BYTES, Case, at_least  # noqa: E402
from bench.suite import make_data  # noqa: E402


def _installed(module):
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------
# Targets on synthetic rows

QUIET = {"other_cpus": 0.0, "steal_cpus": 0.0, "seconds": 1.0, "uncertainty": 0.0,
         "counted": "tasks"}
LOADED = dict(QUIET, other_cpus=1.0)


def _suite_row(case="256x512 NC float32", op="inference", layout="NC", dtype="float32",
               size_class="resident", speedup=3.0, copy_ratio=1.0, machine_load=QUIET,
               unsupported=None):
    return {"name": f"{case} {op}", "case": case, "op": op, "shape": [256, 512],
            "layout": layout, "dtype": dtype, "size_class": size_class,
            "large": size_class == "large", "resident": size_class == "resident",
            "speedup_numpy": 2 * speedup, "speedup_torch": speedup,
            "speedup_peers": {"onnxruntime": speedup, "openvino": speedup,
                              "onednn": speedup, "openvino_relu": speedup},
            "unsupported": unsupported or {}, "copy_ratio": copy_ratio,
            "copy_ratio_1thread": copy_ratio, "copy_split_speedup": 1.5,
            "machine_load": machine_load,
            "seconds": {"cbn_out": 1e-6, "cbn": 2e-6, "numpy": 5e-6, "torch": 4e-6,
                        "copy": 1e-6, "onnxruntime": 2e-6, "onednn": 3e-6,
                        "cbn_relu_out": 1e-6}}


def _full_rows(**changes):
    """Rows of every op on a resident case and a large case of every layout
    and dtype, all meeting their targets."""
    rows = []
    for op in OPS:
        rows.append(_suite_row(op=op))
        for layout in LAYOUTS:
            for dtype in DTYPES:
                rows.append(_suite_row(case=f"big {layout} {dtype}", op=op, layout=layout,
                                       dtype=dtype, size_class="large"))
    for row in rows:
        row.update(changes)
    return rows


def _by_requirement(checked, text):
    found = [target for target in checked if text in target["requirement"]]
    assert found, text
    return found


INSTALLED = {"torch": True, "onnxruntime": True, "openvino": True, "onednn": True}


def test_targets_pass_on_rows_that_meet_them():
    checked = targets.evaluate({"suite": _full_rows()}, installed=INSTALLED)
    suite_targets = [t for t in checked if t["kind"] == "target"
                     and "default threads" not in t["requirement"]
                     and not t["requirement"].startswith("masked")]
    assert suite_targets and all(t["status"] == "PASS" for t in suite_targets), suite_targets


def test_a_slower_case_fails_its_runtime_target_and_is_named():
    rows = _full_rows()
    slow = next(row for row in rows if row["op"] == "inference" and row["resident"])
    slow["speedup_peers"]["openvino"] = 0.8
    checked = targets.evaluate({"suite": rows}, installed=INSTALLED)
    [openvino] = _by_requirement(checked, "inference: faster than OpenVINO on every case")
    assert openvino["status"] == "FAIL"
    assert "0.80x" in openvino["value"] and slow["case"] in openvino["value"]
    [onnx] = _by_requirement(checked, "inference: faster than ONNX Runtime on every case")
    assert onnx["status"] == "PASS"


def test_copy_limits_judge_resident_and_large_rows_separately():
    rows = _full_rows()
    resident = next(row for row in rows if row["op"] == "backward" and row["resident"])
    resident["copy_ratio_1thread"] = 3.3  # over 3.2 at one thread only
    checked = targets.evaluate({"suite": rows}, installed=INSTALLED)
    one, two = _by_requirement(checked, "backward: cbn(out=) / copy <= 3.2, cache-resident")
    assert (one["status"], two["status"]) == ("FAIL", "PASS")
    [large] = _by_requirement(checked, "backward: cbn(out=) / copy <= 2.8 on large arrays")
    assert large["status"] == "PASS"


def test_large_targets_say_which_layouts_and_dtypes_have_no_large_case():
    rows = [row for row in _full_rows() if not (row["large"] and row["layout"] == "NCL")]
    checked = targets.evaluate({"suite": rows}, installed=INSTALLED)
    [large] = _by_requirement(checked, "inference: cbn(out=) / copy <= 1.2 on large arrays")
    assert "no large NCL float32, NCL float64" in large["value"]


def test_unsupported_cases_are_counted_not_judged():
    rows = _full_rows()
    for row in rows:
        if row["op"] == "inference" and row["dtype"] == "float64":
            row["unsupported"] = {"onednn": "no float64"}
            row["speedup_peers"].pop("onednn")
    checked = targets.evaluate({"suite": rows}, installed=INSTALLED)
    [onednn] = _by_requirement(checked, "inference: faster than oneDNN on every case")
    assert onednn["status"] == "PASS" and "n/a on 4 cases" in onednn["value"]


def test_targets_say_how_many_of_their_rows_were_loaded():
    rows = _full_rows()
    rows[0]["machine_load"] = LOADED
    checked = targets.evaluate({"suite": rows}, installed=INSTALLED)
    [target] = _by_requirement(checked, f"{rows[0]['op']}: faster than PyTorch on every case")
    assert "1 of 9 rows timed under load (*)" in target["value"]


def test_quick_marks_the_full_suite_targets_not_applicable():
    results = {"suite": _full_rows(), "small_calls": [
        {"name": "small layer inference 1x64 float32", "seconds": {"cbn": 1e-6},
         "target_us": 3.0, "machine_load": QUIET}]}
    checked = targets.evaluate(results, quick=True, installed=INSTALLED)
    statuses = {t["requirement"]: t["status"] for t in checked if t["kind"] == "target"}
    assert statuses["small layer inference 1x64 float32: under 3 us"] == "PASS"
    for requirement in ("inference: faster than PyTorch on every case",
                        "backward: cbn(out=) / copy <= 2.8 on large arrays",
                        "inference: cbn(out=) / copy <= 1.3, cache-resident, 1 thread",
                        "default threads no more than 10% slower than 1 thread, busy core"):
        assert statuses[requirement] == "N/A", requirement
    assert all(t["value"] == targets.QUICK_NA for t in checked if t["status"] == "N/A")


def test_quick_marks_the_pipeline_targets_not_applicable():
    checked = targets.evaluate({"pipeline": {"cbn first": _pipeline_result(2.0)}}, quick=True)
    [target] = _by_requirement(checked, "pipeline, cbn first")
    assert (target["status"], target["value"]) == ("N/A", targets.QUICK_PIPELINE_NA)


def test_runtimes_not_installed_are_skipped():
    checked = targets.evaluate({"suite": _full_rows()},
                               installed=dict(INSTALLED, openvino=False))
    for target in _by_requirement(checked, "OpenVINO"):
        assert target["status"] == "SKIP" and "not installed" in target["value"]


def test_default_thread_targets_allow_ten_percent():
    rows = [{"scenario": scenario, "case": "32x256 NC float32", "op": "inference",
             "ratio": ratio, "machine_load": QUIET}
            for scenario, ratio in (("quiet", 1.05), ("between matmuls", 1.12),
                                    ("busy core", 0.9))]
    checked = targets.evaluate({"default_threads": rows})
    statuses = [t["status"] for t in _by_requirement(checked, "default threads")]
    assert statuses == ["PASS", "FAIL", "PASS"]


def _pipeline_result(torch_seconds, scenario="quiet"):
    return {"rows": [{"batch": batch, "scenario": scenario, "machine_load": QUIET,
                      "seconds": {"fused": 1.0, "frozen": 1.0, "PyTorch": torch_seconds}}
                     for batch in (1, 32, 256)]}


def test_pipeline_targets_per_import_order():
    pipeline_results = {"torch first": _pipeline_result(2.0),
                        "cbn first": _pipeline_result(0.5),
                        "other": {"error": "timed out after 300 s"}}
    checked = targets.evaluate({"pipeline": pipeline_results})
    found = {t["requirement"].split(",")[1].strip(): t
             for t in _by_requirement(checked, "pipeline")}
    assert found["torch first"]["status"] == "PASS"
    assert found["cbn first"]["status"] == "FAIL"
    assert "4 of 4 slower" in found["cbn first"]["value"]
    assert found["other"]["status"] == "FAIL" and "timed out" in found["other"]["value"]


# ---------------------------------------------------------------------------
# Load: what counts as loaded, and how tables mark it

def test_loaded_needs_more_than_the_uncertainty():
    assert not load.loaded(None)
    assert not load.loaded(QUIET)
    assert load.loaded(LOADED)
    # Ticks over a short row: 0.5 CPUs measured, +-0.4: not surely over 0.2.
    assert not load.loaded(dict(QUIET, other_cpus=0.5, uncertainty=0.4, counted="ticks"))
    assert load.loaded(dict(QUIET, other_cpus=0.9, uncertainty=0.4, counted="ticks"))


def test_cpu_load_measures_short_windows():
    cpu_load = load.CpuLoad()
    measured = cpu_load.lap()
    if measured is None:
        pytest.skip("no /proc/stat")
    assert set(measured) == {"other_cpus", "steal_cpus", "seconds", "uncertainty", "counted"}
    assert measured["seconds"] < 1 and measured["other_cpus"] >= 0


def test_descendants_count_as_ours(monkeypatch):
    monkeypatch.setattr(load.os, "getpid", lambda: 10)
    parents = {10: 1, 11: 10, 12: 11, 13: 1, 14: 13}
    assert load._ours(parents) == {10, 11, 12}


def test_loaded_rows_are_starred_with_a_footnote():
    rows = [_suite_row(), _suite_row(op="backward", machine_load=LOADED)]
    text = tables.suite_table(rows, 2)
    lines = [line for line in text.splitlines() if "(256, 512)" in line]
    assert not lines[0].endswith("*") and lines[1].endswith("*")
    assert "* timed while other processes" in text


def test_unsupported_cells_say_n_a_with_the_reason():
    row = _suite_row(dtype="float64", unsupported={"openvino": "float64 computed in float32",
                                                   "openvino_relu": "float64 computed in "
                                                                    "float32"})
    text = tables.peers_table([row])
    assert "n/a(a)" in text
    assert "(a) n/a: OpenVINO: float64 computed in float32" in text


# ---------------------------------------------------------------------------
# The busy process, per-call timing, case sizes

def test_busy_core_starts_and_stops_its_process():
    with busy.BusyCore(timeout=60) as core:
        assert core.running
        pid = core.process.pid
    assert not core.running
    assert core.process.returncode is not None
    assert not Path(f"/proc/{pid}").exists() or "Z" not in Path(f"/proc/{pid}/stat").read_text()


def test_busy_core_stops_when_the_block_fails():
    core = busy.BusyCore(timeout=60)
    with pytest.raises(RuntimeError), core:
        assert core.running
        raise RuntimeError("benchmark failed")
    assert not core.running


def test_busy_process_ends_itself_after_its_timeout():
    with busy.BusyCore(timeout=0.2) as core:
        core.process.wait(timeout=30)  # without being killed
        assert core.process.returncode == 0


def test_per_call_runs_before_each_outside_every_call():
    calls = {"before": 0, "function": 0}

    def before():
        calls["before"] += 1

    def function():
        calls["function"] += 1
    [seconds] = timing.per_call([function], 3, 0.001, before_each=before)
    assert seconds > 0 and calls["before"] == calls["function"] > 3


def test_large_cases_exceed_the_last_level_cache():
    assert LARGE_BYTES >= 2 * L3_BYTES
    assert at_least((4, 8), 4 * 8 * 4 * 3) == (16, 8)
    for shape in bench_large_shapes():
        assert Case(shape, "NC", np.float32).large


def bench_large_shapes():
    from bench.cases import LARGE_SHAPES
    return [shape for shape, _ in LARGE_SHAPES]


# ---------------------------------------------------------------------------
# The peers: built on a tiny case, checked against cbn

TINY = [Case((4, 6), "NC", np.float32), Case((2, 3, 5), "NCL", np.float32),
        Case((2, 3, 4, 5), "NCHW", np.float32), Case((2, 4, 5, 3), "NHWC", np.float32),
        Case((2, 3, 4, 5), "NCHW", np.float64)]


def _tiny(case):
    x, dy, params = make_data(case, np.random.default_rng(7))
    expected = cbn_calls.call("inference", x, dy, params, case.axis)()
    return x, params, expected


@pytest.mark.parametrize("module", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("case", TINY, ids=lambda case: case.name)
@pytest.mark.parametrize("relu", [False, True])
def test_peer_matches_cbn_on_a_tiny_case(module, case, relu):
    pytest.importorskip(module)
    x, params, expected = _tiny(case)
    peer = {"onnxruntime": peers.peer_onnxruntime, "openvino": peers.peer_openvino}[module]
    if module == "openvino" and case.dtype == np.float64:
        with pytest.raises(peers.NotSupported, match="float32"):
            peer.batch_norm(x, params, case.axis, 1)
        return
    built = peer.batch_norm(x, params, case.axis, 1, relu=relu)
    peers.check(peer.NAME, built.output(), np.maximum(expected, 0) if relu else expected)
    built.run()


@pytest.mark.parametrize("case", TINY, ids=lambda case: case.name)
def test_onednn_matches_cbn_on_a_tiny_case(case):
    torch = pytest.importorskip("torch")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without MKL-DNN")
    x, params, expected = _tiny(case)
    if case.dtype == np.float64:
        with pytest.raises(peers.NotSupported, match="float64"):
            peers.peer_onednn.batch_norm(x, params, case.axis, 1)
        return
    built = peers.peer_onednn.batch_norm(x, params, case.axis, 1)
    peers.check("oneDNN", built.output(), expected)


def test_a_mis_built_peer_is_caught():
    pytest.importorskip("onnxruntime")
    case = TINY[2]
    x, params, expected = _tiny(case)
    wrong = params._replace(running_var=params.running_var * 2)
    calls, unsupported = peers.eval_calls(x, params, case.axis, 1, expected)
    assert "onnxruntime" in calls
    with pytest.raises(peers.Mismatch, match="ONNX Runtime"):
        peers.eval_calls(x, wrong, case.axis, 1, expected)


def test_eval_calls_report_what_a_runtime_cannot_run():
    if not any(v for v in peers.versions().values()):
        pytest.skip("no peer runtime installed")
    case = TINY[4]  # float64
    x, params, expected = _tiny(case)
    calls, unsupported = peers.eval_calls(x, params, case.axis, 1, expected)
    versions = peers.versions()
    if versions["openvino"]:
        assert "float32" in unsupported["openvino"]
    if versions["onednn"]:
        assert "float64" in unsupported["onednn"]
    assert not set(calls) & set(unsupported)


@pytest.mark.parametrize("module", ["onnxruntime", "openvino"])
def test_peer_networks_match_the_example(module):
    pytest.importorskip(module)
    example = pipeline.load_example()
    network = example.from_generator()
    blocks = pipeline.peer_blocks(network)
    plain = example.plain(network)
    peer = pipeline.PEER_NETWORKS["ONNX Runtime" if module == "onnxruntime" else "OpenVINO"]
    x = np.random.default_rng(3).standard_normal((8, example.SIZES[0])).astype(np.float32)
    y = peer.network(blocks, 8, 1)(x)
    np.testing.assert_allclose(y, plain(x), **pipeline.TOLERANCE)


def test_child_code_imports_in_the_order_asked():
    for order, (first, second) in import_order.ORDERS.items():
        code = import_order.child_code(order, {"batch_sizes": [1]})
        assert code.index(f"import {first}") < code.index(f"import {second}") \
            < code.index("spec_from_file_location"), order


def test_sync_part_times_a_tiny_case_and_judges_its_targets():
    pytest.importorskip("mpi4py", reason="the sync part needs mpi4py (the mpi extra)")
    from bench import sync
    shape = (4, 8)
    rows = sync.run(lambda name: True, False, progress=io.StringIO(), ranks_list=(2,),
                    shapes=[shape], repeats={shape: (3, 1)})
    [row] = rows
    assert "error" not in row and "skipped" not in row, row
    assert row["name"] == "sync 2 ranks 4x8 float32" and row["threads_per_rank"] == 1
    assert set(row["seconds"]) == {"local", *sync.REDUCTIONS}
    assert all(_positive(seconds) for seconds in row["seconds"].values())
    text = sync.report(rows, False)
    assert str(shape) in text and "L2" in text and "load during the 2-rank launch" in text
    # the tiny row is not one the targets judge
    assert {t["status"] for t in sync.targets(rows, False)} == {"SKIP"}

    def made(shape, ratio, added_us):
        return {"ranks": 2, "shape": list(shape), "machine_load": QUIET,
                "seconds": {"local": 1.0, **dict.fromkeys(sync.REDUCTIONS, ratio)},
                "ratio": dict.fromkeys(sync.REDUCTIONS, ratio),
                "added_us": dict.fromkeys(sync.REDUCTIONS, added_us)}
    meeting = [made(sync.RATIO_SHAPE, 1.1, 900.0), made(sync.ADDED_SHAPE, 3.0, 29.0)]
    missing = [made(sync.RATIO_SHAPE, 1.2, 900.0), made(sync.ADDED_SHAPE, 1.5, 31.0)]
    assert [t["status"] for t in sync.targets(meeting, False)] == ["PASS", "PASS"]
    assert [t["status"] for t in sync.targets(missing, False)] == ["FAIL", "FAIL"]
    assert [t["status"] for t in sync.targets(missing, True)] == ["N/A", "N/A"]
    assert "1.20x" in sync.targets(missing, False)[0]["value"]


def test_dask_moments_part_times_a_tiny_case():
    pytest.importorskip("dask.array", reason="the dask part needs Dask (the dask extra)")
    from bench import dask_moments
    assert dask_moments.run(lambda name: "NHWC" in name, False) == []
    rows = dask_moments.run(lambda name: True, True, progress=io.StringIO(), threads=2,
                            size_bytes=4 << 20, block_bytes=(1 << 20,), repeats=1)
    [row] = rows
    assert row["name"] == "dask moments 4 MiB float32 blocks of 1 MiB", row
    assert row["blocks"] == 4 and row["bytes"] == 4 << 20 and row["threads"] == 2
    assert all(_positive(seconds) for seconds in row["seconds"].values())
    assert row["ratio"] == pytest.approx(row["seconds"]["read"] / row["seconds"]["moments"])
    text = dask_moments.report(rows)
    assert "L2" in text and "moments/read" in text and "4 MiB" in text


def test_padding_masks_keep_a_prefix_of_each_sample():
    rng = np.random.default_rng(0)
    mask = masked.make_mask("padding", (50, 3, 5), rng)
    assert mask.shape == (50, 3, 5) and mask.dtype == bool
    flat = mask.reshape(50, 15)
    lengths = flat.sum(axis=1)
    for row, length in zip(flat, lengths):
        assert row[:length].all() and not row[length:].any()
    assert lengths.min() >= 8 and lengths.max() <= 15  # 50% (rounded up) to 100% of 15
    assert len(set(lengths.tolist())) > 1
    # (N, C): one position per sample, so a prefix of the batch is valid
    batch = masked.make_mask("padding", (40,), rng)
    length = int(batch.sum())
    assert 20 <= length <= 40 and batch[:length].all() and not batch[length:].any()


def test_random_masks_keep_three_quarters():
    mask = masked.make_mask("random", (200, 50), np.random.default_rng(0))
    assert mask.dtype == bool and 0.72 < mask.mean() < 0.78
    with pytest.raises(ValueError, match="'ragged'"):
        masked.make_mask("ragged", (4, 4), np.random.default_rng(0))


@pytest.mark.parametrize("layout, shape", [("NCL", (4, 3, 10)), ("NHWC", (4, 2, 5, 3))])
def test_masked_call_normalizes_with_the_valid_positions_only(layout, shape):
    case = Case(shape, layout, np.float64)
    mask = masked.make_mask("padding", masked.mask_shape(case), np.random.default_rng(1))
    axis = case.axis % len(shape)
    x = np.moveaxis(np.random.default_rng(2).standard_normal(shape), axis, -1)
    x[~mask] = 100.0  # padding far from the valid values
    x = np.ascontiguousarray(np.moveaxis(x, -1, axis))
    out = np.empty_like(x)
    masked._layer_call(case, x, out, mask)()
    valid = np.moveaxis(out, axis, -1)[mask]  # (valid positions, C)
    np.testing.assert_allclose(valid.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(valid.var(axis=0), 1, rtol=1e-3)


def _masked_row(ratio, case="32x256 NC float32", mask="random", machine_load=QUIET):
    return {"name": f"masked {case} {mask}", "case": case, "mask": mask, "ratio": ratio,
            "seconds": {"unmasked": 1e-5, "masked": ratio * 1e-5},
            "machine_load": machine_load}


def test_masked_target_names_the_worst_row():
    meeting = [_masked_row(1.1), _masked_row(1.3, mask="padding")]
    assert targets.masked_target(meeting)["status"] == "PASS"
    missing = meeting + [_masked_row(1.45, case="8x32x32x32 NHWC float64", mask="padding",
                                     machine_load=LOADED)]
    target = targets.masked_target(missing)
    assert target["status"] == "FAIL"
    assert "1 of 3 miss" in target["value"]
    assert "1.45x (8x32x32x32 NHWC float64, padding mask)" in target["value"]
    assert "1 of 3 rows timed under load" in target["value"]
    quick = targets.masked_target(missing, quick=True)
    assert quick["status"] == "N/A" and "1.45x" in quick["value"]
    assert targets.masked_target([])["status"] == "SKIP"
    [evaluated] = _by_requirement(targets.evaluate({"masked": missing}),
                                  "masked training forward <= 1.3x unmasked")
    assert evaluated == target


def test_masked_part_times_tiny_cases():
    cases = [Case((4, 8, 16), "NCL", np.float32), Case((6, 5, 4, 3), "NHWC", np.float64)]
    assert masked.run(lambda name: "NCHW" in name, True, chosen_cases=cases) == []
    rows = masked.run(lambda name: "random" in name or "NHWC" in name, True,
                      progress=io.StringIO(), chosen_cases=cases)
    assert [row["name"] for row in rows] == [
        "masked 4x8x16 NCL float32 random", "masked 6x5x4x3 NHWC float64 padding",
        "masked 6x5x4x3 NHWC float64 random"]
    for row in rows:
        assert all(_positive(seconds) for seconds in row["seconds"].values())
        assert row["ratio"] == pytest.approx(row["seconds"]["masked"]
                                             / row["seconds"]["unmasked"])
        assert 0.5 <= row["valid_fraction"] <= 1
    text = masked.report(rows, True)
    assert "(4, 8, 16)" in text and "(6, 5, 4, 3)" in text and "L2" in text
    assert "Target: [N/A] masked training forward <= 1.3x" in text


# ---------------------------------------------------------------------------
# The quick run, end to end

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "results.json"
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--json", str(path),
         "--plot", str(path.with_suffix(".png"))],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout, json.loads(path.read_text()), path.with_suffix(".png")


def _positive(value):
    return isinstance(value, float) and value > 0


def test_every_case_and_op_is_timed(quick_run):
    _, results, _ = quick_run
    rows = results["suite"]
    assert {row["layout"] for row in rows} == LAYOUTS
    assert {row["dtype"] for row in rows} == DTYPES
    ops_per_case = {}
    for row in rows:
        ops_per_case.setdefault(row["case"], set()).add(row["op"])
    assert all(ops == OPS for ops in ops_per_case.values()), ops_per_case
    assert len(rows) == 3 * len(ops_per_case)
    torch_timed = _installed("torch")
    for row in rows:
        seconds = row["seconds"]
        for key in ("cbn_out", "cbn", "numpy", "copy", "copy_split", "copy_1thread"):
            assert _positive(seconds[key]), (row["name"], key)
        assert _positive(seconds["torch"]) if torch_timed else seconds["torch"] is None
        assert _positive(row["speedup_numpy"]) and _positive(row["copy_ratio"])
        assert row["machine_load"] is None or row["machine_load"]["seconds"] > 0
        if row["resident"]:
            assert _positive(seconds["cbn_out_1thread"]) and _positive(row["copy_ratio_1thread"])


def test_peers_are_timed_or_not_applicable(quick_run):
    _, results, _ = quick_run
    versions = results["facts"]["peers"]
    for row in results["suite"]:
        if row["op"] != "inference":
            continue
        assert _positive(row["seconds"]["cbn_relu_out"])
        for peer, version in versions.items():
            if version is None:
                assert peer not in row["seconds"] and peer not in row["unsupported"]
            else:
                assert (peer in row["unsupported"]) != (peer in row["seconds"]), (row, peer)
                assert peer in row["unsupported"] or _positive(row["speedup_peers"][peer])


def test_thread_rows_and_pipeline_are_timed(quick_run):
    _, results, _ = quick_run
    small = results["small_calls"]
    assert {(row["form"], row["op"]) for row in small} >= {
        ("layer", "inference"), ("function", "inference"),
        ("function", "train forward"), ("function", "backward")}
    assert {row["op"] for row in results["thread_scaling"]} == OPS
    default = results["default_threads"]
    assert {row["scenario"] for row in default} == {"quiet", "between matmuls", "busy core"}
    for row in default:
        assert all(_positive(seconds) for seconds in row["seconds"].values())
    assert results["python_threads"]
    pipeline_results = results["pipeline"]
    expected_orders = {"cbn first", "torch first"}
    assert set(pipeline_results) == expected_orders
    for order, result in pipeline_results.items():
        if order == "torch first" and not _installed("torch"):
            assert "skipped" in result
            continue
        assert "error" not in result, result
        first = "torch" if order == "torch first" else "cbn"
        assert result["modules_loaded_first"][0] == first
        assert {(row["batch"], row["scenario"]) for row in result["rows"]} == {
            (batch, scenario) for batch in (1, 32, 256) for scenario in ("quiet", "busy core")}
        for row in result["rows"]:
            assert set(row["seconds"]) == set(result["ways"]) >= {"plain", "fused", "frozen",
                                                                  "folded"}


def test_targets_are_judged_and_full_suite_ones_are_not_applicable(quick_run):
    _, results, _ = quick_run
    counted = [target for target in results["targets"] if target["kind"] == "target"]
    assert {target["status"] for target in counted} <= {"PASS", "FAIL", "SKIP", "N/A"}
    not_applicable = [t["requirement"] for t in counted if t["status"] == "N/A"]
    assert any("large arrays" in requirement for requirement in not_applicable)
    assert any("small" in t["requirement"] and t["status"] in ("PASS", "FAIL")
               for t in counted)
    assert all(t["status"] in ("N/A", "SKIP") for t in counted
               if t["requirement"].startswith("pipeline"))
    assert set(results["summary"]) == OPS
    assert set(results["machine_load"]) == {"suite", "small calls", "thread scaling",
                                            "default threads", "python threads", "pipeline",
                                            "sync", "masked"}
    [masked_target] = _by_requirement(counted, "masked training forward")
    assert masked_target["status"] == "N/A" and "worst" in masked_target["value"]


def test_masked_rows_cover_the_training_cases_and_both_masks(quick_run):
    stdout, results, _ = quick_run
    rows = results["masked"]
    expected = {(case.name, mask) for case in masked.cases(quick=True)
                for mask in masked.MASKS}
    assert {(row["case"], row["mask"]) for row in rows} == expected
    assert len(rows) == len(expected)
    assert {row["layout"] for row in rows} == LAYOUTS
    assert {row["dtype"] for row in rows} == DTYPES
    valid = {}
    for row in rows:
        assert all(_positive(seconds) for seconds in row["seconds"].values()), row
        assert str(tuple(row["shape"])) in stdout
        # both dtypes of a shape get the same masks
        valid.setdefault((row["layout"], tuple(row["shape"]), row["mask"]),
                         set()).add(row["valid_fraction"])
    assert all(len(fractions) == 1 for fractions in valid.values()), valid
    assert "Masked training forward vs unmasked" in stdout


def test_report_is_printed(quick_run):
    stdout, results, _ = quick_run
    assert f"cbn {results['facts']['cbn']}" in stdout
    assert "L1d" in stdout and "L3" in stdout and "other processes before the start" in stdout
    assert "cbn(out=)" in stdout and "xNumPy" in stdout and "out=/copy" in stdout
    for row in results["suite"]:
        assert str(tuple(row["shape"])) in stdout
    for title in ("Small calls", "Thread scaling", "Python threads sharing one eval layer",
                  "Inference against the runtimes", "Cache-resident arrays",
                  "The default thread setting", "Pipeline: dense", "Machine load"):
        assert title in stdout, title
    assert "Targets" in stdout and "targets met" in stdout and "[ N/A]" in stdout


def test_chart_only_with_matplotlib(quick_run):
    _, _, chart = quick_run
    if _installed("matplotlib"):
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not chart.exists()


def test_runs_without_torch_and_matplotlib(tmp_path):
    # Both optional: block their imports and run a few rows.
    path = tmp_path / "results.json"
    # `python -c` puts the working directory (the repo root) first on sys.path;
    # drop it so the installed cbn is imported, as `python bench/run.py` does.
    script = ("import runpy, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
              "sys.modules['torch'] = None; "
              "sys.modules['matplotlib'] = None; "
              "sys.argv = ['bench/run.py', '--quick', '--filter', 'NHWC float64', "
              f"'--json', {str(path)!r}, '--plot', {str(tmp_path / 'chart.png')!r}]; "
              "runpy.run_path('bench/run.py', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "not installed, their columns and targets are skipped: PyTorch" in completed.stdout
    results = json.loads(path.read_text())
    assert results["suite"] and all(row["seconds"]["torch"] is None
                                    for row in results["suite"])
    assert all("onednn" not in row["seconds"] for row in results["suite"])
    assert not (tmp_path / "chart.png").exists()
