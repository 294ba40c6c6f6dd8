"""The chunk of plain text a stream sends for nearly every token (worker/streaming.py's
PlainChunks, from a template) is byte for byte the chunk the general path writes."""

from __future__ import annotations

import functools
import json

import pytest

from dormant.protocol import ChunkChoice, ChunkDelta, CompletionChoice
from dormant.worker.streaming import PlainChunks, chunk_event

TEXTS = ["Hello", "", " world", 'quote " and \\ backslash', "line\nbreak\ttab", "é ü 中文 🙂", "\x00\x1f", "</s>"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
def test_a_plain_chunk_is_the_general_paths_chunk(chat, include_usage):
    event = functools.partial(chunk_event, chat, "chatcmpl-1" if chat else "cmpl-1", 1764800000, "my/model", include_usage)
    plain = PlainChunks(event, chat)
    for index in (0, 3, 0):
        for text in TEXTS:
            choice = (ChunkChoice(index=index, delta=ChunkDelta(content=text)) if chat
                      else CompletionChoice(index=index, text=text, finish_reason=None))
            assert plain(index, text) == event(choice)
            data = json.loads(plain(index, text)[len(b"data: "):])
            assert (data["choices"][0]["delta"]["content"] if chat else data["choices"][0]["text"]) == text
