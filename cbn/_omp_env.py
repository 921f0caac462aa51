"""How long idle OpenMP threads spin: set for libgomp as cbn loads it.

Design: after a parallel region libgomp's idle threads spin before they sleep
(GOMP_SPINCOUNT, 300,000 turns by default: milliseconds). A NumPy pipeline
alternates cbn calls with matrix products, whose OpenBLAS threads need the
same cores; each hand-over then waits out the other side's spin. Measured on
a 2-core machine (examples/inference_pipeline.py, batch 256): 30 ms per batch
with the default, 0.7 to 1.0 ms with 1,000 turns, while cbn's own 2-thread
speed-up on back-to-back calls stays 1.7 to 1.8x (with no spin at all,
OMP_WAIT_POLICY=passive, waking the team costs it 1.0 to 1.5x).

libgomp reads the variable once, when it is loaded, so it is set only for
the import of the kernels and removed again (child processes do not inherit
it). A user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is left alone, and a
libgomp that another module loaded before cbn keeps its settings.
"""
import contextlib
import os

SPIN_COUNT = "1000"

# What applies, for cbn.show_config(); set by short_spin().
setting = "unknown"


def _libgomp_loaded():
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:  # not Linux: cannot tell
        return False


@contextlib.contextmanager
def short_spin():
    """Within: GOMP_SPINCOUNT=SPIN_COUNT unless the user configured spinning."""
    global setting
    user = {name: os.environ[name] for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
            if name in os.environ}
    if user:
        setting = ", ".join(f"{name}={value}" for name, value in user.items()) + \
            " (from the environment)"
        yield
        return
    if _libgomp_loaded():
        setting = "libgomp's own (it was loaded before cbn)"
    else:
        setting = f"GOMP_SPINCOUNT={SPIN_COUNT} (cbn's default)"
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        yield
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)
