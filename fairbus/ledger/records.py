"""What the ledger stores: transactions and hash-chained blocks (docs/architecture.md, "Ledger").

A transaction is a participant's signed envelope as recorded: the signed header bytes,
the signature and — for small messages (announcements, evaluations, decisions, dropouts,
roster changes) — the payload. Model-sized payloads (global models, masked uploads) are
kept out of the log: the signed header already carries their SHA-256, and the blob store
keeps the bytes. A transaction's hash is its envelope's hash, SHA-256 of the signed
header, so the ``prev`` links of every sender's chain are transaction hashes.

A block is ``{height, prev_hash, tx_root, timestamp, txs}``; its hash is SHA-256 of the
canonical msgpack of the header fields, and ``tx_root`` is the Merkle root of its
transaction hashes (Bitcoin-style: pairs hashed up, an odd last node paired with
itself, leaves and inner nodes domain-separated so a leaf cannot pose as a node).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from fairbus import envelope
from fairbus.envelope import SignedEnvelope
from fairbus.errors import SchemaError
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import MESSAGE_TYPES

GENESIS_HASH = bytes(32)
"""``prev_hash`` of block 0."""

MAX_BLOCK_TXS = 4096
MAX_BLOCK_BYTES = 1024 * 1024
"""A block stays under etcd's default request limit (1.5 MiB) with room to spare."""
MAX_INLINE_PAYLOAD = 64 * 1024
"""Largest payload kept in a transaction; etcd refuses requests over 1.5 MiB by default."""

LEDGER_TYPES = frozenset(name for name, cls in MESSAGE_TYPES.items() if cls.RECORDED)
"""Envelope types the ledger records: every message that extends a sender's chain."""


def is_model_sized(msg_type: str) -> bool:
    return bool(getattr(MESSAGE_TYPES[msg_type], "MODEL_SIZED", False))


@dataclass(frozen=True, eq=False)
class Transaction:
    """A signed envelope as the ledger records it (payload only if small)."""

    header_bytes: bytes
    signature: bytes
    payload: bytes | None

    @cached_property
    def envelope(self) -> SignedEnvelope:
        """The header parsed strictly; the payload is empty when it lives in the blob store."""
        return envelope.from_parts(self.header_bytes, self.payload or b"", self.signature)

    @cached_property
    def hash(self) -> bytes:
        return hashlib.sha256(self.header_bytes).digest()

    @property
    def size(self) -> int:
        """About the bytes it takes in a block."""
        return len(self.header_bytes) + len(self.signature) + len(self.payload or b"") + 16

    def to_wire(self) -> dict[str, bytes | None]:
        return {"h": self.header_bytes, "s": self.signature, "p": self.payload}

    def to_bytes(self) -> bytes:
        return codec.pack(self.to_wire())

    @classmethod
    def from_envelope(cls, env: SignedEnvelope) -> Transaction:
        """Record ``env``: its payload inline unless the type is model-sized."""
        inline = None if is_model_sized(env.header.type) else env.payload
        tx = cls(env.header_bytes, env.signature, inline)
        if inline is not None:
            tx.__dict__["envelope"] = env  # already parsed: do not parse twice
        return tx

    @classmethod
    def from_wire(cls, obj: object) -> Transaction:
        if not isinstance(obj, dict) or set(obj) != {"h", "s", "p"}:
            raise SchemaError("a transaction is a map with exactly the keys 'h', 's' and 'p'")
        header, signature, payload = obj["h"], obj["s"], obj["p"]
        if not isinstance(header, bytes) or not isinstance(signature, bytes):
            raise SchemaError("transaction fields 'h' and 's' must be bytes")
        if payload is not None and not isinstance(payload, bytes):
            raise SchemaError("transaction field 'p' must be bytes or nil")
        if payload is not None and len(payload) > MAX_INLINE_PAYLOAD:
            raise SchemaError(f"inline payload of {len(payload)} bytes > {MAX_INLINE_PAYLOAD}")
        tx = cls(header, signature, payload)
        tx.envelope  # noqa: B018 — parse now so a bad header is refused here
        return tx

    @classmethod
    def from_bytes(cls, data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Transaction:
        return cls.from_wire(codec.unpack(data, limits))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Merkle root of transaction hashes; SHA-256 of nothing for an empty block."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [
            hashlib.sha256(b"\x01" + level[k] + level[k + 1]).digest()
            for k in range(0, len(level), 2)
        ]
    return level[0]


@dataclass(frozen=True, eq=False)
class Block:
    height: int
    prev_hash: bytes
    tx_root: bytes
    timestamp: float
    txs: tuple[Transaction, ...]

    @classmethod
    def build(
        cls, height: int, prev_hash: bytes, timestamp: float, txs: Sequence[Transaction]
    ) -> Block:
        return cls(height, prev_hash, merkle_root([t.hash for t in txs]), timestamp, tuple(txs))

    def header_wire(self) -> dict[str, object]:
        return {
            "height": self.height,
            "prev_hash": self.prev_hash,
            "tx_root": self.tx_root,
            "n_tx": len(self.txs),
            "timestamp": self.timestamp,
        }

    @cached_property
    def hash(self) -> bytes:
        return hashlib.sha256(codec.pack(self.header_wire())).digest()

    def to_bytes(self) -> bytes:
        return codec.pack({**self.header_wire(), "txs": [t.to_wire() for t in self.txs]})

    @classmethod
    def from_bytes(cls, data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Block:
        """Decode strictly. Checks the shape only; :func:`check_links` checks the hashes."""
        obj = codec.unpack(data, limits)
        keys = {"height", "prev_hash", "tx_root", "n_tx", "timestamp", "txs"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise SchemaError(f"a block is a map with exactly the keys {sorted(keys)}")
        height, n_tx, txs = obj["height"], obj["n_tx"], obj["txs"]
        prev, root, ts = obj["prev_hash"], obj["tx_root"], obj["timestamp"]
        if not (isinstance(height, int) and not isinstance(height, bool) and height >= 0):
            raise SchemaError(f"block height must be an integer >= 0, got {height!r}")
        for name, value in (("prev_hash", prev), ("tx_root", root)):
            if not (isinstance(value, bytes) and len(value) == 32):
                raise SchemaError(f"block {name} must be 32 bytes")
        if not isinstance(ts, float):
            raise SchemaError("block timestamp must be a float")
        if not isinstance(txs, list) or len(txs) > MAX_BLOCK_TXS:
            raise SchemaError(f"block txs must be a list of at most {MAX_BLOCK_TXS}")
        if n_tx != len(txs):
            raise SchemaError(f"block says {n_tx!r} transactions but holds {len(txs)}")
        return cls(height, prev, root, ts, tuple(Transaction.from_wire(t) for t in txs))


def check_links(block: Block, prev: Block | None) -> str | None:
    """What is wrong with ``block`` as the successor of ``prev`` (None for block 0), or None."""
    want_height = 0 if prev is None else prev.height + 1
    want_prev = GENESIS_HASH if prev is None else prev.hash
    if block.height != want_height:
        return f"block at height {block.height}, expected {want_height}"
    if block.prev_hash != want_prev:
        return f"block {block.height}: prev_hash does not match block {want_height - 1}'s hash"
    if merkle_root([t.hash for t in block.txs]) != block.tx_root:
        return f"block {block.height}: transaction root does not match its transactions"
    return None


@dataclass(frozen=True)
class Committed:
    """The receipt: where the transaction is, in a block the store has committed."""

    tx_hash: bytes
    height: int
    block_hash: bytes
    index: int
    duplicate: bool = False
