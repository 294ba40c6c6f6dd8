"""Sampling where the logits are (the GPU), with one device-to-host transfer per step.

Greedy rows take the argmax. Sampled rows: temperature, top-p, then the exponential race
(argmax of p / E with E ~ Exp(1) draws from p, no cumsum or multinomial). A request with a
seed draws its noise from its own generator on the logits' device, so a seed reproduces
whatever else is in the batch. Runs on any device (CPU in the unit tests).
"""

from __future__ import annotations

import weakref

import torch

from dormant.engines.native.core.guided import mask_logits
from dormant.engines.native.core.sequence import Sequence


class GPUSampler:
    def __init__(self) -> None:
        self._generators: weakref.WeakKeyDictionary[Sequence, torch.Generator] = weakref.WeakKeyDictionary()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None) -> list[int]:
        """logits: [B, V] for the B sequences, any float dtype; greedy_ids: their argmax if
        already taken (inside a decode graph). Returns B token ids."""
        if mask_logits(logits, seqs):  # structured output: the graph's argmax did not see the mask
            greedy_ids = None
        token_ids = logits.argmax(dim=-1) if greedy_ids is None else greedy_ids
        rows = [i for i, seq in enumerate(seqs) if not seq.sampling_params.is_greedy]
        if rows:
            token_ids = token_ids.clone()  # may be a graph's output
            token_ids[rows] = self.sample(logits, [seqs[i] for i in rows], rows)
        return token_ids.tolist()  # the one device-to-host transfer

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
        device = logits.device
        params = [seq.sampling_params for seq in seqs]
        temperatures = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        probs = torch.softmax(logits[rows].float() / temperatures, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
            probs = top_p_filter(probs, top_p)
        noise = torch.empty_like(probs)
        unseeded = [j for j, p in enumerate(params) if p.seed is None]
        if unseeded:
            if len(unseeded) == len(params):
                noise.exponential_()
            else:
                noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), device=device).exponential_()
        for j, seq in enumerate(seqs):
            if seq.sampling_params.seed is not None:
                noise[j].exponential_(generator=self._generator(seq, device))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        gen = self._generators.get(seq)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(seq.sampling_params.seed)
            self._generators[seq] = gen
        return gen


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, keep the smallest set of most likely tokens whose mass reaches top_p (the
    rest set to 0, not renormalized: the exponential race does not need it). probs [B, V],
    top_p [B, 1]."""
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
