"""``fairbus ledger verify`` and ``fairbus audit``: re-check a ledger from its blocks.

``verify`` re-checks what makes the record tamper-evident: every block's height and link
to the block before, its transaction root, and every transaction's signature, payload
hash and ``prev`` link (roster changes applied as they come). ``audit`` replays the
blocks through the ledger's own state machine (:mod:`fairbus.ledger.state`), which does all of
that and also re-derives every detection decision (Algorithm 6) with the parameters the
task start recorded, and checks the blobs.
Both stop at, and name, the first bad record.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from fairbus.errors import FairbusError, WireError
from fairbus.ledger.records import GENESIS_HASH, Block, check_links
from fairbus.ledger.state import InvalidBlockError, LedgerState, RefusedError, check_transaction
from fairbus.ledger.verify import EvaluationCheck
from fairbus.roster import Roster
from fairbus.task import TaskParams
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import Dropout, RosterChange, decode_body
from fairbus_ledger_service.blobs import BlobError, BlobStore

MAX_EXPORT_BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class Report:
    blocks: int
    transactions: int
    problem: str | None = None
    """The first bad record, named by block height (and transaction index)."""
    notes: tuple[str, ...] = ()
    """What is allowed but worth knowing (uploads of dropped users with no blob)."""
    task: TaskParams | None = None
    """The task's parameters as its task start recorded them (``audit`` only; None if the
    ledger holds no task start yet): what every decision was re-derived with."""

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(raw_blocks: Iterable[bytes], roster: Roster) -> Report:
    """Hashes, links, Merkle roots, signatures and chains of every block."""
    prev: Block | None = None
    heads: dict[int, bytes] = {}
    n_blocks = n_txs = 0
    for height, data in enumerate(raw_blocks):
        try:
            block = Block.from_bytes(data)
        except WireError as exc:
            return Report(n_blocks, n_txs, f"block {height}: cannot be decoded: {exc}")
        problem = check_links(block, prev)
        if problem:
            return Report(n_blocks, n_txs, problem)
        for k, tx in enumerate(block.txs):
            where = f"block {block.height}, transaction {k} ({tx.hash.hex()[:16]})"
            try:
                body = check_transaction(tx, roster)
            except RefusedError as exc:
                return Report(n_blocks, n_txs, f"{where}: {exc}")
            header = tx.envelope.header
            if header.prev != heads.get(header.sender, GENESIS_HASH):
                return Report(n_blocks, n_txs, f"{where}: prev does not link to the sender's chain")
            heads[header.sender] = tx.hash
            if isinstance(body, RosterChange):
                try:
                    roster = Roster.from_toml(body.roster_toml)
                except FairbusError as exc:
                    return Report(n_blocks, n_txs, f"{where}: {exc}")
            n_txs += 1
        prev = block
        n_blocks += 1
    return Report(n_blocks, n_txs)


def audit(
    raw_blocks: Iterable[bytes],
    roster: Roster,
    blobs: BlobStore | None = None,
) -> Report:
    """:func:`verify`, plus every rule of the state machine and every decision re-derived
    (Algorithm 6, with the parameters of the task's ``task_start`` transaction), plus every
    model-sized payload present and intact in ``blobs``."""
    raw = list(raw_blocks)
    first = verify(raw, roster)
    if not first.ok:
        return first
    # With the blobs, every evaluation is re-derived from the recorded uploads and the
    # committed test set (issue 13); without them only what the blocks hold is checked.
    check = EvaluationCheck(blobs.find) if blobs is not None else None
    state = LedgerState(roster, evaluations=check)
    n_txs = 0
    missing: list[tuple[str, tuple[int | None, int | None], int]] = []
    dropped: set[tuple[int | None, int | None, int]] = set()
    for height, data in enumerate(raw):
        block = Block.from_bytes(data)
        try:
            state.apply_block(block)
        except InvalidBlockError as exc:
            return Report(height, n_txs, str(exc))
        for k, tx in enumerate(block.txs):
            header = tx.envelope.header
            scope = (header.round, header.attempt)
            if header.type == "dropout":
                body = decode_body("dropout", tx.payload or b"", DEFAULT_LIMITS)
                assert isinstance(body, Dropout)
                dropped |= {(*scope, user) for user in body.users}
            if blobs is not None and tx.payload is None:
                try:
                    blobs.get(header.payload_sha256)
                except BlobError as exc:
                    where = f"block {height}, transaction {k}: {exc}"
                    missing.append((where, scope, header.sender))
        n_txs += len(block.txs)
    # A user that died between recording its upload and publishing it leaves a hash with
    # no payload anywhere: allowed when a dropout of that attempt names it.
    notes = []
    for where, scope, sender in missing:
        if (*scope, sender) not in dropped:
            return Report(len(raw), n_txs, where)
        notes.append(f"{where} (from user {sender}, who dropped out of that attempt)")
    return Report(len(raw), n_txs, notes=tuple(notes), task=state.task)


def write_export(path: Path, raw_blocks: Iterable[bytes]) -> int:
    """Write blocks to ``path`` as a stream of msgpack bin records; returns the count."""
    count = 0
    with open(path, "wb") as f:
        for data in raw_blocks:
            f.write(msgpack.packb(data, use_bin_type=True))
            count += 1
    return count


def read_export(path: Path) -> Iterator[bytes]:
    """The blocks of an export file, strictly (anything but bin records is an error)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=True, max_bin_len=MAX_EXPORT_BLOCK, max_str_len=0)
        k = 0
        for k, record in enumerate(unpacker):
            if not isinstance(record, bytes):
                raise WireError(f"export record {k} is not a block")
            yield record
        if unpacker.tell() != size:
            raise WireError(f"export {path} is truncated after record {k}")
