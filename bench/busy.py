"""Another process busy on one core, for the rows timed "with a busy core".

A user's machine is rarely idle; an OpenMP team that waits for a core held
by another process loses whole scheduler time slices. ``BusyCore`` starts a
Python process spinning in a loop and stops it on exit, also when the
benchmark fails or is interrupted; the spinning process also ends itself
after ``timeout`` seconds, should this process die without cleaning up.
As a child of the benchmark, its CPU time is not counted as other
processes' load (load.py).
"""
import subprocess
import sys
import time

SPIN = "import time\nend = time.monotonic() + {timeout}\nwhile time.monotonic() < end: pass\n"


class BusyCore:
    """Context manager: a process busy on one core while the block runs."""

    def __init__(self, timeout=600.0):
        self.timeout = timeout
        self.process = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SPIN.format(timeout=self.timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        time.sleep(0.1)  # let it start spinning before anything is timed
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def stop(self):
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
