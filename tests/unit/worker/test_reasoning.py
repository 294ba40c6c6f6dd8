"""Reasoning parsers on canned replies, whole and streamed (markers cut across deltas)."""

from __future__ import annotations

import pytest

from dormant.worker.reasoning import detect_reasoning_parser, reasoning_parser
from dormant.worker_api import REASONING_PARSERS

pytestmark = pytest.mark.timeout(30)


def streamed(name: str, prompt_tail: str, text: str, step: int) -> tuple[str, str]:
    parser, reasoning, content = reasoning_parser(name, prompt_tail), "", ""
    for i in range(0, len(text), step):
        r, c = parser.feed(text[i:i + step])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize(("name", "prompt_tail", "text", "reasoning", "content"), [
    ("qwen3", "<|im_start|>assistant\n", "<think>\nThe user wants x.\n</think>\n\nThe answer.", "\nThe user wants x.\n", "The answer."),
    ("qwen3", "<|im_start|>assistant\n", "The answer, no thinking.", None, "The answer, no thinking."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "thinking</think>answer", "thinking", "answer"),  # opened by the template
    ("qwen3", "assistant\n<think>\n\n</think>\n\n", "answer <think> as text", None, "answer <think> as text"),  # enable_thinking off
    ("deepseek_r1", "<｜Assistant｜><think>\n", "first, x.</think>\n\nIt is x.", "first, x.", "It is x."),
    ("deepseek_r1", "<｜Assistant｜>", "<think>\nhmm</think>ok", "\nhmm", "ok"),
    ("deepseek_r1", "<｜Assistant｜>", "cut off while thinking", "cut off while thinking", ""),
])
def test_whole_and_streamed(name, prompt_tail, text, reasoning, content):
    assert reasoning_parser(name, prompt_tail).parse(text) == (reasoning, content)
    for step in (1, 3, len(text)):
        assert streamed(name, prompt_tail, text, step) == (reasoning or "", content)


def test_detected_from_the_template():
    assert detect_reasoning_parser("{{ '<think>\\n\\n</think>' }}") == "qwen3"
    assert detect_reasoning_parser("<｜Assistant｜><think>\\n") == "deepseek_r1"
    assert detect_reasoning_parser("{{ message.content }}") is None
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek_r1"}
