"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


# Examples of the optional extras ("cbn[mpi]", "cbn[dask]") need them; CI
# installs both, so there they run.
OPTIONAL = ("mpi4py", "dask")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    try:
        exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"needs the optional {error.name}")
