"""``python -m bench``: the same as ``python bench/run.py``."""
import sys
from pathlib import Path

# ``python -m`` put the working directory first on sys.path: from the
# repository root, that is the source tree, whose cbn/ would shadow the
# installed package. The bench package is imported already; drop the entry
# before cbn is imported, so both commands measure the same cbn.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent.parent:
    del sys.path[0]

from .run import main

sys.exit(main())
