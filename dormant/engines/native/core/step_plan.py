"""What a GPU step feeds the model, worked out in plain Python (no torch, no GPU).

    plan = plan_packed_step(seqs, block_size, scratch_block, block_m, gather_context)
    plan.vectors()                   every index vector of an eager step, for one copy
    fill_decode_rows(host, tables, seqs, size, block_size, scratch_block)
                                     a graph step's rows, into the pinned staging arrays

An eager step packs its decodes first (one attention launch for all of them), then the prompt
chunks. A slot is `block * block_size + offset` in the paged KV cache; block tables are padded
with the scratch block, which padded rows write and read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dormant.engines.native.core.sequence import Sequence

# Triton makes a variant of a kernel per 16-byte alignment of each pointer argument and per
# int argument that is 1 or a multiple of 16 (a row stride). So that an eager step's vectors
# never ask for a new one: each starts 16 bytes (2 int64) into the packed copy, and block tables
# are padded to a multiple of 16 columns. Before, an odd token count shifted every vector after
# it, and the first burst after a cold start compiled prefill kernel variants for seconds.
VECTOR_ALIGN = 2
TABLE_ALIGN = 16


@dataclass
class PackedStep:
    tokens: list[int] = field(default_factory=list)  # the step's tokens, decodes first
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # where each token's K and V go
    keep: list[int] = field(default_factory=list)  # the row of each sampling seq's last token, in seqs' order
    context_lens: list[int] = field(default_factory=list)  # decodes: tokens in the KV after this step
    tables: list[list[int]] = field(default_factory=list)  # a row per decode, then per chunk
    cu_seqlens: list[int] = field(default_factory=list)  # end of the decodes, then of each chunk
    # the compact decoder's prefill launch: per block of block_m query rows, its table row,
    # first row and end row
    query_blocks: tuple[list[int], list[int], list[int]] = field(default_factory=lambda: ([], [], []))
    context_slots: list[int] = field(default_factory=list)  # transformers' model: a chunk's whole context
    context_ranges: list[tuple[int, int] | None] = field(default_factory=list)  # per chunk, in context_slots
    num_decodes: int = 0
    # (seq, first row, end row) of each chunk whose params ask for prompt logprobs; their rows
    # follow the sampling rows in `keep`
    prompt_rows: list = field(default_factory=list)

    def vectors(self) -> tuple[list[int], list[int]]:
        """tokens, positions, slots, keep, context_lens, the query blocks' three columns and
        context_slots, end to end, each padded with zeros to a multiple of VECTOR_ALIGN: what
        the runner copies to the GPU at once. Returns that list and where each vector starts."""
        flat: list[int] = []
        starts: list[int] = []
        for vector in (self.tokens, self.positions, self.slots, self.keep, self.context_lens,
                       *self.query_blocks, self.context_slots):
            starts.append(len(flat))
            flat.extend(vector)
            flat.extend([0] * (-len(vector) % VECTOR_ALIGN))
        return flat, starts


def _slot(table: list[int], pos: int, block_size: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def plan_packed_step(seqs: list[Sequence], block_size: int, scratch_block: int, block_m: int,
                     gather_context: bool) -> PackedStep:
    """The vectors of one eager step over each seq's scheduled tokens. `gather_context`: a
    chunk that continues a prompt lists the slots of its whole context (transformers' model
    reads them; the compact decoder reads the cache through the block table)."""
    plan = PackedStep()
    decodes = [seq for seq in seqs if seq.is_decode]
    chunks = [seq for seq in seqs if not seq.is_decode]
    max_blocks = -(-max(len(seq.block_table) for seq in seqs) // TABLE_ALIGN) * TABLE_ALIGN
    last: dict[int, int] = {}

    def padded(table: list[int]) -> list[int]:
        return table + [scratch_block] * (max_blocks - len(table))

    for seq in decodes:
        pos = seq.num_tokens - 1
        last[id(seq)] = len(plan.tokens)
        plan.tokens.append(seq.last_token)
        plan.positions.append(pos)
        plan.slots.append(_slot(seq.block_table, pos, block_size))
        plan.tables.append(padded(seq.block_table))
        plan.context_lens.append(pos + 1)
    plan.num_decodes = len(decodes)
    plan.cu_seqlens.append(len(plan.tokens))
    for seq in chunks:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
        seq_slots = [_slot(seq.block_table, p, block_size) for p in range(end)]
        plan.tables.append(padded(seq.block_table))
        first = len(plan.tokens)
        for b in range(first, first + end - start, block_m):
            for column, value in zip(plan.query_blocks, (len(plan.tables) - 1, b, min(b + block_m, first + end - start))):
                column.append(value)
        plan.tokens.extend(seq.token_ids[start:end])
        plan.positions.extend(range(start, end))
        plan.slots.extend(seq_slots[start:])
        if start > 0 and gather_context:
            plan.context_ranges.append((len(plan.context_slots), len(plan.context_slots) + end))
            plan.context_slots.extend(seq_slots)
        else:
            plan.context_ranges.append(None)
        plan.cu_seqlens.append(len(plan.tokens))
        last[id(seq)] = len(plan.tokens) - 1
        if seq.sampling_params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
            plan.prompt_rows.append((seq, first, len(plan.tokens)))
    plan.keep = [last[id(seq)] for seq in seqs if seq.samples_this_step]
    plan.keep += [row for _, a, b in plan.prompt_rows for row in range(a, b)]
    return plan


def fill_decode_rows(host, tables, seqs: list[Sequence], size: int, block_size: int, scratch_block: int) -> None:
    """A decode graph's inputs for `seqs`, padded to `size` rows, into the staging arrays
    (numpy views of pinned memory): host rows are input ids, positions, slots and context
    lengths; tables holds a block table per row (columns past a seq's table are stale and
    never read). Padded rows write the scratch slot and read one token of it."""
    n = len(seqs)
    for i, seq in enumerate(seqs):
        pos = seq.num_tokens - 1
        table = seq.block_table
        host[0, i] = seq.last_token
        host[1, i] = pos
        host[2, i] = _slot(table, pos, block_size)
        host[3, i] = pos + 1
        tables[i, :len(table)] = table
    host[0, n:size] = 0
    host[1, n:size] = 0
    host[2, n:size] = scratch_block * block_size
    host[3, n:size] = 1
    tables[n:size, 0] = scratch_block
