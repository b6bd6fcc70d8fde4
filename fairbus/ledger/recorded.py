"""An envelope together with the ledger receipt that proves it was committed.

What travels on the bus for every ledger transaction a participant broadcasts (the
provider's global model, announcement, dropout, evaluation and decision; a user's masked
upload): ``{"e": <signed envelope, payload included>, "r": <a ledger node's signed
Receipt listing the envelope's hash>}``. A receiver acts on the envelope only once the
receipt checks out (:func:`check_receipt`), so it acts only on what the ledger holds:
users never act on an announcement the ledger has not recorded (no equivocation, since
the ledger takes one announcement per round and attempt), and the provider never
aggregates an upload the ledger has not recorded. The ledger itself records a
model-sized envelope without its payload (:func:`header_only`); its nodes keep the
payload from the bus in their blob stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairbus import envelope
from fairbus.errors import FairbusError, SchemaError
from fairbus.ledger.records import Committed
from fairbus.roster import Role, Roster
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import Receipt

MAX_RECEIPT_BYTES = 64 * 1024
"""A receipt names at most a block's worth of one submitter's transactions."""


class ReceiptError(FairbusError):
    """A receipt that is not a ledger node's signed statement that the envelope committed."""


@dataclass(frozen=True, eq=False)
class Recorded:
    envelope: bytes
    receipt: bytes

    def to_bytes(self) -> bytes:
        return codec.pack({"e": self.envelope, "r": self.receipt})

    @classmethod
    def from_bytes(cls, data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Recorded:
        outer = codec.unpack(data, limits)
        if not isinstance(outer, dict) or set(outer) != {"e", "r"}:
            raise SchemaError("a recorded message is a map with exactly the keys 'e' and 'r'")
        env, receipt = outer["e"], outer["r"]
        if not isinstance(env, bytes) or not isinstance(receipt, bytes):
            raise SchemaError("recorded message fields 'e' and 'r' must be bytes")
        if len(receipt) > MAX_RECEIPT_BYTES:
            raise SchemaError(f"receipt of {len(receipt)} bytes > {MAX_RECEIPT_BYTES}")
        return cls(env, receipt)


def header_only(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """The envelope as a ledger submission: the signed header and signature, no payload
    (the header's SHA-256 of the payload still binds it)."""
    env = envelope.parse(data, limits)
    return codec.pack({"h": env.header_bytes, "p": b"", "s": env.signature})


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
) -> tuple[bytes, Committed]:
    """The envelope of a recorded message whose receipt checks out, and where it is.
    The envelope itself is verified by whoever acts on it."""
    recorded = Recorded.from_bytes(data, limits)
    tx_hash = envelope.parse(recorded.envelope, limits).hash
    return recorded.envelope, check_receipt(recorded.receipt, tx_hash, roster, limits)
