"""The suite must exercise the installed package, not a build lying in the tree."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cbn
from cbn import _core, _kernels

REPO = Path(__file__).resolve().parent.parent


def test_cbn_is_imported_from_the_installation():
    location = Path(cbn.__file__).resolve().parent
    if os.environ.get("CBN_TEST_INPLACE") == "1":
        # Developers iterating on an in-place build say so explicitly.
        assert location == REPO / "cbn"
    else:
        assert location != REPO / "cbn", (
            f"cbn was imported from the source tree {location}; install it "
            "(pip install .) and run pytest from the repository root"
        )


def test_compiled_kernels_are_loaded():
    for module in (_core, _kernels):
        assert Path(module.__file__).suffix in (".so", ".pyd")
        assert Path(module.__file__).resolve().parent == Path(cbn.__file__).resolve().parent


def test_an_unbuilt_source_folder_says_it_shadows_the_installed_package(tmp_path):
    """`import cbn` where the current directory holds cbn's sources without
    compiled kernels (the repository root after a plain clone) explains itself."""
    source = tmp_path / "cbn"
    installed = Path(cbn.__file__).resolve().parent
    shutil.copytree(installed, source,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (source / "_core.pyx").write_text("# a source file, as in a checkout\n")
    result = subprocess.run([sys.executable, "-c", "import cbn"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "shadows any installed cbn" in result.stderr
    assert "build_ext --inplace" in result.stderr
    assert "circular import" not in result.stderr
