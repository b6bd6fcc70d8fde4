"""An envelope together with the ledger receipt that proves it was committed.

What travels on the bus for every ledger transaction a participant broadcasts (the
provider's global model, announcement, dropout, evaluation and decision; a user's masked
upload): ``{"e": {"h": header, "p": payload, "s": signature}, "r": <a ledger node's signed
Receipt listing the envelope's hash>}``. The protocol machines act on such a message only
through :func:`open_recorded`, which parses it once (one msgpack decode of the whole
thing), verifies the envelope's signature and body and the receipt, and hands back a typed
:class:`RecordedMessage`: users act only on what the ledger holds (no equivocation, since
the ledger takes one announcement per round and attempt), and the provider aggregates
only uploads the ledger has recorded. The ledger itself records a model-sized envelope
without its payload (:func:`header_only`); its nodes keep the payload from the bus in
their blob stores. See ``docs/architecture.md``, "The one path".
"""

from __future__ import annotations

from dataclasses import dataclass

from fairbus import envelope
from fairbus.envelope import GENESIS, SignedEnvelope, Verified
from fairbus.errors import FairbusError, SchemaError
from fairbus.identity import Identity
from fairbus.ledger.records import Committed, is_model_sized
from fairbus.roster import Role, Roster
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import MESSAGE_TYPES, Message, Receipt, ReceiptEntry

MAX_RECEIPT_BYTES = 64 * 1024
"""A receipt names at most a block's worth of one submitter's transactions."""


class ReceiptError(FairbusError):
    """A receipt that is not a ledger node's signed statement that the envelope committed."""


@dataclass(frozen=True, eq=False)
class Recorded:
    """The wire form: an envelope and the receipt for it, both still unchecked."""

    envelope: SignedEnvelope
    receipt: bytes

    def to_bytes(self) -> bytes:
        env = self.envelope
        inner = {"h": env.header_bytes, "p": env.payload, "s": env.signature}
        return codec.pack({"e": inner, "r": self.receipt})

    @classmethod
    def from_bytes(cls, data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Recorded:
        """Strict framing: one msgpack decode; the header is parsed, nothing verified."""
        outer = codec.unpack(data, limits)
        if not isinstance(outer, dict) or set(outer) != {"e", "r"}:
            raise SchemaError("a recorded message is a map with exactly the keys 'e' and 'r'")
        inner, receipt = outer["e"], outer["r"]
        if not isinstance(inner, dict) or set(inner) != {"h", "p", "s"}:
            raise SchemaError("a recorded message's 'e' is an envelope map ('h', 'p', 's')")
        parts = (inner["h"], inner["p"], inner["s"])
        if not all(isinstance(part, bytes) for part in parts) or not isinstance(receipt, bytes):
            raise SchemaError("a recorded message's envelope fields and receipt must be bytes")
        if len(receipt) > MAX_RECEIPT_BYTES:
            raise SchemaError(f"receipt of {len(receipt)} bytes > {MAX_RECEIPT_BYTES}")
        return cls(envelope.from_parts(*parts, limits), receipt)


@dataclass(frozen=True, eq=False)
class RecordedMessage:
    """A verified envelope and where the ledger committed it: what a machine acts on."""

    verified: Verified
    committed: Committed

    @property
    def message(self) -> Message:
        return self.verified.message

    @property
    def envelope(self) -> SignedEnvelope:
        return self.verified.envelope


def header_only(env: SignedEnvelope) -> bytes:
    """The envelope as a ledger submission: the signed header and signature, no payload
    (the header's SHA-256 of the payload still binds it)."""
    return codec.pack({"h": env.header_bytes, "p": b"", "s": env.signature})


def sign_receipt(
    node: Identity, task: str, height: int, block_hash: bytes, entries: list[ReceiptEntry]
) -> bytes:
    """A ledger node's signed receipt for ``entries`` of the block at ``height`` (receipts
    are not chained: they are statements about the chain, not links in one)."""
    body = Receipt(height, block_hash, tuple(sorted(entries, key=lambda e: e.index)))
    return envelope.sign(node, task, body, prev=GENESIS).to_bytes()


def ledger_submission(env: SignedEnvelope) -> bytes:
    """What a participant submits to the ledger for ``env``: a model-sized one as its
    header (:func:`header_only`; the ledger nodes keep the payload from the bus) unless
    its type is ``SUBMITTED_WHOLE`` (the task's test set), any other whole."""
    kind = env.header.type
    whole = getattr(MESSAGE_TYPES[kind], "SUBMITTED_WHOLE", False)
    return header_only(env) if is_model_sized(kind) and not whole else env.to_bytes()


def check_receipt(
    receipt: bytes, tx_hash: bytes, roster: Roster, limits: WireLimits = DEFAULT_LIMITS
) -> Committed:
    """Where ``tx_hash`` committed, from a receipt signed by a ledger node of ``roster``;
    :class:`ReceiptError` for anything else."""
    try:
        verified = envelope.open_envelope(receipt, roster, limits)
    except FairbusError as exc:
        raise ReceiptError(f"receipt does not verify: {exc}") from None
    body = verified.message
    sender = verified.header.sender
    if not isinstance(body, Receipt) or roster.member(sender).role is not Role.LEDGER:
        raise ReceiptError(f"participant {sender}'s {verified.header.type!r} is not a receipt")
    for entry in body.entries:
        if entry.tx_hash == tx_hash:
            return Committed(tx_hash, body.height, body.block_hash, entry.index)
    raise ReceiptError(f"the receipt does not name transaction {tx_hash.hex()[:16]}")


def open_recorded(
    data: bytes, roster: Roster, limits: WireLimits = DEFAULT_LIMITS
) -> RecordedMessage:
    """Bytes from the bus to a verified message the ledger holds, or a
    :class:`~fairbus.errors.FairbusError`: the receipt is checked first (cheap, and
    nothing unrecorded is verified further), then the envelope's signature and body."""
    recorded = Recorded.from_bytes(data, limits)
    committed = check_receipt(recorded.receipt, recorded.envelope.hash, roster, limits)
    return RecordedMessage(envelope.verify(recorded.envelope, roster, limits), committed)
