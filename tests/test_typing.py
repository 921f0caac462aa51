"""cbn's type information, checked with mypy against the *installed* package.

- tests/typing_usage.py, which uses every public name, passes ``mypy --strict``
  (this needs the installed ``py.typed``: without it mypy reports
  import-untyped);
- misspelled methods and keywords are caught, as the annotations promise;
- the stubs of the compiled modules (``_core.pyi``, ``_kernels*.pyi``) match
  the built modules (``mypy.stubtest``, allow-list in
  tests/stubtest_allowlist.txt).

mypy runs in a temporary directory, so that it reads cbn from site-packages
rather than the source tree, with its cache and configuration there too.
mypy is in the ``test`` extra; without it these tests fail rather than skip.
"""
import ast
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cbn
from cbn import _kernels

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
INSTALLED = Path(cbn.__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").is_file() or not (ROOT / "cbn").is_dir(),
    reason=f"no source tree at {ROOT}: the typing checks use the repository's files")


def run(tmp_path, *args):
    """``python -m <args>`` from ``tmp_path``; returns (exit code, output)."""
    env = {key: value for key, value in os.environ.items() if key != "MYPYPATH"}
    result = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    return result.returncode, result.stdout + result.stderr


def mypy_config(tmp_path, settings=""):
    """A configuration of our own, so that no user's settings take part."""
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\ncache_dir = {tmp_path / 'cache'}\n{settings}")
    return str(config)


def mypy_strict(tmp_path, source):
    return run(tmp_path, "mypy", "--strict", "--config-file", mypy_config(tmp_path),
               str(source))


def test_installed_cbn_is_typed():
    assert (INSTALLED / "py.typed").is_file()
    for stub in ("_core.pyi", "_kernels.pyi"):
        assert (INSTALLED / stub).is_file(), stub


def test_usage_passes_mypy_strict(tmp_path):
    code, output = mypy_strict(tmp_path, HERE / "typing_usage.py")
    assert code == 0, output


WRONG = '''\
import numpy as np

import cbn

x = np.ones((4, 3), dtype=np.float32)
layer = cbn.BatchNorm1d(3)
layer.forwrd(x)  # wrong: attr-defined
cbn.batch_norm(x, np.zeros(3), np.ones(3), trainig=True)  # wrong: call-arg
cbn.BatchNorm1d(3, activation="gelu")  # wrong: arg-type
cbn.BatchNorm1d(3, nonfinite="ignore")  # wrong: arg-type
y = layer.forward(x)
y.no_such_method()  # wrong: attr-defined
'''


def test_mistakes_are_caught(tmp_path):
    source = tmp_path / "wrong.py"
    source.write_text(WRONG)
    code, output = mypy_strict(tmp_path, source)
    assert code == 1, output
    assert '"forwrd"' in output and '"trainig"' in output, output
    # Each wrong line, and only those, is reported with its error code.
    expected = {number: re.search(r"# wrong: ([\w-]+)", line).group(1)
                for number, line in enumerate(WRONG.splitlines(), 1) if "# wrong:" in line}
    reported = {int(match.group(1)): match.group(2)
                for match in re.finditer(r"^wrong\.py:(\d+): error: .*\[([\w-]+)\]$",
                                         output, re.MULTILINE)}
    assert reported == expected, output


def runnable_modules():
    """cbn's submodules this CPU can import: a SIMD build of the kernels for
    instructions the CPU lacks dies of SIGILL when imported (see
    cbn/_dispatch.py), and stubtest imports every module it checks. The
    package itself is left out as well, since naming it makes stubtest walk
    all its submodules; its API is what typing_usage.py checks. cbn.dask
    needs the optional Dask."""
    modules = []
    for info in pkgutil.iter_modules(cbn.__path__):
        target = info.name.partition("_kernels_")[2]
        if target and not _kernels.cpu_supports(target):
            continue
        if info.name == "dask" and importlib.util.find_spec("dask") is None:
            continue
        modules.append(f"cbn.{info.name}")
    return modules


def test_stubs_match_the_compiled_modules(tmp_path):
    modules = runnable_modules()
    assert {"cbn._core", "cbn._kernels", "cbn.layer"} <= set(modules)
    # stubtest builds the modules with mypy and stops at any error; the
    # implementation modules' own typing (private helpers are not annotated)
    # is not what it checks, so their errors are ignored here.
    config = mypy_config(tmp_path, "[mypy-cbn.*]\nignore_errors = True\n")
    code, output = run(tmp_path, "mypy.stubtest", *modules, "--mypy-config-file", config,
                       "--allowlist", str(HERE / "stubtest_allowlist.txt"))
    assert code == 0, output


def declarations(stub):
    """A stub's declarations, without its comments and docstrings."""
    return [ast.dump(node) for node in ast.parse(stub.read_text()).body]


@pytest.mark.parametrize("target", ["avx2", "avx512"])
def test_simd_stubs_match_the_baseline_stub(target):
    # The SIMD builds compile the same source as the baseline one, without
    # its CPU check; stubtest only sees the builds this CPU can import.
    baseline = [node for node in declarations(INSTALLED / "_kernels.pyi")
                if "'cpu_supports'" not in node]
    assert declarations(INSTALLED / f"_kernels_{target}.pyi") == baseline
