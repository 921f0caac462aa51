"""ruff over the Python sources and cython-lint over the Cython sources, with
the settings of pyproject.toml ([tool.ruff], [tool.cython-lint]).

Both linters are in the ``test`` extra. They read the source tree, which an
installed-only run (the tests without the repository) does not have; those
runs skip.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_PATHS = ["cbn", "tests", "bench", "examples", "setup.py"]

pytestmark = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").is_file() or not (ROOT / "cbn").is_dir(),
    reason=f"no source tree at {ROOT}: the linters check the repository's files")


def run(args):
    """Run ``args`` after this interpreter from the repository root, with the
    interpreter's scripts first on PATH (cython-lint runs pycodestyle)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PATH": path})
    return result.returncode, result.stdout + result.stderr


def test_ruff():
    code, output = run(["-m", "ruff", "check", "--no-cache", "--output-format=concise",
                        *PYTHON_PATHS])
    assert code == 0, output


def test_cython_lint():
    # cython-lint finds .pxi files in a directory too, but names them
    # explicitly here so that none is left out.
    sources = sorted(str(p.relative_to(ROOT)) for pattern in ("*.pyx", "*.pxi")
                     for p in (ROOT / "cbn").glob(pattern))
    assert any(s.endswith(".pyx") for s in sources) and any(s.endswith(".pxi") for s in sources)
    # cython_lint has no __main__ module: call its entry point.
    code, output = run(["-c", "import sys; from cython_lint.cython_lint import main; "
                              "sys.exit(main())", *sources])
    assert code == 0, output
