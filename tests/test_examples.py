"""The worked examples run as written, without an OpenMP runtime."""
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_inference_pipeline_example_runs_and_its_four_ways_agree(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "inference_pipeline.py"), "--batches", "3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "All ways agree (plain, fused, frozen, folded" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()[-3:]]
    assert [row[0] for row in rows] == ["1", "32", "256"]
    assert all(len(row) == 5 and all(float(t) > 0 for t in row[1:]) for row in rows)


def test_dataset_statistics_example_normalizes_its_dataset(tmp_path):
    pytest.importorskip("dask.array")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "dataset_statistics.py"), "--megabytes", "8",
         "--rows", "32"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gives the bits of layer(block 0): True" in result.stdout
    assert "Normalized: every channel has mean 0 and standard deviation 1." in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(16))
    for row in rows:   # the data's statistics are near those they were drawn with
        drawn_mean, mean, drawn_std, std = map(float, row[1:5])
        assert abs(mean - drawn_mean) < 0.1 * drawn_std and abs(std / drawn_std - 1) < 0.05


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cbn_loads_no_openmp_runtime():
    # cbn's threads are its own (cbn/_pool.h): an OpenMP runtime loaded by cbn
    # would bring back the spinning threads that slowed NumPy pipelines.
    code = ("import cbn, numpy as np; cbn.batch_norm_forward(np.ones((512, 256), 'f4')); "
            "print(any('libgomp' in line or 'libomp' in line "
            "for line in open('/proc/self/maps')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_sync_training_example_on_two_ranks_matches_one_process(tmp_path):
    pytest.importorskip("mpi4py", reason="the example needs mpi4py (the mpi extra)")
    beside = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert mpiexec, f"mpi4py is installed but there is no mpiexec beside {sys.executable}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CBN_NUM_THREADS", None)
    # a session of its own: on a timeout the whole job goes, never a hang
    process = subprocess.Popen(
        [mpiexec, "-n", "2", sys.executable, str(EXAMPLES / "sync_training.py"), "--steps",
         "3", "--batch", "9"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("mpiexec -n 2 examples/sync_training.py timed out")
    assert process.returncode == 0, stdout + stderr
    assert "on 2 ranks: global batch 9 (rows per rank: 4, 5)" in stdout, stdout
    assert "matches the single-process run" in stdout, stdout


# ---------------------------------------------------------------------------
# examples/train_digits.py: a learning-rate sweep with and without batch norm

DIGITS_RATES = ("0.01", "0.1", "0.5", "1.0")
VERDICT = re.compile(r"^lr (\S+): (batch norm better|batch norm WORSE|no clear difference) "
                     r"\(final loss (\S+) with batch norm, (\S+) without\)$")


def run_train_digits(tmp_path, *args, env=None):
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_digits.py"), *args],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    table = {}   # (lr, network) -> (steps to loss < 0.5, final loss, accuracy): means
    verdicts = {}
    for line in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in DIGITS_RATES and len(cells) == 5:
            steps, final, accuracy = (cell.split(" +- ")[0] for cell in cells[2:])
            table[cells[0], cells[1]] = (steps, float(final), float(accuracy))
        elif match := VERDICT.match(line):
            verdicts[match[1]] = (match[2], float(match[3]), float(match[4]))
    return result.stdout, table, verdicts


@pytest.mark.parametrize("data", ["default", "synthetic", "without scikit-learn"])
def test_train_digits_batch_norm_trains_where_the_plain_network_diverges(
        tmp_path, tmp_path_factory, data):
    env = None
    if data == "without scikit-learn":   # a package that shadows it and fails to import
        shadow = tmp_path_factory.mktemp("shadow")
        (shadow / "sklearn").mkdir()
        (shadow / "sklearn" / "__init__.py").write_text("raise ImportError('shadowed')\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])]))
    stdout, table, verdicts = run_train_digits(
        tmp_path, "--quick", *(["--synthetic"] if data == "synthetic" else []), env=env)
    has_sklearn = importlib.util.find_spec("sklearn") is not None
    expected = {"synthetic": "synthetic digits (--synthetic)",
                "without scikit-learn": "synthetic digits (scikit-learn is not installed)",
                "default": "scikit-learn's digits" if has_sklearn else
                           "synthetic digits (scikit-learn is not installed)"}[data]
    data_line = stdout.splitlines()[0]
    assert data_line.startswith(f"Data: {expected}") and "raw pixels 0-16" in data_line, stdout
    assert set(table) == {(lr, net) for lr in DIGITS_RATES for net in ("plain", "batch norm")}
    for lr in ("0.5", "1.0"):
        _, plain_loss, plain_accuracy = table[lr, "plain"]
        steps, bn_loss, bn_accuracy = table[lr, "batch norm"]
        # the plain network diverges to dead ReLUs (ln 10 = 2.30, chance accuracy) ...
        assert plain_loss > 2 and plain_accuracy < 0.3, (lr, stdout)
        # ... while the one with batch norm learns, fast
        assert bn_loss < 0.2 and bn_accuracy > 0.9 and int(steps) < 50, (lr, stdout)
    # every rate has its verdict, the same as the table's numbers, the bad one included
    assert set(verdicts) == set(DIGITS_RATES)
    for lr, (word, bn_loss, plain_loss) in verdicts.items():
        assert (bn_loss, plain_loss) == (table[lr, "batch norm"][1], table[lr, "plain"][1])
        assert word == ("batch norm better" if bn_loss < plain_loss else "batch norm WORSE")
    assert verdicts["0.01"][0] == "batch norm WORSE", stdout
    assert not list(tmp_path.iterdir()), "--quick drew a PNG it was not asked for"


def test_train_digits_draws_its_loss_curves(tmp_path):
    pytest.importorskip("matplotlib")
    stdout, table, _ = run_train_digits(tmp_path, "--quick", "--synthetic", "--steps", "30",
                                        "--plot", "curves.png")
    assert len(table) == 8 and "Loss curves: curves.png" in stdout
    image = (tmp_path / "curves.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) < 150_000


# ---------------------------------------------------------------------------
# examples/padded_sequences.py: batch norm over zero-padded sequences, mask=

def test_padded_sequences_mask_recovers_the_statistics_the_padding_drags_off(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "padded_sequences.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    drift = []   # (padding %, mean off by (std), vs mixture, mask=: largest difference)
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in ("100", "150", "200", "400", "800") and len(cells) == 6:
            drift.append((float(cells[1].rstrip("%")), float(cells[2].split()[0]),
                          float(cells[4]), float(cells[5])))
    assert len(drift) == 5, stdout
    padding, shift, mixture_error, masked_error = zip(*drift)
    assert list(padding) == sorted(padding) and padding[0] > 0
    # mask=: NumPy's statistics over the real positions, to rounding
    assert max(masked_error) < 1e-12, stdout
    # without it: the moments of the data mixed with zeros, further off as padding grows
    assert max(mixture_error) < 1e-12, stdout
    assert list(shift) == sorted(shift) and shift[0] > 0.1 and shift[-1] > 1, stdout
    # eval mode with running statistics learned with and without the mask
    eval_lines = {line.split()[0]: re.findall(r"[+-]?\d+\.\d+", line)
                  for line in stdout.splitlines() if "per-channel mean" in line}
    without, masked = ([float(v) for v in eval_lines[key]] for key in ("without", "mask="))
    assert max(abs(without[0]), abs(without[1])) > 0.5 and (without[2] < 0.8 or without[3] > 1.2)
    assert max(abs(masked[0]), abs(masked[1])) < 0.1 and 0.9 < masked[2] <= masked[3] < 1.1
    # the masked forward and backward are those of the real positions alone
    differences = dict(re.findall(r"largest difference, ([^:]+): (\S+)", stdout))
    assert set(differences) == {"output", "input gradient", "input gradient in the padding",
                                "weight gradient", "bias gradient", "running statistics"}
    assert all(float(value) < 1e-12 for value in differences.values()), differences
    assert not list(tmp_path.iterdir()), "drew a PNG it was not asked for"


def test_padded_sequences_batches_checked_against_numpy():
    # the example's own batches, its statistics recomputed here with NumPy
    import numpy as np

    import cbn
    spec = importlib.util.spec_from_file_location("padded_sequences",
                                                  EXAMPLES / "padded_sequences.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rng = np.random.default_rng(7)
    x, mask = example.padded_batch(rng, example.channel_moments(rng), 400)
    assert x.shape[0] == mask.shape[0] and x.shape[2] == mask.shape[1] == 400
    lengths = mask.sum(axis=1)
    assert lengths.max() == 100 and lengths.min() >= 50 and not mask[:, 100:].any()
    assert (x.transpose(0, 2, 1)[~mask] == 0).all()   # zero-padded
    real = np.concatenate([x[n][:, mask[n]] for n in range(len(x))], axis=1)   # (C, M)
    mean, var = cbn.batch_stats(x, mask=mask)
    np.testing.assert_allclose(mean, real.mean(axis=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(var, real.var(axis=1), rtol=1e-12)
    unmasked_mean, _ = cbn.batch_stats(x)
    assert np.max(np.abs(unmasked_mean - real.mean(axis=1)) / real.std(axis=1)) > 1
