"""Tool-call parsers: a model's reply text -> content and OpenAI `tool_calls`, whole or streamed.

    parser = tool_parser("hermes", req.tools)     # one per request: it holds the stream's state
    step = parser.feed(text_delta)                # ToolCallDelta(content, tool_calls completed)
    last = parser.finish()
    content, calls = tool_parser("hermes", tools).parse(whole_text)

Which parser a model gets: `tool_call_parser` in dormant.yaml (the names are
worker_api.TOOL_CALL_PARSERS, checked at config load), else `detect_tool_parser` on its chat
template. The grammar that forces a call in a format is tool_parsers/grammar.py.
"""

from __future__ import annotations

from dormant.protocol import ChatTool
from dormant.worker.tool_parsers.base import ToolCallDelta, ToolParser
from dormant.worker.tool_parsers.hermes import HermesToolParser
from dormant.worker.tool_parsers.llama3 import Llama3JsonToolParser
from dormant.worker.tool_parsers.mistral import MistralToolParser
from dormant.worker.tool_parsers.qwen3_coder import Qwen3CoderToolParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}

__all__ = ["PARSERS", "ToolCallDelta", "ToolParser", "detect_tool_parser", "tool_parser"]


def tool_parser(name: str, tools: list[ChatTool] | None) -> ToolParser:
    return PARSERS[name](tools)


def detect_tool_parser(template: str) -> str | None:
    """The format a chat template asks tool calls in, from the markers it writes; None when it
    names none we know. The most specific marker first: Qwen3-Coder's XML also sits inside
    `<tool_call>`."""
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|eom_id|>" in template and "parameters" in template):
        return "llama3_json"
    return None
