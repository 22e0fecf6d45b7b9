"""Pydantic models mirroring the OpenAI schema, plus NeuronGuard's guard extensions.

Unknown request fields are ignored (as OpenAI-compatible servers usually do); fields that
would change the answer but are not supported (`n > 1`, non-text content) are rejected.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from neuronguard.server.guard import Decision, GuardMode, Stage

FinishReason = Literal["stop", "length", "content_filter"]


def _encodable(text: str) -> str:
    """JSON may escape lone surrogates (`"\\ud800"`); the tokenizer cannot encode them (was a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: `{"error": {message, type, param, code}}`."""

    error: ErrorBody


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: str
    content: Text | list[TextPart] | None = None

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


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    guard: GuardOptions | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GuardReport(BaseModel):
    """What the guard saw and did for one request (attached to chat responses)."""

    mode: GuardMode
    stage: Stage
    decision: Decision
    score: float
    threshold: float
    flagged: bool
    patched: bool = False


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    guard: GuardReport | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
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
    # One category: the probe measures p(the model's answer would be harmful), nothing finer.
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


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


def jsonable(payload: BaseModel) -> dict[str, Any]:
    return payload.model_dump(mode="json", exclude_none=False)
