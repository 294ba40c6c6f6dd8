from __future__ import annotations

from enum import Enum, auto

import torch

from dormant.engines.base import SamplingParams, TokenLogprob


# A token not yet read back: the input of a decode step launched before the step that samples
# it has returned (core/llm_engine.py, "run ahead"); the runner feeds the real id on the device
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request's tokens and KV blocks. Prompt and output share ``token_ids``.

    ``num_computed_tokens`` tokens have their KV in the cache (prefix-cache hits included);
    the scheduler sets ``num_scheduled_tokens`` for the next step (1 for a decode, a chunk of
    the prompt for a prefill). A step that reaches ``num_tokens`` samples a token.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the full, computed blocks
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache at admission
        self.num_scheduled_tokens = 0
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.guide = None  # llguidance's matcher of sampling_params.guidance (core/guided.py)
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed)
        # filled by the sampler when the params ask: one per output token, and per prompt token
        # (the first has none: nothing predicts it)
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = [None]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_decode(self) -> bool:
        """This step computes only the last token, one sampled by the previous step. A prompt's
        last token alone (after a prefix-cache hit or a chunk) is no decode: prompt tokens are
        computed alike however they are split (the CPU's mixed dtype, cpu/mixed_linear.py)."""
        return (self.num_scheduled_tokens == 1 and self.num_computed_tokens == self.num_tokens - 1
                and self.num_tokens > self.num_prompt_tokens)

    @property
    def samples_this_step(self) -> bool:
        return self.num_computed_tokens + self.num_scheduled_tokens == self.num_tokens

    @property
    def can_run_ahead(self) -> bool:
        """Its next step needs nothing of this step's token on the host: no grammar to advance,
        no penalties or logit_bias over the output so far, no logprobs to read."""
        params = self.sampling_params
        return self.guide is None and not params.changes_logits and params.logprobs is None

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
