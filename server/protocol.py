"""OpenAI protocol models (pydantic v2), apart from any serving logic.

Shapes follow OpenAI's chat completions API; the δ-mem additions are `session_id` and
`memory_window_tokens` in the request and a `session` object in responses.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import APIError

# Fields OpenAI defines that this server does not implement: refused with a 400 naming the
# field, never silently ignored.
UNSUPPORTED_FIELDS = {
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
    "audio", "modalities", "prediction", "web_search_options", "top_logprobs",
    "reasoning_effort",
}
# Fields that change nothing here and that clients send routinely.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}


def check_text(value: Any, where: str = "body") -> None:
    """Refuse strings that are not valid Unicode text (a lone surrogate such as "\\ud800"
    decodes from JSON but cannot be encoded, tokenized or stored)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where} holds a lone surrogate at character {e.start}: not "
                             "valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


class TextOnly(BaseModel):
    """A request model whose strings must all be valid Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_text(data, cls.__name__)
        return data


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def normalized(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text"]


class ChatCompletionRequest(TextOnly):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension (-1 or 0: off)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1)
    # vLLM's extensions: a reply of at least `min_tokens`, or one that ignores end-of-sequence.
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    response_format: ResponseFormat | None = None
    # δ-mem extensions
    session_id: str | None = None
    memory_window_tokens: int | None = Field(
        default=None, ge=-1,
        description="tokens of recent transcript kept in the prompt (0: state only, -1: all)")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if v is not None and not all(v):
            raise ValueError("a stop sequence cannot be empty")
        return v

    def unsupported(self) -> list[str]:
        extra = set(self.model_extra or {})
        bad = sorted(extra & UNSUPPORTED_FIELDS)
        bad += sorted(extra - UNSUPPORTED_FIELDS - IGNORED_FIELDS)
        if self.logprobs:
            bad.append("logprobs")
        return bad

    def check_supported(self, max_messages: int) -> None:
        """Refuse, with a 400 naming the field, what this server does not implement."""
        bad = self.unsupported()
        if bad:
            raise APIError(400, f"unsupported field(s): {', '.join(bad)}", param=bad[0],
                           code="unsupported_parameter")
        if len(self.messages) > max_messages:
            raise APIError(400, f"{len(self.messages)} messages exceed the limit of "
                           f"{max_messages}", param="messages")
        if self.n != 1:
            raise APIError(400, "only n = 1 is supported", param="n")

    def to_sampling_params(self, default_max_tokens: int, max_tokens_limit: int):
        """vLLM's SamplingParams for this request (OpenAI's defaults where unset)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError

        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit "
                           f"{max_tokens_limit}", param="max_tokens")
        kw = dict(max_tokens=max_tokens, stop=self.stop, seed=self.seed,
                  temperature=1.0 if self.temperature is None else self.temperature)
        for f in ("top_p", "top_k", "presence_penalty", "frequency_penalty", "min_tokens",
                  "ignore_eos"):
            if getattr(self, f) is not None:
                kw[f] = getattr(self, f)
        try:
            return SamplingParams(**kw)
        except (ValueError, VLLMValidationError) as e:  # what vLLM itself refuses
            raise APIError(400, str(e), param=getattr(e, "parameter", None),
                           code="invalid_value") from None


class SessionInfo(BaseModel):
    id: str
    version: int
    turns: int
    tokens_absorbed: int
    transcript_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    session: SessionInfo | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    session: SessionInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltamem"
    max_model_len: int | None = None
    memory: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionView(BaseModel):
    id: str
    version: int
    turns: int
    tokens_absorbed: int
    transcript_tokens: int
    created_at: float
    updated_at: float
    messages: list[dict[str, Any]] | None = None
    transcript: list[int] | None = None
    turn_log: list[dict[str, Any]] | None = None
    versions: list[int] | None = None
    state_bytes: int | None = None


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionView]
    next_cursor: str | None = None


class ForkRequest(TextOnly):
    model_config = ConfigDict(extra="forbid")
    new_session_id: str | None = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
