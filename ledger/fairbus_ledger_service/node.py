"""A ledger node: the state machine of :mod:`fairbus.ledger.state` over a block store.

One node at a time is the *writer*: it batches submissions into blocks and appends them
with a compare-and-swap; a submission's :class:`Committed` outcome (its receipt) is
resolved only after the append returned, never before. The other nodes follow: they
read every new block from the store, re-validate it and raise an alarm on an invalid one.
With etcd, the writer is elected through a lease (:class:`EtcdElection`); with SQLite
the one node is always the writer.

A node keeps a model-sized payload (a masked upload, a global model) in its blob store
only if the ledger has committed its hash already, or if its envelope's signed header
verifies against the roster (a member allowed to send that type, this task, and the bytes
hashing to the signed SHA-256): nothing is written for anything else (issue 14, item 7).
What a verified sender has in the store before a block names it is *parked*, and bounded
per sender (:data:`MAX_PARKED_BLOBS`, :data:`PARKED_MODELS`); a commit naming a payload
releases it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
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
    check_transaction,
)
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus_ledger_service.blobs import BlobError, BlobStore
from fairbus_ledger_service.stores import BlockStore

log = logging.getLogger("fairbus.ledger")

MAX_PARKED_BLOBS = 4
"""Blobs one sender may have parked (stored, not yet named by a committed transaction).
An honest sender has one model-sized payload in flight at a time (its upload for the
current round attempt; the provider its global model) and publishes it on the bus only
once it is committed; four leave room for a new attempt and a follower a few blocks
behind. A payload whose transaction the ledger refuses stays counted (the count is kept
in memory, so until the node restarts): refusals cannot churn a node's disk."""
PAYLOAD_WAIT = 2.0
"""Seconds the writer waits for the payloads a batch is re-derived from (a test set,
uploads, a global model): a participant publishes a model-sized payload on the bus only
once its transaction is committed, and a ledger node takes it from there. Then it refuses
(``missing_payload``) and the provider relays what it holds; below the participants'
ledger timeout (5 s by default), so that the refusal reaches it."""
PARKED_MODELS = 4
"""A sender's parked bytes are bounded by this many of the largest model-sized payload
the wire limits allow (:func:`largest_model_payload`): 4 × (48 MiB + 4 KiB) by default."""
_MODEL_FRAMING = 4096
"""What a model-sized body may add to ``max_model_bytes`` (its msgpack framing), as
:func:`fairbus.wire.messages.decode_body` allows."""


def largest_model_payload(limits: WireLimits) -> int:
    """The largest model-sized payload ``limits`` let a node decode: larger is refused."""
    return limits.max_model_bytes + _MODEL_FRAMING


@dataclass(frozen=True)
class Refused:
    tx_hash: bytes | None
    reason: RefusalReason
    detail: str


Outcome = Committed | Refused


class NotWriterError(FairbusError):
    """This node is not the writer now; submit to the writer, or retry."""


class BlobRefusedError(RefusedError):
    """A model-sized payload this node does not keep, and why; nothing was written. It
    names the transaction, so that a submitter's refusal reaches it."""

    def __init__(self, reason: RefusalReason, detail: str, tx_hash: bytes) -> None:
        super().__init__(reason, detail)
        self.tx_hash = tx_hash


class ParkedBlobsError(BlobRefusedError):
    """The sender already has as many blobs or bytes parked as a node keeps for it."""


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
        max_parked_blobs: int = MAX_PARKED_BLOBS,
        max_parked_bytes: int | None = None,
    ) -> None:
        """``max_parked_blobs`` and ``max_parked_bytes`` bound each sender's parked blobs
        (the bytes default to :data:`PARKED_MODELS` of the largest model ``limits``
        allow)."""
        self.state = state
        self.store = store
        self.blobs = blobs
        self.max_block_txs = max_block_txs
        self.max_block_bytes = max_block_bytes
        self.linger = linger
        self.limits = limits
        self.on_block = on_block
        self.max_parked_blobs = max_parked_blobs
        self.max_parked_bytes = (
            PARKED_MODELS * largest_model_payload(limits)
            if max_parked_bytes is None
            else max_parked_bytes
        )
        self._parked: dict[int, dict[bytes, int]] = {}
        """Sender → payload SHA-256 → size of each blob it has parked."""
        self._parked_lock = threading.Lock()
        """Blobs are parked on the decoder thread (or the service's loop) and released
        on the loop after a commit; the committed check and the parking happen under
        this lock, so a blob committed meanwhile is never left counted."""
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
        store (:meth:`keep_payload`), or raise :class:`BlobRefusedError`."""
        tx = Transaction.from_envelope(env)
        if is_model_sized(env.header.type) and env.payload:
            self.keep_payload(tx, env)
        return tx

    def keep_payload(self, tx: Transaction, env: SignedEnvelope) -> None:
        """Write ``env``'s payload to the blob store if the ledger committed its hash, or
        if ``tx`` (``env`` recorded) verifies against the roster and its sender has room
        to park it; otherwise raise :class:`BlobRefusedError` (a
        :class:`ParkedBlobsError` for a sender past its bound) and write nothing. The
        signature is checked first: one Ed25519 check before hashing the payload."""
        header = env.header
        digest = header.payload_sha256
        if self.blobs is None:
            raise BlobRefusedError(RefusalReason.TOO_LARGE, "this node keeps no blobs", tx.hash)
        largest = largest_model_payload(self.limits)
        if len(env.payload) > largest:
            raise BlobRefusedError(
                RefusalReason.TOO_LARGE,
                f"a {header.type!r} payload of {len(env.payload)} bytes exceeds {largest}",
                tx.hash,
            )
        if digest not in self.state.blob_index:
            try:
                check_transaction(tx, self.state.roster, self.limits)
            except RefusedError as exc:
                raise BlobRefusedError(exc.reason, exc.detail, tx.hash) from None
        if hashlib.sha256(env.payload).digest() != digest:
            raise BlobRefusedError(
                RefusalReason.PAYLOAD_MISMATCH,
                "payload does not match the signed SHA-256; not stored",
                tx.hash,
            )
        parked = self._park(header.sender, digest, len(env.payload), tx.hash)
        try:
            self.blobs.put(digest, env.payload)
        except Exception as exc:
            if parked:
                self._unpark(header.sender, digest)
            if isinstance(exc, BlobError):
                raise BlobRefusedError(RefusalReason.TOO_LARGE, str(exc), tx.hash) from None
            raise

    def parked(self, sender: int) -> tuple[int, int]:
        """How many blobs, and bytes, ``sender`` has parked on this node."""
        with self._parked_lock:
            mine = self._parked.get(sender, {})
            return len(mine), sum(mine.values())

    def _park(self, sender: int, digest: bytes, size: int, tx_hash: bytes) -> bool:
        """Count ``digest`` against ``sender``'s bound; False if it needs no counting (the
        ledger committed it, or the sender parked it already). Raises
        :class:`ParkedBlobsError` when the sender has no room left."""
        with self._parked_lock:
            if digest in self.state.blob_index:
                return False
            mine = self._parked.setdefault(sender, {})
            if digest in mine:
                return False
            count, total = len(mine), sum(mine.values())
            if count >= self.max_parked_blobs or total + size > self.max_parked_bytes:
                if not mine:
                    del self._parked[sender]
                log.warning(
                    "blob %s (%d bytes) from participant %d refused: %d blobs, %d bytes "
                    "already await commit (at most %d, %d bytes)",
                    digest.hex()[:16], size, sender, count, total,
                    self.max_parked_blobs, self.max_parked_bytes,
                )  # fmt: skip
                raise ParkedBlobsError(
                    RefusalReason.TOO_LARGE,
                    f"participant {sender} has {count} blobs ({total} bytes) awaiting "
                    f"commit; a ledger node parks at most {self.max_parked_blobs} blobs, "
                    f"{self.max_parked_bytes} bytes per sender",
                    tx_hash,
                )
            mine[digest] = size
            return True

    def _unpark(self, sender: int, digest: bytes) -> None:
        with self._parked_lock:
            mine = self._parked.get(sender, {})
            mine.pop(digest, None)
            if not mine:
                self._parked.pop(sender, None)

    def _settle(self, block: Block) -> None:
        """The blobs ``block`` names are committed: they count against nobody now."""
        named = {tx.envelope.header.payload_sha256 for tx in block.txs if tx.payload is None}
        if not named:
            return
        with self._parked_lock:
            for sender, mine in list(self._parked.items()):
                for digest in named & mine.keys():
                    del mine[digest]
                if not mine:
                    del self._parked[sender]

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
            tx_hash = error.tx_hash if isinstance(error, BlobRefusedError) else None
            done.set_result(Refused(tx_hash, error.reason, error.detail))
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
        applied = 0
        for data in raw:
            try:
                block = Block.from_bytes(data, self.limits)
                # A follower does not re-derive evaluations: the writer did before it
                # committed them (ledger nodes are crash-fault tolerant, not Byzantine),
                # and doing it here would keep this replica seconds to minutes behind,
                # so that a provider restoring from it would read a stale round.
                # `fairbus audit` re-derives everything from any node's store and blobs.
                self.state.apply_block(block, re_derive=False)
            except (InvalidBlockError, WireError) as exc:
                self.alarm = f"invalid block at height {self.state.height + 1}: {exc}"
                log.error("ALARM: %s", self.alarm)
                return 0
            self._settle(block)
            self._blocks.append(block.hash)
            applied += 1
            if self.on_block is not None:
                await self.on_block(block)
        return applied

    async def _payloads_at_hand(self, txs: Sequence[Transaction]) -> None:
        """Wait (up to :data:`PAYLOAD_WAIT` seconds) until the blob store holds every
        payload admitting ``txs`` reads (admission refuses what is still missing)."""
        needed = self.state.payloads_needed(txs)
        blobs = self.blobs
        deadline = time.monotonic() + PAYLOAD_WAIT
        while blobs is not None and any(d not in blobs for d in needed):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.02)

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
        # Re-deriving an evaluation takes seconds (issue 13): done on a worker thread,
        # so queries and submissions keep being served meanwhile, once the payloads it
        # reads have come over the bus (admission refuses it if they never do).
        txs = [i.tx for i in batch]
        await self._payloads_at_hand(txs)
        await asyncio.to_thread(self.state.prepare_evaluations, txs)
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
        self._settle(block)
        self._blocks.append(block.hash)
        for k, tx in enumerate(block.txs):
            receipt = Committed(tx.hash, block.height, block.hash, k)
            for n, item in enumerate(waiting[tx.hash]):
                item.done.set_result(receipt if n == 0 else replace(receipt, duplicate=True))
        if self.on_block is not None:
            await self.on_block(block)
