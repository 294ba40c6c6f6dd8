"""The forced-call grammars, checked with llguidance itself over SmolLM2's tokenizer: valid
calls in each format are accepted whole, invalid ones refused at the first wrong token."""

from __future__ import annotations

import pytest

from dormant.protocol import ChatTool
from dormant.worker.tool_parsers import tool_parser
from dormant.worker.tool_parsers.grammar import auto_tool_call_grammar, tool_call_grammar

llguidance = pytest.importorskip("llguidance")
pytestmark = pytest.mark.timeout(120)

TOOLS = [ChatTool.model_validate(t) for t in [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}},
]]


@pytest.fixture(scope="module")
def check(model_dir):
    import llguidance.hf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def accepts(parser: str, text: str, one_call: bool = False, name: str | None = None, auto: bool = False) -> bool:
        grammar = auto_tool_call_grammar(parser, TOOLS, one_call) if auto else tool_call_grammar(parser, TOOLS, one_call, name)
        matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar.value), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return bool(matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))) and matcher.is_accepting()

    return accepts


HERMES_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_NOW = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
CODER_PARIS = '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>'


@pytest.mark.parametrize(("parser", "text"), [
    ("hermes", HERMES_PARIS),
    ("hermes", HERMES_PARIS + "\n" + HERMES_NOW),
    ("qwen3_coder", CODER_PARIS),
    ("qwen3_coder", ('<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n'
                     '<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>')),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'),
])
def test_valid_calls_are_accepted_and_parse_back(check, parser, text):
    assert check(parser, text)
    content, calls = tool_parser(parser, TOOLS).parse(text)
    assert content is None and calls


@pytest.mark.parametrize(("parser", "text"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>'),  # required city missing
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": 7}}\n</tool_call>'),  # wrong type
    ("hermes", '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>'),  # no such tool
    ("hermes", "Sure, let me check."),  # prose instead of a call
    ("qwen3_coder", '<tool_call>\n<function=get_weather>\n<parameter=days>\nsoon\n</parameter>\n</function>\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # Llama's key is parameters
])
def test_invalid_calls_are_refused(check, parser, text):
    assert not check(parser, text)


def test_named_function_and_single_call(check):
    assert check("hermes", HERMES_NOW, name="now")
    assert not check("hermes", HERMES_PARIS, name="now")
    assert check("hermes", HERMES_PARIS, one_call=True)
    assert not check("hermes", HERMES_PARIS + "\n" + HERMES_NOW, one_call=True)


@pytest.mark.parametrize("parser", ["hermes", "qwen3_coder"])
def test_strict_auto_leaves_text_free_and_holds_calls_to_their_schema(check, parser):
    paris = HERMES_PARIS if parser == "hermes" else CODER_PARIS
    assert check(parser, "The weather is fine, no call needed.", auto=True)
    assert check(parser, "Let me look that up.\n" + paris, auto=True)
    assert check(parser, paris + "\nDone.", auto=True)
    assert check(parser, paris + "\n" + paris, auto=True)
    assert not check(parser, paris + "\n" + paris, one_call=True, auto=True)
    bad = ('<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>' if parser == "hermes" else
           "<tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    assert not check(parser, "Sure. " + bad, auto=True)  # the required city is missing
    assert not check(parser, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', auto=True)


@pytest.mark.parametrize(("parser", "paris", "bad"), [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     '{"name": "get_weather", "parameters": {"days": 2}}'),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     '[{"name": "get_weather", "arguments": {"days": 2}}]'),
])
def test_strict_auto_without_a_tag_holds_a_reply_that_opens_as_calls(check, parser, paris, bad):
    assert check(parser, "The weather is fine, no call needed.", auto=True)
    assert check(parser, "", auto=True)
    assert check(parser, paris, auto=True)
    assert not check(parser, bad, auto=True)  # the required city is missing
    assert not check(parser, paris[0] + " not a call", auto=True)
