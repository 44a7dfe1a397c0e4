"""OpenAI's Responses and Conversations API shapes (pydantic v2), apart from any serving logic.

The shapes are those the official `openai` SDK parses (`openai.types.responses.Response`,
`openai.types.conversations.*`). Requests are checked here: fields this server does not
implement are refused with a 400 naming the field, never silently ignored; input items are
parsed into plain text messages (`InputMessage`). The δ-mem addition to a response is a
`session` object (the session and version it names), as in chat completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .protocol import SessionInfo, TextOnly

# Fields of POST /v1/responses this server does not implement: refused (400 naming the field)
# whenever they are present with a value other than null (and, for the lists, non-empty).
UNSUPPORTED_RESPONSE_FIELDS = {
    "prompt", "max_tool_calls", "context_management", "moderation", "image",
    "background_options", "prompt_cache_options", "access_programs", "conversation_options",
    "top_logprobs",
}
# Fields that change nothing here and that clients send routinely.
IGNORED_RESPONSE_FIELDS = {
    "user", "safety_identifier", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "stream_options", "parallel_tool_calls", "truncation",
}
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
FILE_PARTS = ("input_image", "input_file", "input_audio", "computer_screenshot")
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


def _bad(message: str, param: str, code: str = "unsupported_parameter") -> APIError:
    return APIError(400, message, code=code, param=param)


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string pairs, keys ≤ 64 and values ≤ 512 chars."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{param} must be an object of string pairs", param, "invalid_value")
    if len(value) > METADATA_PAIRS:
        raise _bad(f"{param} has {len(value)} pairs; at most {METADATA_PAIRS}", param,
                   "invalid_value")
    for k, v in value.items():
        if not isinstance(v, str) or len(k) > METADATA_KEY or len(v) > METADATA_VALUE:
            raise _bad(f"{param}[{k!r}]: keys are strings of at most {METADATA_KEY} "
                       f"characters, values strings of at most {METADATA_VALUE}",
                       f"{param}.{k}", "invalid_value")
    return dict(value)


@dataclass
class InputMessage:
    """One message item of an input or a conversation, as text. `param` names where it came
    from (for errors); `id` is its item id once it has one."""

    role: str  # user, assistant, system, developer
    text: str
    param: str
    id: str | None = None

    @property
    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


def parse_items(value: Any, param: str) -> list[InputMessage]:
    """An `input` (a string, or a list of items) or a conversation's `items` as messages.
    Only message items with text content are served; anything else is a 400 naming it."""
    if value is None:
        return []
    if isinstance(value, str):
        return [InputMessage("user", value, param)]
    if not isinstance(value, list):
        raise _bad(f"{param} must be a string or a list of items", param, "invalid_value")
    out = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an item object", where, "invalid_value")
        kind = item.get("type", "message")
        if kind != "message":
            raise _bad(f"{where}: items of type {kind!r} are not supported; this server takes "
                       "message items with text content only", f"{where}.type")
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}",
                       f"{where}.role", "invalid_value")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype in FILE_PARTS:
                    raise _bad(f"{pw}: {ptype} content is not supported; this server takes "
                               "text only (input_text, output_text)", pw)
                if ptype not in TEXT_PARTS or not isinstance(part.get("text"), str):
                    raise _bad(f"{pw}: content parts must be input_text or output_text with "
                               "a text", pw, "invalid_value")
                texts.append(part["text"])
            text = "".join(texts)
        else:
            raise _bad(f"{where}.content must be a string or a list of text parts",
                       f"{where}.content", "invalid_value")
        out.append(InputMessage(role, text, where))
    return out


class ResponseCreateRequest(TextOnly):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    store: bool | None = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    metadata: dict[str, Any] | None = None
    # Refused unless empty or harmless (see check_supported).
    tools: list[Any] | None = None
    tool_choice: Any = None
    background: bool | None = None
    reasoning: Any = None
    include: list[Any] | None = None
    text: dict[str, Any] | None = None
    # δ-mem extension, as in chat completions
    memory_window_tokens: int | None = Field(default=None, ge=-1)

    def conversation_id(self) -> str | None:
        c = self.conversation
        if isinstance(c, dict):
            cid = c.get("id")
            if not isinstance(cid, str) or not cid:
                raise _bad("conversation must be an id or an object with an id",
                           "conversation", "invalid_value")
            return cid
        return c or None

    def check_supported(self) -> None:
        """Refuse, with a 400 naming the field, what this server does not implement."""
        extra = {k for k, v in (self.model_extra or {}).items() if v is not None}
        bad = sorted(extra - IGNORED_RESPONSE_FIELDS)
        if bad:
            known = [b for b in bad if b in UNSUPPORTED_RESPONSE_FIELDS]
            name = (known or bad)[0]
            raise _bad(f"unsupported field(s): {', '.join(bad)}", name)
        if self.tools:
            raise _bad("tools are not supported (no function calling, no built-in tools)",
                       "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice is not supported (this server has no tools)",
                       "tool_choice")
        if self.background:
            raise _bad("background responses are not supported", "background")
        if self.reasoning is not None and (not isinstance(self.reasoning, dict) or any(
                v is not None for v in self.reasoning.values())):
            raise _bad("reasoning is not supported (the model does not reason)", "reasoning")
        if self.include:
            raise _bad(f"include of {', '.join(map(str, self.include))} is not supported",
                       "include")
        if self.text is not None:
            fmt = self.text.get("format")
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
                raise _bad("only text output is supported (text.format type 'text')",
                           "text.format")
            others = sorted(k for k, v in self.text.items() if k != "format" and v is not None)
            if others:
                raise _bad(f"text.{others[0]} is not supported", f"text.{others[0]}")
        if self.previous_response_id and self.conversation is not None:
            raise _bad("previous_response_id and conversation cannot be used together: a "
                       "response continues either a previous response or a conversation",
                       "previous_response_id", "invalid_value")
        check_metadata(self.metadata)


# --- output shapes ---------------------------------------------------------------------------

class InputTextPart(BaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class MessageItem(BaseModel):
    """A message item: a response's output, a response's input item, a conversation item."""

    id: str
    type: Literal["message"] = "message"
    role: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[InputTextPart | OutputTextPart]
    # δ-mem extension (conversation items): written into the session's state yet, or
    # pending (sent by the conversation's next response).
    absorbed: bool | None = None


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ConversationRef(BaseModel):
    id: str


class IncompleteDetails(BaseModel):
    reason: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    completed_at: int | None = None
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[MessageItem] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: str | None = None
    reasoning: Any = None
    store: bool = True
    background: bool = False
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    conversation: ConversationRef | None = None
    # δ-mem extension: the session version this response names (None with store false)
    session: SessionInfo | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MessageItem]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class ConversationCreateRequest(TextOnly):
    model_config = ConfigDict(extra="forbid")

    items: list[Any] | None = None
    metadata: dict[str, Any] | None = None


class ConversationUpdateRequest(TextOnly):
    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] | None


class ItemsCreateRequest(TextOnly):
    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(min_length=1)


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True
