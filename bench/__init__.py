"""The cbn benchmark: ``python bench/run.py`` or ``python -m bench`` (see run.py).

One module per concern:

    cases.py          the suite, the small calls, the thread-scaling rows
    cbn_calls.py      cbn's calls (with out= and default)
    numpy_formula.py  the NumPy baseline, in the input's dtype
    torch_ops.py      PyTorch CPU's calls (optional)
    copy_limit.py     a copy of the same bytes split over threads
    timing.py         interleaved medians; timeit-style per-call times
    cache.py          evicting the last-level cache between timed calls
    suite.py          the large cases
    small_calls.py    small calls in microseconds
    scaling.py        1 vs 2 threads, and bit-identical results
    targets.py        the issue's targets, PASS/FAIL
    environment.py    versions, CPU, build facts
    report.py         the printed tables
    plot.py           the PNG chart (matplotlib optional)
    run.py            the command line
"""
