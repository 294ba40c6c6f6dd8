"""One llama.cpp sampler chain per request, built from its SamplingParams.

The chain runs in C on the logits llama_decode left for the request's row
(`llama_sampler_sample`), so sampling costs no copy of the vocabulary into Python. A new
field is one more stage in `_stages`, in the order vLLM applies them: penalties on the raw
logits, then temperature, then the truncations (top_k, top_p, min_p), then the draw.
"""

from __future__ import annotations

import llama_cpp as lc

from dormant.engines.base import SamplingParams


def _stages(params: SamplingParams) -> list:
    if params.is_greedy:
        return [lc.llama_sampler_init_greedy()]
    stages = [lc.llama_sampler_init_temp(params.temperature)]
    if params.top_p < 1.0:
        stages.append(lc.llama_sampler_init_top_p(params.top_p, 1))
    seed = lc.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    stages.append(lc.llama_sampler_init_dist(seed))
    return stages


def check_supported(params: SamplingParams) -> None:
    """ValueError for what this engine cannot honour (the worker answers 400)."""
    if params.guidance is not None:
        raise ValueError("the llamacpp engine has no structured output (response_format, forced tool calls) yet")


class Sampler:
    """A request's sampler chain; `sample(ctx, row)` draws from the logits of batch row `row`."""

    def __init__(self, params: SamplingParams):
        check_supported(params)
        self._chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        for stage in _stages(params):
            lc.llama_sampler_chain_add(self._chain, stage)  # the chain owns and frees its stages

    def sample(self, ctx, row: int) -> int:
        return lc.llama_sampler_sample(self._chain, ctx, row)

    def free(self) -> None:
        if self._chain is not None:
            lc.llama_sampler_free(self._chain)
            self._chain = None
