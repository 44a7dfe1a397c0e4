"""Session record types and id validation."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidSessionId

__all__ = [
    "SessionRecord",
    "SessionSummary",
    "StateIdentity",
    "StoredBase",
    "validate_session_id",
    "validate_tenant",
]

# Lineages: which stored deltas, in order, make a version's content, as inclusive ranges of the
# version numbers that wrote them (increasing, not overlapping).
Lineage = tuple[tuple[int, int], ...]

# No '/', '{' or '}': the Redis store builds keys and cluster hash tags from these ids.
_ID_RE = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")


def _validate_id(value: object, what: str) -> str:
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise InvalidSessionId(
            f"invalid {what} {value!r}: use 1-128 characters of [A-Za-z0-9._:-], "
            "not starting with '.'"
        )
    return value


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` unchanged if valid, else raise :class:`InvalidSessionId`."""
    return _validate_id(session_id, "session id")


def validate_tenant(tenant: object) -> str:
    """Tenant ids follow the session id rules."""
    return _validate_id(tenant, "tenant id")


@dataclass(frozen=True)
class StateIdentity:
    """What a state was made with; a state is only valid under the same identity."""

    backbone: str
    adapter: str
    num_layers: int
    num_state_heads: int
    rank: int

    def __post_init__(self) -> None:
        for name in ("backbone", "adapter"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"StateIdentity.{name} must be a non-empty string")
        for name in ("num_layers", "num_state_heads", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"StateIdentity.{name} must be a positive int, got {value!r}")

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_state_heads, self.rank, self.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "adapter": self.adapter,
            "num_layers": self.num_layers,
            "num_state_heads": self.num_state_heads,
            "rank": self.rank,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StateIdentity:
        return cls(
            backbone=obj["backbone"],
            adapter=obj["adapter"],
            num_layers=obj["num_layers"],
            num_state_heads=obj["num_state_heads"],
            rank=obj["rank"],
        )

    def differences(self, other: StateIdentity) -> list[str]:
        """Human-readable list of the fields where ``other`` differs from ``self``."""
        return [
            f"{name}: {getattr(other, name)!r} != {getattr(self, name)!r}"
            for name in ("backbone", "adapter", "num_layers", "num_state_heads", "rank")
            if getattr(self, name) != getattr(other, name)
        ]


# eq=False: field-wise equality would compare tensors elementwise and fail in bool().
@dataclass(eq=False)
class SessionRecord:
    """All of one conversation's persistent state.

    ``state`` is float32 of shape ``identity.state_shape``; None means the zero state.
    ``version`` 0 means not stored yet; the store sets it on every commit.
    """

    session_id: str
    tenant: str
    identity: StateIdentity
    state: torch.Tensor | None = None
    transcript: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tokens_absorbed: int = 0
    version: int = 0
    turns: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    # More states of the same shape, by name (the turn plan's epoch state and block snapshot);
    # only with a state.
    extra_states: dict[str, torch.Tensor] = field(default_factory=dict)
    # What the store already holds of this record: set by load and commit, carried along by
    # dataclasses.replace, so that the next commit sends only what was appended (the store's
    # business; leave it alone).
    stored: StoredBase | None = field(default=None, compare=False, repr=False, kw_only=True)

    def summary(self) -> SessionSummary:
        return SessionSummary(
            session_id=self.session_id,
            version=self.version,
            turns=self.turns,
            tokens_absorbed=self.tokens_absorbed,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(frozen=True, eq=False)
class StoredBase:
    """The stored version a record was loaded as (or committed as); private to the store.

    ``token`` is the id of the session's *current* head when this was read: while it is still
    current (and the version unchanged), every delta of ``lineage`` and every state of
    ``states`` is still stored. The lists are the store's own copies of the stored content
    (never handed out), against which a commit checks that the record it is given extends
    this version.
    """

    tenant: str
    session_id: str
    version: int
    token: str
    lineage: Lineage
    # Version that appended each entry of the visible turn log, oldest first.
    log_sources: tuple[int, ...]
    transcript: list[int]
    messages: list[Any]
    # Append-only meta lists (``boundaries``, ``turn_log``): None where meta has no such list.
    lists: dict[str, list[Any] | None]
    # Digests of the states this version's head names (stored by digest, once a session): a
    # commit on this base does not send them again.
    states: frozenset[str]


@dataclass(frozen=True)
class SessionSummary:
    """What listing a tenant's sessions shows, without loading their records."""

    session_id: str
    version: int
    turns: int
    tokens_absorbed: int
    created_at: float
    updated_at: float
