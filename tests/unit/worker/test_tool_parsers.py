"""Each tool-call parser on canned replies, whole and streamed: the stream cut at every
character (markers split across deltas) must give what the whole reply gives."""

from __future__ import annotations

import json

import pytest

from dormant.protocol import ChatTool
from dormant.worker.tool_parsers import PARSERS, detect_tool_parser, tool_parser
from dormant.worker_api import TOOL_CALL_PARSERS

pytestmark = pytest.mark.timeout(60)

TOOLS = [ChatTool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}}})]


def streamed(name: str, text: str, step: int = 1) -> tuple[str, list[tuple[str, dict]]]:
    parser, content, calls = tool_parser(name, TOOLS), "", []
    for delta in [*(parser.feed(text[i:i + step]) for i in range(0, len(text), step)), parser.finish()]:
        content += delta.content
        calls += [(c.function.name, json.loads(c.function.arguments)) for c in delta.tool_calls]
    return content, calls


def whole(name: str, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = tool_parser(name, TOOLS).parse(text)
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in calls]


CASES = [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris"})]),
    ("hermes", ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'),
     None, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "days": 2})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut at EOS: still a call
     None, [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Plain answer with < and <tool in it.', "Plain answer with < and <tool in it.", []),
    ("qwen3_coder", ('<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n'
                     '<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>\n'
                     '<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n</function>\n</tool_call>'),
     None, [("get_weather", {"city": "New York", "days": 3, "metric": True}), ("get_weather", {"city": "42"})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}',
     None, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
     None, [("get_weather", {"city": "Paris"})]),
    ("llama3_json", 'JSON looks like {"name": "x"}.', 'JSON looks like {"name": "x"}.', []),
    ("mistral", ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                 '{"name": "get_weather", "arguments": {"city": "Rome"}}]'),
     None, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # the marker dropped by the detokenizer
     None, [("get_weather", {"city": "Paris"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_whole_and_streamed_agree(name, text, content, calls):
    assert whole(name, text) == (content, calls)
    for step in (1, 2, 5, len(text)):  # every cut of the markers across deltas
        assert streamed(name, text, step) == (content or "", calls)


@pytest.mark.parametrize(("name", "text"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),  # no name
    ("qwen3_coder", '<tool_call>\nnot xml at all\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": '),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {]'),
])
def test_malformed_calls_stay_content(name, text):
    assert whole(name, text) == (text, [])
    assert streamed(name, text) == (text, [])


def test_content_after_a_call_and_a_broken_call_between_good_ones():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n'
            '<tool_call>{broken}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call> done')
    content, calls = whole("hermes", text)
    assert content == "<tool_call>{broken}</tool_call> done"
    assert [c[1]["city"] for c in calls] == ["A", "B"]
    assert streamed("hermes", text, 3) == (content, calls)


def test_content_streams_before_the_call_arrives():
    parser = tool_parser("hermes", TOOLS)
    assert parser.feed("Checking the weather").content == "Checking the weather"
    assert parser.feed(" now.\n<tool").content == " now."  # "<tool" may open a call: held back
    step = parser.feed('_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    assert step.content == "" and step.tool_calls[0].function.name == "get_weather"
    assert step.tool_calls[0].id.startswith("call_")


def test_detected_from_the_template_markers():
    assert detect_tool_parser("{{ '<tool_call>' }}<function=x><parameter=y>") == "qwen3_coder"
    assert detect_tool_parser("...<tool_call>\\n{\"name\": ...") == "hermes"
    assert detect_tool_parser("[AVAILABLE_TOOLS]...[TOOL_CALLS]") == "mistral"
    assert detect_tool_parser("<|python_tag|>{{ tool_call | tojson }}") == "llama3_json"
    assert detect_tool_parser("{{ message.content }}") is None


def test_the_contract_names_every_parser():
    assert set(TOOL_CALL_PARSERS) == set(PARSERS)
