"""Paged KV blocks with prefix caching.

A sequence of n tokens holds ceil(n / block_size) blocks; the slot of token i is
``block_table[i // block_size] * block_size + i % block_size``.

Prefix caching: once a block is full and its KV computed, it gets a hash of its token ids
chained with the previous block's hash, so equal hashes mean equal prefixes. A new sequence
takes the blocks whose hashes it finds (ref_count + 1) and computes only the rest. A freed
block (ref_count 0) goes to the back of the free list with its hash kept: it is reused as
is until a fresh allocation takes it from the front (least recently freed first) and drops
the hash. The block holding a prompt's last token is never taken from the cache, so the
token whose logits are sampled is always computed and no step writes into a shared block.
"""

from __future__ import annotations

from collections import OrderedDict

from dormant.engines.native.core.sequence import Sequence


def block_hash(token_ids: list[int], prev_hash: int | None) -> int:
    return hash((prev_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 cache_output_blocks: bool = True):
        """`cache_output_blocks` False: only blocks of prompt tokens are shared, for a runner
        whose decode steps compute KV unlike its prompt steps (the CPU's mixed dtype), so that
        a cache hit gives the KV an uncached prompt would have."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.cache_output_blocks = cache_output_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count 0, in eviction order; an OrderedDict so that a cache hit leaves it in O(1)
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the KV cache was released, by a sleep); all blocks must be free."""
        if self.num_free_blocks != self.num_blocks:
            raise RuntimeError("cannot reset the prefix cache while sequences hold blocks")
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block_id.clear()

    # -- admission ------------------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block id, hash) of the leading blocks found in the cache; never the block that
        holds the last token."""
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt position
        hits, prev = [], None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(tokens, prev)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append((block_id, h))
            prev = h
        return hits

    def _num_free_needed(self, seq: Sequence, hits: list[tuple[int, int]]) -> int:
        """Blocks that leave the free list: the fresh ones and the hits nobody holds."""
        revived = sum(1 for block_id, _ in hits if self.blocks[block_id].ref_count == 0)
        return self.num_blocks_needed(seq.num_tokens) - len(hits) + revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self._num_free_needed(seq, self._cached_prefix(seq)) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's tokens: the cached prefix shared, the rest fresh. Sets
        num_computed_tokens to the cached prefix's length."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds blocks")
        hits = self._cached_prefix(seq)
        if self._num_free_needed(seq, hits) > self.num_free_blocks:
            raise RuntimeError("not enough free KV blocks")
        for block_id, h in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        for _ in range(self.num_blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    # -- running --------------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody holds go to the free list, hashes kept. The
        tail goes in first so that a prompt's last blocks are evicted before its first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether the last token's KV slot exists or one free block can hold it."""
        return len(seq.block_table) >= self.num_blocks_needed(seq.num_tokens) or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.num_blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_free_block())

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that this step filled with computed KV (prompt or output), so later
        sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else None
        computed = seq.num_computed_tokens if self.cache_output_blocks else min(seq.num_computed_tokens, seq.num_prompt_tokens)
        for i in range(len(seq.block_hashes), computed // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(tokens, prev)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block_id.setdefault(h, block.block_id)  # an equal block may exist
            seq.block_hashes.append(h)
            prev = h
