"""`dormant profile MODEL --json`: a cold start and a restore, each in a fresh worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(400)
def test_profile_prints_both_paths(model_dir, store_home):
    env = {**os.environ, "DORMANT_HOME": str(store_home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "dormant.cli", "profile", "smollm2", "--json"],
                         capture_output=True, text=True, env=env, timeout=380, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["cold"]["weights_source"] == "safetensors"
    assert result["restore"]["weights_source"] == "image"
    for path in ("cold", "restore"):
        phases = result[path]["phases"]
        assert {"process_start", "import", "model_init", "weight_load", "warm_up", "first_token"} <= set(phases)
        assert result[path]["total"] > 0 and all(v >= 0 for v in phases.values())
