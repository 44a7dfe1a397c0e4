"""Binary codec of a session record.

Layout (all integers little-endian)::

    magic     8 bytes  b"DMEMREC\\0"
    format    u16      FORMAT_VERSION
    hdr_len   u32      length of the JSON header
    n_tokens  u32      transcript length (tokens)
    st_len    u32      length of the safetensors blob (0 when the state is None)
    header    JSON     scalar fields, identity, state dtype/shape, messages, meta
    tokens    int32 x n_tokens
    state     safetensors bytes holding one tensor named "state"
    digest    32 bytes blake2b-256 of everything above

The state goes through safetensors rather than pickle so that loading a record can never run
code, and the digest is checked before any of the payload is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from array import array
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CorruptRecord, IdentityMismatch, UnknownFormat
from .record import SessionRecord, StateIdentity

__all__ = ["FORMAT_VERSION", "MAGIC", "decode_record", "encode_record"]

MAGIC = b"DMEMREC\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHIII")
_DIGEST_SIZE = 32
_STATE_KEY = "state"
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


def _assemble(header: dict[str, Any], tokens: bytes, state: bytes) -> bytes:
    """Frame already-encoded parts; separate from encode_record so tests can forge records."""
    header_bytes = json.dumps(
        header, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    body = b"".join(
        (
            _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(tokens) // 4, len(state)),
            header_bytes,
            tokens,
            state,
        )
    )
    return body + _digest(body)


def encode_record(record: SessionRecord) -> bytes:
    """Serialise ``record``; raises ValueError for a record that breaks its own invariants."""
    identity = record.identity
    if not isinstance(identity, StateIdentity):
        raise ValueError("record.identity must be a StateIdentity")
    state_bytes = b""
    state_info: dict[str, Any] | None = None
    if record.state is not None:
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
        state_bytes = st_save({_STATE_KEY: state.detach().to("cpu").contiguous()})
        state_info = {"dtype": "float32", "shape": list(identity.state_shape)}
    if not 0 <= record.tokens_absorbed <= len(record.transcript):
        raise ValueError(
            f"tokens_absorbed={record.tokens_absorbed} outside [0, {len(record.transcript)}]"
        )
    if record.version < 0 or record.turns < 0:
        raise ValueError("version and turns must be non-negative")
    header = {
        "session_id": record.session_id,
        "tenant": record.tenant,
        "identity": identity.to_json(),
        "version": record.version,
        "turns": record.turns,
        "tokens_absorbed": record.tokens_absorbed,
        "created_at": float(record.created_at),
        "updated_at": float(record.updated_at),
        "state": state_info,
        "messages": record.messages,
        "meta": record.meta,
    }
    try:
        return _assemble(header, _pack_tokens(record.transcript), state_bytes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record is not serialisable: {exc}") from exc


def _split(data: bytes) -> tuple[memoryview, memoryview, memoryview]:
    """Check framing and digest; return the header, token and state sections."""
    view = memoryview(data)
    magic_len = len(MAGIC)
    if len(view) < magic_len:
        if MAGIC.startswith(bytes(view)):
            raise CorruptRecord(f"record truncated: {len(view)} bytes")
        raise UnknownFormat("not a δ-mem session record (bad magic)")
    if view[:magic_len] != MAGIC:
        raise UnknownFormat("not a δ-mem session record (bad magic)")
    if len(view) < _PREFIX.size:
        raise CorruptRecord(f"record truncated: {len(view)} bytes")
    _, fmt, header_len, n_tokens, state_len = _PREFIX.unpack_from(view)
    if fmt != FORMAT_VERSION:
        raise UnknownFormat(f"record format {fmt}; this build reads format {FORMAT_VERSION}")
    body_len = _PREFIX.size + header_len + 4 * n_tokens + state_len
    expected = body_len + _DIGEST_SIZE
    if len(view) < expected:
        raise CorruptRecord(f"record truncated: {len(view)} of {expected} bytes")
    if len(view) > expected:
        raise CorruptRecord(f"record has {len(view) - expected} trailing bytes")
    if not hmac.compare_digest(_digest(view[:body_len]), view[body_len:]):
        raise CorruptRecord("record checksum mismatch")
    start = _PREFIX.size
    tokens_at = start + header_len
    state_at = tokens_at + 4 * n_tokens
    return view[start:tokens_at], view[tokens_at:state_at], view[state_at:body_len]


def _check_int(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative int")
    return value


def decode_record(data: bytes, expected_identity: StateIdentity | None = None) -> SessionRecord:
    """Parse and verify ``data``.

    Raises UnknownFormat, CorruptRecord, or IdentityMismatch when ``expected_identity`` is
    given and differs from the record's.
    """
    header_view, token_view, state_view = _split(bytes(data))
    try:
        header = json.loads(bytes(header_view))
        identity = StateIdentity.from_json(header["identity"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"record header does not parse: {exc}") from exc
    if expected_identity is not None and identity != expected_identity:
        raise IdentityMismatch(
            "session state was made with another backbone/adapter ("
            + "; ".join(expected_identity.differences(identity))
            + ")"
        )
    state = _decode_state(header.get("state"), state_view, identity)
    transcript = _unpack_tokens(token_view)
    try:
        record = SessionRecord(
            session_id=str(header["session_id"]),
            tenant=str(header["tenant"]),
            identity=identity,
            state=state,
            transcript=transcript,
            messages=list(header["messages"]),
            tokens_absorbed=_check_int(header, "tokens_absorbed"),
            version=_check_int(header, "version"),
            turns=_check_int(header, "turns"),
            created_at=float(header["created_at"]),
            updated_at=float(header["updated_at"]),
            meta=dict(header["meta"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"record header is invalid: {exc}") from exc
    if record.tokens_absorbed > len(transcript):
        raise CorruptRecord("record claims more absorbed tokens than its transcript holds")
    return record


def _decode_state(
    info: Any, state_view: memoryview, identity: StateIdentity
) -> torch.Tensor | None:
    if info is None:
        if len(state_view):
            raise CorruptRecord("record has state bytes but no state header")
        return None
    if (
        not isinstance(info, dict)
        or info.get("dtype") != "float32"
        or info.get("shape") != list(identity.state_shape)
    ):
        raise CorruptRecord(
            f"record state header {info!r} does not match float32 {identity.state_shape}"
        )
    try:
        tensors = st_load(bytes(state_view))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptRecord(f"record state does not parse: {exc}") from exc
    state = tensors.get(_STATE_KEY)
    if len(tensors) != 1 or state is None:
        raise CorruptRecord(f"record state holds tensors {sorted(tensors)}, expected 'state'")
    if state.dtype != torch.float32 or tuple(state.shape) != identity.state_shape:
        raise CorruptRecord(
            f"record state is {state.dtype} {tuple(state.shape)}, "
            f"expected float32 {identity.state_shape}"
        )
    return state
