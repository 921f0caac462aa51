"""Fixtures for the cbn test suite.

The suite imports the *installed* cbn: pytest runs in importlib mode and only
tests/ is put on sys.path, never the repository root (see test_install.py).
"""
import numpy as np
import pytest

import cbn


def pytest_report_header(config):
    from cbn._dispatch import kernels as _kernels
    return (f"cbn {cbn.__version__} from {cbn.__file__}; "
            f"thread pool {'on' if _kernels.threads_enabled() else 'off'}, "
            f"{cbn.get_num_threads()} threads")


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture
def restore_threads():
    """Resets the kernels' thread count to the default after a test."""
    yield
    cbn.set_num_threads(None)
