"""The whole suite once more (but the leak tests), against a build with
AddressSanitizer and UndefinedBehaviorSanitizer (CBN_SANITIZE=1, see setup.py).

Any out-of-bounds access, use after free or undefined behaviour in the
compiled code aborts that run, which then fails this test with the report.
The sanitized package is built from this checkout into a temporary folder
and imported from there by a child pytest, with libasan preloaded into the
(uninstrumented) Python. Takes a few minutes; CBN_SANITIZER_RUN=0 leaves it
out while iterating locally.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PACKAGE_FILES = ("setup.py", "pyproject.toml", "README.md")

# detect_leaks: CPython itself keeps memory until exit; leaks are tested in
# test_leaks.py. allocator_may_return_null: huge requests must fail like
# malloc does (the kernels check), not abort.
ASAN_OPTIONS = "detect_leaks=0:allocator_may_return_null=1"


def runtime_library(name):
    """Absolute path of a compiler runtime library (libasan.so, ...), or None."""
    compiler = os.environ.get("CC", "gcc")
    try:
        found = subprocess.run([compiler, f"-print-file-name={name}"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


def preload():
    """LD_PRELOAD for an uninstrumented Python: libasan first; libstdc++ too,
    or ASan's C++ exception interceptor finds no __cxa_throw when a C++
    extension (matplotlib, torch) throws."""
    libraries = [runtime_library("libasan.so"), runtime_library("libstdc++.so")]
    assert libraries[0], "the sanitizer build needs the compiler's libasan"
    return " ".join(library for library in libraries if library)


def build_sanitized(destination):
    """pip-install this checkout, built with CBN_SANITIZE=1, into destination."""
    source = destination.parent / "source"
    shutil.copytree(REPO / "cbn", source / "cbn",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    for name in PACKAGE_FILES:
        shutil.copy(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
               "--target", str(destination), str(source)]
    if importlib.util.find_spec("Cython") is not None:  # build here, offline
        command.insert(4, "--no-build-isolation")
    build = subprocess.run(command, env=dict(os.environ, CBN_SANITIZE="1"),
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("CBN_SANITIZER_RUN") == "0",
                    reason="CBN_SANITIZER_RUN=0: the sanitizer run was left out")
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the sanitizer run uses gcc's libasan on Linux")
def test_whole_suite_is_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    site = tmp_path / "site"
    build_sanitized(site)
    kernels = sorted((site / "cbn").glob("_kernels*.so"))
    assert kernels
    for module in kernels:  # the build really is instrumented
        linked = subprocess.run(["ldd", str(module)], capture_output=True, text=True).stdout
        assert "libasan" in linked and "libubsan" in linked, linked
    # OpenVINO's runtime ends the process (exit status 1, no message) under
    # ASan's interceptors, so this run hides it: its imports fail and the
    # benchmark tests that need it skip here (the plain suite runs them).
    hidden = tmp_path / "hidden"
    (hidden / "openvino").mkdir(parents=True)
    (hidden / "openvino" / "__init__.py").write_text(
        "raise ModuleNotFoundError('openvino is hidden in the sanitizer run')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(hidden)]),
               LD_PRELOAD=preload(), ASAN_OPTIONS=ASAN_OPTIONS,
               UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("CBN_TEST_INPLACE", None)
    where = subprocess.run([sys.executable, "-c", "import cbn; print(cbn.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert where.stdout.strip() == str(site / "cbn" / "__init__.py"), where.stderr
    # test_leaks.py measures resident memory, which ASan's allocator inflates
    # (freed blocks wait in its quarantine); it runs in the plain suite.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS), "-q", "-p", "no:cacheprovider",
         f"--ignore={Path(__file__).resolve()}", f"--ignore={TESTS / 'test_leaks.py'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    output = run.stdout + run.stderr
    assert "ERROR: AddressSanitizer" not in output, output[-6000:]
    assert "runtime error:" not in output, output[-6000:]
    assert run.returncode == 0, output[-6000:]
