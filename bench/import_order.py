"""The pipeline benchmark in child processes, one per import order.

Which of torch and cbn a process imports first decides which OpenMP
runtime and which thread settings load first, so each order runs in a
fresh interpreter: the child imports the two in the order asked, before
anything else, then loads this bench package from its folder and prints
``pipeline.measure``'s result as JSON on its last line of output. The child
finds the same cbn as this process (its folder goes first on sys.path) and
runs in a temporary directory, so no source tree shadows it.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cbn

ORDERS = {"torch first": ("torch", "cbn"), "cbn first": ("cbn", "torch")}
BENCH = Path(__file__).resolve().parent

CHILD = """\
import sys
sys.path.insert(0, {cbn_parent!r})
{first}
{second}
import importlib.util, json
spec = importlib.util.spec_from_file_location(
    "bench", {init!r}, submodule_search_locations=[{bench!r}])
sys.modules["bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["bench"])
from bench import pipeline
result = pipeline.measure(**json.loads({arguments!r}))
result["modules_loaded_first"] = [name for name in sys.modules if name in ("torch", "cbn")]
print(json.dumps(result))
"""


IMPORT = {"cbn": "import cbn",
          # Optional: without PyTorch the child runs without its column.
          "torch": "try:\n    import torch\nexcept ImportError:\n    pass"}


def child_code(order, arguments):
    first, second = (IMPORT[name] for name in ORDERS[order])
    return CHILD.format(cbn_parent=str(Path(cbn.__file__).resolve().parent.parent),
                        first=first, second=second, init=str(BENCH / "__init__.py"),
                        bench=str(BENCH), arguments=json.dumps(arguments))


def run(order, arguments, timeout):
    """``pipeline.measure(**arguments)`` in a child importing in ``order``:
    its result dict, or {"error": message} when the child fails or times out."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            completed = subprocess.run(
                [sys.executable, "-c", child_code(order, arguments)], cwd=directory,
                capture_output=True, text=True, timeout=timeout,
                env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s"}
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {completed.returncode}: {last}"}
    try:
        return json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": "no JSON result on the last line of its output"}
