"""Timing with drift in mind: calls interleaved round by round, medians.

The machine's speed drifts (other tenants, frequency, memory bandwidth by up
to 2x between runs), so the functions compared are called in turn within each
round: a slow stretch hits all of them alike, and the median over rounds
drops the outliers. The first round is a warm-up and is not kept.
"""
import gc
import statistics
import time


class _GcPaused:
    """Garbage collection off while timing, as in ``timeit``."""

    def __enter__(self):
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


def interleaved(functions, repeats, before_each=None):
    """Median seconds of one call of each function (for calls of a millisecond
    or more). Each round calls every function once, in order; a result is
    released after its clock stops. ``before_each`` (e.g. a cache flush) is
    called before every timed call, outside the clock."""
    samples = [[] for _ in functions]
    with _GcPaused():
        for round_index in range(repeats + 1):
            for function, times in zip(functions, samples):
                if before_each is not None:
                    before_each()
                start = time.perf_counter()
                result = function()
                elapsed = time.perf_counter() - start
                del result
                if round_index:  # round 0 is the warm-up
                    times.append(elapsed)
    return [statistics.median(times) for times in samples]


def _sample(function, count, before_each=None):
    """Seconds spent in ``count`` calls of ``function``; with ``before_each``,
    that is called before each call, outside the clock (calls timed one by
    one, so the clock's own cost, about 0.1 us, is in each)."""
    if before_each is None:
        start = time.perf_counter()
        for _ in range(count):
            function()
        return time.perf_counter() - start
    spent = 0.0
    for _ in range(count):
        before_each()
        start = time.perf_counter()
        function()
        spent += time.perf_counter() - start
    return spent


def _loops_for(function, setup, seconds, before_each=None):
    """Calls per sample so that one sample lasts about ``seconds`` (of wall
    time, ``before_each`` included)."""
    if setup is not None:
        setup()
    loops = 1
    while True:
        start = time.perf_counter()
        _sample(function, loops, before_each)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4 or loops >= 1 << 24:
            return max(1, int(loops * seconds / max(elapsed, 1e-9)))
        loops *= 4


def per_call(functions, samples, sample_seconds, setups=None, before_each=None):
    """Median seconds per call of each function, for calls of microseconds.

    Like ``timeit``: a sample is a loop of many calls, sized so that it lasts
    about ``sample_seconds``; samples of the functions are interleaved round
    by round. ``setups`` (optional, one per function, or None) are called
    before each of that function's samples, outside the clock (e.g. to set
    the thread count); ``before_each`` before every call, outside the clock
    (e.g. the matrix product a pipeline runs between batch norms).
    """
    setups = setups or [None] * len(functions)
    with _GcPaused():
        loops = [_loops_for(f, s, sample_seconds, before_each)
                 for f, s in zip(functions, setups)]
        times = [[] for _ in functions]
        for _ in range(samples):
            for function, setup, count, kept in zip(functions, setups, loops, times):
                if setup is not None:
                    setup()
                kept.append(_sample(function, count, before_each) / count)
    return [statistics.median(kept) for kept in times]
