"""One llama.cpp sampler chain per request, built from its SamplingParams.

The chain runs in C on the logits llama_decode left for the request's row
(`llama_sampler_sample`), so sampling costs no copy of the vocabulary into Python. A new
field is one more stage in `_stages`, in the order vLLM applies them: penalties on the raw
logits, then temperature, then the truncations (top_k, top_p, min_p), then the draw.
"""

from __future__ import annotations

import llama_cpp as lc

from dormant.engines.base import SamplingParams


# the tokens the penalties look back over: the engine's longest context (config.py caps it at 2048)
PENALTY_WINDOW = 2048


def _stages(params: SamplingParams, n_vocab: int) -> list:
    stages = []
    if params.logit_bias:
        biases = (lc.llama_logit_bias * len(params.logit_bias))(
            *(lc.llama_logit_bias(token, bias) for token, bias in params.logit_bias.items()))
        stages.append(lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        # llama.cpp's penalties count the tokens the chain accepted: this request's output, as
        # OpenAI's presence / frequency penalties do (vLLM's repetition penalty also counts the
        # prompt). The binding declares an n_vocab first that newer llama.cpp dropped; the window
        # is passed in both integer places, so either signature reads it as penalty_last_n.
        stages.append(lc.llama_sampler_init_penalties(PENALTY_WINDOW, PENALTY_WINDOW, params.repetition_penalty,
                                                      params.frequency_penalty, params.presence_penalty))
    if params.is_greedy:
        return stages + [lc.llama_sampler_init_greedy()]
    if params.top_k > 0:
        stages.append(lc.llama_sampler_init_top_k(params.top_k))
    stages.append(lc.llama_sampler_init_temp(params.temperature))
    if params.top_p < 1.0:
        stages.append(lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        stages.append(lc.llama_sampler_init_min_p(params.min_p, 1))
    seed = lc.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    stages.append(lc.llama_sampler_init_dist(seed))
    return stages


def check_supported(params: SamplingParams) -> None:
    """ValueError for what this engine cannot honour (the worker answers 400)."""
    if params.guidance is not None:
        raise ValueError("the llamacpp engine has no structured output (response_format, forced tool calls)")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        raise ValueError("the llamacpp engine reports no logprobs")


class Sampler:
    """A request's sampler chain; `sample(ctx, row)` draws from the logits of batch row `row`."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        check_supported(params)
        self._chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        for stage in _stages(params, n_vocab):
            lc.llama_sampler_chain_add(self._chain, stage)  # the chain owns and frees its stages

    def sample(self, ctx, row: int) -> int:
        return lc.llama_sampler_sample(self._chain, ctx, row)

    def free(self) -> None:
        if self._chain is not None:
            lc.llama_sampler_free(self._chain)
            self._chain = None
