"""The engine: requests in, one token per running sequence per step out.

Decode steps run ahead where the runner can (GPU decode graphs): the next step is launched
before the last one's tokens are read back, its input tokens fed on the device, so the host's
work between two steps (the read-back, stop checks, streaming the tokens, the next step's
inputs) overlaps the device's step instead of leaving the device idle. On the H200 (8B shape,
bench/results/burst/in-turn.json against run-ahead.json) a step at batch 1 went from 6.05 to
5.45 ms against a 5.31 ms graph, and 64 streams from 3,680 to 4,530 output tok/s (issue 12).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.checkpoint import read_generation_eos
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.guided import GuidedDecoding
from dormant.engines.native.core.runner import ModelRunner, make_runner
from dormant.engines.native.core.scheduler import Scheduler, StepOutput
from dormant.engines.native.core.sequence import Sequence


class LLMEngine:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int] | None = None,
                 beside_load: Callable[[], None] | None = None):
        """`beside_load`: called once, when other start-up work (the worker's tokenizer) may
        run beside the model's (see make_runner)."""
        self.config = config
        self.model_runner: ModelRunner = make_runner(config, beside_load)
        eos = read_generation_eos(Path(config.model_dir)) | set(eos_token_ids or ())
        self.scheduler = Scheduler(config, eos)
        hf = config.model_config
        self._ahead: tuple[list[Sequence], object] | None = None  # a launched step, its tokens not read
        # the EOS set is shared: a guided sequence's grammar ends on any id the scheduler stops on
        self.guided = GuidedDecoding(hf.get("vocab_size") or hf.get("text_config", {}).get("vocab_size"),
                                     self.scheduler.eos_token_ids)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's max_model_len is "
                f"{self.config.max_model_len} (prompt and completion together)"
            )
        seq = Sequence(request_id, prompt_token_ids, sampling_params)
        if sampling_params.guidance is not None:
            seq.guide = self.guided.matcher(sampling_params.guidance)  # ValueError: refused
        self.scheduler.add(seq)

    def add_eos_token_ids(self, token_ids: set[int]) -> None:
        """More ids that end a sequence (the tokenizer's, known once it has loaded)."""
        self.scheduler.eos_token_ids |= set(token_ids)

    def use_tokenizer(self, tokenizer) -> None:
        """The model's HF tokenizer, which structured output builds its token tables from; its
        EOS id ends sequences too."""
        self.guided.tokenizer = tokenizer
        if tokenizer.eos_token_id is not None:
            self.add_eos_token_ids({tokenizer.eos_token_id})

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def step(self) -> list[StepOutput]:
        """One step's outputs. Where the step ran ahead (launched by the step before) or can
        (all decodes, Sequence.can_run_ahead, the runner runs ahead), the next one is launched
        before this one's tokens are read. A step that fails drops the one ahead; the
        running requests are then left mid-step (a placeholder token, a token not taken):
        the caller aborts them (the loop thread fails every request it holds)."""
        try:
            return self._step()
        except BaseException:
            self._ahead = None
            raise

    def _step(self) -> list[StepOutput]:
        if self._ahead is None:
            seqs = self.scheduler.schedule()
            if not seqs:
                return []
            if not self._can_launch(seqs):
                return self.scheduler.postprocess(seqs, self.model_runner.run(seqs))
            launched = self.model_runner.launch(seqs)
        else:
            (seqs, launched), self._ahead = self._ahead, None
        samples = self.scheduler.account(seqs)
        rows = self.scheduler.schedule_ahead(seqs)
        if rows:
            ahead = [seqs[i] for i in rows]
            self._ahead = (ahead, self.model_runner.launch(ahead, (launched, rows)))
        return self.scheduler.take_tokens(seqs, samples, self.model_runner.collect(launched))

    def _can_launch(self, seqs: list[Sequence]) -> bool:
        return (self.model_runner.runs_ahead and all(seq.is_decode and seq.can_run_ahead for seq in seqs)
                and self.model_runner.can_launch(len(seqs)))

    @property
    def has_unfinished(self) -> bool:
        return not self.scheduler.is_finished() or self._ahead is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def sleep(self, level: int = 1) -> None:
        if self.has_unfinished:
            raise RuntimeError("cannot sleep with requests in flight; drain first")
        self.model_runner.sleep(level)
        self.scheduler.block_manager.reset_prefix_cache()  # the KV the hashes point to is gone

    def wake_up(self) -> None:
        self.model_runner.wake_up()

    @property
    def is_sleeping(self) -> bool:
        return self.model_runner.is_sleeping

    def generate(self, prompts: list[list[int]], sampling_params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (offline use, tests, benchmarks); returns completion ids."""
        self.model_runner.capture_pending_graphs()  # no idle loop here to do it
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        results: dict[str, list[int]] = {}
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            results[f"gen-{i}"] = []
            self.add_request(f"gen-{i}", prompt, params)
        while self.has_unfinished:
            for request_id, output in self.step():
                results[request_id].extend(output.new_token_ids)
        return [results[f"gen-{i}"] for i in range(len(prompts))]

