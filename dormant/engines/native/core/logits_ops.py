"""What both samplers do to a step's logits before they pick, batched over the step's rows;
plain torch ops on whatever device the logits are on (the CPU sampler and the GPU one share
them, so the two devices process alike).

    logits = apply_penalties_and_bias(logits, seqs)   rows that ask: repetition, frequency,
                                                      presence penalties, then logit_bias
    probs = filter_probs(probs, top_k, top_p, min_p)  sampled rows: tokens outside the three
                                                      cut-offs get probability 0
    record_logprobs(raw, token_ids, seqs)             rows that ask: the chosen token's
                                                      logprob and the best alternatives -> seq.logprobs
    record_prompt_logprobs(seq, logits, start)        a prompt chunk's logits -> seq.prompt_logprobs

Each is skipped by its caller when no row asks (the batch-wide fast path).
"""

from __future__ import annotations

import torch

from dormant.engines.base import TokenLogprob
from dormant.engines.native.core.sequence import Sequence


def apply_penalties_and_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """[B, V] float logits of `seqs` -> the same, with each row's penalties and logit_bias
    applied (out of place: the input may be a decode graph's output buffer)."""
    rows = [i for i, seq in enumerate(seqs) if seq.sampling_params.changes_logits]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    sub = logits[rows].float()  # advanced indexing copies
    params = [seqs[i].sampling_params for i in rows]
    if any(p.has_penalties for p in params):
        out_rows, out_ids = _flat_ids([seqs[i].output_token_ids for i in rows], vocab)
        counts = torch.zeros_like(sub)
        counts.index_put_((out_rows.to(device), out_ids.to(device)), torch.ones(len(out_ids), device=device),
                          accumulate=True)
        repetition = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = counts > 0
            prompt_rows, prompt_ids = _flat_ids([seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in rows], vocab)
            seen[prompt_rows.to(device), prompt_ids.to(device)] = True
            sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        sub = sub - frequency * counts - presence * (counts > 0).float()
    if any(p.logit_bias for p in params):
        bias_rows = [j for j, p in enumerate(params) for _ in p.logit_bias]
        bias_ids = [t for p in params for t in p.logit_bias]
        bias = [b for p in params for b in p.logit_bias.values()]
        keep = [k for k, t in enumerate(bias_ids) if 0 <= t < vocab]  # ids past the logits: no such token
        sub.index_put_((torch.tensor([bias_rows[k] for k in keep], device=device),
                        torch.tensor([bias_ids[k] for k in keep], device=device)),
                       torch.tensor([float(bias[k]) for k in keep], device=device), accumulate=True)
    return logits.float().index_copy(0, torch.tensor(rows, device=device), sub)


def _flat_ids(id_lists: list[list[int]], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [j for j, ids in enumerate(id_lists) for t in ids if t < vocab]
    ids = [t for ids in id_lists for t in ids if t < vocab]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long)


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                 min_p: torch.Tensor | None) -> torch.Tensor:
    """probs [B, V]; each cut-off a [B, 1] tensor or None (no row asks). Keeps, per row, the
    top_k most likely tokens (0: all), of those the smallest set whose mass reaches top_p of
    theirs, and only tokens at least min_p times as likely as the most likely one. The rest are
    set to 0; the rows are not renormalized (multinomial and the exponential race need not)."""
    if top_k is None and top_p is None and min_p is None:
        return probs
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
        drop |= (ranks >= top_k) & (top_k > 0)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    if top_p is not None:
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely kept tokens
        drop |= before >= top_p * sorted_probs.sum(-1, keepdim=True)
    if min_p is not None:
        drop |= sorted_probs < min_p * sorted_probs[:, :1]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)


def on_device(values: list, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`. To a GPU through pinned memory, without
    waiting: a plain copy would wait for the device's queued work, a step launched ahead
    included (llm_engine.py)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def cutoffs(seqs: list[Sequence], device) -> tuple[torch.Tensor | None, ...]:
    """(top_k, top_p, min_p) as [B, 1] tensors for filter_probs; None for one no row uses."""
    params = [seq.sampling_params for seq in seqs]
    top_k = on_device([p.top_k for p in params], device).unsqueeze(1) if any(p.top_k for p in params) else None
    top_p = on_device([p.top_p for p in params], device).unsqueeze(1) if any(p.top_p < 1.0 for p in params) else None
    min_p = on_device([p.min_p for p in params], device).unsqueeze(1) if any(p.min_p for p in params) else None
    return top_k, top_p, min_p


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, nums: list[int]) -> list[TokenLogprob]:
    """logits [R, V] (raw), token_ids [R]: each row's chosen id with its log-probability and
    the nums[r] most likely ids of that row, best first. One device-to-host transfer."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.view(-1, 1).to(logprobs.device)).squeeze(1)
    k = min(max(nums, default=0), logprobs.shape[1])
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        host = torch.stack([top_ids.double(), top_values.double()]).tolist()
    else:
        host = [[[]] * len(nums), [[]] * len(nums)]
    ids, chosen_values = token_ids.tolist(), chosen.tolist()
    return [TokenLogprob(ids[r], chosen_values[r], tuple(zip(map(int, host[0][r][:n]), host[1][r][:n])))
            for r, n in enumerate(nums)]


def record_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, seqs: list[Sequence]) -> None:
    """Append, to each seq whose params ask, its chosen token's logprob under the raw logits."""
    rows = [i for i, seq in enumerate(seqs) if seq.sampling_params.logprobs is not None]
    if not rows:
        return
    index = torch.tensor(rows, device=raw.device)
    found = token_logprobs(raw[index], token_ids[index], [seqs[i].sampling_params.logprobs for i in rows])
    for i, logprob in zip(rows, found):
        seqs[i].logprobs.append(logprob)


def record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, start: int) -> None:
    """logits [T, V] of seq's chunk computed from position `start` on: row j predicts the
    token at start + j + 1. Appends the logprobs of the prompt tokens it predicts (the last
    prompt row predicts the first output token, which the sampler handles)."""
    first = len(seq.prompt_logprobs) - 1  # positions before it were recorded (a preempted seq recomputes them)
    end = min(start + logits.shape[0], seq.num_prompt_tokens - 1)
    if end <= first:
        return
    targets = torch.tensor(seq.token_ids[first + 1:end + 1], device=logits.device)
    n = end - first
    rows = logits[first - start:end - start]
    seq.prompt_logprobs.extend(token_logprobs(rows, targets, [seq.sampling_params.prompt_logprobs] * n))


def prompt_logprob_rows(seqs: list[Sequence]) -> list[tuple[Sequence, int, int]]:
    """(seq, first row, end row) in a packed step (seqs' scheduled tokens end to end, in order)
    of each seq whose params ask for prompt logprobs and whose chunk holds prompt tokens."""
    rows, first = [], 0
    for seq in seqs:
        end = first + seq.num_scheduled_tokens
        if seq.sampling_params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens - 1:
            rows.append((seq, first, end))
        first = end
    return rows


def record_chunk_logprobs(logits: torch.Tensor, prompt_rows: list[tuple[Sequence, int, int]]) -> None:
    """logits: the rows of `prompt_rows`, end to end -> each seq's prompt_logprobs."""
    offset = 0
    for seq, first, end in prompt_rows:
        record_prompt_logprobs(seq, logits[offset:offset + end - first], seq.num_computed_tokens)
        offset += end - first
