"""A rank that dies before the collective: the job must end, not hang.

    mpiexec -n 3 python -m mpi4py tests/mpi/killed_rank.py --out /tmp/verdicts

Rank 1 kills itself with SIGKILL (no Python cleanup, no MPI_Abort) just
before a training forward; the others enter the forward's collective.
MPICH's launcher (hydra) sees the dead process and ends the job, so
mpiexec exits non-zero within seconds. The surviving ranks write "entering"
first, so the test can tell a job that ended from one that never started.
"""
import os
import signal

import numpy as np
from harness import comm_world, global_batches, parse_args

import cbn

if __name__ == "__main__":
    args = parse_args()
    comm = comm_world()
    rank, size = comm.Get_rank(), comm.Get_size()
    layer = cbn.SyncBatchNorm(3)
    xs = global_batches(7, "NCHW", [4] * size, 3, np.float32)
    layer(xs[rank])   # one good step: every rank is up and synchronized
    comm.Barrier()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.entering").write_text("entering\n")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    layer(xs[rank])
    (args.out / f"rank{rank}.finished").write_text("finished\n")
