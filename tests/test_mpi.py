"""SyncBatchNorm, cbn.distributed.batch_stats and calibrate(comm=) over MPI,
against a single process on the whole batch.

Each test reads the verdicts of worker scripts (tests/mpi/, see harness.py
there) that run under ``mpiexec -n N python -m mpi4py`` at 1 to 4 ranks: on
every rank, a training step's output, input gradient, summed weight and bias
gradients and running statistics equal a plain cbn.BatchNorm's on the
concatenation of all ranks' batches (within the contract's bounds, the state
the same bits on every rank); both reduction paths agree; eval mode does not
communicate; a bad input on some ranks raises the same error on every rank
and changes no state; a killed rank ends the job. One launch per script and
rank count serves all of its cases (a launch costs about a second).

Launches get OMP_NUM_THREADS=1 and no CBN_NUM_THREADS, and are killed (their
whole process group) after TIMEOUT seconds: a hang fails, it never blocks.
Skipped only when mpi4py is not installed (the ``mpi`` extra; CI has it).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed: the MPI tests need the "
                                     "mpi extra (pip install 'cbn[mpi]')")

WORKERS = Path(__file__).resolve().parent / "mpi"
TIMEOUT = 120          # seconds per launch
KILLED_LIMIT = 30      # a job with a dead rank must end well within TIMEOUT


def mpiexec():
    """The mpiexec beside this interpreter (mpi4py's MPICH wheels put it in
    the environment's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail(f"mpi4py is installed but there is no mpiexec beside {sys.executable} "
                    "or on PATH")
    return found


class Launch:
    """One finished (or killed) mpiexec job and its ranks' verdict files."""

    def __init__(self, ranks, script, out, returncode, stdout, stderr, seconds, timed_out):
        self.ranks, self.script, self.out = ranks, script, out
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.seconds, self.timed_out = seconds, timed_out
        self.records = {}
        for rank in range(ranks):
            path = out / f"rank{rank}.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            self.records[rank] = [json.loads(line) for line in lines]

    def tail(self):
        return (f"mpiexec -n {self.ranks} {self.script}: exit {self.returncode} after "
                f"{self.seconds:.1f} s{' (timed out, killed)' if self.timed_out else ''}\n"
                f"stderr (end): {self.stderr[-3000:]}")

    def check_complete(self):
        """Every rank finished every case; returns {case: {rank: verdict}}."""
        unfinished = {}
        for rank, records in self.records.items():
            if not records or not records[-1].get("done"):
                started = [r["start"] for r in records if "start" in r]
                unfinished[rank] = started[-1] if started else "(nothing)"
        assert not self.timed_out and self.returncode == 0 and not unfinished, (
            f"ranks did not finish (last case started: {unfinished})\n{self.tail()}")
        verdicts = {}
        for rank, records in self.records.items():
            for record in records:
                if "case" in record:
                    verdicts.setdefault(record["case"], {})[rank] = record
        missing = {case: sorted(set(range(self.ranks)) - set(by_rank))
                   for case, by_rank in verdicts.items() if len(by_rank) != self.ranks}
        assert not missing, f"cases without a verdict from every rank: {missing}"
        return verdicts


def launch(ranks, script, out, timeout=TIMEOUT):
    """``mpiexec -n ranks python -m mpi4py tests/mpi/<script> --out <out>``,
    run in ``out`` (so no source tree shadows the installed cbn)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("CBN_NUM_THREADS", None)
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py",
               str(WORKERS / script), "--out", str(out)]
    start = time.monotonic()
    # A session of its own: on a timeout the whole job (mpiexec, its proxy
    # and the ranks) is killed as one process group.
    process = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return Launch(ranks, script, out, process.returncode, stdout, stderr,
                  time.monotonic() - start, timed_out)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(script, ranks): the Launch of that script at that rank count,
    run once per module."""
    runs = {}

    def get(script, ranks):
        if (script, ranks) not in runs:
            out = tmp_path_factory.mktemp(f"{Path(script).stem}-{ranks}")
            runs[script, ranks] = launch(ranks, script, out)
        return runs[script, ranks]
    return get


def assert_all_ok(verdicts, prefix, launch):
    chosen = {case: by_rank for case, by_rank in verdicts.items() if case.startswith(prefix)}
    assert chosen, f"no {prefix!r} cases ran\n{launch.tail()}"
    failed = [f"{case} [rank {rank}]: " + " | ".join(record["problems"])[:1500]
              for case, by_rank in sorted(chosen.items())
              for rank, record in sorted(by_rank.items()) if not record["ok"]]
    assert not failed, f"{len(failed)} failing (case, rank) pairs at {launch.ranks} ranks:\n" \
        + "\n".join(failed)


RANKS = [1, 2, 3, 4]
TOPICS = {
    "train/": "forward + backward x3 against the single process: uneven, empty and "
              "all-empty batches, float32/float64, NC/NCL/NCHW/NHWC, relu, momentum=None, "
              "affine=False, bias=False, track_running_stats=False, 5000 channels, out=, "
              "convert",
    "nonfinite/": "NaN or inf on one rank, nonfinite='propagate' or 'skip': outputs and "
                  "running statistics as the single process's",
    "reduction/": "allgather and allreduce each match the single process and each other",
    "collectives/": "a training forward makes exactly one collective of its path",
    "eval/": "eval mode (also with batch statistics) runs locally, no collective",
    "pickle/": "convert and pickling keep the state; the unpickled layer synchronizes",
    "batch_stats/": "cbn.distributed.batch_stats against Moments.of on the concatenation",
    "calibrate/": "calibrate(comm=) against one calibrate on all ranks' data",
}


@pytest.mark.parametrize("topic", list(TOPICS))
@pytest.mark.parametrize("ranks", RANKS)
def test_sync_layer_equals_single_process(launched, ranks, topic):
    run = launched("sync_layer.py", ranks)
    assert_all_ok(run.check_complete(), topic, run)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_bad_input_on_some_ranks_raises_everywhere_and_changes_nothing(launched, ranks):
    # wrong channel count (one rank, two ranks), a list of strings, a 1-D
    # input, NaN/inf under nonfinite="raise", a dtype differing from the other
    # ranks', a global batch of one value per channel, a wrong gradient shape
    run = launched("failures.py", ranks)
    verdicts = run.check_complete()
    assert len(verdicts) >= 9
    assert_all_ok(verdicts, "fail/", run)


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_killed_rank_ends_the_job(tmp_path, ranks):
    run = launch(ranks, "killed_rank.py", tmp_path, timeout=TIMEOUT)
    entered = sorted(int(p.name[4:-9]) for p in tmp_path.glob("rank*.entering"))
    assert entered == list(range(ranks)), f"not every rank got going\n{run.tail()}"
    assert not run.timed_out and run.seconds < KILLED_LIMIT, run.tail()
    assert run.returncode != 0, run.tail()
    assert not list(tmp_path.glob("rank*.finished")), \
        f"a rank finished the collective without rank 1\n{run.tail()}"
