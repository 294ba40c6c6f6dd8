"""The engine and scheduler running decode steps ahead, against a fake runner whose next token
is a fixed function of the context: hundreds of seeded scenarios of arrivals, aborts, EOS,
max_tokens and max_model_len endings, prefix caching on and off, and KV blocks short enough to
preempt. At every launch: no placeholder reaches an input, every context position's KV holds
its seq's own token (written in launch order, as one device stream would); at the end every
stream holds the tokens the function gives (an aborted one a prefix of them) and every block
is free. The real model's side is test_run_ahead.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.llm_engine import LLMEngine
from dormant.engines.native.core.scheduler import Scheduler
from dormant.engines.native.core.sequence import PLACEHOLDER, Sequence

VOCAB, EOS = 50, 0


def next_token(context: list[int]) -> int:
    """The model: mostly a function of the last four tokens, EOS now and then."""
    if random.Random(hash(tuple(context))).random() < 0.04:
        return EOS
    return hash(tuple(context[-4:])) % (VOCAB - 1) + 1


class FakeRunner:
    """A runner whose 'KV cache' is a dict slot -> (token, position), written at launch."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv: dict[int, tuple[int, int]] = {}
        self.runs_ahead = True
        self.num_fed = 0

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _step(self, seqs: list[Sequence], fed: list[int] | None = None) -> list[int]:
        out = []
        for j, seq in enumerate(seqs):
            tokens = list(seq.token_ids)
            if fed is not None:
                assert tokens[-1] == PLACEHOLDER
                tokens[-1] = fed[j]
            assert PLACEHOLDER not in tokens, seq.request_id
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            for pos in range(start):
                assert self.kv.get(self._slot(seq, pos)) == (tokens[pos], pos), (seq.request_id, pos)
            for pos in range(start, end):
                self.kv[self._slot(seq, pos)] = (tokens[pos], pos)
            if end == len(tokens):
                out.append(next_token(tokens))
        return out

    def run(self, seqs):
        return self._step(seqs)

    def can_launch(self, num_seqs: int) -> bool:
        return True

    def launch(self, seqs, feed=None):
        if feed is None:
            return self._step(seqs)
        tokens, rows = feed
        self.num_fed += 1
        return self._step(seqs, [tokens[r] for r in rows])

    def collect(self, launched):
        return launched


def engine_for(rng: random.Random) -> LLMEngine:
    block_size = rng.choice([2, 4])
    max_model_len = rng.choice([12, 24, 40])
    config = SimpleNamespace(max_num_seqs=rng.choice([1, 2, 4, 8]), max_num_batched_tokens=64,
                             max_model_len=max_model_len, enable_chunked_prefill=True, block_size=block_size,
                             num_kv_blocks=max_model_len // block_size + 1 + rng.choice([0, 2, 6, 40]),
                             enable_prefix_caching=rng.random() < 0.7, dtype="float32")
    engine = object.__new__(LLMEngine)  # the engine's stepping, without a model to load
    engine.config, engine.model_runner, engine._ahead = config, FakeRunner(block_size), None
    engine.scheduler = Scheduler(config, {EOS})
    return engine


def expected(prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    context, out = list(prompt), []
    while True:
        token = next_token(context)
        context.append(token)
        out.append(token)
        if ((not params.ignore_eos and token == EOS) or (params.max_tokens and len(out) >= params.max_tokens)
                or len(context) >= max_model_len):
            return out


def play(seed: int) -> int:
    rng = random.Random(seed)
    engine = engine_for(rng)
    max_model_len = engine.config.max_model_len
    requests, streams, aborted = {}, {}, set()
    for step in range(400):
        if len(requests) < 12 and rng.random() < 0.25:
            request_id = f"r{len(requests)}"
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 6))]
            if rng.random() < 0.5:  # a shared prefix: prefix-cache hits
                prompt = [5, 6, 7, 8, 9, 10, 11][:rng.randrange(1, 8)] + prompt
            prompt = prompt[:max_model_len - 1]
            params = SamplingParams(temperature=0, max_tokens=rng.choice([None, 1, 3, 10, 30]),
                                    ignore_eos=rng.random() < 0.3)
            engine.add_request(request_id, prompt, params)
            requests[request_id], streams[request_id] = (prompt, params), []
        if streams and rng.random() < 0.05:
            request_id = rng.choice(sorted(streams))
            if engine.abort_request(request_id):
                aborted.add(request_id)
        for request_id, out in engine.step():
            streams[request_id].extend(out.new_token_ids)
        for block in engine.scheduler.block_manager.blocks:
            assert PLACEHOLDER not in block.token_ids
        if len(requests) >= 12 and not engine.has_unfinished:
            break
    for _ in range(5000):
        if not engine.has_unfinished:
            break
        for request_id, out in engine.step():
            streams[request_id].extend(out.new_token_ids)
    assert not engine.has_unfinished
    blocks = engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and all(b.ref_count == 0 for b in blocks.blocks)
    for request_id, (prompt, params) in requests.items():
        want = expected(prompt, params, max_model_len)
        got = streams[request_id]
        assert got == (want[:len(got)] if request_id in aborted else want), (seed, request_id)
    return engine.model_runner.num_fed


@pytest.mark.timeout(120)
def test_steps_run_ahead_keep_every_stream_and_block_right_over_seeded_scenarios():
    fed = sum(play(seed) for seed in range(300))
    assert fed > 500  # the scenarios do run ahead, not only in turn
