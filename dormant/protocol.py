"""OpenAI protocol models, shared by the gateway and the workers.

Fields mirror ../shared/openai/openapi.yaml in the spec's order. The rule (issue 11): every
field of a request takes effect or is refused with a 400 naming it. A field a request class
does not declare is refused by `parse_request`, unless the class lists it in `SPEC_IGNORED`
(what the spec lets a server ignore: `user`, `metadata`, ...; logged at debug). dormant's and
vLLM's extensions are grouped at the end of each request.
Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, ClassVar, Literal, NamedTuple, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from dormant.engines.base import Guidance
from dormant.errors import InvalidRequest


log = logging.getLogger("dormant.protocol")

# what the spec lets a server leave aside: tracking and billing hints, OpenAI's own storage
_TRACKING = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                       "prompt_cache_retention", "prompt_cache_options"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    SPEC_IGNORED: ClassVar[frozenset[str]] = frozenset()

    def ignored_fields(self) -> list[str]:
        """Fields sent that the spec lets us ignore (the caller logs them)."""
        return sorted(k for k in (self.model_extra or {}) if k in self.SPEC_IGNORED)

    def unhandled_fields(self) -> list[str]:
        """Fields sent that nothing here acts on: each is a 400."""
        return sorted(k for k in (self.model_extra or {}) if k not in self.SPEC_IGNORED)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    # the spec's padding of stream events against length side channels: dormant pads nothing,
    # so only "off" is taken
    include_obfuscation: Literal[False] | None = None


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it (the spec's type)


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextContentPart], None] = None
    name: str | None = None  # a participant's name, handed to the chat template
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant, vLLM's: earlier thinking, for templates that show it

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Stop = Union[str, list[str], None]
# An int64, as seeds are: anything larger is no token count (1e30, 2^64). Whether a value
# fits the context is the worker's to say (it knows max_model_len): a 400 naming max_tokens.
MAX_TOKENS_LIMIT = 2**63 - 1


def _check_stop(value: Stop) -> Stop:
    if isinstance(value, list) and any(not s for s in value):
        raise ValueError("stop sequences must be non-empty strings")
    return value


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # forced calls are always held to `parameters`; with tool_choice auto, a strict tool holds
    # every call the model writes to its tool's schema (worker/tool_parsers/grammar.py)
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # absent: any JSON object
    strict: bool | None = None  # the schema is followed either way (constrained decoding)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one of these constrains the output."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # llguidance's Lark, or GBNF / EBNF
    json_object: bool | None = None


class OutputConstraint(NamedTuple):
    param: str  # the request field it came from, which a 400 about it names
    guidance: Guidance


class _SamplingFields(_Request):
    """Fields shared by chat and text completions, in the spec's order."""

    SPEC_IGNORED = _TRACKING

    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    n: int | None = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # an int64, as vLLM and torch take it
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    response_format: ResponseFormat | None = None
    # vLLM's extensions: structured output (and its older top-level names)
    structured_outputs: StructuredOutputs | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's sampling extensions
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1: every token
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool | None = None  # generate max_tokens even past EOS (benchmarks)
    # dormant's
    keep_alive: Union[str, int, float, None] = None  # Ollama-style: "5m", 0, -1

    _check_stop = field_validator("stop")(classmethod(lambda cls, v: _check_stop(v)))

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM refuse it
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        return self

    def output_constraint(self) -> OutputConstraint | None:
        """What the output must follow (response_format, structured_outputs, guided_*), with the
        param it came from; a 400 for two at once."""
        found: list[OutputConstraint] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(OutputConstraint("response_format", Guidance("json_object")))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequest("'response_format.json_schema' is required when its type is json_schema.",
                                     param="response_format.json_schema")
            schema = fmt.json_schema.schema_
            found.append(OutputConstraint("response_format.json_schema.schema", Guidance(
                "json_schema", schema) if schema is not None else Guidance("json_object")))
        fields = (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar"))
        outputs = self.structured_outputs
        if outputs is not None:
            values = {"json": outputs.json_, "regex": outputs.regex, "choice": outputs.choice, "grammar": outputs.grammar}
            found += [OutputConstraint(f"structured_outputs.{name}", Guidance(kind, values[name]))
                      for name, kind in fields if values[name] is not None]
            if outputs.json_object:
                found.append(OutputConstraint("structured_outputs.json_object", Guidance("json_object")))
        found += [OutputConstraint(f"guided_{name}", Guidance(kind, getattr(self, f"guided_{name}")))
                  for name, kind in fields if getattr(self, f"guided_{name}") is not None]
        if len(found) > 1:
            raise InvalidRequest(f"'{found[0].param}' and '{found[1].param}' both constrain the output; "
                                 "send one of them.", param=found[1].param)
        return found[0] if found else None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # default true; false: at most one call
    # vLLM's extension: extra variables for the chat template, e.g. {"enable_thinking": false}
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("'logprobs' must be true when 'top_logprobs' is set.", param="top_logprobs")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1, le=20)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, p):
        if not p:
            raise ValueError("must not be empty")
        for i, one in enumerate(p if isinstance(p, list) and not isinstance(p[0], int) else [p]):
            if not one:  # nothing to continue from: the worker has no first token
                raise ValueError("must not be empty" if not isinstance(p, list) or isinstance(p[0], int)
                                 else f"prompt {i} must not be empty")
        return p

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:  # fill-in-the-middle needs the model's own FIM tokens; none of ours declares them
            raise InvalidRequest("'suffix' is not supported: this server does not do fill-in-the-middle.",
                                 param="suffix")
        return value

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise InvalidRequest("'best_of' must be greater than or equal to 'n'.", param="best_of")
        if self.best_of is not None and self.best_of > (self.n or 1) and self.stream:
            raise InvalidRequest("'best_of' greater than 'n' cannot be streamed.", param="best_of")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the batch: a text or a list of token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_tokens or 16  # the spec's default for completions


def parse_request(model_cls: type[_Request], body: Any) -> Any:
    """Validate a JSON body into `model_cls`, or raise InvalidRequest naming the param."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if not (str(p) == "str" or str(p).startswith(("function-", "list[", "str[", "dict[")))]
        param = _param_path(loc) or None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        where = f"'{param}': " if param else ""
        raise InvalidRequest(f"Invalid value for {where}{msg}", param=param) from None
    _apply_the_rule(req)
    return req


def _apply_the_rule(req: _Request) -> None:
    """A 400 for the first field nothing acts on; the spec's ignorable fields logged at debug."""
    parts: list[tuple[str, _Request]] = [("", req)]
    parts += [(f"messages[{i}].", m) for i, m in enumerate(getattr(req, "messages", None) or [])]
    for prefix, part in parts:
        unhandled = part.unhandled_fields()
        if unhandled:
            name = prefix + unhandled[0]
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
        if part.ignored_fields():
            log.debug("ignoring %s (the spec lets a server leave them aside)",
                      ", ".join(prefix + f for f in part.ignored_fields()))


def _param_path(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


# ---- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None  # vLLM's: the thinking a reasoning parser moved out of content

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # the spec's tool_calls is not nullable: absent when there are none
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in ("content", "refusal")}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    """ChatCompletionTokenLogprob: a token of the answer with the most likely ones at its place."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None
    refusal: list[TokenLogprobEntry] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token (with `echo`, the
    prompt's first token has no logprob: null, as vLLM and OpenAI's echo give it)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    stop_reason: str | None = None  # vLLM's: the stop string that ended the choice (None: EOS, length)


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkToolCall(BaseModel):
    """A piece of a streamed tool call: its first carries id, type and the name; later ones
    pieces of `arguments`, to be appended (the spec's ChatCompletionMessageToolCallChunk)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # The spec's delta has no nullable role: leave absent fields out rather than null.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: str | None = None  # vLLM's, on the last chunk of a choice that a stop string ended


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: str | None = None  # vLLM's: the stop string that ended the choice (None: EOS, length)


class CompletionResponse(BaseModel):
    """Also the shape of each streamed completion chunk (the spec uses one schema)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dormant"
    max_model_len: int | None = None  # vLLM's extension: the context, prompt and completion together


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One SSE `data:` event. `usage: null` stays in chunks, as the spec's streams show it."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        import json

        text = json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
# worker -> gateway, on a non-streamed answer: seconds from the worker taking the request to its
# first token, for the gateway's time-to-first-token histogram
FIRST_TOKEN_HEADER = "X-Dormant-First-Token-Seconds"
SSE_KEEPALIVE = b": loading\n\n"
