"""n > 1 shares the prompt's KV blocks (issue 11), through the worker's route on the native
engine with the real SmolLM2: the first candidate runs alone to its first token, the others
then find the prompt's full blocks in the prefix cache (worker/candidate.py), so the prompt is
computed once and each further candidate computes only the block that holds its last token."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from dormant.engines.base import get_engine
from dormant.worker.server import WorkerState, build_app
from dormant.worker_api import Route

N, MAX_TOKENS = 3, 4
TEXT = ("The committee met on a rainy Tuesday to review the budget, the new library wing, the bus routes "
        "and the summer festival, and after a long debate it agreed on a plan for each of them before "
        "its members went home through the wet streets of the old town.")


@pytest.mark.timeout(300)
def test_n_candidates_compute_the_prompt_once_whole_and_streamed(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))  # the engine image would land here
    loaded = get_engine("native").load(model_dir, {"device": "cpu", "backup_weights": False})
    try:
        asyncio.run(_ask(loaded))
    finally:
        loaded.engine.shutdown()


async def _ask(loaded) -> None:
    state = WorkerState(loaded.engine, loaded.tokenizer, ["m"], loaded.max_model_len)
    runner = loaded.engine.engine.model_runner  # counts the tokens run through the model
    block_size = loaded.engine.engine.scheduler.block_manager.block_size
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=240) as client:
        for stream in (False, True):
            prompt = loaded.tokenizer.encode(("Streamed: " if stream else "Whole: ") + TEXT)
            body = {"model": "m", "prompt": prompt, "n": N, "max_tokens": MAX_TOKENS, "temperature": 1.0,
                    "seed": 5, "ignore_eos": True, "stream": stream}
            before = runner.num_processed_tokens
            r = await client.post(Route.COMPLETIONS, json=body)
            assert r.status_code == 200, r.text
            if stream:
                chunks = [json.loads(line[5:]) for line in r.text.splitlines()
                          if line.startswith("data:") and line != "data: [DONE]"]
                assert {c["index"] for chunk in chunks for c in chunk["choices"]} == set(range(N))
            else:
                assert [c["index"] for c in r.json()["choices"]] == list(range(N))
            processed = runner.num_processed_tokens - before
            tail = len(prompt) - (len(prompt) - 1) // block_size * block_size  # the last token's block
            decodes = N * (MAX_TOKENS - 1)
            assert len(prompt) > 3 * block_size
            assert processed == len(prompt) + (N - 1) * tail + decodes, (processed, len(prompt), tail)
