"""The ledger in this process: the validation state machine the ledger nodes run, one
block per transaction, for drivers that have no ledger service (``fairbus simulate``,
the detection bench, ``fairbus walkthrough``, the machines' tests).

Nothing is simplified: every transaction is admitted by :class:`~fairbus.ledger.state.Draft`
exactly as a ledger node's writer admits it (refusals included), blocks are built and
linked as the writer builds them, and each commit is answered with a receipt signed by a
ledger node of the roster, which the machines check as they check a networked node's.
Blocks and model-sized payloads go to the sinks given (the CLI writes them to a SQLite
store and a blob store, so ``fairbus audit`` checks a simulated run like a deployed one).
It re-derives every evaluation from the payloads (:mod:`fairbus.ledger.verify`), kept in
memory for the round in progress, unless ``re_derive`` is False: only the machines'
tests turn that off, whose toy models no test set can evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fairbus.envelope import SignedEnvelope
from fairbus.identity import Identity
from fairbus.ledger.recorded import Recorded, sign_receipt
from fairbus.ledger.records import Block, Transaction, is_model_sized
from fairbus.ledger.state import LedgerState, Location, RefusedError
from fairbus.ledger.verify import EvaluationCheck
from fairbus.roster import Role, Roster
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import ReceiptEntry

BlockSink = Callable[[Block], None]
BlobSink = Callable[[bytes, bytes], None]
"""Called with (SHA-256 of the payload, payload) for every model-sized transaction."""


class InProcessLedger:
    """Commit envelopes one by one; :meth:`commit` returns the bytes a participant sends
    on (:class:`~fairbus.ledger.recorded.Recorded`: the envelope with its receipt) or
    raises :class:`~fairbus.ledger.state.RefusedError` and changes nothing."""

    def __init__(
        self,
        roster: Roster,
        node: Identity,
        *,
        on_block: BlockSink | None = None,
        on_blob: BlobSink | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        re_derive: bool = True,
    ) -> None:
        roster.member(node.participant_id, roles=[Role.LEDGER])
        self.node = node
        self._blobs: dict[bytes, bytes] = {}
        self._round_blobs: list[bytes] = []
        check = EvaluationCheck(self._blobs.get, limits) if re_derive else None
        self.state = LedgerState(roster, limits=limits, evaluations=check)
        self.blocks: list[Block] = []
        self._on_block = on_block
        self._on_blob = on_blob
        self._clock = clock

    @property
    def height(self) -> int:
        return self.state.height

    def head(self, sender: int) -> bytes:
        """``sender``'s chain head: what its next transaction must name as ``prev``."""
        return self.state.head(sender)

    def commit(self, env: SignedEnvelope) -> bytes:
        tx = Transaction.from_envelope(env)
        known = self.state.index.get(tx.hash)
        if known is None:
            known = self._append_with_payload(tx, env)
            if is_model_sized(env.header.type) and self._on_blob is not None:
                self._on_blob(env.header.payload_sha256, env.payload)
        block = self.blocks[known.height]
        entry = ReceiptEntry(tx.hash, known.index)
        receipt = sign_receipt(self.node, self.state.roster.task, block.height, block.hash, [entry])
        return Recorded(env, receipt).to_bytes()

    def _append_with_payload(self, tx: Transaction, env: SignedEnvelope) -> Location:
        """Admit ``tx`` with its payload at hand (the evaluation check reads it); an
        upload's payload (a SecCL change's) is dropped once its round is decided (its
        candidates recorded), the rest kept."""
        kind = env.header.type
        digest = env.header.payload_sha256
        held = is_model_sized(kind) and digest not in self._blobs
        if held:
            self._blobs[digest] = env.payload
        try:
            where = self._append(tx)
        except RefusedError:
            if held:
                del self._blobs[digest]
            raise
        if held and kind in ("upload", "seccl_update"):
            self._round_blobs.append(digest)
        if kind in ("decision", "seccl_candidates"):
            for done in self._round_blobs:
                self._blobs.pop(done, None)
            self._round_blobs = []
        return where

    def _append(self, tx: Transaction) -> Location:
        draft = self.state.draft()
        draft.admit(tx)
        block = Block.build(self.state.height + 1, self.state.head_hash, self._clock(), draft.txs)
        self.state.commit(draft, block)
        self.blocks.append(block)
        if self._on_block is not None:
            self._on_block(block)
        return Location(block.height, 0)

    def uploads(self, round: int, attempt: int) -> frozenset[tuple[int, int]]:
        """(group, user) of every upload recorded for ``round``'s ``attempt``."""
        record = self.state.rounds.get(round)
        if record is None or record.attempt != attempt:
            return frozenset()
        return record.uploads
