"""The printed report, in the manner of bottleneck's bench: a header of
versions and how to read the numbers, then aligned plain-text tables."""
import textwrap

from .cases import LARGE_BYTES
from .targets import COPY_LIMITS


def _ms(seconds):
    """Milliseconds with about four significant digits, or "-"."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    for bound, decimals in ((100, 1), (10, 2), (1, 3)):
        if ms >= bound:
            return f"{ms:.{decimals}f}"
    return f"{ms:.4f}"


def _us(seconds):
    return "-" if seconds is None else f"{seconds * 1e6:.2f}"


def _times(value):
    return "-" if value is None else f"{value:.1f}x"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}"


def _shape(shape):
    return str(tuple(shape))


def _table(headers, rows, left=1):
    """Aligned columns: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return ("  " + "  ".join(str(cell).ljust(width) if index < left
                                 else str(cell).rjust(width)
                                 for index, (cell, width) in enumerate(zip(cells, widths)))
                ).rstrip()
    return "\n".join([line(headers)] + [line(row) for row in rows])


# Other processes using more than this many CPUs make the times unreliable.
BUSY_CPUS = 0.2


# Loads averaged over less than this many seconds are too rough to judge.
MEASURABLE_SECONDS = 1.0


def busy(load):
    """True when other processes or the hypervisor took more than BUSY_CPUS."""
    return (load is not None and load["seconds"] >= MEASURABLE_SECONDS
            and load["other_cpus"] + load["steal_cpus"] > BUSY_CPUS)


def _load(load):
    if load is None:
        return "unknown"
    return (f"{load['other_cpus']:.2f} CPUs busy"
            + (f", {load['steal_cpus']:.2f} stolen by the hypervisor"
               if load["steal_cpus"] >= 0.01 else ""))


def header(facts, repeats, copy_threads):
    torch = f"PyTorch {facts['torch']}" if facts["torch"] else "PyTorch not installed"
    simd = " ".join(facts["cpu_simd"]) or "unknown"
    cache = facts["last_level_cache_bytes"]
    cache = "unknown" if cache is None else f"{cache / 2**20:.0f} MiB"
    lines = [
        "cbn benchmark: cbn against the NumPy formula, PyTorch CPU and a copy of the same bytes",
        f"    cbn {facts['cbn']} ({facts['cbn_path']}); NumPy {facts['numpy']}; {torch}; "
        f"Python {facts['python']}",
        f"    CPU: {facts['cpu']}, {facts['logical_cpus']} logical CPUs, {facts['machine']} "
        f"({simd}), last-level cache {cache}",
        f"    threads: {facts['threads']} for cbn{' and PyTorch' if facts['torch'] else ''}; "
        f"the copy split over {copy_threads} Python threads",
        f"    other processes before the start: {_load(facts['load_before_start'])}",
        f"    times: median of {repeats} rounds after a warm-up round, the calls of a case "
        "interleaved in each round",
    ]
    if facts["show_config"] is not None:
        lines.append("    cbn.show_config():")
        lines.append(textwrap.indent(facts["show_config"], " " * 8))
    return "\n".join(lines)


def suite_table(rows, copy_threads):
    legend = textwrap.dedent(f"""\
        Large arrays: median milliseconds per call (on arrays of {LARGE_BYTES >> 20} MiB or more,
        every timed call starts with the caches flushed, so all read from memory)
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
    headers = ["shape", "layout", "dtype", "op", "cbn(out=)", "cbn", "NumPy", "PyTorch",
               "copy", "xNumPy", "xPyTorch", "out=/copy"]
    body = [[_shape(row["shape"]), row["layout"], row["dtype"], row["op"],
             _ms(row["seconds"]["cbn_out"]), _ms(row["seconds"]["cbn"]),
             _ms(row["seconds"]["numpy"]), _ms(row["seconds"]["torch"]),
             _ms(row["seconds"]["copy"]), _times(row["speedup_numpy"]),
             _times(row["speedup_torch"]), _ratio(row["copy_ratio"]),
             "*" if busy(row.get("machine_load")) else ""]
            for row in rows]
    table = _table(headers + [""], body, left=4)
    if any(row[-1] for row in body):
        table += ("\n  * timed while other processes or the hypervisor took more than "
                  f"{BUSY_CPUS:g} CPUs:\n    unreliable, rerun (--filter) on a quiet machine")
    return legend + "\n" + table


def small_calls_table(rows, samples):
    headers = ["call", "shape", "cbn", "NumPy", "PyTorch", "target"]
    body = [[f"{row['form']} {row['op']}", _shape(row["shape"]), _us(row["seconds"]["cbn"]),
             _us(row["seconds"]["numpy"]), _us(row["seconds"]["torch"]),
             f"< {row['target_us']:g}"] for row in rows]
    return (f"Small calls: float32, microseconds per call (median of {samples} samples of "
            "many calls)\n" + _table(headers, body, left=2))


def scaling_table(rows, samples):
    headers = ["shape", "layout", "op", "1 thread", "2 threads", "speed-up", "identical"]
    body = [[_shape(row["shape"]), row["layout"], row["op"], _us(row["seconds"][0]),
             _us(row["seconds"][-1]), f"{row['speedup']:.2f}x",
             "yes" if row["identical"] else "NO"] for row in rows]
    return ("Thread scaling: float32 in cache, cbn with out=, microseconds per call "
            f"(median of {samples} samples)\n" + _table(headers, body, left=3))


def python_threads_table(rows, samples):
    headers = ["form", "shape", "1 thread", "2 threads", "speed-up"]
    body = [[row["form"], _shape(row["shape"]), _us(row["seconds"][0]),
             _us(row["seconds"][1]), f"{row['speedup']:.2f}x"] for row in rows]
    return ("Python threads sharing one eval layer: float32, out=, cbn kernels at one "
            f"thread, microseconds per call (median of {samples} samples)\n"
            + _table(headers, body, left=2))


def summary_table(by_op):
    headers = ["op", "cases", "xNumPy", "xPyTorch", "out=/copy", "worst large", "limit"]
    body = [[op, values["cases"], _times(values["speedup_numpy"]),
             _times(values["speedup_torch"]), _ratio(values["copy_ratio"]),
             _ratio(values["worst_large_copy_ratio"]), f"{COPY_LIMITS[op]:g}"]
            for op, values in by_op.items()]
    return ("Summary: medians over the suite (worst large: highest out=/copy on a large "
            "array)\n" + _table(headers, body, left=1))


def targets_list(targets):
    width = max(len(target["requirement"]) for target in targets)
    lines = ["Targets (from the issue)"]
    for target in targets:
        lines.append(f"  [{target['status']:>4}] {target['requirement'].ljust(width)}  "
                     f"{target['value']}")
    counted = [target for target in targets if target["kind"] == "target"]
    judged = [target for target in counted if target["status"] != "SKIP"]
    met = sum(target["status"] == "PASS" for target in judged)
    lines.append(f"  {met} of {len(judged)} targets met"
                 + (f" ({len(counted) - len(judged)} skipped)" if len(judged) < len(counted)
                    else ""))
    return "\n".join(lines)


def machine_load(loads):
    """How busy other processes (and other guests of the host) kept the CPUs
    during each part of the run."""
    lines = ["Machine load: CPUs used by other processes (and stolen by the hypervisor)"]
    others, stolen = [], []
    for part, load in loads.items():
        lines.append(f"  {part:<14} {_load(load)}")
        if load is not None and load["seconds"] >= MEASURABLE_SECONDS:
            if load["other_cpus"] > BUSY_CPUS:
                others.append(part)
            if load["steal_cpus"] > BUSY_CPUS:
                stolen.append(part)
    if others:
        lines.append(
            f"  WARNING: other processes were busy during: {', '.join(others)}. Those times\n"
            "  are unreliable: multi-threaded calls stall for whole scheduler time slices\n"
            "  while an OpenMP thread waits for a core. Rerun on a quiet machine.")
    if stolen:
        lines.append(
            f"  Note: the hypervisor took CPU time during: {', '.join(stolen)} (the host's\n"
            "  cores are shared with other guests); multi-threaded times suffer most.")
    return "\n".join(lines)
