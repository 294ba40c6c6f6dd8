"""One chat reply through the model's reasoning and tool-call parsers, whole or streamed.

    reply = ReplyParser.for_request(req, formats, prompt_tail)  # 400s for a tool_choice it cannot honour
    params.guidance = reply.guidance                    # forced calls or strict tools: the grammar, else None
    deltas = reply.feed(text)                           # streamed: ChunkDeltas (reasoning, content, tool_calls)
    deltas = reply.finish()
    message = reply.message(whole_text)                 # or at once: the ResponseMessage
    reason = reply.finish_reason(engine_reason)         # "tool_calls" when it made any

Text goes through the reasoning parser first (a call written while thinking is no call), then
the tool parser. Without tools and a reasoning parser it passes text through as content.
"""

from __future__ import annotations

from dormant.engines.base import Guidance
from dormant.errors import InvalidRequest
from dormant.protocol import ChatCompletionRequest, ChunkDelta, ChunkFunction, ChunkToolCall, ResponseMessage, ToolCall
from dormant.worker.chat_template import ModelFormats, uses_tools
from dormant.worker.reasoning import ReasoningParser, reasoning_parser
from dormant.worker.tool_parsers import ToolParser, tool_parser
from dormant.worker.tool_parsers.grammar import auto_tool_call_grammar, tool_call_grammar


class ReplyParser:
    def __init__(self, tools: ToolParser | None, reasoning: ReasoningParser | None,
                 guidance: Guidance | None = None, one_call: bool = False) -> None:
        """`one_call` (parallel_tool_calls false): calls after the first are dropped, as vLLM
        drops them; where the call is forced, the grammar already allows only one."""
        self.tools = tools
        self.reasoning = reasoning
        self.guidance = guidance
        self.one_call = one_call
        self.calls: list[ToolCall] = []

    @classmethod
    def for_request(cls, req: ChatCompletionRequest, formats: ModelFormats, prompt_tail: str) -> ReplyParser:
        choice = req.tool_choice
        if choice not in (None, "none", "auto") and not req.tools:
            raise InvalidRequest("'tool_choice' needs 'tools': there is no tool to call.", param="tool_choice")
        named = None if isinstance(choice, str) or choice is None else choice.function.name
        if named is not None and named not in {t.function.name for t in req.tools}:
            raise InvalidRequest(f"'tool_choice' names the function {named!r}, which is not in 'tools'.",
                                 param="tool_choice")
        tools = guidance = None
        if uses_tools(req):
            name = formats.tool_call_parser
            if name is None:
                raise InvalidRequest("This model's tool-call format is unknown; set tool_call_parser for it in "
                                     "dormant.yaml.", param="tools")
            tools = tool_parser(name, req.tools)
            if choice == "required" or named is not None:
                one_call = named is not None or req.parallel_tool_calls is False
                guidance = tool_call_grammar(name, req.tools, one_call, named)
            elif any(t.function.strict for t in req.tools):  # auto: the calls it makes are held to their schemas
                guidance = auto_tool_call_grammar(name, req.tools, req.parallel_tool_calls is False)
        reasoning = reasoning_parser(formats.reasoning_parser, prompt_tail) if formats.reasoning_parser else None
        return cls(tools, reasoning, guidance, one_call=req.parallel_tool_calls is False)

    def feed(self, text: str) -> list[ChunkDelta]:
        return self._deltas(*self.reasoning.feed(text)) if self.reasoning else self._deltas("", text)

    def finish(self) -> list[ChunkDelta]:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        return self._deltas(reasoning, content, final=True)

    def message(self, text: str) -> ResponseMessage:
        deltas = self.feed(text) + self.finish()
        reasoning = "".join(d.reasoning_content or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        return ResponseMessage(content=(content or None) if self.calls else content,
                               tool_calls=self.calls or None, reasoning_content=reasoning or None)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _deltas(self, reasoning: str, content: str, final: bool = False) -> list[ChunkDelta]:
        out = [ChunkDelta(reasoning_content=reasoning)] if reasoning else []
        if self.tools is None:
            return out + ([ChunkDelta(content=content)] if content else [])
        step = self.tools.feed(content)
        if final:
            last = self.tools.finish()
            step.content += last.content
            step.tool_calls += last.tool_calls
        if step.content:
            out.append(ChunkDelta(content=step.content))
        for call in step.tool_calls:
            if self.one_call and self.calls:
                continue
            index = len(self.calls)
            self.calls.append(call)
            # the spec's pieces: id, type and name first, then the arguments to append
            out.append(ChunkDelta(tool_calls=[ChunkToolCall(
                index=index, id=call.id, type="function", function=ChunkFunction(name=call.function.name, arguments=""))]))
            out.append(ChunkDelta(tool_calls=[ChunkToolCall(
                index=index, function=ChunkFunction(arguments=call.function.arguments))]))
        return out
