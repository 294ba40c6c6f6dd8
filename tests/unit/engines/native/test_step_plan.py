"""The GPU step's inputs, worked out without a GPU: the packed eager step and a graph step's rows."""

from __future__ import annotations

import numpy as np
import pytest

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.core.step_plan import VECTOR_ALIGN, fill_decode_rows, plan_packed_step

SCRATCH = 99


def seq(tokens, table, computed, scheduled, num_outputs=0):
    """The last `num_outputs` of `tokens` were sampled (a decode computes one of those)."""
    s = Sequence("r", tokens[:len(tokens) - num_outputs], SamplingParams(temperature=0))
    for t in tokens[len(tokens) - num_outputs:]:
        s.append_token(t)
    s.block_table, s.num_computed_tokens, s.num_scheduled_tokens = table, computed, scheduled
    return s


@pytest.mark.timeout(30)
def test_a_packed_step_puts_decodes_first_and_keeps_each_samplers_last_row():
    middle = seq(list(range(10, 20)), [3, 4, 5], computed=4, scheduled=3)  # a prompt's middle chunk
    decode = seq([1, 2, 3, 4, 5, 6], [7, 8], computed=5, scheduled=1, num_outputs=1)
    whole = seq([30, 31, 32], [6], computed=0, scheduled=3)  # a whole prompt: samples
    plan = plan_packed_step([middle, decode, whole], block_size=4, scratch_block=SCRATCH, block_m=2,
                            gather_context=True)
    assert plan.num_decodes == 1
    assert plan.tokens == [6, 14, 15, 16, 30, 31, 32]
    assert plan.positions == [5, 4, 5, 6, 0, 1, 2]
    assert plan.slots == [8 * 4 + 1, 16, 17, 18, 24, 25, 26]
    assert plan.keep == [0, 6]  # the decode's row, the whole prompt's last; the middle chunk samples nothing
    assert plan.context_lens == [6]
    pad = [SCRATCH] * 13  # tables are TABLE_ALIGN (16) columns wide
    assert plan.tables == [[7, 8, SCRATCH] + pad, [3, 4, 5] + pad, [6, SCRATCH, SCRATCH] + pad]
    assert plan.cu_seqlens == [1, 4, 7]
    assert plan.query_blocks == ([1, 1, 2, 2], [1, 3, 4, 6], [3, 4, 6, 7])  # table row, first, end
    assert plan.context_ranges == [(0, 7), None] and plan.context_slots == [12, 13, 14, 15, 16, 17, 18]
    flat, starts = plan.vectors()
    # each vector starts 16 bytes (2 int64) in, padded with zeros: 7 tokens take 8 places
    assert starts == [0, 8, 16, 24, 26, 28, 32, 36, 40]
    assert all(start % VECTOR_ALIGN == 0 for start in starts)
    assert flat[:8] == plan.tokens + [0] and flat[8:15] == plan.positions and flat[24:26] == plan.keep
    assert flat[26:27] == plan.context_lens and flat[28:32] == plan.query_blocks[0]
    assert flat[40:47] == plan.context_slots and len(flat) == 48

    compact = plan_packed_step([middle, decode, whole], 4, SCRATCH, 2, gather_context=False)
    assert compact.context_ranges == [None, None] and compact.context_slots == []


@pytest.mark.timeout(30)
def test_graph_rows_are_filled_and_padding_points_at_the_scratch_block():
    host = np.full((4, 4), -1, dtype=np.int64)
    tables = np.full((4, 3), -1, dtype=np.int32)
    a = seq([1, 2, 3, 4, 5], [2, 9], computed=4, scheduled=1)
    b = seq([7, 8], [5], computed=1, scheduled=1)
    fill_decode_rows(host, tables, [a, b], size=3, block_size=4, scratch_block=SCRATCH)
    assert host[:, 0].tolist() == [5, 4, 9 * 4 + 0, 5]
    assert host[:, 1].tolist() == [8, 1, 5 * 4 + 1, 2]
    assert host[:, 2].tolist() == [0, 0, SCRATCH * 4, 1]  # padding: the scratch slot, one token
    assert host[:, 3].tolist() == [-1, -1, -1, -1]  # past `size`: untouched
    assert tables[0, :2].tolist() == [2, 9] and tables[1, 0] == 5 and tables[2, 0] == SCRATCH
