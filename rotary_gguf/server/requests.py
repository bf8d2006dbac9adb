"""The request bodies of /v1/chat/completions and /v1/completions, field for field as the OpenAI API reference
has them, validated strictly (unknown or ill-typed fields are a 400, as OpenAI answers), and turned into one
GenerationRequest for the worker. Fields that would change the result and that rotary does not implement are
refused by name, never ignored."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rotary_gguf.runtime.generation import GrammarError, json_grammar
from rotary_gguf.server.errors import APIError, invalid, unsupported

# llama.cpp's defaults for its extensions (top_k, min_p); OpenAI's for the rest.
DEFAULT_TOP_K, DEFAULT_MIN_P = 40, 0.05


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class JSONSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampled(_Body):
    """What both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # llama.cpp's extension, as llama-server takes it
    min_p: float | None = Field(default=None, ge=0, le=1)  # likewise
    ignore_eos: bool | None = None  # likewise: decode max_tokens whatever the model says (benchmarks)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and not used: none of these change the result
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # a latency hint: the output is the model's either way
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What the worker needs to run one request: a chat (messages through the GGUF's template) or a prompt."""

    endpoint: str  # "chat" or "completion"
    model: str
    messages: tuple[dict[str, str], ...] | None
    prompt: str | tuple[int, ...] | None
    max_tokens: int | None  # None: up to the context
    temp: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    stop: tuple[str, ...]
    grammar: str | None  # GBNF: response_format json_object / json_schema, enforced by llama.cpp's sampler
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _param(loc: tuple[Any, ...]) -> str:
    """messages[0].role from pydantic's ('messages', 0, 'role'), union member tags ('list[str]') left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.split("[")[0].lower() in _TYPE_TAGS or part[:1].isupper() or "-" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out


def _validation_error(exc: ValidationError) -> APIError:
    error = exc.errors()[0]
    param = _param(error["loc"])
    if error["type"] == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if error["type"] == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param)
    return invalid(f"Invalid value for '{param}': {error['msg']}", param)


def parse_body(raw: bytes, model: type[_Sampled]) -> _Sampled:
    """The JSON body validated against an endpoint's model, or one APIError (400) that names the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _common_refusals(body: _Sampled) -> None:
    if body.n not in (None, 1):
        raise unsupported("n", "one choice per request")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise unsupported(name)
    if body.logit_bias:
        raise unsupported("logit_bias")
    if body.stream_options is not None and not body.stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise invalid(f"'stop' holds at most 4 sequences (got {len(stops)})", "stop")
    if any(s == "" for s in stops):
        raise invalid("'stop' sequences must not be empty", "stop")
    return tuple(stops)


def _message_text(message: ChatMessage, i: int) -> str:
    """A message's content as one string: text parts joined; any other part is refused by name."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                raise invalid(f"'{where}.text' must be a string", f"{where}.text")
            raise unsupported(f"{where}.type", f"content parts of type {kind!r} (only 'text')")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: ChatRequest) -> tuple[dict[str, str], ...]:
    out = []
    for i, m in enumerate(body.messages):
        if m.role in ("tool", "function") or m.tool_calls or m.function_call or m.tool_call_id:
            raise unsupported(f"messages[{i}].role" if m.role in ("tool", "function") else f"messages[{i}]",
                              "tool calls are not implemented")
        if m.audio:
            raise unsupported(f"messages[{i}].audio")
        message = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
        if m.name:
            message["name"] = m.name
        out.append(message)
    return tuple(out)


def _chat_refusals(body: ChatRequest) -> None:
    if body.logprobs or body.top_logprobs is not None:
        raise unsupported("logprobs" if body.logprobs else "top_logprobs")
    if body.tools or body.functions:
        raise unsupported("tools" if body.tools else "functions", "tool calls are not implemented")
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise unsupported(name, "tool calls are not implemented")
    for name in ("reasoning_effort", "verbosity", "audio", "web_search_options"):
        if getattr(body, name) is not None:
            raise unsupported(name)
    if body.modalities not in (None, ["text"]):
        raise unsupported("modalities", "text only")


def _grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar that enforces a response_format: any JSON object, or JSON valid against the schema."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_grammar()
    if fmt.json_schema is None:
        raise invalid("Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema")
    try:
        return json_grammar(fmt.json_schema.schema_ or {"type": "object"})
    except GrammarError as exc:
        raise invalid(str(exc), "response_format.json_schema.schema") from None


def _sampling(body: _Sampled) -> dict[str, Any]:
    return {"temp": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": DEFAULT_TOP_K if body.top_k is None else body.top_k,
            "min_p": DEFAULT_MIN_P if body.min_p is None else body.min_p,
            "seed": secrets.randbelow(2**31) if body.seed is None else body.seed & 0xFFFFFFFF}


def chat_request(raw: bytes) -> GenerationRequest:
    body = parse_body(raw, ChatRequest)
    assert isinstance(body, ChatRequest)
    _common_refusals(body)
    _chat_refusals(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    return GenerationRequest("chat", body.model, _messages(body), None, max_tokens, **_sampling(body),
                             stop=_stops(body.stop), grammar=_grammar(body.response_format),
                             stream=bool(body.stream),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage),
                             ignore_eos=bool(body.ignore_eos))


def completion_request(raw: bytes) -> GenerationRequest:
    body = parse_body(raw, CompletionRequest)
    assert isinstance(body, CompletionRequest)
    _common_refusals(body)
    if body.best_of not in (None, 1):
        raise unsupported("best_of", "one choice per request")
    if body.echo:
        raise unsupported("echo")
    if body.logprobs is not None:
        raise unsupported("logprobs")
    if body.suffix:
        raise unsupported("suffix", "no fill-in-the-middle")
    prompt: str | tuple[int, ...]
    if isinstance(body.prompt, str):
        prompt = body.prompt
    elif body.prompt and all(isinstance(p, int) for p in body.prompt):
        prompt = tuple(body.prompt)  # type: ignore[arg-type]
    elif len(body.prompt) == 1:
        only = body.prompt[0]
        prompt = only if isinstance(only, str) else tuple(only)  # type: ignore[arg-type]
    else:
        raise unsupported("prompt", f"one prompt per request (got {len(body.prompt)})")
    if not prompt:
        raise invalid("'prompt' must not be empty", "prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
    return GenerationRequest("completion", body.model, None, prompt, max_tokens, **_sampling(body),
                             stop=_stops(body.stop), grammar=None, stream=bool(body.stream),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage),
                             ignore_eos=bool(body.ignore_eos))
