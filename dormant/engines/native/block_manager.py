from __future__ import annotations

from collections import deque

from dormant.engines.native.sequence import Sequence


class BlockManager:
    """Fixed-size KV blocks: a free list and each sequence's block table.

    A sequence of n tokens holds ceil(n / block_size) blocks; the slot of token i is
    ``block_table[i // block_size] * block_size + i % block_size``.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_blocks_needed(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        n = self.num_blocks_needed(seq.num_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError("not enough free KV blocks")
        seq.block_table = [self.free_block_ids.popleft() for _ in range(n)]

    def free(self, seq: Sequence) -> None:
        self.free_block_ids.extend(seq.block_table)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Whether the last token's KV slot exists or one free block can hold it."""
        return len(seq.block_table) >= self.num_blocks_needed(seq.num_tokens) or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.num_blocks_needed(seq.num_tokens):
            seq.block_table.append(self.free_block_ids.popleft())
