"""The report's tables: aligned plain text, one function per table.

Times are medians; every row timed while other processes or the
hypervisor took CPU time (load.loaded) ends with a * and the table with a
footnote saying so. A runtime that cannot run a case shows "n/a" with a
footnote giving the reason.
"""
import textwrap

from . import load as machine
from .peers import names as peer_names
from .report import mib
from .targets import COPY_LIMITS, RESIDENT_LIMITS


def _us(seconds):
    """Microseconds with about four significant digits, or "-"."""
    if seconds is None:
        return "-"
    us = seconds * 1e6
    for bound, decimals in ((1000, 0), (100, 1), (10, 2)):
        if us >= bound:
            return f"{us:.{decimals}f}"
    return f"{us:.3f}"


def _times(value):
    return "-" if value is None else f"{value:.2f}x"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}"


def _shape(shape):
    return str(tuple(shape))


def _star(row):
    return "*" if machine.loaded(row.get("machine_load")) else ""


def _table(headers, rows, left=1):
    """Aligned columns: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return ("  " + "  ".join(str(cell).ljust(width) if index < left
                                 else str(cell).rjust(width)
                                 for index, (cell, width) in enumerate(zip(cells, widths)))
                ).rstrip()
    return "\n".join([line(headers)] + [line(row) for row in rows])


def _starred(headers, body, rows, left):
    """The table with a last column of * marks, and the footnote when any."""
    table = _table(headers + [""], [cells + [_star(row)] for cells, row in zip(body, rows)],
                   left)
    if any(_star(row) for row in rows):
        table += ("\n  * timed while other processes or the hypervisor took more than "
                  f"{machine.BUSY_CPUS:g} CPUs (beyond the\n    tick-counting uncertainty): "
                  "unreliable, rerun (--filter) on a quiet machine")
    return table


def suite_table(rows, copy_threads):
    legend = textwrap.dedent(f"""\
        The suite: median microseconds per call. Size: resident (at most {mib(8 << 20)},
        warm caches), medium, or large (at least 2x the L3: every call reads memory, the
        caches flushed before it).
            cbn(out=): cbn writing a preallocated array; cbn: the default call, allocating
            its output as NumPy and PyTorch do; NumPy: the vectorized NumPy formula in the
            input's dtype; PyTorch: torch.nn.functional.batch_norm, and for the backward
            aten.native_batch_norm_backward (the kernel autograd runs); copy: np.copyto of
            the same bytes into a preallocated array, the limit of a memory-bound kernel
            (the faster of a copy split over {copy_threads} threads and a one-thread copy).
            xNumPy, xPyTorch: their time / cbn's (default call); above 1 means cbn is faster.
            out=/copy: cbn(out=) time / copy time; the floor is 1 for inference, 1 to 1.5
            for a training forward, 1.5 to 2.5 for backward (traffic in copies of the array).
            Layouts: NC is (N, C), NCL (N, C, L), NCHW, all with channels on axis 1;
            NHWC is channels last (axis=-1).
        """)
    headers = ["shape", "layout", "dtype", "op", "size", "cbn(out=)", "cbn", "NumPy",
               "PyTorch", "copy", "xNumPy", "xPyTorch", "out=/copy"]
    body = [[_shape(row["shape"]), row["layout"], row["dtype"], row["op"], row["size_class"],
             _us(row["seconds"]["cbn_out"]), _us(row["seconds"]["cbn"]),
             _us(row["seconds"]["numpy"]), _us(row["seconds"]["torch"]),
             _us(row["seconds"]["copy"]), _times(row["speedup_numpy"]),
             _times(row["speedup_torch"]), _ratio(row["copy_ratio"])] for row in rows]
    return legend + _starred(headers, body, rows, left=5)


def peers_table(rows):
    rows = [row for row in rows if row["op"] == "inference"]
    labels = peer_names()
    reasons = {}

    def cell(row, key):
        if key in row["unsupported"]:
            label = labels.get(key.removesuffix("_relu"), key)
            reason = f"{label}: {row['unsupported'][key]}"
            return f"n/a({reasons.setdefault(reason, chr(ord('a') + len(reasons)))})"
        return _us(row["seconds"].get(key))

    def speedup(row, key):
        return "" if key in row["unsupported"] else _times(row["speedup_peers"].get(key))

    headers = (["shape", "layout", "dtype", "cbn(out=)", "cbn"] + list(labels.values())
               + ["PyTorch"] + [f"x{label}" for label in labels.values()]
               + ["xPyTorch", "ReLU: cbn(out=)", "OpenVINO", "xOpenVINO"])
    body = [[_shape(row["shape"]), row["layout"], row["dtype"],
             _us(row["seconds"]["cbn_out"]), _us(row["seconds"]["cbn"])]
            + [cell(row, key) for key in labels] + [_us(row["seconds"]["torch"])]
            + [speedup(row, key) for key in labels] + [_times(row["speedup_torch"])]
            + [_us(row["seconds"].get("cbn_relu_out")), cell(row, "openvino_relu"),
               speedup(row, "openvino_relu")]
            for row in rows]
    legend = textwrap.dedent("""\
        Inference against the runtimes a user would pick instead: median microseconds per
        call, same thread count. ONNX Runtime: one BatchNormalization node, input and
        output bound to NumPy buffers (IOBinding), intra-op spinning off; OpenVINO: one
        BatchNormInference compiled for CPU, f32 precision, tensors sharing NumPy's
        memory; oneDNN: PyTorch's MKL-DNN tensor (reordered outside the clock), eval batch
        norm allocating its output. xRuntime: its time / cbn(out=)'s (ONNX Runtime,
        OpenVINO) or / cbn's default call (oneDNN, PyTorch, which allocate); above 1 means
        cbn is faster. ReLU: cbn with activation="relu" and OpenVINO's BN+ReLU (fused
        into one node by its plugin). Channels-last arrays are given to ONNX Runtime and
        OpenVINO as their (N*H*W, C) view; each runtime's output was checked against cbn's.
        """)
    table = _starred(headers, body, rows, left=3)
    if reasons:
        table += "\n" + "\n".join(f"  ({letter}) n/a: {reason}"
                                  for reason, letter in reasons.items())
    return legend + table


def resident_table(rows, threads):
    rows = [row for row in rows if row["resident"]]
    headers = ["shape", "layout", "dtype", "op", "1 thread", "copy", "out=/copy",
               f"{threads} threads", "copy", "out=/copy", "limit"]
    body = [[_shape(row["shape"]), row["layout"], row["dtype"], row["op"],
             _us(row["seconds"].get("cbn_out_1thread")), _us(row["seconds"]["copy_1thread"]),
             _ratio(row["copy_ratio_1thread"]), _us(row["seconds"]["cbn_out"]),
             _us(row["seconds"]["copy"]), _ratio(row["copy_ratio"]),
             f"{RESIDENT_LIMITS[row['op']]:g}"] for row in rows]
    return ("Cache-resident arrays (at most 8 MiB, warm caches): cbn(out=) against a copy, "
            "median microseconds per call.\n    At 1 thread the copy is a plain np.copyto; at "
            f"{threads} threads the faster of a copy split over Python threads\n    and a "
            "plain np.copyto, as for large arrays.\n" + _starred(headers, body, rows, left=4))


def small_calls_table(rows, samples):
    headers = ["call", "shape", "cbn", "NumPy", "PyTorch", "target"]
    body = [[f"{row['form']} {row['op']}", _shape(row["shape"]), _us(row["seconds"]["cbn"]),
             _us(row["seconds"]["numpy"]), _us(row["seconds"]["torch"]),
             f"< {row['target_us']:g}"] for row in rows]
    return (f"Small calls: float32, microseconds per call (median of {samples} samples of "
            "many calls)\n" + _starred(headers, body, rows, left=2))


def scaling_table(rows, samples):
    headers = ["shape", "layout", "op", "1 thread", "2 threads", "speed-up", "identical"]
    body = [[_shape(row["shape"]), row["layout"], row["op"], _us(row["seconds"][0]),
             _us(row["seconds"][-1]), f"{row['speedup']:.2f}x",
             "yes" if row["identical"] else "NO"] for row in rows]
    return ("Thread scaling: float32 in cache, cbn with out=, microseconds per call "
            f"(median of {samples} samples)\n" + _starred(headers, body, rows, left=3))


def default_threads_table(rows, samples):
    headers = ["scenario", "shape", "layout", "op", "default", "1 thread", "ratio"]
    body = [[row["scenario"], _shape(row["shape"]), row["layout"], row["op"],
             _us(row["seconds"]["default"]), _us(row["seconds"]["1 thread"]),
             _ratio(row["ratio"])] for row in rows]
    count = rows[0]["default_threads"] if rows else "?"
    return ("The default thread setting (cbn.set_num_threads(None): "
            f"{count} threads) against one thread: float32, out=,\n"
            f"microseconds per call, median of {samples} samples of each setting, "
            "alternating.\n    between matmuls: a multithreaded NumPy matrix product "
            "before each call (outside the clock);\n    busy core: another process "
            "spinning on one core (its CPU time is not counted as load)\n"
            + _starred(headers, body, rows, left=4))


def python_threads_table(rows, samples):
    headers = ["form", "shape", "1 thread", "2 threads", "speed-up"]
    body = [[row["form"], _shape(row["shape"]), _us(row["seconds"][0]),
             _us(row["seconds"][1]), f"{row['speedup']:.2f}x"] for row in rows]
    return ("Python threads sharing one eval layer: float32, out=, cbn kernels at one "
            f"thread, microseconds per call (median of {samples} samples)\n"
            + _starred(headers, body, rows, left=2))


def pipeline_table(pipeline):
    parts = []
    for order, result in pipeline.items():
        if "error" in result or "skipped" in result:
            parts.append(f"  {order}: {result.get('skipped') or 'FAILED: ' + result['error']}")
            continue
        ways = result["ways"]
        headers = ["batch", "stream", "scenario", *ways, "xPyTorch fused", "frozen"]
        body = []
        for row in result["rows"]:
            torch = row["seconds"].get("PyTorch")
            speedups = [_times(None if torch is None else torch / row["seconds"][way])
                        for way in ("fused", "frozen")]
            body.append([row["batch"], f"{result['rounds']}x{row['batches']}", row["scenario"],
                         *[_us(row["seconds"][way]) for way in ways], *speedups])
        parts.append(f"  {order} (imported in that order in a fresh process)"
                     + "".join(f"; {note}" for note in result["notes"]) + "\n"
                     + _starred(headers, body, result["rows"], left=3))
    sizes = next((result["sizes"] for result in pipeline.values() if "sizes" in result), [])
    legend = textwrap.dedent(f"""\
        Pipeline: dense -> batch norm -> ReLU, three blocks ({' -> '.join(map(str, sizes))}
        features), float32, microseconds per batch: the median over rounds of a stream of
        batches (stream: rounds x batches), the ways interleaved in each round.
            plain: eval layer then np.maximum; fused: activation="relu"; frozen:
            layer.freeze(); folded: BN folded into the dense weights; PyTorch: eager, grad
            off; ONNX Runtime and OpenVINO: the whole model. busy core: another process
            spinning on one core. xPyTorch: PyTorch's time / the way's.
        """)
    return legend + "\n".join(parts)


def summary_table(by_op):
    headers = ["op", "cases", "xNumPy", "xPyTorch", "out=/copy", "worst large", "limit"]
    body = [[op, values["cases"], _times(values["speedup_numpy"]),
             _times(values["speedup_torch"]), _ratio(values["copy_ratio"]),
             _ratio(values["worst_large_copy_ratio"]), f"{COPY_LIMITS[op]:g}"]
            for op, values in by_op.items()]
    return ("Summary: medians over the suite (worst large: highest out=/copy on a large "
            "array)\n" + _table(headers, body, left=1))
