from __future__ import annotations

import torch

from dormant.engines.native.core.guided import mask_logits
from dormant.engines.native.core.sequence import Sequence


class Sampler:
    """Greedy rows in one argmax; sampled rows with temperature, top-p and the request's own
    seeded generator (so a seed reproduces regardless of what else is batched)."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        logits = logits.float()
        mask_logits(logits, seqs)
        token_ids = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            params = seq.sampling_params
            if params.is_greedy:
                continue
            probs = torch.softmax(logits[i] / params.temperature, dim=-1)
            if params.top_p < 1.0:
                probs = top_p_filter(probs, params.top_p)
            token_ids[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
        return token_ids


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalize."""
    sorted_probs, sorted_idx = probs.sort(descending=True)
    cumulative = sorted_probs.cumsum(-1)
    drop = cumulative - sorted_probs >= top_p  # mass before this token already reaches top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
    return out / out.sum()
