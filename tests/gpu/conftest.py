"""Every test here needs a CUDA GPU: each gets the `gpu` marker, and tests/conftest.py skips
them, with the reason, where torch sees none (CI). They run on the lent GPU machine:
`bash bench/gpu_session.sh tests` (bench/README.md, "Running")."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
