"""Signed envelopes and per-sender hash chains (docs/architecture.md, "Wire" and "Ledger").

An envelope is ``{"h": header, "p": payload, "s": signature}`` in msgpack, where
``header`` is the canonical msgpack of (version, task, type, sender, round,
attempt, SHA-256 of the payload, ``prev``) and ``signature`` is a detached Ed25519
signature over the header bytes. The envelope's hash is SHA-256 of the header
bytes; ``prev`` is the hash of the sender's previous envelope, so each sender's
uploads form a hash chain that nobody can fork or rewrite unnoticed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from nacl.exceptions import BadSignatureError

from fairbus.errors import (
    ChainError,
    ReplayError,
    SchemaError,
    SignatureError,
)
from fairbus.identity import Identity
from fairbus.roster import Roster
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import MAX_ATTEMPT, MESSAGE_TYPES, Message, decode_body
from fairbus.wire.schema import Bin, Int, Optional, Spec, Str, WireStruct, names

VERSION = 1
GENESIS = bytes(32)
"""``prev`` of a sender's first envelope."""

SIGNATURE_BYTES = 64
_MAX_HEADER_BYTES = 1024


@dataclass(frozen=True)
class Header(WireStruct):
    v: int
    task: str
    type: str
    sender: int
    round: int | None
    attempt: int | None
    group: int | None
    """An upload's group id, in the signed header so the ledger knows it without the
    model-sized payload; None for every other type."""
    payload_sha256: bytes
    prev: bytes
    FIELDS: ClassVar[dict[str, Spec]] = {
        "v": Int(VERSION, VERSION),
        "task": Str(max_len=64),
        "type": names(tuple(MESSAGE_TYPES)),
        "sender": Int(),
        "round": Optional(Int()),
        "attempt": Optional(Int(0, MAX_ATTEMPT)),
        "group": Optional(Int()),
        "payload_sha256": Bin(exact=32),
        "prev": Bin(exact=32),
    }


@dataclass(frozen=True, eq=False)
class SignedEnvelope:
    """An envelope as built or as received, before any check of its contents."""

    header: Header
    header_bytes: bytes
    payload: bytes
    signature: bytes

    @property
    def hash(self) -> bytes:
        """SHA-256 of the signed header: the id that ``prev`` links and receipts name."""
        return hashlib.sha256(self.header_bytes).digest()

    def to_bytes(self) -> bytes:
        return codec.pack({"h": self.header_bytes, "p": self.payload, "s": self.signature})


@dataclass(frozen=True, eq=False)
class Verified:
    """An envelope whose signature, payload hash and schema all checked out."""

    envelope: SignedEnvelope
    message: Message

    @property
    def header(self) -> Header:
        return self.envelope.header

    @property
    def hash(self) -> bytes:
        return self.envelope.hash


def sign(
    identity: Identity,
    task: str,
    message: Message,
    *,
    prev: bytes,
    round: int | None = None,
    attempt: int | None = None,
) -> SignedEnvelope:
    """Build and sign an envelope carrying ``message`` (an upload's group goes into the
    header too)."""
    if (round is not None and attempt is not None) != message.SCOPED:
        raise SchemaError(
            f"{message.TYPE!r} messages {'need' if message.SCOPED else 'take no'} round and attempt"
        )
    group: int | None = getattr(message, "group", None) if header_group(message.TYPE) else None
    payload = message.payload()
    header = Header(
        VERSION,
        task,
        message.TYPE,
        identity.participant_id,
        round,
        attempt,
        group,
        hashlib.sha256(payload).digest(),
        prev,
    )
    header_bytes = codec.pack(header.to_wire())
    signature = identity.signing_key.sign(header_bytes).signature
    return SignedEnvelope(header, header_bytes, payload, bytes(signature))


def parse(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> SignedEnvelope:
    """Strictly decode an envelope's framing and header; verifies nothing cryptographic."""
    outer = codec.unpack(data, limits)
    if not isinstance(outer, dict) or set(outer) != {"h", "p", "s"}:
        raise SchemaError("an envelope is a map with exactly the keys 'h', 'p' and 's'")
    header_bytes, payload, signature = outer["h"], outer["p"], outer["s"]
    for name, value in (("h", header_bytes), ("p", payload), ("s", signature)):
        if not isinstance(value, bytes):
            raise SchemaError(f"envelope field {name!r} must be bytes")
    return from_parts(header_bytes, payload, signature, limits)


def from_parts(
    header_bytes: bytes, payload: bytes, signature: bytes, limits: WireLimits = DEFAULT_LIMITS
) -> SignedEnvelope:
    """Strictly decode an envelope's header from its parts (as the ledger stores them)."""
    if len(signature) != SIGNATURE_BYTES:
        raise SchemaError(f"signature is {len(signature)} bytes, expected {SIGNATURE_BYTES}")
    raw_header = codec.unpack(header_bytes, limits, max_bytes=_MAX_HEADER_BYTES)
    header = Header.from_wire(raw_header, "header", limits)
    if codec.pack(header.to_wire()) != header_bytes:
        # Two byte strings for one header would give one message two hashes.
        raise SchemaError("envelope header is not in canonical form")
    cls = MESSAGE_TYPES[header.type]
    if (header.round is not None, header.attempt is not None) != (cls.SCOPED, cls.SCOPED):
        raise SchemaError(
            f"{header.type!r} messages {'need' if cls.SCOPED else 'take no'} round and attempt"
        )
    return SignedEnvelope(header, header_bytes, payload, signature)


def verify(
    envelope: SignedEnvelope,
    roster: Roster,
    limits: WireLimits = DEFAULT_LIMITS,
) -> Verified:
    """Check sender, role, task, signature and payload hash, then decode the payload.

    Order matters: nothing about the payload is parsed before the signature holds.
    """
    header = envelope.header
    cls = MESSAGE_TYPES[header.type]
    member = roster.member(header.sender, roles=cls.SENDERS)
    if header.task != roster.task:
        raise ReplayError(f"envelope is for task {header.task!r}, this is {roster.task!r}")
    try:
        member.identity.verify_key.verify(envelope.header_bytes, envelope.signature)
    except BadSignatureError:
        raise SignatureError(
            f"signature on a {header.type!r} envelope does not verify for participant "
            f"{header.sender}"
        ) from None
    if hashlib.sha256(envelope.payload).digest() != header.payload_sha256:
        raise SignatureError("payload does not match the SHA-256 in the signed header")
    check_header_group(header)
    body = decode_body(header.type, envelope.payload, limits)
    if header.group is not None and header.group != getattr(body, "group", None):
        raise SchemaError(f"header names group {header.group}, the upload another")
    return Verified(envelope, body)


def header_group(msg_type: str) -> bool:
    """Whether envelopes of this type name their group in the header."""
    return bool(getattr(MESSAGE_TYPES[msg_type], "HEADER_GROUP", False))


def check_header_group(header: Header) -> None:
    """An upload names its group in the header; nothing else names one."""
    if header_group(header.type) != (header.group is not None):
        raise SchemaError(
            f"a {header.type!r} header must {'' if header_group(header.type) else 'not '}"
            "name a group"
        )


def open_envelope(data: bytes, roster: Roster, limits: WireLimits = DEFAULT_LIMITS) -> Verified:
    """``parse`` then ``verify``: bytes from the network to a checked message, or an error."""
    return verify(parse(data, limits), roster, limits)


class ChainTracker:
    """Each sender's chain head; accepts an envelope only if it extends that chain.

    Pure state, no I/O: the ledger and the provider each keep one.
    """

    def __init__(self, heads: dict[int, bytes] | None = None) -> None:
        self._heads: dict[int, bytes] = dict(heads or {})
        self._seen: set[bytes] = set()

    def head(self, sender: int) -> bytes:
        return self._heads.get(sender, GENESIS)

    def check(self, envelope: SignedEnvelope) -> None:
        """Raise :class:`ReplayError` for an envelope already accepted, and
        :class:`ChainError` for one whose ``prev`` is not the sender's head."""
        if envelope.hash in self._seen:
            raise ReplayError(f"envelope {envelope.hash.hex()[:16]} was already accepted")
        sender = envelope.header.sender
        head = self.head(sender)
        if envelope.header.prev != head:
            raise ChainError(
                f"participant {sender}'s envelope has prev {envelope.header.prev.hex()[:16]}, "
                f"but its chain head is {head.hex()[:16]} (a fork or a forged link)"
            )

    def resync(self, sender: int, head: bytes) -> None:
        """Take ``head`` as the sender's chain head (from the ledger, which checked every
        link before it)."""
        self._heads[sender] = head

    def accept(self, envelope: SignedEnvelope) -> None:
        self.check(envelope)
        self._heads[envelope.header.sender] = envelope.hash
        self._seen.add(envelope.hash)

    def seen(self, envelope_hash: bytes) -> bool:
        """Whether an envelope with this hash was accepted (or :meth:`remember`-ed)."""
        return envelope_hash in self._seen

    def remember(self, envelope_hash: bytes) -> None:
        """Count an envelope as accepted without moving any head (one the ledger
        recorded before this tracker was built)."""
        self._seen.add(envelope_hash)
