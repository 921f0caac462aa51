"""The suite must exercise the installed package, not a build lying in the tree."""
import os
from pathlib import Path

import cbn
from cbn import _kernels

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
    assert Path(_kernels.__file__).suffix in (".so", ".pyd")
    assert Path(_kernels.__file__).resolve().parent == Path(cbn.__file__).resolve().parent
