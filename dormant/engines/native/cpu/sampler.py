"""Sampling on the CPU: penalties and logit_bias for the rows that ask, greedy rows in one
argmax, sampled rows with temperature, top-k, top-p and min-p and the request's own seeded
generator (so a seed reproduces regardless of what else is batched); then the logprobs of the
rows that ask. Every optional stage is skipped when no row of the step asks for it."""

from __future__ import annotations

import torch

from dormant.engines.native.core.guided import mask_logits
from dormant.engines.native.core.logits_ops import (
    apply_penalties_and_bias,
    cutoffs,
    filter_probs,
    record_logprobs,
)
from dormant.engines.native.core.sequence import Sequence


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [B, V] of `seqs`; returns B token ids and appends to each seq's `logprobs`
        when its params ask."""
        raw = logits.float()
        logits = apply_penalties_and_bias(raw, seqs)
        if any(seq.guide is not None for seq in seqs):  # structured output; raw stays for the logprobs
            logits = logits.clone() if logits is raw else logits
            mask_logits(logits, seqs)
        token_ids = logits.argmax(dim=-1)
        rows = [i for i, seq in enumerate(seqs) if not seq.sampling_params.is_greedy]
        if rows:
            sampled = [seqs[i] for i in rows]
            temperatures = torch.tensor([seq.sampling_params.temperature for seq in sampled]).unsqueeze(1)
            probs = filter_probs(torch.softmax(logits[rows] / temperatures, dim=-1), *cutoffs(sampled, "cpu"))
            for j, (i, seq) in enumerate(zip(rows, sampled)):
                token_ids[i] = int(torch.multinomial(probs[j], 1, generator=seq.generator))
        record_logprobs(raw, token_ids, seqs)
        return token_ids.tolist()


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalize."""
    out = filter_probs(probs.unsqueeze(0), None, torch.tensor([[top_p]]), None)[0]
    return out / out.sum()
