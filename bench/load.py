"""How busy the rest of the machine was while a part or a row was timed.

Two counts of other processes' CPU time, for windows of any length:

- per task: the CPU time of every thread on the machine, in nanoseconds
  (/proc/<pid>/task/<tid>/schedstat), summed over the threads of processes
  that are neither this one nor its descendants (the busy process of
  busy.py, the pipeline's child processes); precise over a short row, but
  blind to processes that start and end between two samples (a compiler);
- the machine's busy time from /proc/stat minus this process's and its
  children's: sees every process, but counts in ticks of 10 ms, so over a
  window of ``seconds`` it is uncertain by about CPUs x 10 ms / seconds.

The load is the per-task count, unless the tick count exceeds it by more
than its uncertainty (short-lived processes were busy); then it is the
tick count, with that uncertainty. A window counts as loaded when its load,
minus the uncertainty, exceeds BUSY_CPUS. The hypervisor's steal (ticks) is
reported beside it.
"""
import os
import resource
import time

# Other processes using more than this many CPUs make the times unreliable.
BUSY_CPUS = 0.2

_TICK_SECONDS = 1 / os.sysconf("SC_CLK_TCK")


def _tasks():
    """({tid: (pid, CPU nanoseconds)}, {pid: parent pid}) of every task, or
    (None, None) where /proc has no per-task schedstat."""
    tasks, parents = {}, {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None, None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parents[pid] = int(stat.read().rsplit(")", 1)[1].split()[1])
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                    tasks[int(tid)] = (pid, int(schedstat.read().split()[0]))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not readable
    return (tasks, parents) if tasks else (None, None)


def _ours(parents):
    """This process and its descendants."""
    ours = {os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= children
        grew = bool(children)
    return ours


def _machine_seconds():
    """(busy CPU seconds of the whole machine, seconds stolen by the hypervisor)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) * _TICK_SECONDS, steal * _TICK_SECONDS


def _sample():
    """(time, machine busy s, steal s, our CPU s, {other tid: ns} or None)."""
    try:
        busy, steal = _machine_seconds()
    except (OSError, ValueError):
        return None
    tasks, parents = _tasks()
    others, descendants = None, 0.0
    if tasks is not None:
        ours = _ours(parents)
        others = {tid: ns for tid, (pid, ns) in tasks.items() if pid not in ours}
        descendants = sum(ns for pid, ns in tasks.values()
                          if pid in ours and pid != os.getpid()) / 1e9
    own = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime + descendants
    return time.perf_counter(), busy, steal, mine, others


class CpuLoad:
    """Load of other processes since the last lap: :meth:`lap` returns
    {"other_cpus", "steal_cpus", "seconds", "uncertainty", "counted"} (CPUs
    on average; counted: "tasks" or "ticks"), or None without /proc/stat."""

    def __init__(self):
        self._last = _sample()

    def lap(self):
        now, last = _sample(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0]:
            return None
        wall = now[0] - last[0]
        uncertainty = (os.cpu_count() or 1) * _TICK_SECONDS / wall
        ticks = max(0.0, (now[1] - last[1] - (now[3] - last[3])) / wall)
        steal = (now[2] - last[2]) / wall
        load = {"other_cpus": ticks, "steal_cpus": steal, "seconds": wall,
                "uncertainty": uncertainty, "counted": "ticks"}
        if now[4] is not None and last[4] is not None:
            # A task new since the last sample counts whole: it started meanwhile.
            tasks = sum(max(0, ns - last[4].get(tid, 0)) for tid, ns in now[4].items())
            tasks /= 1e9 * wall
            if ticks - uncertainty <= tasks:
                load.update(other_cpus=tasks, uncertainty=0.0, counted="tasks")
        return load


def loaded(load):
    """True when other processes or the hypervisor surely took more than BUSY_CPUS."""
    if load is None:
        return False
    steal = max(0.0, load["steal_cpus"] - (os.cpu_count() or 1) * _TICK_SECONDS
                / load["seconds"])
    return load["other_cpus"] - load["uncertainty"] + steal > BUSY_CPUS


def quiet_check(seconds=0.5):
    """CPU load of other processes over a short idle wait before the run."""
    load = CpuLoad()
    time.sleep(seconds)
    return load.lap()


def describe(load):
    if load is None:
        return "unknown"
    return (f"{load['other_cpus']:.2f} CPUs busy"
            + (f" (+-{load['uncertainty']:.2f})" if load["uncertainty"] >= 0.01 else "")
            + (f", {load['steal_cpus']:.2f} stolen by the hypervisor"
               if load["steal_cpus"] >= 0.01 else "")
            + f" over {load['seconds']:.2f} s")
