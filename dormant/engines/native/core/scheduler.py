from __future__ import annotations

from collections import deque

from dormant.engines.base import RequestOutput
from dormant.engines.native.core.block_manager import BlockManager
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.guided import advance
from dormant.engines.native.core.sequence import PLACEHOLDER, Sequence, SequenceStatus

StepOutput = tuple[str, RequestOutput]  # request_id, what its stream gets


class Scheduler:
    """Waiting and running queues; each step gets a budget of max_num_batched_tokens.

    With ``enable_chunked_prefill`` (the default) one step mixes: every running sequence
    first (a decode token each, or the next chunk of an unfinished prompt), then waiting
    prompts admitted while KV blocks, max_num_seqs and the budget allow, the last one
    possibly cut to a chunk. Without it a step is either whole prompts or all decodes (the
    reference the mixed steps are tested against). A prompt's cached prefix (block_manager)
    costs no budget. A chunk short of its prompt's end stops at a block boundary, as a cache
    hit does: on the CPU a prompt's KV takes other bits when a step of it ends inside a
    16-row tile (measured on SmolLM2: cuts after 13 or 24 tokens change layer 1's KV, cuts
    after 16, 32, 48 or 64 do not), and greedy output must not depend on how a prompt was cut
    or cached (issue 11). On block shortage the most recently admitted sequence is
    preempted: its blocks are freed and it is prefilled again later (recompute; its own
    blocks are likely still in the prefix cache)."""

    def __init__(self, config: EngineConfig, eos_token_ids: set[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.eos_token_ids = set(eos_token_ids)
        # the mixed dtype's decodes run bf16 linears, its prompt steps fp32 (cpu/mixed_linear.py)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                          cache_output_blocks=getattr(config, "dtype", None) != "mixed")
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return True
        return False

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step, each with num_scheduled_tokens set."""
        if not self.enable_chunked_prefill:
            return self._admit(self.max_num_batched_tokens, whole_prompts=True) or self._schedule_running(None)[0]
        preemptions = self.num_preemptions
        scheduled, budget = self._schedule_running(self.max_num_batched_tokens)
        if budget > 0 and self.num_preemptions == preemptions:  # no room to admit after a preemption
            scheduled += self._admit(budget, whole_prompts=False)
        return scheduled

    def _num_tokens_to_run(self, seq: Sequence, budget: int | None) -> int:
        """What is left of seq's tokens, or the most of them that `budget` holds up to a block
        boundary (0: none this step)."""
        n = seq.num_tokens - seq.num_computed_tokens
        if budget is None or n <= budget:
            return n
        bs = self.block_manager.block_size
        return max(0, (seq.num_computed_tokens + budget) // bs * bs - seq.num_computed_tokens)

    def _schedule_running(self, budget: int | None) -> tuple[list[Sequence], int]:
        scheduled: list[Sequence] = []
        visited: list[Sequence] = []  # scheduled, or a prompt chunk the budget cannot hold this step
        while self.running and (budget is None or budget > 0):
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                visited.append(seq)
                num_tokens = self._num_tokens_to_run(seq, budget)
                if not num_tokens:
                    continue
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = num_tokens
                if budget is not None:
                    budget -= num_tokens
                scheduled.append(seq)
        self.running.extendleft(reversed(visited))
        return scheduled, budget or 0

    def _admit(self, budget: int, whole_prompts: bool) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if whole_prompts and scheduled and seq.num_tokens > budget:
                break
            if not whole_prompts and budget < self.block_manager.block_size and seq.num_tokens > budget:
                break  # no whole block fits (a cache hit would shorten the prompt by whole blocks)
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            seq.num_scheduled_tokens = self._num_tokens_to_run(seq, None if whole_prompts else budget)
            budget -= seq.num_scheduled_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[StepOutput]:
        """Account the step's computed tokens; token_ids holds one sampled id for each seq
        whose step reached its last token, in order (a prompt chunk short of it samples none)."""
        return self.take_tokens(seqs, self.account(seqs), token_ids)

    def account(self, seqs: list[Sequence]) -> list[bool]:
        """The step's tokens are computed (their KV written): count them and cache the blocks
        they filled. Returns, per seq, whether its step sampled a token. A seq that finished
        while its step ran (aborted, or ended by the token before) is left alone: its blocks
        are free already."""
        samples = []
        for seq in seqs:
            if seq.is_finished:  # only a step run ahead holds one: all decodes, each sampled
                samples.append(True)
                continue
            samples.append(seq.samples_this_step)
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self.block_manager.cache_full_blocks(seq)
        return samples

    def take_tokens(self, seqs: list[Sequence], samples: list[bool], token_ids: list[int]) -> list[StepOutput]:
        """Each sampled token (token_ids, one per True of `samples`, in order) joins its seq,
        in the place of the PLACEHOLDER where the next step already runs (schedule_ahead);
        a seq that stops on it (EOS, a stop id, the grammar's end, its length) finishes.
        Returns what each seq's stream gets."""
        outputs = []
        sampled = iter(token_ids)
        for seq, samples_token in zip(seqs, samples):
            if not samples_token:
                continue
            token_id = next(sampled)
            if seq.is_finished:  # finished while this step ran: its token is dropped
                continue
            if seq.token_ids[-1] == PLACEHOLDER:
                seq.token_ids[-1] = token_id
            else:
                seq.append_token(token_id)
            params = seq.sampling_params
            reason = None
            completes_grammar = seq.guide is not None and advance(seq, token_id)
            if ((not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids
                    or completes_grammar):
                reason = "stop"
            elif self._ends_by_length(seq, 0):
                reason = "length"
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            outputs.append((seq.request_id, self._output(seq, token_id, reason)))
        return outputs

    def _ends_by_length(self, seq: Sequence, ahead: int) -> bool:
        """Whether seq is at its max_tokens or the model's max_model_len `ahead` tokens on."""
        max_tokens = seq.sampling_params.max_tokens
        return ((max_tokens is not None and seq.num_completion_tokens + ahead >= max_tokens)
                or seq.num_tokens + ahead >= self.max_model_len)

    def schedule_ahead(self, seqs: list[Sequence]) -> list[int]:
        """After a decode step over `seqs` was launched and accounted, before its tokens are
        read: the next decode step, of each seq whose coming token cannot end it by length.
        Its input token is a PLACEHOLDER that the runner fills on the device from the step's
        output. Returns the rows of `seqs` scheduled, in order; none when the next step needs
        the tokens on the host first: a prompt waits with room (seqs, blocks) to admit it, a
        running seq is not in this step (a chunk), a seq needs its tokens read
        (Sequence.can_run_ahead), or the KV blocks run short (preemption is decided on known
        tokens only). A seq that its coming token ends
        (EOS, a stop id) has run one step for nothing; account and take_tokens drop it."""
        live = [seq for seq in seqs if not seq.is_finished]
        admits = (self.waiting and len(self.running) < self.max_num_seqs
                  and self.block_manager.can_allocate(self.waiting[0]))
        if admits or len(live) != len(self.running) or not all(seq.can_run_ahead for seq in live):
            return []
        rows = [i for i, seq in enumerate(seqs) if not seq.is_finished and not self._ends_by_length(seq, 1)]
        bm = self.block_manager
        new_blocks = sum(len(seqs[i].block_table) < bm.num_blocks_needed(seqs[i].num_tokens + 1) for i in rows)
        if new_blocks > bm.num_free_blocks:
            return []
        for i in rows:
            seq = seqs[i]
            seq.token_ids.append(PLACEHOLDER)
            bm.may_append(seq)
            seq.num_scheduled_tokens = 1
        return rows

    @staticmethod
    def _output(seq: Sequence, token_id: int, reason: str | None) -> RequestOutput:
        params = seq.sampling_params
        out = RequestOutput([token_id], reason is not None, reason)
        if params.logprobs is not None:
            out.logprobs = seq.logprobs[-1:]
        if params.prompt_logprobs is not None and seq.num_completion_tokens == 1:
            out.prompt_logprobs = list(seq.prompt_logprobs)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
