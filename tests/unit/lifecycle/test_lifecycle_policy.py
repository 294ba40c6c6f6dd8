"""Idle policy and start timeouts: pure decisions, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dormant.config import ModelSpec
from dormant.durations import NEVER
from dormant.lifecycle.policy import IdleAction, IdlePlan, idle_plan, start_timeout


def spec(**kw) -> ModelSpec:
    return ModelSpec(id="m", source="builtin:smollm2", **kw)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kw,keep_alive,plan", [
    ({"sleep_after": 300, "stop_after": 1800}, None, IdlePlan(300, 1800)),
    ({"sleep_after": 300, "stop_after": 1800}, 5.0, IdlePlan(5, 1800)),
    ({"sleep_after": 300, "stop_after": 1800}, 3600.0, IdlePlan(3600, 3600)),
    ({"sleep_after": 300, "stop_after": 1800}, NEVER, IdlePlan(NEVER, NEVER)),
    ({"sleep_after": 0, "stop_after": NEVER}, None, IdlePlan(0, NEVER, 1800)),  # hibernate_after's default
    ({"sleep_after": NEVER, "stop_after": 60}, 0.0, IdlePlan(NEVER, 0)),
    ({"sleep_after": NEVER, "stop_after": NEVER}, 0.0, IdlePlan(NEVER, NEVER, 0)),  # keep_alive 0 hibernates
    ({"sleep_after": NEVER, "hibernate_after": NEVER, "stop_after": NEVER}, 0.0, IdlePlan(NEVER, 0)),
    ({"sleep_after": 60, "hibernate_after": 600, "stop_after": 3600}, None, IdlePlan(60, 3600, 600)),
    ({"sleep_after": 60, "hibernate_after": 600, "stop_after": 3600}, 900.0, IdlePlan(900, 3600, 900)),
    ({"sleep_after": 600, "hibernate_after": 60}, None, IdlePlan(NEVER, NEVER, 60)),  # sleeping later is moot
    ({"sleep_after": 10, "stop_after": 10}, 2.0, IdlePlan(NEVER, 2)),
    ({"sleep_after": 10, "stop_after": 60, "min_replicas": 1}, 0.0, IdlePlan(NEVER, NEVER)),
])
def test_idle_plan(kw, keep_alive, plan):
    assert idle_plan(spec(**kw), keep_alive) == plan


@pytest.mark.timeout(10)
def test_next_step_per_tier():
    assert IdlePlan(5, 60).next_step(is_asleep=False) == (IdleAction.SLEEP, 5)
    assert IdlePlan(5, 60).next_step(is_asleep=True) == (IdleAction.STOP, 60)
    assert IdlePlan(60, 60).next_step(is_asleep=False) == (IdleAction.STOP, 60)  # no point sleeping
    assert IdlePlan(NEVER, 30).next_step(is_asleep=False) == (IdleAction.STOP, 30)
    assert IdlePlan(5, NEVER).next_step(is_asleep=True) is None
    assert IdlePlan(NEVER, NEVER).next_step(is_asleep=False) is None
    assert IdlePlan(5, 600, 60).next_step() == (IdleAction.SLEEP, 5)
    assert IdlePlan(5, 600, 60).next_step(is_asleep=True) == (IdleAction.HIBERNATE, 60)
    assert IdlePlan(5, 600, 60).next_step(is_hibernated=True) == (IdleAction.STOP, 600)
    assert IdlePlan(5, NEVER, 60).next_step(is_hibernated=True) is None
    assert IdlePlan(NEVER, 60, 60).next_step() == (IdleAction.STOP, 60)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kw,keep_alive,plan", [
    ({"sleep_after": 60, "suspend_after": 300, "hibernate_after": 1800}, None, IdlePlan(60, NEVER, 1800, 300)),
    ({"sleep_after": 60, "suspend_after": 300, "hibernate_after": 1800}, 600.0, IdlePlan(600, NEVER, 1800, 600)),
    # suspend at or before sleep keeps the sleep tier here: next_step skips it while it can suspend
    ({"sleep_after": 300, "suspend_after": 300, "hibernate_after": 1800}, None, IdlePlan(300, NEVER, 1800, 300)),
    ({"sleep_after": 60, "suspend_after": 1800, "hibernate_after": 1800}, None, IdlePlan(60, NEVER, 1800)),
])
def test_idle_plan_with_the_suspend_tier(kw, keep_alive, plan):
    assert idle_plan(spec(**kw), keep_alive) == plan


@pytest.mark.timeout(10)
def test_next_step_with_the_suspend_tier():
    plan = IdlePlan(60, NEVER, 1800, 300)
    assert plan.next_step() == (IdleAction.SLEEP, 60)
    assert plan.next_step(is_asleep=True) == (IdleAction.SUSPEND, 300)
    assert plan.next_step(is_suspended=True) == (IdleAction.HIBERNATE, 1800)
    assert plan.next_step(is_asleep=True, can_suspend=False) == (IdleAction.HIBERNATE, 1800)
    same = IdlePlan(300, NEVER, 1800, 300)  # suspend due with sleep: one step, that sleeps first
    assert same.next_step() == (IdleAction.SUSPEND, 300)
    assert same.next_step(can_suspend=False) == (IdleAction.SLEEP, 300)
    assert IdlePlan(NEVER, NEVER, NEVER, 10).next_step(is_suspended=True) is None


@pytest.mark.timeout(10)
def test_start_timeout_scales_with_size_and_allows_an_import(tmp_path: Path):
    assert start_timeout(spec(start_timeout=42.0), tmp_path) == 42.0
    # builtin, not yet imported: the import allowance applies
    assert start_timeout(spec(), tmp_path) > 180
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    assert 60 < start_timeout(spec(), tmp_path) < 61
    local = tmp_path / "local"
    local.mkdir()
    (local / "w.bin").write_bytes(b"\0" * 1000)
    assert start_timeout(ModelSpec(id="x", source=str(local)), tmp_path) == pytest.approx(60, abs=0.01)
