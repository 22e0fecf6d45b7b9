"""Pydantic models mirroring the OpenAI schema, plus NeuronGuard's guard extensions.

Request types are strict where OpenAI's are (`"max_tokens": "4"` or `"stream": "yes"` is a
400). Every OpenAI request field is either implemented or declared here as unsupported, so
a value that would change the answer (tools, JSON mode, audio, ...) is a 400 naming the
field with code `unsupported_parameter`, never ignored. Fields OpenAI does not define are
accepted and logged by name (`services.common.log_unknown_fields`), as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from neuronguard.server.guard import Decision, GuardMode, Stage

FinishReason = Literal["stop", "length", "content_filter"]
MAX_CHOICES = 16  # choices per request (n, times prompts for completions): each is a job of its own
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs`
MAX_COMPLETION_LOGPROBS = 5  # completions `logprobs`
UNSUPPORTED = "unsupported_parameter"  # error type and code of a declared, unimplemented field


def _encodable(text: str) -> str:
    """JSON may escape lone surrogates (`"\\ud800"`); the tokenizer cannot encode them (was a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


# Per unsupported field: the values that ask for nothing (null always does), and why the rest are refused.
_HARMLESS: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": (([],), "tool calling is not implemented"),
    "tool_choice": (("none",), "tool calling is not implemented; only \"none\" is accepted"),
    "functions": (([],), "function calling is not implemented"),
    "function_call": (("none",), "function calling is not implemented; only \"none\" is accepted"),
    "parallel_tool_calls": ((False,), "tool calling is not implemented"),
    "response_format": (({"type": "text"},), "JSON mode and structured outputs are not implemented; "
                                             "only {\"type\": \"text\"} is accepted"),
    "audio": ((), "audio output is not implemented"),
    "modalities": ((["text"],), "only [\"text\"] is accepted"),
    "prediction": ((), "predicted outputs are not implemented"),
    "web_search_options": ((), "web search is not implemented"),
    "reasoning_effort": ((), "the served model has no reasoning setting"),
    "verbosity": ((), "the served model has no verbosity setting"),
    "store": ((False,), "completions are not stored; only false is accepted"),
    "echo": ((False,), "echoing the prompt is not implemented; only false is accepted"),
    "suffix": ((), "insertion (suffix) is not implemented"),
    "best_of": ((1,), "best_of is not implemented; use n"),
    "name": ((), "message names are not passed to the chat template"),
    "tool_calls": (([],), "tool calling is not implemented"),
    "tool_call_id": ((), "tool calling is not implemented"),
    "refusal": ((), "assistant refusals are not passed to the chat template"),
}


def _reject_unsupported(value: Any, info: ValidationInfo) -> Any:
    harmless, why = _HARMLESS[info.field_name or ""]
    if value is None or value in harmless:
        return value
    raise PydanticCustomError(UNSUPPORTED, "not supported by this server: {why}", {"why": why})


# A declared OpenAI field this server does not implement (a 400 unless harmless); not in the OpenAPI schema.
Unsupported = SkipJsonSchema[Annotated[Any, BeforeValidator(_reject_unsupported)]]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: `{"error": {message, type, param, code}}`."""

    error: ErrorBody


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: str
    content: Text | list[TextPart] | None = None
    name: Unsupported = None
    tool_calls: Unsupported = None
    tool_call_id: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    refusal: Unsupported = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class GuardOptions(_Request):
    """Per-request guard: may only be stricter than the server policy unless overrides are on."""

    mode: GuardMode | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)


class StreamOptions(_Request):
    include_usage: bool = False


class GenerationRequest(_Request):
    """What chat and legacy completions share: sampling, stopping, streaming, choices, the guard."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="choice i samples with seed + i")
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices, each generated and guarded on its own")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    guard: GuardOptions | None = None
    # accepted, no effect on the answer: request metadata OpenAI uses for billing, caching and abuse tracking
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    store: Unsupported = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None and not all(key.isascii() and key.isdecimal() for key in bias):
            raise ValueError("logit_bias keys must be token ids written as decimal strings, e.g. {\"50256\": -100}")
        return bias

    def bias(self) -> dict[int, float] | None:
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    parallel_tool_calls: Unsupported = None
    response_format: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs \"logprobs\": true")
        return top

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_n(self) -> int | None:
        """Alternatives per token for the decoder (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: Text | list[Text] = Field(description="a string, or a list of strings (each gets n choices)")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Unsupported = None
    suffix: Unsupported = None
    best_of: Unsupported = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GuardReport(BaseModel):
    """What the guard saw and did for one choice (attached to chat and completion responses)."""

    mode: GuardMode
    stage: Stage
    decision: Decision
    score: float
    threshold: float
    flagged: bool
    patched: bool = False


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat: the released tokens' log-probabilities (a blocked token is never listed)."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions: parallel lists per released token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None
    guard: GuardReport | None = None


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    guard: GuardReport | None = Field(None, description="the guard report when n is 1 (each choice has its own)")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    guard: GuardReport | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    guard: GuardReport | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    guard: GuardReport | None = None


class Completion(BaseModel):
    """A legacy completion, or one chunk of its stream (same object, as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    guard: GuardReport | None = None


class ModerationRequest(_Request):
    input: Text | list[Text]
    model: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ModerationResult(BaseModel):
    # The probe scores one category, `harmful`; OpenAI's own keys are present (false, 0.0) for typed clients.
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class GuardCheckRequest(_Request):
    messages: list[ChatMessage] | None = None
    prompt: Text | None = None
    guard: GuardOptions | None = None


class Contribution(BaseModel):
    layer: int
    index: int
    contribution: float


class GuardCheckResponse(BaseModel):
    flagged: bool
    score: float
    threshold: float
    decision: Decision
    neurons_used: int
    latency_ms: float
    top_contributions: list[Contribution]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "neuronguard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
