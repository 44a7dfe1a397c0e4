"""Binary codecs of the session store: whole records, and the heads, deltas and turn-log
parts the stores keep (base.py says how they fit together).

All integers little-endian. JSON is compact UTF-8 (no NaN). States go through safetensors,
never pickle, so that loading can never run code; every blob ends in a blake2b digest that is
checked before any of its payload is parsed.

**Record** (``encode_record``; exports, imports, and sessions stored by the previous layout)::

    magic     8 bytes  b"DMEMREC\\0"
    format    u16      FORMAT_VERSION (1)
    hdr_len   u32      length of the JSON header
    n_tokens  u32      transcript length (tokens)
    st_len    u32      length of the safetensors blob (0 when the state is None)
    header    JSON     scalar fields, identity, state dtype/shape, messages, meta
    tokens    int32 x n_tokens
    state     safetensors bytes: "state", and "extra.<name>" for each extra state
    digest    32 bytes blake2b-256 of everything above

**Head** (``encode_head``; one a kept version): the record's framing with magic
``b"DMEMHED\\0"``, format ``HEAD_FORMAT`` (2), ``n_tokens`` 0 and no tokens, and no state
bytes either: the JSON header's ``state`` entry names the states by digest
(``{"dtype": "float32", "shape": [...], "digest": "<hex>", "extra": {"<name>": "<hex>"}}``;
null without a state), stored once per session beside the heads. The header also holds the
record's scalar fields and identity, ``meta`` without the append-only lists, ``lists`` (each
append-only list present: its position among the meta keys), ``lengths`` (``tokens``,
``messages``, and each present list's entries), ``lineage`` and ``log_lineage`` (inclusive
version ranges, ``[[1, 40], [43, 45]]``). Heads of format 1 (the layout before) carry their
states inline, as a record does (safetensors); they still decode.

**State** (``encode_state_blob``; one state tensor, content-addressed)::

    magic     4 bytes  b"DMS\\x01" (the last byte is the format)
    ndim      u8
    dims      u32 x ndim
    values    float32 little-endian, C order

Its address (``state_digest``) is the first 16 bytes of the SHA-256 of the whole blob (shape
included), as 32 lowercase hex digits; a load recomputes it, so the address is its checksum.

**Delta** (``encode_delta``; what one version appended)::

    magic     4 bytes  b"DMD\\x01" (the last byte is the format)
    version   u32      the version that appended it
    n_tokens  u32
    json_len  u32
    width     u8       bytes a token id: 2, 3 or 4, the fewest that hold the largest
    tokens    n_tokens x width bytes, little-endian unsigned
    json      JSON     [new messages, new meta["boundaries"] entries]
    digest    16 bytes blake2b-128 of everything above

**Turn-log part** (``encode_turns``; the ``meta["turn_log"]`` entries one version appended)::

    magic     4 bytes  b"DMT\\x01"
    version   u32
    json_len  u32
    json      JSON     [entries]
    digest    16 bytes blake2b-128 of everything above
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CorruptRecord, IdentityMismatch, UnknownFormat
from .record import Lineage, SessionRecord, StateIdentity

__all__ = ["FORMAT_VERSION", "MAGIC", "decode_record", "encode_record", "validate_record"]

MAGIC = b"DMEMREC\x00"
FORMAT_VERSION = 1
# Heads name their states by digest (format 2); format 1 heads hold them inline.
HEAD_FORMAT = 2
_HEAD_FORMATS = (FORMAT_VERSION, HEAD_FORMAT)
_PREFIX = struct.Struct("<8sHIII")
_DIGEST_SIZE = 32
_STATE_KEY = "state"
_EXTRA_PREFIX = "extra."
_TOKEN_MAX = 2**31 - 1

# The transcript is packed as int32; pick the array typecode that is 4 bytes here.
_INT32 = next(code for code in ("i", "l") if array(code).itemsize == 4)
_SWAP = sys.byteorder != "little"


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()


def _pack_tokens(tokens: list[int]) -> bytes:
    try:
        packed = array(_INT32, tokens)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"transcript must hold int token ids in [0, 2**31): {exc}") from exc
    if packed and min(packed) < 0:
        raise ValueError("transcript must hold non-negative token ids")
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def _unpack_tokens(data: bytes | memoryview) -> list[int]:
    tokens = array(_INT32)
    tokens.frombytes(data)
    if _SWAP:
        tokens.byteswap()
    return tokens.tolist()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _assemble(
    header: dict[str, Any], tokens: bytes, state: bytes, magic: bytes = MAGIC,
    fmt: int = FORMAT_VERSION,
) -> bytes:
    """Frame already-encoded parts; separate from encode_record so tests can forge records."""
    header_bytes = _json(header)
    body = b"".join(
        (
            _PREFIX.pack(magic, fmt, len(header_bytes), len(tokens) // 4, len(state)),
            header_bytes,
            tokens,
            state,
        )
    )
    return body + _digest(body)


def _checked_states(record: SessionRecord) -> dict[str, torch.Tensor] | None:
    """``state`` and ``extra_states`` by their stored names (``state``, ``extra.<name>``,
    extras sorted), on the CPU and contiguous, checked against the identity; None without a
    state. Raises ValueError for a record that breaks its own invariants."""
    identity = record.identity
    if not isinstance(identity, StateIdentity):
        raise ValueError("record.identity must be a StateIdentity")
    if record.state is None:
        if record.extra_states:
            raise ValueError("record.extra_states needs a state")
        return None
    state = record.state
    if not isinstance(state, torch.Tensor):
        raise ValueError("record.state must be a torch.Tensor or None")
    if state.dtype != torch.float32:
        raise ValueError(f"record.state must be float32, got {state.dtype}")
    if tuple(state.shape) != identity.state_shape:
        raise ValueError(
            f"record.state has shape {tuple(state.shape)}, identity wants "
            f"{identity.state_shape}"
        )
    tensors = {_STATE_KEY: state.detach().to("cpu").contiguous()}
    for name, extra in sorted(record.extra_states.items()):
        if (not isinstance(extra, torch.Tensor) or extra.dtype != torch.float32
                or tuple(extra.shape) != identity.state_shape):
            raise ValueError(f"record.extra_states[{name!r}] must be float32 "
                             f"{identity.state_shape}")
        tensors[_EXTRA_PREFIX + name] = extra.detach().to("cpu").contiguous()
    return tensors


def _encode_states(record: SessionRecord) -> tuple[bytes, dict[str, Any] | None]:
    """The safetensors blob of ``state`` and ``extra_states``, and its header entry."""
    tensors = _checked_states(record)
    if tensors is None:
        return b"", None
    info: dict[str, Any] = {"dtype": "float32", "shape": list(record.identity.state_shape)}
    if record.extra_states:
        info["extra"] = sorted(record.extra_states)
    return st_save(tensors), info


def _check_scalars(record: SessionRecord, n_tokens: int) -> None:
    if not 0 <= record.tokens_absorbed <= n_tokens:
        raise ValueError(f"tokens_absorbed={record.tokens_absorbed} outside [0, {n_tokens}]")
    if record.version < 0 or record.turns < 0:
        raise ValueError("version and turns must be non-negative")


def _scalar_header(record: SessionRecord) -> dict[str, Any]:
    return {
        "session_id": record.session_id,
        "tenant": record.tenant,
        "identity": record.identity.to_json(),
        "version": record.version,
        "turns": record.turns,
        "tokens_absorbed": record.tokens_absorbed,
        "created_at": float(record.created_at),
        "updated_at": float(record.updated_at),
    }


def encode_record(record: SessionRecord) -> bytes:
    """Serialise ``record``; raises ValueError for a record that breaks its own invariants."""
    state_bytes, state_info = _encode_states(record)
    _check_scalars(record, len(record.transcript))
    header = {
        **_scalar_header(record),
        "state": state_info,
        "messages": record.messages,
        "meta": record.meta,
    }
    try:
        return _assemble(header, _pack_tokens(record.transcript), state_bytes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record is not serialisable: {exc}") from exc


def _split(
    data: bytes, magic: bytes = MAGIC, what: str = "record",
    formats: tuple[int, ...] = (FORMAT_VERSION,),
) -> tuple[int, memoryview, memoryview, memoryview]:
    """Check framing and digest; return the format and the header, token and state
    sections."""
    view = memoryview(data)
    magic_len = len(magic)
    if len(view) < magic_len:
        if magic.startswith(bytes(view)):
            raise CorruptRecord(f"{what} truncated: {len(view)} bytes")
        raise UnknownFormat(f"not a δ-mem session {what} (bad magic)")
    if view[:magic_len] != magic:
        raise UnknownFormat(f"not a δ-mem session {what} (bad magic)")
    if len(view) < _PREFIX.size:
        raise CorruptRecord(f"{what} truncated: {len(view)} bytes")
    _, fmt, header_len, n_tokens, state_len = _PREFIX.unpack_from(view)
    if fmt not in formats:
        readable = " and ".join(str(f) for f in formats)
        raise UnknownFormat(f"{what} format {fmt}; this build reads format {readable}")
    body_len = _PREFIX.size + header_len + 4 * n_tokens + state_len
    expected = body_len + _DIGEST_SIZE
    if len(view) < expected:
        raise CorruptRecord(f"{what} truncated: {len(view)} of {expected} bytes")
    if len(view) > expected:
        raise CorruptRecord(f"{what} has {len(view) - expected} trailing bytes")
    if not hmac.compare_digest(_digest(view[:body_len]), view[body_len:]):
        raise CorruptRecord(f"{what} checksum mismatch")
    start = _PREFIX.size
    tokens_at = start + header_len
    state_at = tokens_at + 4 * n_tokens
    return fmt, view[start:tokens_at], view[tokens_at:state_at], view[state_at:body_len]


def _check_int(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative int")
    return value


def _parse_header(
    header_view: memoryview, expected_identity: StateIdentity | None, what: str
) -> tuple[dict[str, Any], StateIdentity]:
    try:
        header = json.loads(bytes(header_view))
        identity = StateIdentity.from_json(header["identity"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"{what} header does not parse: {exc}") from exc
    if expected_identity is not None and identity != expected_identity:
        raise IdentityMismatch(
            "session state was made with another backbone/adapter ("
            + "; ".join(expected_identity.differences(identity))
            + ")"
        )
    return header, identity


def _record_from_header(
    header: dict[str, Any],
    identity: StateIdentity,
    state_view: memoryview,
    transcript: list[int],
    messages: Any,
    meta: Any,
    what: str,
) -> SessionRecord:
    state, extra_states = _decode_state(header.get("state"), state_view, identity)
    try:
        return SessionRecord(
            session_id=str(header["session_id"]),
            tenant=str(header["tenant"]),
            identity=identity,
            state=state,
            transcript=transcript,
            messages=list(messages),
            tokens_absorbed=_check_int(header, "tokens_absorbed"),
            version=_check_int(header, "version"),
            turns=_check_int(header, "turns"),
            created_at=float(header["created_at"]),
            updated_at=float(header["updated_at"]),
            meta=dict(meta),
            extra_states=extra_states,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"{what} header is invalid: {exc}") from exc


def decode_record(data: bytes, expected_identity: StateIdentity | None = None) -> SessionRecord:
    """Parse and verify ``data``.

    Raises UnknownFormat, CorruptRecord, or IdentityMismatch when ``expected_identity`` is
    given and differs from the record's.
    """
    _, header_view, token_view, state_view = _split(bytes(data))
    header, identity = _parse_header(header_view, expected_identity, "record")
    try:
        messages, meta = header["messages"], header["meta"]
    except (KeyError, TypeError) as exc:
        raise CorruptRecord(f"record header is invalid: {exc}") from exc
    # Checked before list()/dict() below, which would turn a string or an object into a list.
    if not isinstance(messages, list):
        raise CorruptRecord(f"record messages must be a list, got {type(messages).__name__}")
    if not isinstance(meta, dict):
        raise CorruptRecord(f"record meta must be an object, got {type(meta).__name__}")
    transcript = _unpack_tokens(token_view)
    record = _record_from_header(
        header, identity, state_view, transcript, messages, meta, "record"
    )
    if record.tokens_absorbed > len(transcript):
        raise CorruptRecord(f"record tokens_absorbed={record.tokens_absorbed} exceeds its "
                            f"transcript of {len(transcript)} tokens")
    return record


def validate_record(record: SessionRecord, *, vocab_size: int | None = None) -> None:
    """Check what a record from outside (an import) holds beyond its framing, checksum and
    identity: a checksum only proves that the bytes are what their writer wrote, and a forged
    export is checksummed too. Raises CorruptRecord naming the first bad field.

    The rules are those the server relies on (docs/design.md §2 and §3): ``messages`` a list
    of ``{"role": str, "content": str}``; ``tokens_absorbed == len(transcript) - 1`` (0 for
    an empty transcript: the last sampled token is never absorbed, invariant 5); ``turns``
    non-negative; token ids ints in ``[0, vocab_size)`` (``[0, 2**31)`` without
    ``vocab_size``); ``meta["boundaries"]`` sorted ints in ``[0, len(transcript)]``;
    ``meta["epoch"]`` and ``meta["block_pos"]`` inside the transcript; every state float32
    of the identity's shape, finite (a NaN or inf would spread through every later turn).
    """
    if vocab_size is not None and (not _is_int(vocab_size) or vocab_size <= 0):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    n = len(record.transcript)
    _check_messages(record.messages)
    _check_transcript(record.transcript, vocab_size)
    absorbed, turns = record.tokens_absorbed, record.turns
    if not _is_int(absorbed) or absorbed != max(0, n - 1):
        raise CorruptRecord(
            f"tokens_absorbed={absorbed!r} does not fit a transcript of {n} tokens: after a "
            "turn every token but the last sampled one is absorbed (len(transcript) - 1; 0 "
            "for an empty transcript)"
        )
    if not _is_int(turns) or turns < 0:
        raise CorruptRecord(f"turns={turns!r} must be a non-negative int")
    if not isinstance(record.meta, dict):
        raise CorruptRecord("meta must be an object")
    _check_meta(record.meta, n, absorbed)
    _check_states(record)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise CorruptRecord(f"messages must be a list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise CorruptRecord(
                f"messages[{i}] must be an object with a string role and a string content, "
                f"got {_short(m)}"
            )


def _check_transcript(transcript: list[int], vocab_size: int | None) -> None:
    if not transcript:
        return
    ids = np.asarray(transcript)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise CorruptRecord("transcript must hold int token ids")
    top = _TOKEN_MAX + 1 if vocab_size is None else vocab_size
    bad = np.flatnonzero((ids < 0) | (ids >= top))
    if bad.size:
        at = int(bad[0])
        where = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else "[0, 2**31)"
        raise CorruptRecord(f"transcript[{at}] = {int(ids[at])} is outside {where}")


def _check_meta(meta: dict[str, Any], n_tokens: int, absorbed: int) -> None:
    boundaries = meta.get("boundaries")
    if boundaries is not None:
        if not isinstance(boundaries, list):
            raise CorruptRecord("meta.boundaries must be a list of ints")
        last = 0
        for i, b in enumerate(boundaries):
            if not _is_int(b) or not last <= b <= n_tokens:
                raise CorruptRecord(
                    f"meta.boundaries[{i}] = {_short(b)}: boundaries must be sorted ints in "
                    f"[0, {n_tokens}] (the transcript's length)"
                )
            last = b
    # The turn planner (server/sessions.py) reads these as positions in the transcript.
    epoch = meta.get("epoch")
    if epoch is not None and not (
        isinstance(epoch, dict)
        and _is_int(epoch.get("window_start"))
        and _is_int(epoch.get("write_from"))
        and 0 <= epoch["window_start"] <= n_tokens
        and 0 <= epoch["write_from"] <= absorbed
    ):
        raise CorruptRecord(
            f"meta.epoch = {_short(epoch)}: window_start must be an int in [0, {n_tokens}] "
            f"and write_from an int in [0, {absorbed}]"
        )
    block_pos = meta.get("block_pos")
    if block_pos is not None and not (_is_int(block_pos) and 0 <= block_pos <= n_tokens):
        raise CorruptRecord(f"meta.block_pos = {_short(block_pos)} is not an int in "
                            f"[0, {n_tokens}]")


def _check_states(record: SessionRecord) -> None:
    shape = record.identity.state_shape
    states: list[tuple[str, Any]] = [] if record.state is None else [("state", record.state)]
    states += [(f"extra_states[{name!r}]", t) for name, t in sorted(record.extra_states.items())]
    if record.state is None and record.extra_states:
        raise CorruptRecord("extra_states without a state")
    for name, t in states:
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                or tuple(t.shape) != shape):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
            raise CorruptRecord(f"{name} is {got}, the identity wants float32 {shape}")
        if not bool(torch.isfinite(t).all()):
            raise CorruptRecord(f"{name} holds NaN or inf values")


def _check_state_entry(info: Any, identity: StateIdentity, what: str) -> None:
    """A header's description of the state: float32 of the identity's shape."""
    if (
        not isinstance(info, dict)
        or info.get("dtype") != "float32"
        or info.get("shape") != list(identity.state_shape)
    ):
        raise CorruptRecord(f"{what} {info!r} does not match float32 {identity.state_shape}")


def _decode_state(
    info: Any, state_view: memoryview, identity: StateIdentity
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    if info is None:
        if len(state_view):
            raise CorruptRecord("record has state bytes but no state header")
        return None, {}
    _check_state_entry(info, identity, "record state header")
    try:
        tensors = st_load(bytes(state_view))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptRecord(f"record state does not parse: {exc}") from exc
    names = info.get("extra", [])
    expected = {_STATE_KEY, *(_EXTRA_PREFIX + n for n in names)}
    if set(tensors) != expected:
        raise CorruptRecord(f"record state holds tensors {sorted(tensors)}, expected "
                            f"{sorted(expected)}")
    for name, t in tensors.items():
        if t.dtype != torch.float32 or tuple(t.shape) != identity.state_shape:
            raise CorruptRecord(
                f"record state {name!r} is {t.dtype} {tuple(t.shape)}, "
                f"expected float32 {identity.state_shape}"
            )
    return tensors[_STATE_KEY], {n: tensors[_EXTRA_PREFIX + n] for n in names}


# -- the store's own layout: heads, deltas, turn-log parts ----------------------------------
#
# A stored version is a *head* (everything but the append-only content) plus the *deltas* its
# lineage names: each delta holds what one committed version appended (tokens, messages,
# boundaries), each turn-log part the turn-log entries one version appended. See base.py.

HEAD_MAGIC = b"DMEMHED\x00"
DELTA_MAGIC = b"DMD\x01"  # the last byte is the format
TURNS_MAGIC = b"DMT\x01"
# Deltas are many and small (a turn each): a 128-bit checksum is plenty to catch corruption
# and keeps the framing to 33 bytes a delta.
_PART_DIGEST_SIZE = 16
_DELTA_PREFIX = struct.Struct("<4sIIIB")  # magic, version, n_tokens, json_len, token width
_TURNS_PREFIX = struct.Struct("<4sII")  # magic, version, json_len
_VERSION_LIMIT = 2**32

# Meta lists that only grow: their entries live in the deltas, not in the head.
CONTENT_LISTS = ("boundaries",)
# The meta list that grows at the end and is cut at the front (the server keeps the last 64):
# its entries live in turn-log parts, kept while some kept version still shows them.
WINDOW_LIST = "turn_log"
APPEND_LISTS = (*CONTENT_LISTS, WINDOW_LIST)


def _part_digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_PART_DIGEST_SIZE).digest()


# -- states, content-addressed: stored once per session, named by digest from the heads ----

STATE_MAGIC = b"DMS\x01"  # the last byte is the format
_STATE_PREFIX = struct.Struct("<4sB")  # magic, ndim; then ndim u32 dims
# 128 bits of SHA-256: an address is scoped to one session, whose own writer made every
# state in it, so a collision could only mix up states that writer chose; 32 hex digits keep
# the Redis field names and SQLite keys short.
_STATE_DIGEST_SIZE = 16
_STATE_DIGEST_RE = re.compile(r"[0-9a-f]{32}")


def encode_state_blob(tensor: torch.Tensor) -> bytes:
    """A state as stored: its shape, then its float32 values little-endian (no pickle, no
    parser beyond ``np.frombuffer`` on the way back)."""
    values = np.ascontiguousarray(tensor.detach().to("cpu").numpy(), dtype="<f4")
    shape = values.shape
    return (_STATE_PREFIX.pack(STATE_MAGIC, len(shape))
            + struct.pack(f"<{len(shape)}I", *shape) + values.tobytes())


def state_digest(blob: bytes | memoryview) -> str:
    """A state blob's address (and checksum): truncated SHA-256, hex."""
    return hashlib.sha256(blob).digest()[:_STATE_DIGEST_SIZE].hex()


def decode_state_blob(
    blob: bytes | memoryview, digest: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """The state stored at ``digest``, verified against its address and ``shape``
    (CorruptRecord, UnknownFormat). The tensor owns its memory."""
    view = memoryview(blob)
    if not hmac.compare_digest(state_digest(view), digest):
        raise CorruptRecord(f"state {digest} checksum mismatch")
    if len(view) < _STATE_PREFIX.size:
        raise CorruptRecord(f"state {digest} truncated: {len(view)} bytes")
    magic, ndim = _STATE_PREFIX.unpack_from(view)
    if magic != STATE_MAGIC:
        raise UnknownFormat(f"not a δ-mem state (bad magic or format) at {digest}")
    at = _STATE_PREFIX.size + 4 * ndim
    if len(view) < at:
        raise CorruptRecord(f"state {digest} truncated: {len(view)} bytes")
    dims = struct.unpack_from(f"<{ndim}I", view, _STATE_PREFIX.size)
    if dims != tuple(shape):
        raise CorruptRecord(f"state {digest} has shape {dims}, expected {tuple(shape)}")
    if len(view) - at != 4 * math.prod(dims):
        raise CorruptRecord(f"state {digest} holds {len(view) - at} value bytes, "
                            f"expected {4 * math.prod(dims)}")
    # astype copies into native float32: a tensor that owns (and may write) its memory.
    values = np.frombuffer(view, dtype="<f4", offset=at).astype(np.float32)
    return torch.from_numpy(values).reshape(dims)


@dataclass(frozen=True)
class StateRefs:
    """The states a head names: the digest of ``state`` and of each extra state."""

    state: str
    extra: dict[str, str]  # extra state name -> digest

    def digests(self) -> frozenset[str]:
        return frozenset((self.state, *self.extra.values()))


def encode_states_by_ref(record: SessionRecord) -> tuple[StateRefs | None, dict[str, bytes]]:
    """The record's states as blobs by digest (each distinct one once), and what a head names
    them by; (None, {}) without a state. Raises ValueError for a record that breaks its own
    invariants."""
    tensors = _checked_states(record)
    if tensors is None:
        return None, {}
    blobs: dict[str, bytes] = {}
    names: dict[str, str] = {}
    for name, tensor in tensors.items():
        blob = encode_state_blob(tensor)
        digest = state_digest(blob)
        blobs[digest] = blob
        names[name] = digest
    refs = StateRefs(
        state=names[_STATE_KEY],
        extra={n[len(_EXTRA_PREFIX):]: d for n, d in names.items() if n != _STATE_KEY},
    )
    return refs, blobs


def _parse_refs(info: Any, identity: StateIdentity) -> StateRefs | None:
    """A format-2 head's state entry (CorruptRecord when malformed)."""
    if info is None:
        return None
    _check_state_entry(info, identity, "head state entry")
    digest, extra = info.get("digest"), info.get("extra", {})
    if (
        not isinstance(digest, str)
        or _STATE_DIGEST_RE.fullmatch(digest) is None
        or not isinstance(extra, dict)
        or not all(isinstance(n, str) and isinstance(d, str)
                   and _STATE_DIGEST_RE.fullmatch(d) is not None for n, d in extra.items())
    ):
        raise CorruptRecord(f"head state entry names bad digests: {info!r}")
    return StateRefs(state=digest, extra=dict(sorted(extra.items())))


@dataclass
class Head:
    """A decoded head: ``record`` has the scalars, identity and the small meta (no transcript,
    messages or append-only meta lists), and the states when the head holds them inline
    (format 1); the rest says how to rebuild what it lacks."""

    record: SessionRecord
    positions: dict[str, int]  # append-only meta list present -> its position among meta keys
    n_tokens: int
    n_messages: int
    n_lists: dict[str, int]  # entries of each present append-only meta list
    lineage: Lineage
    log_lineage: Lineage
    # The states it names by digest (format 2); None: inline (format 1), or no state at all.
    states: StateRefs | None


def encode_head(
    record: SessionRecord,
    states: StateRefs | None,
    small_meta: dict[str, Any],
    positions: dict[str, int],
    n_tokens: int,
    n_messages: int,
    n_lists: dict[str, int],
    lineage: Lineage,
    log_lineage: Lineage,
) -> bytes:
    """Serialise a head naming ``states`` (from :func:`encode_states_by_ref` of ``record``);
    raises ValueError for a record that breaks its own invariants."""
    if (states is None) != (record.state is None):
        raise ValueError("a head names states exactly when its record has a state")
    _check_scalars(record, n_tokens)
    state_info: dict[str, Any] | None = None
    if states is not None:
        if sorted(states.extra) != sorted(record.extra_states):
            raise ValueError("the state digests do not name the record's extra states")
        state_info = {"dtype": "float32", "shape": list(record.identity.state_shape),
                      "digest": states.state, "extra": dict(sorted(states.extra.items()))}
    header = {
        **_scalar_header(record),
        "state": state_info,
        "meta": small_meta,
        "lists": positions,
        "lengths": {"tokens": n_tokens, "messages": n_messages, **n_lists},
        "lineage": [list(r) for r in lineage],
        "log_lineage": [list(r) for r in log_lineage],
    }
    try:
        return _assemble(header, b"", b"", HEAD_MAGIC, HEAD_FORMAT)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record is not serialisable: {exc}") from exc


def _check_lineage(obj: Any, version: int) -> Lineage:
    if not isinstance(obj, list):
        raise ValueError("lineage must be a list")
    out: list[tuple[int, int]] = []
    last = 0
    for item in obj:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in item)
            or not last < item[0] <= item[1] <= version
        ):
            raise ValueError(f"bad lineage range {item!r}")
        out.append((item[0], item[1]))
        last = item[1]
    return tuple(out)


def decode_head(data: bytes, expected_identity: StateIdentity | None = None) -> Head:
    """Parse and verify a head (UnknownFormat, CorruptRecord, IdentityMismatch). A format 2
    head's record has no states: ``Head.states`` names them."""
    fmt, header_view, token_view, state_view = _split(
        bytes(data), HEAD_MAGIC, "head", _HEAD_FORMATS
    )
    if len(token_view):
        raise CorruptRecord("head holds tokens")
    header, identity = _parse_header(header_view, expected_identity, "head")
    refs: StateRefs | None = None
    if fmt == HEAD_FORMAT:
        if len(state_view):
            raise CorruptRecord("head of format 2 holds state bytes")
        refs = _parse_refs(header.get("state"), identity)
        header = {**header, "state": None}  # the record's states come from the store
    try:
        meta = header["meta"]
        if not isinstance(meta, dict):
            raise ValueError("meta must be an object")
        positions = header["lists"]
        lengths = header["lengths"]
        if (not isinstance(positions, dict) or not isinstance(lengths, dict)
                or not set(positions) <= set(APPEND_LISTS) or set(lengths) != {
                    "tokens", "messages", *positions}):
            raise ValueError("bad list positions or lengths")
        for key, pos in positions.items():
            if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
                raise ValueError(f"bad position of {key!r}")
        for key in lengths:
            _check_int(lengths, key)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"head header is invalid: {exc}") from exc
    record = _record_from_header(header, identity, state_view, [], [], meta, "head")
    try:
        lineage = _check_lineage(header["lineage"], record.version)
        log_lineage = _check_lineage(header["log_lineage"], record.version)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"head lineage is invalid: {exc}") from exc
    if record.tokens_absorbed > lengths["tokens"]:
        raise CorruptRecord(f"head tokens_absorbed={record.tokens_absorbed} exceeds its "
                            f"transcript of {lengths['tokens']} tokens")
    return Head(
        record=record,
        positions=dict(positions),
        n_tokens=lengths["tokens"],
        n_messages=lengths["messages"],
        n_lists={k: lengths[k] for k in positions},
        lineage=lineage,
        log_lineage=log_lineage,
        states=refs,
    )


def encode_delta(
    version: int, tokens: list[int], messages: list[Any], lists: dict[str, list[Any]]
) -> bytes:
    """What ``version`` appended: tokens, messages, and the CONTENT_LISTS' new entries."""
    if not 0 < version < _VERSION_LIMIT:
        raise ValueError(f"version {version} out of range")
    width, packed = _pack_narrow(tokens)
    try:
        js = _json([messages, *(lists.get(k, []) for k in CONTENT_LISTS)])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record is not serialisable: {exc}") from exc
    body = (_DELTA_PREFIX.pack(DELTA_MAGIC, version, len(tokens), len(js), width)
            + packed + js)
    return body + _part_digest(body)


def _pack_narrow(tokens: list[int]) -> tuple[int, bytes]:
    """Token ids little-endian in the fewest of 2, 3 or 4 bytes that hold the largest: half
    the int32 size for vocabularies under 65,536 ids, three quarters under 16.7 M."""
    packed = _pack_tokens(tokens)  # validates: ints in [0, 2**31)
    if not packed:
        return 2, b""
    top = int(np.frombuffer(packed, dtype="<i4").max())
    width = 2 if top < 1 << 16 else 3 if top < 1 << 24 else 4
    if width == 4:
        return 4, packed
    return width, np.frombuffer(packed, dtype=np.uint8).reshape(-1, 4)[:, :width].tobytes()


def _widen(data: bytes, width: int) -> bytes:
    """Little-endian ids of ``width`` bytes back to little-endian int32."""
    if width == 4:
        return bytes(data)
    n = len(data) // width
    out = np.zeros((n, 4), dtype=np.uint8)
    out[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(n, width)
    return out.tobytes()


def _split_part(
    data: bytes, prefix: struct.Struct, magic: bytes, what: str
) -> tuple[tuple[Any, ...], memoryview]:
    view = memoryview(data)
    if len(view) < prefix.size + _PART_DIGEST_SIZE:
        raise CorruptRecord(f"{what} truncated: {len(view)} bytes")
    fields = prefix.unpack_from(view)
    if fields[0] != magic:
        raise UnknownFormat(f"not a δ-mem {what} (bad magic or format)")
    body_len = len(view) - _PART_DIGEST_SIZE
    if not hmac.compare_digest(_part_digest(view[:body_len]), view[body_len:]):
        raise CorruptRecord(f"{what} checksum mismatch")
    return fields[1:], view[prefix.size : body_len]


@dataclass
class DeltaPart:
    """A verified delta, not yet parsed."""

    version: int
    width: int  # bytes a token id
    tokens: memoryview  # n ids, little-endian, ``width`` bytes each
    json: bytes  # [messages, *CONTENT_LISTS]


def decode_delta(data: bytes) -> DeltaPart:
    """Verify a delta's framing and checksum (parse many at once with :func:`delta_tokens`
    and :func:`parse_delta_json`)."""
    (version, n_tokens, js_len, width), payload = _split_part(
        data, _DELTA_PREFIX, DELTA_MAGIC, "delta"
    )
    if width not in (2, 3, 4) or len(payload) != width * n_tokens + js_len:
        raise CorruptRecord(f"delta of version {version} has inconsistent lengths")
    at = width * n_tokens
    return DeltaPart(version, width, payload[:at], bytes(payload[at:]))


def split_parts(data: bytes) -> list[bytes]:
    """Cut a concatenation of deltas or of turn-log parts (each says its own length) back
    into its parts."""
    view = memoryview(data)
    out: list[bytes] = []
    at = 0
    while at < len(view):
        magic = bytes(view[at : at + 4])
        if magic == DELTA_MAGIC and len(view) - at >= _DELTA_PREFIX.size:
            _, _, n_tokens, js_len, width = _DELTA_PREFIX.unpack_from(view, at)
            size = _DELTA_PREFIX.size + width * n_tokens + js_len + _PART_DIGEST_SIZE
        elif magic == TURNS_MAGIC and len(view) - at >= _TURNS_PREFIX.size:
            _, _, js_len = _TURNS_PREFIX.unpack_from(view, at)
            size = _TURNS_PREFIX.size + js_len + _PART_DIGEST_SIZE
        else:
            raise CorruptRecord(f"stored parts do not parse at byte {at}")
        if at + size > len(view):
            raise CorruptRecord("stored parts are truncated")
        out.append(bytes(view[at : at + size]))
        at += size
    return out


_WIDTH_DTYPE = {2: "<u2", 4: "<i4"}


def delta_tokens(parts: list[DeltaPart]) -> list[int]:
    """The deltas' tokens, concatenated."""
    out: list[int] = []
    i = 0
    while i < len(parts):
        width = parts[i].width
        j = i
        while j < len(parts) and parts[j].width == width:
            j += 1
        data = b"".join(p.tokens for p in parts[i:j])
        if width == 3:
            data, width = _widen(data, 3), 4
        out += np.frombuffer(data, dtype=_WIDTH_DTYPE[width]).tolist()
        i = j
    return out


def parse_delta_json(parts: list[bytes]) -> tuple[list[Any], dict[str, list[Any]]]:
    """The deltas' messages and CONTENT_LISTS entries, concatenated (parsed in one go)."""
    try:
        items = json.loads(b"[" + b",".join(parts) + b"]")
    except ValueError as exc:
        raise CorruptRecord(f"delta does not parse: {exc}") from exc
    messages: list[Any] = []
    lists: dict[str, list[Any]] = {k: [] for k in CONTENT_LISTS}
    width = 1 + len(CONTENT_LISTS)
    for obj in items:
        if type(obj) is not list or len(obj) != width or type(obj[0]) is not list:
            raise CorruptRecord("delta JSON has the wrong shape")
        messages += obj[0]
        for key, entries in zip(CONTENT_LISTS, obj[1:], strict=True):
            if type(entries) is not list:
                raise CorruptRecord("delta JSON has the wrong shape")
            lists[key] += entries
    return messages, lists


def encode_turns(version: int, entries: list[Any]) -> bytes:
    """The turn-log entries ``version`` appended."""
    if not 0 < version < _VERSION_LIMIT:
        raise ValueError(f"version {version} out of range")
    try:
        js = _json(entries)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record is not serialisable: {exc}") from exc
    body = _TURNS_PREFIX.pack(TURNS_MAGIC, version, len(js)) + js
    return body + _part_digest(body)


def decode_turns(data: bytes) -> tuple[int, bytes]:
    """Verify a turn-log part; return its version and its JSON bytes (a list of entries)."""
    (version, js_len), payload = _split_part(data, _TURNS_PREFIX, TURNS_MAGIC, "turn-log part")
    if len(payload) != js_len:
        raise CorruptRecord(f"turn-log part of version {version} has inconsistent lengths")
    return version, bytes(payload)


def parse_turns_json(parts: list[bytes]) -> list[list[Any]]:
    """The entries of each turn-log part's JSON (parsed in one go)."""
    try:
        items = json.loads(b"[" + b",".join(parts) + b"]")
    except ValueError as exc:
        raise CorruptRecord(f"turn-log part does not parse: {exc}") from exc
    if not all(isinstance(obj, list) for obj in items):
        raise CorruptRecord("turn-log part is not a list")
    return items
