"""Masked training forwards against unmasked ones.

For each training-forward case of the suite (cases.py, both dtypes) and a
few (N, C, L) float32 cases shaped like padded sequence models, one fresh
cbn.BatchNorm per call in training mode (running statistics updated by
every call) times ``layer(x, out)`` and ``layer(x, out, mask=mask)`` in the
same rounds, at the run's thread count, for two masks of x's shape without
the channel axis:

  padding   each sample keeps a valid prefix of its flattened positions,
            of a length drawn uniformly from 50% to 100% of them; (N, C)
            arrays have one position per sample, so there the batch itself
            is the sequence: a prefix of its samples is valid
  random    each position valid with probability RANDOM_VALID

Calls under a millisecond are timed many per sample (timing.per_call, warm
caches); longer ones one per round (timing.interleaved), as many rounds as
fit in ROUND_SECONDS, without cache flushes: the three calls of a case read
the same arrays, so each leaves the caches as the others find them.
Each row reports the medians and masked / unmasked.
"""
import math
import os
import sys
import time

import numpy as np

import cbn

from . import load as machine
from .cache import cache_sizes
from .cases import FULL_SUITE, QUICK_SUITE, Case
from .report import mib
from .tables import _table, _us
from .targets import masked_target
from .timing import interleaved, per_call

SEQUENCE_SHAPES = ((32, 256, 128), (64, 512, 64), (16, 128, 512))
QUICK_SEQUENCE_SHAPES = ((8, 64, 128),)
MASKS = ("padding", "random")
RANDOM_VALID = 0.75
PADDING_LOW = 0.5  # shortest valid prefix, as a fraction of the positions
SEED = 20261201

# Calls at least this long are timed one per round.
ROUND_CALL_SECONDS = 1e-3
# (samples, seconds per sample) of the per-call timings; (seconds of rounds
# per case, fewest rounds, most rounds) of the interleaved ones.
SAMPLES, QUICK_SAMPLES = (9, 0.01), (3, 0.002)
ROUNDS, QUICK_ROUNDS = (1.0, 5, 200), (0.1, 3, 20)


def cases(quick):
    """The suite's cases that train, then the sequence cases."""
    suite = QUICK_SUITE if quick else FULL_SUITE
    sequences = QUICK_SEQUENCE_SHAPES if quick else SEQUENCE_SHAPES
    return ([case for case in suite if "train forward" in case.ops]
            + [Case(shape, "NCL", np.float32) for shape in sequences])


def row_name(case, mask):
    return f"masked {case.name} {mask}"


def mask_shape(case):
    axis = case.axis % len(case.shape)
    return case.shape[:axis] + case.shape[axis + 1:]


def make_mask(kind, shape, rng):
    """A boolean mask of ``shape`` (x's without the channel axis)."""
    if kind == "random":
        return rng.random(shape) < RANDOM_VALID
    if kind != "padding":
        raise ValueError(f"mask kind is expected to be one of {MASKS}, got {kind!r}")
    if len(shape) == 1:  # (N, C): the batch is the sequence
        samples, positions = 1, shape[0]
    else:
        samples, positions = shape[0], math.prod(shape[1:])
    lengths = rng.integers(math.ceil(PADDING_LOW * positions), positions, size=samples,
                           endpoint=True)
    return (np.arange(positions) < lengths[:, None]).reshape(shape)


def _data(case, rng):
    x = rng.standard_normal(case.shape, dtype=case.dtype)
    x *= 2
    x += 3
    return x


def _layer_call(case, x, out, mask=None):
    layer = cbn.BatchNorm(case.channels, axis=case.axis, dtype=case.dtype).train()
    if mask is None:
        return lambda: layer(x, out)
    return lambda: layer(x, out, mask=mask)


def _median_call(function, count=3):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[count // 2]


def time_case(case, masks, quick):
    """({"unmasked": s, mask kind: s}, {mask kind: valid fraction}, how timed).
    Fixed seeds: both dtypes of a shape get the same masks, whatever the filter."""
    x = _data(case, np.random.default_rng(SEED))
    out = np.empty_like(x)
    chosen = {kind: make_mask(kind, mask_shape(case), np.random.default_rng([SEED, index]))
              for index, kind in enumerate(MASKS) if kind in masks}
    calls = {"unmasked": _layer_call(case, x, out),
             **{kind: _layer_call(case, x, out, mask) for kind, mask in chosen.items()}}
    for call in calls.values():
        call()  # first calls: the layers' buffers, the pages of out
    one_call = _median_call(calls["unmasked"])
    if one_call < ROUND_CALL_SECONDS:
        samples, sample_seconds = QUICK_SAMPLES if quick else SAMPLES
        medians = per_call(list(calls.values()), samples, sample_seconds)
        timed = f"{samples} samples of {sample_seconds * 1e3:g} ms"
    else:
        seconds, fewest, most = QUICK_ROUNDS if quick else ROUNDS
        rounds = max(fewest, min(most, int(seconds / (len(calls) * one_call))))
        medians = interleaved(list(calls.values()), rounds)
        timed = f"{rounds} rounds"
    valid = {kind: float(mask.mean()) for kind, mask in chosen.items()}
    return dict(zip(calls, medians)), valid, timed


def run(selected, quick, progress=sys.stderr, *, chosen_cases=None):
    """One row per (case, mask) whose name ``selected`` keeps; [] when none.
    ``chosen_cases``: the cases to time (default: ``cases(quick)``)."""
    todo = [(case, [kind for kind in MASKS if selected(row_name(case, kind))])
            for case in (cases(quick) if chosen_cases is None else chosen_cases)]
    todo = [(case, masks) for case, masks in todo if masks]
    rows = []
    threads = cbn.get_num_threads()
    for index, (case, masks) in enumerate(todo, 1):
        start = time.perf_counter()
        cpu_load = machine.CpuLoad()
        seconds, valid, timed = time_case(case, masks, quick)
        load = cpu_load.lap()
        for kind in masks:
            rows.append({
                "name": row_name(case, kind), "case": case.name, "shape": list(case.shape),
                "layout": case.layout, "axis": case.axis, "dtype": case.dtype_name,
                "nbytes": case.nbytes, "mask": kind, "valid_fraction": valid[kind],
                "threads": threads, "timed": timed,
                "seconds": {"unmasked": seconds["unmasked"], "masked": seconds[kind]},
                "ratio": seconds[kind] / seconds["unmasked"], "machine_load": load})
        print(f"[{index:2d}/{len(todo)}] masked {case.name}: {timed} in "
              f"{time.perf_counter() - start:.1f} s"
              + ("; LOADED: " + machine.describe(load) if machine.loaded(load) else ""),
              file=progress, flush=True)
    return rows


def report(rows, quick):
    """The part's table, its caches line and its target (met / not met)."""
    caches = cache_sizes()
    threads = rows[0]["threads"] if rows else "-"
    lines = ["Masked training forward vs unmasked: a fresh BatchNorm in training mode, "
             "layer(x, out, mask=mask) against layer(x, out)",
             f"    {os.cpu_count()} logical CPUs; caches (per core where private): "
             + (", ".join(f"{name} {mib(size)}" for name, size in caches.items())
                or "unknown"),
             f"    {threads} threads; times: medians, the calls of a case interleaved (calls "
             f"under {ROUND_CALL_SECONDS * 1e3:g} ms: samples of many calls, warm caches); "
             "x: masked / unmasked",
             f"    masks: padding (a valid prefix of each sample's positions, "
             f"{PADDING_LOW:.0%} to 100%), random (each position valid with probability "
             f"{RANDOM_VALID:g})"]
    body = [[str(tuple(row["shape"])), row["layout"], row["dtype"], mib(row["nbytes"]),
             row["mask"], f"{row['valid_fraction']:.0%}", _us(row["seconds"]["unmasked"]),
             _us(row["seconds"]["masked"]), f"{row['ratio']:.2f}x",
             "*" if machine.loaded(row["machine_load"]) else ""] for row in rows]
    lines.append(_table(["case", "layout", "dtype", "size", "mask", "valid", "unmasked us",
                         "masked us", "x", ""], body, left=5))
    if any(machine.loaded(row["machine_load"]) for row in rows):
        lines.append("  * timed while other processes or the hypervisor took more than "
                     f"{machine.BUSY_CPUS:g} CPUs")
    target = masked_target(rows, quick)
    verdict = {"PASS": "met", "FAIL": "NOT MET"}.get(target["status"], target["status"])
    lines.append(f"  Target: [{verdict}] {target['requirement']}: {target['value']}")
    return "\n".join(lines)
