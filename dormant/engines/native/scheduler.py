from __future__ import annotations

from collections import deque

from dormant.engines.native.block_manager import BlockManager
from dormant.engines.native.config import EngineConfig
from dormant.engines.native.sequence import Sequence, SequenceStatus

StepOutput = tuple[str, list[int], bool, "str | None"]  # request_id, new ids, finished, reason


class Scheduler:
    """Waiting and running queues. A step is either prefills (admitted while KV blocks and
    the token budget allow) or one decode token for every running sequence, batched into one
    forward. On block shortage the most recently admitted sequence is preempted: its blocks
    are freed and it is re-prefilled later (recompute)."""

    def __init__(self, config: EngineConfig, eos_token_ids: set[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

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

    def schedule(self) -> tuple[list[Sequence], bool]:
        scheduled: list[Sequence] = []
        num_batched_tokens = 0
        while self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if scheduled and num_batched_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            num_batched_tokens += seq.num_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            scheduled.append(seq)
        if scheduled:
            self.running.extend(scheduled)
            return scheduled, True

        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[StepOutput]:
        outputs = []
        for seq, token_id in zip(seqs, token_ids):
            seq.append_token(token_id)
            params = seq.sampling_params
            reason = None
            if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
                reason = "stop"
            elif params.max_tokens is not None and seq.num_completion_tokens >= params.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            outputs.append((seq.request_id, [token_id], reason is not None, reason))
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
