"""Submitting to the ledger over the bus and waiting for the receipt.

A submitter publishes its signed envelope on its own ``…/ledger/submit`` topic and waits
for a signed :class:`~fairbus.wire.messages.Receipt` (sent only after commit) or a
:class:`~fairbus.wire.messages.Refusal`. With no answer in ``timeout`` it submits again
(until ``retries`` times the timeout, or the patience, has passed): the ledger answers a
duplicate with the first receipt, so a retry never commits twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from typing import Protocol, TypeVar

import aiomqtt

from fairbus import envelope, topics
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.identity import Identity
from fairbus.ledger.records import Committed
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.roster import Role, Roster
from fairbus.wire.messages import Query, QueryResponse, Receipt, Refusal
from fairbus_ledger_service.blobs import BlobError

T = TypeVar("T")


HEIGHT_BYTES = 8


def encode_height(height: int) -> bytes:
    """A ``height`` query's first record: the last block's height, signed big-endian
    (-1 for an empty ledger); the second record is that block's hash."""
    return height.to_bytes(HEIGHT_BYTES, "big", signed=True)


class LedgerTimeoutError(FairbusError):
    """No ledger node answered in time (after every retry)."""


class Publisher(Protocol):
    """What the client needs of a connection: an aiomqtt client, or a runtime's
    reconnecting bus."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None: ...


class LedgerClient:
    """Submits and queries over ``mqtt``.

    Standalone (``async with LedgerClient(aiomqtt_client, …)``) it subscribes to
    :attr:`topics` and owns the client's message loop. Inside a runtime that routes
    messages itself, subscribe to :attr:`topics` and hand each message to
    :meth:`dispatch`.
    """

    def __init__(
        self,
        mqtt: Publisher,
        identity: Identity,
        roster: Roster,
        role: str,
        *,
        timeout: float = 5.0,
        retries: int = 5,
    ) -> None:
        self.mqtt = mqtt
        self.identity = identity
        self.roster = roster
        self.role = role
        self.timeout = timeout
        self.retries = retries
        self.task = roster.task
        self.pid = identity.participant_id
        self._waiting: dict[bytes, asyncio.Future[tuple[Committed, bytes] | Refusal]] = {}
        self._queries: dict[int, asyncio.Future[QueryResponse]] = {}
        self._qids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None

    @property
    def topics(self) -> list[str]:
        """Receipts and query responses for this participant, from any ledger node."""
        return [
            topics.ledger_receipt(self.task, "+", self.pid),
            topics.ledger_response(self.task, "+", self.pid),
        ]

    async def __aenter__(self) -> LedgerClient:
        if not isinstance(self.mqtt, aiomqtt.Client):
            raise TypeError("standalone use needs an aiomqtt client; otherwise call dispatch()")
        for topic in self.topics:
            await self.mqtt.subscribe(topic, qos=topics.QOS)
        self._reader = asyncio.create_task(self._read(self.mqtt))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self, mqtt: aiomqtt.Client) -> None:
        async for message in mqtt.messages:
            if isinstance(message.payload, bytes | bytearray):
                self.dispatch(bytes(message.payload))

    def dispatch(self, data: bytes) -> None:
        """A message that arrived on one of :attr:`topics`."""
        try:
            verified = envelope.open_envelope(data, self.roster)
        except FairbusError:
            return  # not signed by a participant of the roster: ignore
        if self.roster.member(verified.header.sender).role is not Role.LEDGER:
            return
        body = verified.message
        if isinstance(body, Receipt):
            for entry in body.entries:
                committed = Committed(entry.tx_hash, body.height, body.block_hash, entry.index)
                self._resolve(self._waiting.get(entry.tx_hash), (committed, data))
        elif isinstance(body, Refusal):
            self._resolve(self._waiting.get(body.ref), body)
        elif isinstance(body, QueryResponse):
            self._resolve(self._queries.get(body.qid), body)

    @staticmethod
    def _resolve(future: asyncio.Future[T] | None, value: T) -> None:
        if future is not None and not future.done():
            future.set_result(value)

    async def submit(self, data: bytes) -> Committed:
        """Commit one signed envelope; where it is (from a signed receipt), or
        :class:`RefusedError`."""
        committed, _ = await self.submit_for_receipt(data)
        return committed

    async def submit_for_receipt(
        self, data: bytes, patience: float | None = None
    ) -> tuple[Committed, bytes]:
        """:meth:`submit`, also returning the signed receipt (to pass on with the
        envelope, :mod:`fairbus.ledger.recorded`). It is sent again every ``timeout``
        until ``retries`` times the larger of ``timeout`` and ``patience`` has passed;
        ``patience`` is for a transaction the ledger re-derives at length (an
        evaluation). Resending within the patience matters: a submission lost with a
        ledger writer that died must not wait it out before the new writer sees it (a
        duplicate costs the ledger a lookup, and an evaluation's numbers are cached)."""
        tx_hash = hashlib.sha256(envelope.parse(data).header_bytes).digest()
        loop = asyncio.get_running_loop()
        future = self._waiting.setdefault(tx_hash, loop.create_future())
        topic = topics.ledger_submit(self.task, self.role, self.pid)
        deadline = loop.time() + self.retries * max(self.timeout, patience or 0.0)
        try:
            while True:
                await self.mqtt.publish(topic, data, qos=topics.QOS)
                wait = min(self.timeout, max(deadline - loop.time(), 0.0))
                try:
                    answer = await asyncio.wait_for(asyncio.shield(future), wait)
                except TimeoutError:
                    if loop.time() >= deadline:
                        break
                    continue
                if isinstance(answer, Refusal):
                    raise RefusedError(RefusalReason(answer.reason), answer.detail)
                return answer
        finally:
            self._waiting.pop(tx_hash, None)
        raise LedgerTimeoutError(f"no ledger receipt for {tx_hash.hex()[:16]}")

    async def query(self, kind: str, **key: object) -> QueryResponse:
        qid = next(self._qids)
        query = Query(qid, kind, key.get("tx_hash"), key.get("sender"), key.get("round"))  # type: ignore[arg-type]
        future = self._queries.setdefault(qid, asyncio.get_running_loop().create_future())
        signed = envelope.sign(self.identity, self.task, query, prev=GENESIS)
        try:
            await self.mqtt.publish(
                topics.ledger_query(self.task, self.role, self.pid),
                signed.to_bytes(),
                qos=topics.QOS,
            )
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise LedgerTimeoutError(f"no answer to {kind!r} query") from None
        finally:
            self._queries.pop(qid, None)

    async def height(self) -> tuple[int, bytes]:
        """The height of the ledger's last block (-1: none) and that block's hash, as the
        first ledger node to answer has it."""
        response = await self.query("height")
        if not response.ok or len(response.records) != 2:
            why = response.error or "no records"
            raise FairbusError(f"the ledger did not tell its height: {why}")
        raw, head = response.records
        if len(raw) != HEIGHT_BYTES:
            raise FairbusError("the ledger's height answer is malformed")
        return int.from_bytes(raw, "big", signed=True), head

    async def blob(self, digest: bytes) -> bytes:
        """A model-sized payload by its SHA-256, from any ledger node, checked."""
        response = await self.query("blob", tx_hash=digest)
        data = b"".join(response.records)
        if not response.ok or hashlib.sha256(data).digest() != digest:
            raise BlobError(response.error or f"blob {digest.hex()[:16]} does not match its hash")
        return data
