"""``fairbus ledger --node N``: a ledger node on the bus (the MQTT front).

Every node subscribes to submissions (``fairbus/<task>/+/+/ledger/submit``) and keeps the
blobs of model-sized payloads it sees; only the writer commits, and it sends the receipt
(``fairbus/<task>/ledger/<node>/receipt/<sender>``) only after the block is in the store,
then the block header (``…/<node>/block``). A refusal goes back at once with its reason.
Every node answers queries (a transaction by hash, a sender's head, a round's records) on
``…/<node>/response/<asker>``; askers take the first answer. Followers poll the store's
head, re-validate each new block and raise an alarm (log and stop applying) on an
invalid one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import aiomqtt

from fairbus import bus, envelope
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.identity import Identity
from fairbus.roster import Role, Roster
from fairbus.wire.messages import (
    BlockHeader,
    Message,
    Query,
    QueryResponse,
    Receipt,
    Refusal,
)
from ledger.blobs import BlobStore
from ledger.config import LedgerConfig
from ledger.election import EtcdElection, lead_when_elected
from ledger.node import Committed, LedgerNode, NotWriterError, Outcome
from ledger.records import Block
from ledger.state import LedgerState, RefusalReason
from ledger.stores import BlockStore, EtcdStore, SqliteStore

log = logging.getLogger("fairbus.ledger")

FOLLOW_INTERVAL = 0.05


class LedgerService:
    def __init__(self, config: LedgerConfig, node_id: int) -> None:
        self.config = config
        self.node_id = node_id
        self.roster = Roster.load(config.roster)
        self.roster.member(node_id, roles=[Role.LEDGER])
        self.identity = Identity.load(config.keys, node_id)
        self.task = self.roster.task
        self.mqtt: aiomqtt.Client | None = None
        self.node: LedgerNode | None = None

    # --- store -------------------------------------------------------------------------------

    async def _open_store(self) -> BlockStore:
        if self.config.store == "sqlite":
            return SqliteStore(self.config.sqlite)
        return await EtcdStore.connect(list(self.config.etcd), self.task)

    async def run(self) -> None:
        store = await self._open_store()
        node = LedgerNode(
            LedgerState(self.roster, self.config.detection),
            store,
            BlobStore(self.config.blobs),
            max_block_txs=self.config.max_block_txs,
            linger=self.config.linger_ms / 1000,
            on_block=self._published_block,
        )
        self.node = node
        await node.sync()
        log.info("ledger node %d: %s store at height %d", self.node_id, self.config.store,
                 node.state.height)  # fmt: skip
        host, port = self.config.broker
        async with bus.client(host, port, f"ledger-{self.node_id}") as mqtt:
            self.mqtt = mqtt
            await mqtt.subscribe(f"fairbus/{self.task}/+/+/ledger/submit", qos=bus.QOS)
            await mqtt.subscribe(f"fairbus/{self.task}/+/+/ledger/query", qos=bus.QOS)
            log.info("ledger node %d: on the bus at %s:%d", self.node_id, host, port)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(node.write_loop())
                tasks.create_task(self._follow())
                if isinstance(store, EtcdStore):
                    tasks.create_task(self._elect(store))
                else:
                    node.is_writer = True
                async for message in mqtt.messages:
                    if isinstance(message.payload, bytes | bytearray):
                        tasks.create_task(
                            self._on_message(str(message.topic), bytes(message.payload))
                        )

    async def _elect(self, store: EtcdStore) -> None:
        assert self.node is not None
        node = self.node
        election = EtcdElection(store, self.node_id, self.config.lease_ttl)

        async def elected() -> None:
            await node.sync()
            node.fence = election.value
            node.is_writer = True
            log.info("ledger node %d is the writer (height %d)", self.node_id, node.state.height)

        async def deposed() -> None:
            node.is_writer = False
            node.fence = None
            log.warning("ledger node %d is no longer the writer", self.node_id)

        await lead_when_elected(election, elected, deposed)

    async def _follow(self) -> None:
        assert self.node is not None
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            if self.node.is_writer:
                continue
            try:
                await self.node.sync()
            except Exception as exc:  # the store is unreachable for now; keep trying
                log.warning("follow: %s", exc)
                await asyncio.sleep(0.5)

    # --- the front -----------------------------------------------------------------------------

    async def _on_message(self, topic: str, data: bytes) -> None:
        asker = bus.sender_of(topic)
        if asker is None:
            return
        if topic.endswith("/ledger/query"):
            await self._on_query(asker[1], data)
            return
        await self._on_submit(asker[1], data)

    async def _on_submit(self, asker: int, data: bytes) -> None:
        assert self.node is not None
        if not self.node.is_writer:
            # Keep the blob (filled from the bus) but let the writer answer.
            with contextlib.suppress(FairbusError):
                self.node.transaction_of(data)
            return
        try:
            outcome = await self.node.submit(data)
        except NotWriterError:
            return
        await self._answer(asker, data, outcome)

    async def _answer(self, asker: int, data: bytes, outcome: Outcome) -> None:
        message: Message
        if isinstance(outcome, Committed):
            message = Receipt(outcome.tx_hash, outcome.height, outcome.block_hash, outcome.index)
        else:
            ref = outcome.tx_hash or hashlib.sha256(data).digest()
            message = Refusal(ref, outcome.reason.value, outcome.detail[:4000])
        await self._publish(bus.ledger_receipt(self.task, self.node_id, asker), message)

    async def _on_query(self, asker: int, data: bytes) -> None:
        assert self.node is not None
        try:
            verified = envelope.open_envelope(data, self.roster)
        except FairbusError as exc:
            log.info("query from %d refused: %s", asker, exc)
            return
        query = verified.message
        if not isinstance(query, Query) or verified.header.sender != asker:
            return
        records, error = await self._records(query)
        response = QueryResponse(query.qid, not error, error, tuple(records))
        await self._publish(bus.ledger_response(self.task, self.node_id, asker), response)

    async def _records(self, query: Query) -> tuple[list[bytes], str]:
        assert self.node is not None
        state = self.node.state
        if query.kind == "head":
            assert query.sender is not None
            return [state.head(query.sender)], ""
        if query.kind == "tx":
            assert query.tx_hash is not None
            where = state.index.get(query.tx_hash)
            if where is None:
                return [], "no such transaction"
            block = Block.from_bytes(
                (await self.node.store.read(where.height, where.height + 1))[0]
            )
            return [block.txs[where.index].to_bytes()], ""
        assert query.round is not None
        wanted = state.round_index.get(query.round, set())
        out: list[bytes] = []
        for height in sorted({state.index[h].height for h in wanted}):
            block = Block.from_bytes((await self.node.store.read(height, height + 1))[0])
            out += [t.to_bytes() for t in block.txs if t.hash in wanted]
        return out, ""

    async def _published_block(self, block: Block) -> None:
        if self.mqtt is None or self.node is None or not self.node.is_writer:
            return
        header = BlockHeader(block.height, block.prev_hash, block.tx_root, len(block.txs),
                             block.timestamp)  # fmt: skip
        await self._publish(bus.ledger_block(self.task, self.node_id), header)

    async def _publish(self, topic: str, message: Message) -> None:
        assert self.mqtt is not None
        signed = envelope.sign(self.identity, self.task, message, prev=GENESIS)
        await self.mqtt.publish(topic, signed.to_bytes(), qos=bus.QOS)


def refusal_reason(message: Refusal) -> RefusalReason:
    return RefusalReason(message.reason)
