"""The cbn benchmark: ``python bench/run.py`` or ``python -m bench`` (see run.py).

One module per concern:

    cases.py             the suite (sized against this machine's caches), the
                         small calls, the thread rows
    cbn_calls.py         cbn's calls (with out= and default)
    numpy_formula.py     the NumPy baseline, in the input's dtype
    torch_ops.py         PyTorch CPU's calls (optional)
    peer_api.py          what a peer runtime's module provides
    peer_onnxruntime.py  ONNX Runtime: one BatchNormalization node; the network
    peer_openvino.py     OpenVINO: BatchNormInference (+ ReLU); the network
    peer_onednn.py       oneDNN through PyTorch's MKL-DNN tensors
    peers.py             the peers built, checked against cbn, or n/a with a reason
    copy_limit.py        a copy of the same bytes split over threads
    timing.py            interleaved medians; timeit-style per-call times
    cache.py             cache sizes; evicting the last-level cache between calls
    load.py              other processes' CPU load over a part or a row
    busy.py              another process busy on one core
    suite.py             the suite's cases: cbn, NumPy, PyTorch, peers, copy
    small_calls.py       small calls in microseconds
    scaling.py           1 vs 2 threads, and bit-identical results
    default_threads.py   the default thread setting vs 1 thread: quiet, between
                         matrix products, with a busy core
    python_threads.py    Python threads sharing one eval layer
    pipeline.py          dense -> batch norm -> ReLU: cbn's four ways, PyTorch,
                         ONNX Runtime, OpenVINO
    import_order.py      the pipeline in a child process per import order
    sync.py              SyncBatchNorm's step against the local step at 2 and 4
                         MPI ranks (runs sync_worker.py under mpiexec)
    sync_pieces.py       where SyncBatchNorm's added time goes (run under mpiexec)
    dask_moments.py      cbn.dask.moments against reading the same file
    targets.py           the performance targets, PASS/FAIL (N/A in --quick)
    environment.py       versions, CPU, caches, build facts
    report.py            the header, the targets, the machine load
    tables.py            the printed tables
    plot.py              the PNG chart (matplotlib optional)
    run.py               the command line
"""
