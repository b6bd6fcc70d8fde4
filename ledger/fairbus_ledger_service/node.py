"""A ledger node: the state machine of :mod:`fairbus.ledger.state` over a block store.

One node at a time is the *writer*: it batches submissions into blocks and appends them
with a compare-and-swap; a submission's :class:`Committed` outcome (its receipt) is
resolved only after the append returned, never before. The other nodes follow: they
read every new block from the store, re-validate it and raise an alarm on an invalid one.
With etcd, the writer is elected through a lease (:class:`EtcdElection`); with SQLite
the one node is always the writer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from fairbus.envelope import SignedEnvelope
from fairbus.errors import FairbusError, SizeError, WireError
from fairbus.ledger.records import MAX_BLOCK_BYTES, Block, Committed, Transaction, is_model_sized
from fairbus.ledger.state import (
    InvalidBlockError,
    LedgerState,
    Location,
    RefusalReason,
    RefusedError,
)
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus_ledger_service.blobs import BlobError, BlobStore
from fairbus_ledger_service.stores import BlockStore

log = logging.getLogger("fairbus.ledger")


@dataclass(frozen=True)
class Refused:
    tx_hash: bytes | None
    reason: RefusalReason
    detail: str


Outcome = Committed | Refused


class NotWriterError(FairbusError):
    """This node is not the writer now; submit to the writer, or retry."""


@dataclass
class _Pending:
    tx: Transaction
    done: asyncio.Future[Outcome]


class LedgerNode:
    """Validation, batching and commit for one node; I/O only through ``store``."""

    def __init__(
        self,
        state: LedgerState,
        store: BlockStore,
        blobs: BlobStore | None = None,
        *,
        max_block_txs: int = 2048,
        max_block_bytes: int = MAX_BLOCK_BYTES,
        linger: float = 0.002,
        limits: WireLimits = DEFAULT_LIMITS,
        on_block: Callable[[Block], Awaitable[None]] | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.blobs = blobs
        self.max_block_txs = max_block_txs
        self.max_block_bytes = max_block_bytes
        self.linger = linger
        self.limits = limits
        self.on_block = on_block
        self.fence: bytes | None = None
        self.is_writer = False
        self.alarm: str | None = None
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: collections.deque[_Pending] = collections.deque()
        self._blocks: list[bytes] = []  # block hashes by height, for receipts of duplicates
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, "ledger-decode")
        """Submissions are decoded (and their blobs written) here, off the event loop, so
        a large or deep payload never stalls the writer (issue 12, item 4). One thread:
        decoded in arrival order, so a sender's chain stays in order."""

    # --- submissions -----------------------------------------------------------------------

    def transaction_of(self, data: bytes) -> Transaction:
        """Decode a submitted envelope; keep a model-sized payload in the blob store."""
        from fairbus import envelope

        try:
            env: SignedEnvelope = envelope.parse(data, self.limits)
        except WireError as exc:
            reason = (
                RefusalReason.TOO_LARGE if isinstance(exc, SizeError) else RefusalReason.MALFORMED
            )
            raise RefusedError(reason, str(exc)) from None
        return self.transaction_of_envelope(env)

    def transaction_of_envelope(self, env: SignedEnvelope) -> Transaction:
        """The transaction of a parsed envelope; keep a model-sized payload in the blob
        store (checked against the signed header's SHA-256)."""
        tx = Transaction.from_envelope(env)
        if is_model_sized(env.header.type) and env.payload:
            if self.blobs is None:
                raise RefusedError(RefusalReason.TOO_LARGE, "this node keeps no blobs")
            try:
                self.blobs.put(env.header.payload_sha256, env.payload)
            except BlobError as exc:
                raise RefusedError(RefusalReason.PAYLOAD_MISMATCH, str(exc)) from None
        return tx

    async def submit(self, data: bytes) -> Outcome:
        """Validate and commit one envelope; resolves after the block is in the store."""
        return await self.submit_nowait(data)

    def submit_nowait(self, data: bytes) -> asyncio.Future[Outcome]:
        """:meth:`submit` without a coroutine per submission: a future that resolves
        with the outcome (as soon as it is decoded for a refusal or a duplicate). The
        envelope is decoded on the decoder thread; submissions keep their order."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()
        decoding = loop.run_in_executor(self._decoder, self.transaction_of, data)
        decoding.add_done_callback(lambda decoded: self._decoded(decoded, done))
        return done

    def _decoded(self, decoded: asyncio.Future[Transaction], done: asyncio.Future[Outcome]) -> None:
        if done.cancelled():
            return
        error = decoded.exception()
        if isinstance(error, RefusedError):
            done.set_result(Refused(None, error.reason, error.detail))
            return
        if error is not None:
            done.set_exception(error)
            return
        tx = decoded.result()
        known = self.state.index.get(tx.hash)
        if known is not None:
            done.set_result(self._receipt(tx.hash, known, duplicate=True))
        elif not self.is_writer:
            done.set_exception(NotWriterError("this ledger node is not the writer"))
        else:
            self._queue.put_nowait(_Pending(tx, done))

    def close(self) -> None:
        """Stop the decoder thread (after the submissions it holds)."""
        self._decoder.shutdown(wait=True, cancel_futures=True)

    def _receipt(self, tx_hash: bytes, where: Location, duplicate: bool = False) -> Committed:
        return Committed(
            tx_hash, where.height, self._block_hash(where.height), where.index, duplicate
        )

    def _block_hash(self, height: int) -> bytes:
        if height == self.state.height and self.state.last_block is not None:
            return self.state.last_block.hash
        return self._blocks[height]

    # --- following -------------------------------------------------------------------------

    async def sync(self) -> int:
        """Apply every block the store has beyond ours; returns how many. An invalid
        block sets :attr:`alarm` and stops the node from applying anything further."""
        if self.alarm:
            return 0
        raw = await self.store.read(self.state.height + 1)
        for data in raw:
            try:
                block = Block.from_bytes(data, self.limits)
                self.state.apply_block(block)
            except (InvalidBlockError, WireError) as exc:
                self.alarm = f"invalid block at height {self.state.height + 1}: {exc}"
                log.error("ALARM: %s", self.alarm)
                return 0
            self._blocks.append(block.hash)
            if self.on_block is not None:
                await self.on_block(block)
        return len(raw)

    # --- writing ---------------------------------------------------------------------------

    async def _next_batch(self) -> list[_Pending]:
        """Up to ``max_block_txs`` submissions and ``max_block_bytes``, in arrival order;
        what was put back (a failed commit) comes first."""
        first = self._carry.popleft() if self._carry else await self._queue.get()
        if self.linger:
            await asyncio.sleep(self.linger)
        batch, size = [first], first.tx.size
        while len(batch) < self.max_block_txs and (self._carry or not self._queue.empty()):
            item = self._carry.popleft() if self._carry else self._queue.get_nowait()
            if size + item.tx.size > self.max_block_bytes:
                self._carry.appendleft(item)
                break
            batch.append(item)
            size += item.tx.size
        return batch

    def _put_back(self, items: list[_Pending]) -> None:
        """Retry ``items`` first, in their order (a sender's chain must stay in order)."""
        self._carry.extendleft(reversed([i for i in items if not i.done.done()]))

    async def write_loop(self) -> None:
        """Commit queued submissions in blocks while this node is the writer."""
        while True:
            batch = await self._next_batch()
            try:
                await self._commit(batch)
            except Exception as exc:  # the store failed: retry after catching up
                log.warning("commit failed (%s); retrying", exc)
                self._put_back(batch)
                await asyncio.sleep(0.05)
                with contextlib.suppress(Exception):
                    await self.sync()

    async def _commit(self, batch: list[_Pending]) -> None:
        if not self.is_writer:
            for item in batch:
                item.done.set_exception(NotWriterError("this node stopped being the writer"))
            return
        draft = self.state.draft()
        waiting: dict[bytes, list[_Pending]] = {}
        for item in batch:
            tx = item.tx
            known = draft.location(tx.hash)
            if known is not None and known.height >= 0:
                item.done.set_result(self._receipt(tx.hash, known, duplicate=True))
                continue
            if known is not None:  # twice in this batch: one receipt for both
                waiting[tx.hash].append(item)
                continue
            try:
                draft.admit(tx)
            except RefusedError as exc:
                item.done.set_result(Refused(tx.hash, exc.reason, exc.detail))
                continue
            waiting[tx.hash] = [item]
        if not draft.txs:
            return
        block = Block.build(self.state.height + 1, self.state.head_hash, time.time(), draft.txs)
        if not await self.store.append(block, self.fence):
            # Another writer got there first (or our fence is gone): catch up and retry.
            await self.sync()
            self._put_back(batch)
            return
        self.state.commit(draft, block)
        self._blocks.append(block.hash)
        for k, tx in enumerate(block.txs):
            receipt = Committed(tx.hash, block.height, block.hash, k)
            for n, item in enumerate(waiting[tx.hash]):
                item.done.set_result(receipt if n == 0 else replace(receipt, duplicate=True))
        if self.on_block is not None:
            await self.on_block(block)
