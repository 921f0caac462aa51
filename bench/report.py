"""The printed report, in the manner of bottleneck's bench: a header of
versions, caches and load, then the tables (tables.py), the targets and
the machine load of each part."""
import textwrap

from . import load as machine
from .peers import names as peer_names


def mib(nbytes):
    if nbytes is None:
        return "unknown"
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes >> 10} KiB"


def caches(facts):
    sizes = facts.get("caches") or {}
    return ", ".join(f"{name} {mib(size)}" for name, size in sizes.items()) or "unknown"


def header(facts, repeats, copy_threads, quick):
    torch = f"PyTorch {facts['torch']}" if facts["torch"] else "PyTorch not installed"
    peers = "; ".join(f"{label} {facts['peers'][key]}" if facts["peers"][key]
                      else f"{label} not installed" for key, label in peer_names().items())
    simd = " ".join(facts["cpu_simd"]) or "unknown"
    lines = [
        "cbn benchmark: cbn against the NumPy formula, PyTorch CPU, ONNX Runtime, OpenVINO, "
        "oneDNN and a copy of the same bytes" + (" (--quick: a smoke test)" if quick else ""),
        f"    cbn {facts['cbn']} ({facts['cbn_path']}); NumPy {facts['numpy']}; {torch}; "
        f"Python {facts['python']}",
        f"    {peers}",
        f"    NumPy's BLAS: {', '.join(facts['blas']) if facts.get('blas') else 'unknown'}",
        f"    CPU: {facts['cpu']}, {facts['logical_cpus']} logical CPUs, {facts['machine']} "
        f"({simd})",
        f"    caches (per core where private): {caches(facts)}",
        f"    threads: {facts['threads']} for cbn and every runtime; the copy split over "
        f"{copy_threads} Python threads",
        f"    other processes before the start: {machine.describe(facts['load_before_start'])}",
        f"    times: medians; large arrays: {repeats} rounds of one call each after a warm-up, "
        "caches flushed before each call; others: samples of many calls (warm caches); "
        "the calls of a case interleaved",
    ]
    if facts["show_config"] is not None:
        lines.append("    cbn.show_config():")
        lines.append(textwrap.indent(facts["show_config"], " " * 8))
    return "\n".join(lines)


def targets_list(targets):
    width = max(len(target["requirement"]) for target in targets)
    lines = ["Targets"]
    for target in targets:
        lines.append(f"  [{target['status']:>4}] {target['requirement'].ljust(width)}  "
                     f"{target['value']}")
    counted = [target for target in targets if target["kind"] == "target"]
    judged = [target for target in counted if target["status"] in ("PASS", "FAIL")]
    met = sum(target["status"] == "PASS" for target in judged)
    others = {status: sum(target["status"] == status for target in counted)
              for status in ("SKIP", "N/A")}
    aside = ", ".join(f"{count} {'skipped' if status == 'SKIP' else 'not applicable'}"
                      for status, count in others.items() if count)
    lines.append(f"  {met} of {len(judged)} targets met" + (f" ({aside})" if aside else ""))
    if any("(*)" in target["value"] for target in targets):
        lines.append("  (*) rows timed while other processes or the hypervisor took more than "
                     f"{machine.BUSY_CPUS:g} CPUs: see the tables")
    return "\n".join(lines)


def machine_load(loads):
    """How busy other processes (and other guests of the host) kept the CPUs
    during each part of the run (the busy process of the busy-core rows
    counts as the benchmark's own)."""
    lines = ["Machine load: CPUs used by other processes (and stolen by the hypervisor)"]
    busy = []
    for part, load in loads.items():
        lines.append(f"  {part:<16} {machine.describe(load)}")
        if machine.loaded(load):
            busy.append(part)
    if busy:
        lines.append(
            f"  WARNING: other processes were busy during: {', '.join(busy)}. Rows timed\n"
            "  under load are marked * in their tables: multi-threaded calls stall for\n"
            "  whole scheduler time slices while a thread waits for a core. Rerun them\n"
            "  (--filter) on a quiet machine.")
    return "\n".join(lines)
