"""Rendering with tools through a real tokenizer (SmolLM2's, given a Hermes tool template),
and the 400s for what a template or a request cannot do."""

from __future__ import annotations

from pathlib import Path

import pytest

from dormant.config import ConfigError, parse_model_spec
from dormant.errors import InvalidRequest
from dormant.protocol import ChatCompletionRequest
from dormant.worker.chat_template import ModelFormats, render_chat
from dormant.worker.reply import ReplyParser
from dormant.worker_api import LaunchSpec

pytestmark = pytest.mark.timeout(120)
TEMPLATE = (Path(__file__).parents[2] / "data" / "hermes_tools.jinja").read_text()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizers(model_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(model_dir)
    tools = AutoTokenizer.from_pretrained(model_dir)
    tools.chat_template = TEMPLATE
    return plain, tools


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Paris?"}], **fields})


def test_tools_calls_and_results_reach_the_prompt(tokenizers):
    _, tok = tokenizers
    req = request(tools=TOOLS, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    prompt = tok.decode(render_chat(tok, req))
    assert '"name": "get_weather", "description": "Weather now"' in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # arguments as an object
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    # tool_choice none: the tools are not shown
    assert "get_weather" not in tok.decode(render_chat(tok, request(tools=TOOLS, tool_choice="none")))


def test_chat_template_kwargs_reach_the_template(tokenizers):
    _, tok = tokenizers
    assert tok.decode(render_chat(tok, request(chat_template_kwargs={"enable_thinking": False}))).endswith(
        "<think>\n\n</think>\n\n")
    with pytest.raises(InvalidRequest) as err:
        render_chat(tok, request(chat_template_kwargs={"tokenize": False}))
    assert err.value.param == "chat_template_kwargs"


def test_a_template_without_tools_refuses_them(tokenizers):
    plain, _ = tokenizers
    with pytest.raises(InvalidRequest) as err:
        render_chat(plain, request(tools=TOOLS))
    assert err.value.param == "tools"
    render_chat(plain, request(tools=TOOLS, tool_choice="none"))  # not shown, so nothing to refuse
    assert ModelFormats.of(plain) == ModelFormats(False, None, None)


def test_bad_arguments_and_tool_choices_are_400s(tokenizers):
    _, tok = tokenizers
    with pytest.raises(InvalidRequest) as err:
        render_chat(tok, request(messages=[{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]))
    assert err.value.param == "messages[0].tool_calls[0].function.arguments"
    formats = ModelFormats.of(tok)
    for fields in ({"tool_choice": "required"},
                   {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}):
        with pytest.raises(InvalidRequest) as err:
            ReplyParser.for_request(request(**fields), formats, "")
        assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequest) as err:  # a template with tools but no known call format
        ReplyParser.for_request(request(tools=TOOLS), ModelFormats(True, None, None), "")
    assert err.value.param == "tools"


def test_forced_choices_get_a_grammar_and_auto_none(tokenizers):
    formats = ModelFormats.of(tokenizers[1])
    assert ReplyParser.for_request(request(tools=TOOLS), formats, "").guidance is None
    forced = ReplyParser.for_request(request(tools=TOOLS, tool_choice="required"), formats, "").guidance
    assert forced.kind == "grammar" and "get_weather" in forced.value


@pytest.mark.parametrize("parallel", [None, False])
def test_parallel_tool_calls_false_keeps_the_first_call_whole_and_streamed(parallel):
    """In `auto` nothing forces one call: a second one the model writes is dropped, as vLLM
    drops it; left out, both come back."""
    formats = ModelFormats(True, "hermes", None)
    two = "".join(f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>\n'
                  for c in ("Paris", "Rome"))
    req = request(tools=TOOLS, **({} if parallel is None else {"parallel_tool_calls": parallel}))
    expected = ['{"city": "Paris"}'] if parallel is False else ['{"city": "Paris"}', '{"city": "Rome"}']
    message = ReplyParser.for_request(req, formats, "").message(two)
    assert [c.function.arguments for c in message.tool_calls] == expected and not message.content
    reply = ReplyParser.for_request(req, formats, "")
    deltas = [d for i in range(0, len(two), 7) for d in reply.feed(two[i:i + 7])] + reply.finish()
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    assert sorted({tc.index for tc in pieces}) == list(range(len(expected)))
    assert not "".join(d.content or "" for d in deltas).strip()


def test_parsers_are_configured_per_model_and_carried_to_the_worker():
    spec = parse_model_spec("m", {"source": "builtin:smollm2", "tool_call_parser": "hermes", "reasoning_parser": "qwen3"})
    assert (spec.tool_call_parser, spec.reasoning_parser) == ("hermes", "qwen3")
    with pytest.raises(ConfigError, match=r"models\.m\.tool_call_parser: unknown parser 'hermez'; did you mean 'hermes'"):
        parse_model_spec("m", {"source": "builtin:smollm2", "tool_call_parser": "hermez"})
    with pytest.raises(ConfigError, match=r"models\.m\.reasoning_parser"):
        parse_model_spec("m", {"source": "builtin:smollm2", "reasoning_parser": "o1"})
    launch = LaunchSpec(source="s", model_id="m", port=1, tool_call_parser="mistral", reasoning_parser="deepseek_r1")
    assert LaunchSpec.from_argv(launch.to_argv()) == launch
