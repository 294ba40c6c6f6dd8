"""engine: vllm on a real GPU under a real `dormant serve` (issue 13's GPU tests): one vLLM
replica through its tiers (asleep, woken, suspended, resumed), a request answered after each;
two vLLM models on one GPU through the placement policy; a native model beside a vLLM model.

The model is a tiny random Qwen3 (bench/random_model.py), so each vLLM start is short
(enforce_eager: no compile, no CUDA graphs); one gateway serves the module, and the tests run in
order, each starting from the tiers the one before left. vLLM runs as `env PYTHONPATH=$DORMANT_TEST_VLLM_PATH python -m
vllm.entrypoints.openai.api_server` where that variable is set (on the GPU machine vLLM is
unpacked into /tmp/vsite: `bash bench/gpu_session.sh vllm-tests`), else with this Python.

What placement does here: a vLLM replica takes gpu_memory_utilization (0.25) of the device's
memory (lifecycle/budgets.estimate), and the GPU budget is set to half the device plus 1 GiB:
the two vLLM replicas fit side by side, and the native one (~2 GiB) beside one of them but not
beside both, so a start or wake that would overfill it evicts an idle replica.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))
from e2e_harness import launch_gateway, wait_for  # noqa: E402
from test_suspend_gpu import device_used_bytes  # noqa: E402

GiB = 2**30
START = 600  # seconds: a vLLM start with room (about 30-60 s for this model, eager)
TINY_QWEN3 = {  # Qwen3's architecture, two small layers: vLLM and the native engine both take it
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 4096, "max_window_layers": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "use_sliding_window": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 151936, "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "tie_word_embeddings": True}
VLLM_ARGS = {"enforce_eager": True, "max_model_len": 1024, "gpu_memory_utilization": 0.25}
NEVER = -1


def vllm_command() -> list[str]:
    path = os.environ.get("DORMANT_TEST_VLLM_PATH")
    env = ["env", f"PYTHONPATH={path}"] if path else []
    return [*env, sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from random_model import make_random_model

    folder = tmp_path_factory.mktemp("models")
    (folder / "tiny-qwen3.json").write_text(json.dumps(TINY_QWEN3))
    return make_random_model(folder / "tiny-qwen3.json", folder / "tiny-qwen3", device="cpu")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, store_home, tiny_model):
    command = vllm_command()
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([*command[:-2], "-c", probe], check=False, timeout=60).returncode != 0:
        pytest.skip(f"vLLM is not importable by {' '.join(command[:-2])} (set DORMANT_TEST_VLLM_PATH to the "
                    "folder that holds it; on the GPU machine: bash bench/gpu_session.sh vllm-tests)")
    vllm = {"source": str(tiny_model), "engine": "vllm", "vllm_command": command, "engine_args": VLLM_ARGS,
            "hibernate_after": NEVER, "stop_after": NEVER, "start_timeout": START, "max_queue_wait": START}
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    config = {"standby_worker": False, "budgets": {"gpu_memory": total // 2 + GiB}, "models": {
        # "a" goes through its idle tiers by itself; "b" and "n" leave the GPU only when evicted
        "a": {**vllm, "sleep_after": "2s", "suspend_after": "4s"},
        "b": {**vllm, "sleep_after": NEVER},
        "n": {"source": str(tiny_model), "engine_args": {"device": "cuda", "kv_cache_tokens": 4096},
              "sleep_after": NEVER, "hibernate_after": NEVER, "stop_after": NEVER, "start_timeout": START}}}
    gateway = launch_gateway(tmp_path_factory.mktemp("vllm-gpu"), store_home, config, entry=("dormant.cli", "serve"))
    yield gateway
    gateway.stop()
    print(gateway.log())


def complete(gw, model: str) -> str:
    body = {"model": model, "prompt": "t11 t12 t13 t14 t15", "max_tokens": 12, "temperature": 0}
    r = gw.http("POST", "/v1/completions", json=body, timeout=START)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    return choice["text"]


def suspended_or_skipped(gw, model: str) -> dict:
    r = gw.replica(model)
    return r if r["state"] == "suspended" or r["suspend_skipped"] else {}


def evicted(gw, model: str) -> float:
    return gw.metric("dormant:evictions_total", model=model, reason="make_room")


@pytest.mark.timeout(900)
def test_a_vllm_replica_sleeps_wakes_suspends_and_resumes_answering_after_each(gw):
    first = complete(gw, "a")  # its start: vLLM, then the sleep and wake dormant does once in idle time
    ready = gw.replica("a")
    assert ready["state"] == "ready" and ready["engine"] == "vllm" and ready["gpu_bytes"] > 0

    asleep = gw.wait_state("asleep", model="a", timeout=60)
    assert asleep["pid"] == ready["pid"] and asleep["gpu_bytes"] == 0 and asleep["tier"] == "asleep"
    used_asleep = device_used_bytes()
    # vLLM's own sleep, not only dormant's count: awake it holds 0.25 of the device (35 GiB); a
    # prepin's wake that came after the gateway's sleep once left it so while "asleep"
    assert used_asleep < 8 * GiB, used_asleep
    assert complete(gw, "a") == first  # woken: /wake_up, and the same greedy tokens
    assert gw.replica("a")["state"] == "ready"

    r = wait_for(lambda: suspended_or_skipped(gw, "a"), 120, "a suspended, or its suspend tier skipped")
    if r["suspend_skipped"]:
        pytest.skip(f"the driver's checkpoint API refused: {r['suspend_skipped']}")
    assert r["pid"] == ready["pid"] and r["gpu_bytes"] == 0 and r["tier"] == "suspended"
    assert len(r["suspension"]["pids"]) >= 2  # vLLM's API server and its engine core, together
    used_suspended = device_used_bytes()
    assert used_suspended < 256 * 2**20, used_suspended  # nothing else runs: the device is empty
    t = time.monotonic()
    assert complete(gw, "a") == first  # resumed: the same process, weights and KV cache intact
    seconds = time.monotonic() - t
    after = gw.replica("a")
    assert after["state"] == "ready" and after["pid"] == ready["pid"]
    assert gw.metric("dormant:checkpoint_seconds_count", model="a", op="resume") == 1
    resume = gw.metric("dormant:checkpoint_seconds_sum", model="a", op="resume")
    print(f"vLLM tiny: asleep {used_asleep / GiB:.2f} GiB on the device, suspended {used_suspended / GiB:.3f} GiB; "
          f"suspend {r['suspension']['suspend_seconds']:.2f} s ({len(r['suspension']['pids'])} processes), "
          f"resume {resume:.2f} s, request from suspended -> answer {seconds:.2f} s")


@pytest.mark.timeout(900)
def test_two_vllm_models_run_side_by_side_on_one_gpu_through_placement(gw):
    before = {m: evicted(gw, m) for m in ("a", "b")}
    answer_b = complete(gw, "b")
    complete(gw, "a")  # a wakes (or resumes) beside b: the budget holds both shares
    a, b = gw.replica("a"), gw.replica("b")
    assert a["state"] == "ready" and b["state"] == "ready", (a["state"], b["state"])
    assert {m: evicted(gw, m) for m in ("a", "b")} == before
    assert complete(gw, "b") == answer_b


@pytest.mark.timeout(900)
def test_a_native_model_beside_vllm_models_gets_room_by_eviction(gw):
    before = sum(evicted(gw, m) for m in ("a", "b", "n"))
    answer_n = complete(gw, "n")  # beside b (and a, if awake: then one of them is evicted)
    n = gw.replica("n")
    assert n["state"] == "ready" and n["engine"] == "native" and n["gpu_bytes"] > 0
    complete(gw, "a")
    complete(gw, "b")  # a, b and n together would overfill the budget: someone idle made room
    assert sum(evicted(gw, m) for m in ("a", "b", "n")) >= before + 1
    assert complete(gw, "n") == answer_n  # the native replica, evicted or not, kept its weights
    assert gw.replica("n")["state"] == "ready"
