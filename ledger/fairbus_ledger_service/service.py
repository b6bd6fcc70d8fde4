"""``fairbus ledger --node N``: a ledger node on the bus (the MQTT front).

The writer subscribes to submissions (``fairbus/<task>/+/+/ledger/submit``) and commits
them; every node keeps the blobs of the model-sized payloads it sees on the bus (uploads,
global models) whose signed headers verify against the roster, or whose hashes the ledger
has committed, up to a bound per sender on what awaits commit (:class:`LedgerNode`,
issue 14, item 7); it writes nothing for anything else. The writer sends the receipt
(``fairbus/<task>/ledger/<node>/receipt/<sender>``) only after the block is in the store,
then the block header (``…/<node>/block``). A refusal goes back at once with its reason.
Every node answers queries (a transaction by hash, a sender's head, a round's records, a
blob, the height and hash of its last block) on ``…/<node>/response/<asker>``; askers
take the first answer. Metrics (:mod:`fairbus_ledger_service.metrics`) are served on
``metrics_port`` when configured. Masked uploads go only to :data:`UPLOAD_READERS` (the
provider, ledger nodes and admins): anyone else's ``round`` query, ``blob`` query for an
upload's payload and ``tx`` query for another participant's upload is answered
``ok=False`` with a ``role_not_allowed:`` error and nothing else, since the uploads of a
complete group add up to its sum without any key (issue 12). Global models and SecCL's
recorded changes (type (a) messages, public on the bulletin board) stay readable by
every member of the roster. Followers poll the store's head, re-validate each new
block and raise an alarm (log and stop applying) on an invalid one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiomqtt

from fairbus import envelope, topics
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError, OperatorError
from fairbus.identity import Identity, load_broker_password
from fairbus.ledger.recorded import Recorded
from fairbus.ledger.records import Block, Committed
from fairbus.ledger.state import LedgerState, RefusalReason
from fairbus.ledger.verify import EvaluationCheck
from fairbus.roster import Role, Roster
from fairbus.wire.messages import (
    BlockHeader,
    Message,
    Query,
    QueryResponse,
    Receipt,
    ReceiptEntry,
    Refusal,
)
from fairbus_broker.mqtt import login_refused, mqtt_client, refusal_reason
from fairbus_ledger_service.blobs import BlobError, BlobStore
from fairbus_ledger_service.client import encode_height
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.election import EtcdElection, lead_when_elected
from fairbus_ledger_service.metrics import LedgerMetrics
from fairbus_ledger_service.node import LedgerNode, NotWriterError, Outcome, Refused
from fairbus_ledger_service.stores import BlockStore, EtcdStore, SqliteStore

log = logging.getLogger("fairbus.ledger")

FOLLOW_INTERVAL = 0.05
RECONNECT_DELAY = (0.2, 2.0)
"""First and longest wait (seconds) before connecting to the broker again."""
BLOB_CHUNK = 64 * 1024
"""A blob is served as records of this size (the query response's bound per record)."""
UPLOAD_READERS = frozenset({Role.PROVIDER, Role.LEDGER, Role.ADMIN})
"""Who may obtain masked uploads from the ledger (their payloads, a round's upload list):
those who may see group sums anyway (docs/architecture.md, "Trust and privacy")."""
PUBLIC_BLOBS = frozenset({"global_model", "seccl_update"})
"""Recorded model-sized types whose payloads every member of the roster may read: the
global models, and SecCL's type (a) messages, which the bulletin board shows every
participant (SecCL, "Message Interaction Protocol")."""


class QueryRefusedError(FairbusError):
    """A query the asker's role may not make: answered ``ok=False`` with the reason."""


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
        self._receipts: dict[tuple[int, int, bytes], list[ReceiptEntry]] = {}
        self._flush: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = LedgerMetrics(node_id)
        """Prometheus metrics (:mod:`fairbus_ledger_service.metrics`); served on
        ``metrics_port`` while :meth:`run` runs."""

    # --- store -------------------------------------------------------------------------------

    async def _open_store(self) -> BlockStore:
        if self.config.store == "sqlite":
            return SqliteStore(self.config.sqlite)
        endpoints = list(self.config.etcd)
        return await EtcdStore.connect(endpoints, self.task, first=self.node_id % len(endpoints))

    async def run(self) -> None:
        store = await self._open_store()
        blobs = BlobStore(self.config.blobs)
        node = LedgerNode(
            LedgerState(self.roster, evaluations=EvaluationCheck(blobs.find)),
            store,
            blobs,
            max_block_txs=self.config.max_block_txs,
            linger=self.config.linger_ms / 1000,
            on_block=self._published_block,
        )
        self.node = node
        self.metrics.watch(
            height=lambda: node.state.height,
            writer=lambda: node.is_writer,
            alarm=lambda: node.alarm is not None,
            connected=lambda: self.mqtt is not None,
        )
        self.metrics.serve(self.config.metrics_port, self.config.metrics_address)
        await node.sync()
        log.info("ledger node %d: %s store at height %d", self.node_id, self.config.store,
                 node.state.height)  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(asyncio.to_thread(_load_evaluation))
                tasks.create_task(node.write_loop())
                tasks.create_task(self._follow())
                if isinstance(store, EtcdStore):
                    tasks.create_task(self._elect(store))
                else:
                    await self._become_writer(None)
                await self._serve(tasks)
        except BaseExceptionGroup as group:
            # An operator's mistake (a refused broker login) is one line, not a group.
            mistakes = group.subgroup(OperatorError)
            while isinstance(mistakes, BaseExceptionGroup):
                mistakes = mistakes.exceptions[0]  # type: ignore[assignment]
            if mistakes is not None:
                raise mistakes from None
            raise
        finally:
            node.close()
            self.metrics.close()

    async def _serve(self, tasks: asyncio.TaskGroup) -> None:
        """The bus, kept up: a lost broker connection is made again (with backoff) and the
        subscriptions renewed; submitters retry what went unanswered meanwhile."""
        host, port = self.config.broker
        login = topics.username("ledger", self.node_id)
        password = load_broker_password(self.config.keys, self.node_id)
        if password is None:
            log.warning("ledger node %d: no %s: logging in to the broker anonymously",
                        self.node_id, self.config.keys / f"{self.node_id}.mqtt.key")  # fmt: skip
        # A persistent session: uploads published while this node reconnects are queued
        # for it (and kept across a broker restart where the broker persists), so their
        # payloads reach the blob store.
        client = mqtt_client(
            host, port, login, username=login if password else None, password=password,
            clean_session=False,
        )  # fmt: skip
        delay = RECONNECT_DELAY[0]
        while True:
            try:
                async with client as mqtt:
                    await mqtt.subscribe(f"fairbus/{self.task}/+/+/ledger/query", qos=topics.QOS)
                    for topic in self._blob_topics():
                        await mqtt.subscribe(topic, qos=topics.QOS)
                    if self.node is not None and self.node.is_writer:
                        await mqtt.subscribe(self._submit_topic, qos=topics.QOS)
                    self.mqtt = mqtt
                    delay = RECONNECT_DELAY[0]
                    log.info("ledger node %d: on the bus at %s:%d", self.node_id, host, port)
                    async for message in mqtt.messages:
                        if not isinstance(message.payload, bytes | bytearray):
                            continue
                        topic, data = str(message.topic), bytes(message.payload)
                        if topic.endswith("/ledger/submit"):
                            self._on_submit(topic, data)  # the hot path: no task per message
                        else:
                            tasks.create_task(self._on_message(topic, data))
            except aiomqtt.MqttError as exc:
                self.mqtt = None
                if login_refused(exc):
                    raise OperatorError(
                        f"the broker at {host}:{port} refused login {login!r} "
                        f"({refusal_reason(exc)}): check "
                        f"{self.config.keys / f'{self.node_id}.mqtt.key'}"
                    ) from None
                log.warning("ledger node %d: bus lost (%s); again in %.1f s", self.node_id,
                            exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY[1])

    async def _elect(self, store: EtcdStore) -> None:
        assert self.node is not None
        node = self.node
        election = EtcdElection(store, self.node_id, self.config.lease_ttl)

        async def elected() -> None:
            await node.sync()
            await self._become_writer(election.value)

        async def deposed() -> None:
            node.is_writer = False
            node.fence = None
            log.warning("ledger node %d is no longer the writer", self.node_id)
            if self.mqtt is not None:
                with contextlib.suppress(Exception):
                    await self.mqtt.unsubscribe(self._submit_topic)

        await lead_when_elected(election, elected, deposed)

    @property
    def _submit_topic(self) -> str:
        return f"fairbus/{self.task}/+/+/ledger/submit"

    def _blob_topics(self) -> list[str]:
        """Where model-sized payloads travel on the bus (uploads, global models, and what
        the provider relays: the task's test set, uploads a node lacks; SecCL's changes,
        which the consensus contract aggregates)."""
        return [
            topics.uploads(self.task),
            topics.seccl_changes(self.task),
            topics.global_models(self.task),
            topics.relayed_payloads(self.task),
        ]

    async def _become_writer(self, fence: bytes | None) -> None:
        """Only the writer takes submissions; the others keep blobs from the bus."""
        assert self.node is not None
        self.node.fence = fence
        self.node.is_writer = True
        if self.mqtt is not None:  # otherwise the next connection subscribes
            await self.mqtt.subscribe(self._submit_topic, qos=topics.QOS)
        log.info("ledger node %d is the writer (height %d)", self.node_id, self.node.state.height)

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
        asker = topics.sender_of(topic)
        if asker is None:
            return
        if topic.endswith("/ledger/query"):
            await self._on_query(asker[1], data)
        else:
            self._keep_blob(data)

    def _keep_blob(self, data: bytes) -> None:
        """A model-sized envelope seen on the bus (:mod:`fairbus.ledger.recorded`): keep its
        payload by hash if :meth:`LedgerNode.keep_payload` takes it (a committed hash, or a
        header signed by a roster member allowed to send it, the payload matching it and
        the sender within its bound); anything else is dropped, and nothing written."""
        assert self.node is not None
        try:
            self.node.transaction_of_envelope(Recorded.from_bytes(data, self.node.limits).envelope)
        except FairbusError as exc:
            log.debug("blob from the bus not kept: %s", exc)
            self.metrics.blob(kept=False)
        else:
            self.metrics.blob(kept=True)

    def _on_submit(self, topic: str, data: bytes) -> None:
        assert self.node is not None
        asker = topics.sender_of(topic)
        if asker is None or not self.node.is_writer:
            return
        future = self.node.submit_nowait(data)
        arrived = time.perf_counter()
        future.add_done_callback(lambda f: self._answered(asker[1], data, f, arrived))

    def _answered(
        self, asker: int, data: bytes, future: asyncio.Future[Outcome], arrived: float
    ) -> None:
        if future.cancelled() or isinstance(future.exception(), NotWriterError):
            return
        outcome = future.result()
        if isinstance(outcome, Committed):
            if not outcome.duplicate:
                self.metrics.committed_after(time.perf_counter() - arrived)
            self._collect_receipt(asker, outcome)
        else:
            self.metrics.refused(outcome.reason.value)
            self._background(self._refuse(asker, data, outcome))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _collect_receipt(self, asker: int, outcome: Committed) -> None:
        # Receipts for one block are resolved together; one signed receipt per
        # submitter and block is sent once they all have been collected.
        key = (asker, outcome.height, outcome.block_hash)
        self._receipts.setdefault(key, []).append(ReceiptEntry(outcome.tx_hash, outcome.index))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._send_receipts())

    async def _refuse(self, asker: int, data: bytes, outcome: Refused) -> None:
        ref = outcome.tx_hash or hashlib.sha256(data).digest()
        refusal = Refusal(ref, outcome.reason.value, outcome.detail[:4000])
        await self._publish(topics.ledger_receipt(self.task, self.node_id, asker), refusal)

    async def _send_receipts(self) -> None:
        await asyncio.sleep(0)  # let the rest of the block's submissions resolve
        batch, self._receipts = self._receipts, {}
        await asyncio.gather(
            *(
                self._publish(
                    topics.ledger_receipt(self.task, self.node_id, asker),
                    Receipt(height, block_hash, tuple(sorted(entries, key=lambda e: e.index))),
                )
                for (asker, height, block_hash), entries in batch.items()
            )
        )

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
        try:
            records, error = await self._records(query, asker)
        except QueryRefusedError as refused:
            log.info("query from %d refused: %s", asker, refused)
            records, error = [], f"{RefusalReason.ROLE_NOT_ALLOWED.value}: {refused}"
            self.metrics.query(query.kind, "refused")
        else:
            self.metrics.query(query.kind, "not_found" if error else "ok")
        response = QueryResponse(query.qid, not error, error, tuple(records))
        await self._publish(topics.ledger_response(self.task, self.node_id, asker), response)

    def _reads_uploads(self, asker: int) -> bool:
        """Whether ``asker`` may obtain masked uploads (by its role in the ledger's
        roster, which a recorded roster change updates)."""
        assert self.node is not None
        member = self.node.state.roster.get(asker)
        return member is not None and member.role in UPLOAD_READERS

    def _readers(self) -> str:
        return ", ".join(sorted(r.value for r in UPLOAD_READERS))

    async def _records(self, query: Query, asker: int) -> tuple[list[bytes], str]:
        """The answer to ``query`` from ``asker``: (records, "") or ([], why not found);
        raises :class:`QueryRefusedError` for what ``asker`` may not obtain."""
        assert self.node is not None
        state = self.node.state
        reader = self._reads_uploads(asker)
        if query.kind == "head":
            assert query.sender is not None
            return [state.head(query.sender)], ""
        if query.kind == "height":
            return [encode_height(state.height), state.head_hash], ""
        if query.kind == "blob":
            assert query.tx_hash is not None and self.node.blobs is not None
            owners = state.blob_index.get(query.tx_hash, frozenset())
            public = bool(owners) and all(t in PUBLIC_BLOBS or s == asker for t, s in owners)
            if not reader and not public:
                # An upload's payload (another's, or one that is not recorded yet) or
                # bytes no recorded global model names: nothing, not even whether it exists.
                raise QueryRefusedError(
                    f"blob {query.tx_hash.hex()[:16]} is not a recorded global model or "
                    f"participant {asker}'s own upload; masked uploads go only to "
                    f"{self._readers()}"
                )
            try:
                data = self.node.blobs.get(query.tx_hash)
            except BlobError as exc:
                return [], str(exc)
            return [data[k : k + BLOB_CHUNK] for k in range(0, len(data), BLOB_CHUNK)], ""
        if query.kind == "tx":
            assert query.tx_hash is not None
            where = state.index.get(query.tx_hash)
            if where is None:
                return [], "no such transaction"
            block = Block.from_bytes(
                (await self.node.store.read(where.height, where.height + 1))[0]
            )
            tx = block.txs[where.index]
            header = tx.envelope.header
            if not reader and header.type == "upload" and header.sender != asker:
                raise QueryRefusedError(
                    f"transaction {query.tx_hash.hex()[:16]} is participant {header.sender}'s "
                    f"upload; masked uploads go only to {self._readers()}"
                )
            return [tx.to_bytes()], ""
        assert query.round is not None
        if not reader:
            raise QueryRefusedError(
                f"round {query.round}'s transactions list its masked uploads, which go only "
                f"to {self._readers()}"
            )
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
        await self._publish(topics.ledger_block(self.task, self.node_id), header)

    async def _publish(self, topic: str, message: Message) -> None:
        """Publish if on the bus; an answer lost while off it is asked for again."""
        mqtt = self.mqtt
        if mqtt is None:
            return
        signed = envelope.sign(self.identity, self.task, message, prev=GENESIS)
        with contextlib.suppress(aiomqtt.MqttError):
            await mqtt.publish(topic, signed.to_bytes(), qos=topics.QOS)


def _load_evaluation() -> None:
    """Import torch and the models now, on a worker thread (seconds on a busy machine),
    rather than when the task start's test set is first checked."""
    import fairbus.training.models  # noqa: F401
