"""OpenAI request bodies as pydantic models, with the value ranges OpenAI documents; and the answers' shapes.

Owns: what a request may say, each value's type and allowed range (a value of another type or outside the
range is a 400 naming the parameter: types are strict, as OpenAI's are, so "0.5" or true is no number and
1.0 no integer), and the request's sampling values as the engine's SamplingParams (`sampling()`, OpenAI's
defaults). Leaves to openai.py the defaults that depend on the model (max_tokens from the context left), to
inference/sampling.py what the values mean, and to reply.py the responses (plain dicts in OpenAI's shape).
A new request field is declared here and read where it is used.

Fields that only label a request (`user`, `metadata`, ...) are ignored, as OpenAI-compatible servers do; OpenAI
fields that would change the reply and that lmforge does not implement (`logit_bias`, `best_of`, `suffix`, the
legacy `functions` / `function_call`, `audio`, `modalities` other than text, `prediction`,
`web_search_options`) are a 400 naming the field when given a value that asks for something, never accepted
and ignored. Beyond
OpenAI's fields: vLLM's sampling extras top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, and
vLLM's `structured_outputs` object (json / regex / choice / grammar / json_object; its current form, which
replaced the older guided_json, guided_regex, ... fields) on both generation routes.

The response models at the end are documentation: /openapi.json publishes them (with the request models),
reply.py builds plain dicts of these shapes, and the fuzz tests check every answer against the published
schema, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.inference.sampling import SamplingParams

# strict: JSON types as they are (no "1" for 1, no 1.0 for an int, no true for a number); no NaN or Infinity
_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
INT64 = 2**63 - 1


def _not_implemented(name: str, value: Any, harmless: tuple = (None,), instead: str = "") -> Any:
    """`value` if it asks for nothing lmforge would have to do; else the ValueError of a field we do not honour."""
    if any(value == h and type(value) is type(h) for h in harmless):
        return value
    raise ValueError(f"lmforge does not implement '{name}'{instead}; remove it from the request")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = _STRICT

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=INT64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-INT64 - 1, le=INT64)  # OpenAI's: a 64-bit integer
    user: str | None = None
    # vLLM extras
    top_k: int = Field(default=0, ge=-1, le=2**31 - 1)  # -1 or 0: off; above the vocabulary: off too
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(default=None, max_length=64)
    # OpenAI's, not implemented: refused unless empty
    logit_bias: Any = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Any) -> Any:
        return _not_implemented("logit_bias", v, (None, {}))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(len(s) > 1000 for s in stops):
            raise ValueError("a stop sequence may be at most 1000 characters")
        return [s for s in stops if s]

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, logprobs: bool = False, top_logprobs: int = 0,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters for this request (OpenAI's defaults: temperature 1, top_p 1; top_k -1 = off).
        Not validated here: the fields above hold OpenAI's ranges, and SamplingParams.validate runs once, in
        Engine.submit (stop_token_ids against the vocabulary too), its error a 400 (reply.submit)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of json (a JSON Schema), regex, choice, grammar (Lark, in
    llguidance's dialect), json_object."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a field we do not enforce is refused, not ignored
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def given(self) -> list[str]:
        return [k for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                               ("grammar", self.grammar), ("json_object", self.json_object or None))
                if v is not None]


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # name, tool_calls, ... reach
    # the template untouched
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The text content; a list of parts keeps its text parts (images are not supported)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {p.get('type')!r}")
            parts.append(p["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI's, not implemented: refused (the legacy function calling is `tools` now)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("functions", "function_call", "audio", "modalities", "prediction", "web_search_options")
    @classmethod
    def _not_implemented_fields(cls, v: Any, info) -> Any:
        instead = " (send them as `tools` / `tool_choice`)" if info.field_name.startswith("function") else ""
        harmless = (None, ["text"]) if info.field_name == "modalities" else (None,)
        return _not_implemented(info.field_name, v, harmless, instead)


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class CompletionRequest(_Sampling):
    """Legacy completions. With `echo` and `logprobs`, the prompt's tokens are scored too (OpenAI's layout:
    one entry per prompt token, the first one's logprob null, then the completion's); `max_tokens: 0` with
    `echo` scores the prompt and generates nothing."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=None, ge=0, le=INT64)  # 0: with echo only
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    structured_outputs: StructuredOutputs | None = None
    # OpenAI's, not implemented: refused unless they ask for nothing (best_of 1, an empty suffix)
    best_of: Any = None
    suffix: Any = None

    @field_validator("best_of", "suffix")
    @classmethod
    def _not_implemented_fields(cls, v: Any, info) -> Any:
        return _not_implemented(info.field_name, v, (None, 1) if info.field_name == "best_of" else (None, ""))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


# ---- the answers, as /openapi.json documents them ------------------------------------------------------
class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")  # new fields (tool calls, sources, ...) keep an answer valid


class ErrorBody(_Doc):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Doc):
    """Every 4xx and 5xx: OpenAI's error shape."""

    error: ErrorBody


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Doc):
    """Parallel lists, one entry per token (with echo: the prompt's tokens first, the first one's logprob
    and top_logprobs null). A logprob is finite or null, never NaN."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
    text_offset: list[int]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(_Doc):
    """POST /v1/completions without `stream` (a streamed chunk has the same shape; `usage` null or absent)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Doc):
    token: str
    logprob: float | None
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(_Doc):
    content: list[ChatTokenLogprob] | None = None


class ChatCompletionMessage(_Doc):
    role: Literal["assistant"]
    content: str | None = None


class ChatChoice(_Doc):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Doc):
    """POST /v1/chat/completions without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    parent: str | None = None


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]
