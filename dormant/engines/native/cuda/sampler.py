"""Sampling where the logits are (the GPU), with one device-to-host transfer per step.

Rows that ask get penalties and logit_bias first (core/logits_ops.py, the ops the CPU sampler
uses). Greedy rows take the argmax. Sampled rows: temperature, top-k, top-p, min-p, then the
exponential race (argmax of p / E with E ~ Exp(1) draws from p, no cumsum or multinomial).
Rows that ask for logprobs get them from the raw logits, in one more transfer. A request with a
seed draws its noise from its own generator on the logits' device, so a seed reproduces
whatever else is in the batch. Runs on any device (CPU in the unit tests).
"""

from __future__ import annotations

import weakref

import torch

from dormant.engines.native.core.guided import mask_logits
from dormant.engines.native.core.logits_ops import (
    apply_penalties_and_bias,
    cutoffs,
    filter_probs,
    on_device,
    record_logprobs,
)
from dormant.engines.native.core.sequence import Sequence


class GPUSampler:
    def __init__(self) -> None:
        self._generators: weakref.WeakKeyDictionary[Sequence, torch.Generator] = weakref.WeakKeyDictionary()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None) -> list[int]:
        """logits: [B, V] for the B sequences, any float dtype; greedy_ids: their argmax if
        already taken (inside a decode graph). Returns B token ids."""
        raw = logits
        if any(seq.sampling_params.changes_logits for seq in seqs):
            logits = apply_penalties_and_bias(logits, seqs)
            greedy_ids = None
        if any(seq.guide is not None for seq in seqs):  # structured output; raw stays for the logprobs
            logits = logits.clone() if logits is raw else logits
            mask_logits(logits, seqs)  # the graph's argmax did not see the mask
            greedy_ids = None
        token_ids = self.choose(logits, seqs, greedy_ids)
        record_logprobs(raw, token_ids, seqs)
        return token_ids.tolist()  # the one device-to-host transfer (two with logprobs)

    def choose(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's token, left on the device: the argmax (greedy_ids where a graph took it),
        a draw for the rows that sample. Nothing here waits for the device."""
        token_ids = logits.argmax(dim=-1) if greedy_ids is None else greedy_ids
        rows = [i for i, seq in enumerate(seqs) if not seq.sampling_params.is_greedy]
        if len(rows) == len(seqs):
            return self.sample(logits, seqs)
        if rows:
            index = on_device(rows, logits.device)
            token_ids = token_ids.index_put((index,), self.sample(logits.index_select(0, index), [seqs[i] for i in rows]))
        return token_ids

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """A draw for each row of logits [B, V] (those of seqs)."""
        device = logits.device
        params = [seq.sampling_params for seq in seqs]
        temperatures = on_device([p.temperature for p in params], device).unsqueeze(1)
        probs = torch.softmax(logits.float() / temperatures, dim=-1)
        probs = filter_probs(probs, *cutoffs(seqs, device))
        noise = torch.empty_like(probs)
        unseeded = [j for j, p in enumerate(params) if p.seed is None]
        if len(unseeded) == len(params):
            noise.exponential_()
        elif unseeded:
            index = on_device(unseeded, device)
            noise.index_copy_(0, index, torch.empty((len(unseeded), probs.shape[1]), device=device).exponential_())
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
    return filter_probs(probs, None, top_p, None)
