"""The ledger's MQTT front on a real Mosquitto (SQLite store): receipts after commit, typed
refusals, queries (head, transaction, blob); and a follower's alarm on a bad block."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS
from fairbus.identity import Identity
from fairbus.ledger.records import Block, Transaction
from fairbus.ledger.state import LedgerState, RefusalReason, RefusedError
from fairbus.roster import Member, Role, Roster
from fairbus.wire.messages import Attestation, GlobalModel
from fairbus_broker.mqtt import mqtt_client
from fairbus_ledger_service.blobs import BlobStore
from fairbus_ledger_service.client import LedgerClient, LedgerTimeoutError, Publisher
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.node import LedgerNode
from fairbus_ledger_service.service import LedgerService
from fairbus_ledger_service.stores import SqliteStore
from tests.conftest import find_service_binary
from tests.integration.test_services import free_port, running
from tests.support_ledger import task_opening

TASK = "front"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    binary = find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with running([binary, "-c", str(conf)], port):
        yield port


def _deployment(tmp_path: Path, port: int) -> tuple[Roster, dict[int, Identity], LedgerConfig]:
    roles = {0: Role.PROVIDER, 1: Role.USER, 101: Role.LEDGER, 200: Role.ADMIN}
    ids = {pid: Identity.generate(pid) for pid in roles}
    roster = Roster(TASK, [Member(ids[pid].public, role) for pid, role in roles.items()])
    (tmp_path / "roster.toml").write_text(roster.to_toml())
    ids[101].save(tmp_path / "keys")
    cfg = tmp_path / "ledger.toml"
    cfg.write_text(
        f'roster = "roster.toml"\nstore = "sqlite"\nsqlite = "l.sqlite"\n'
        f'broker = "127.0.0.1:{port}"\n'
    )
    return roster, ids, LedgerConfig.load(cfg)


async def test_receipts_refusals_and_queries_over_the_bus(broker: int, tmp_path: Path) -> None:
    roster, ids, config = _deployment(tmp_path, broker)
    service = asyncio.create_task(LedgerService(config, 101).run())
    model = np.arange(582_026, dtype="<f4").tobytes()  # the paper's MNIST CNN size
    test_set, start = task_opening(ids[0], TASK)
    signed = envelope.sign(
        ids[0], TASK, GlobalModel(582_026, model), prev=start.hash, round=1, attempt=0
    )
    try:
        async with (
            mqtt_client("127.0.0.1", broker, "provider-0") as mqtt,
            LedgerClient(mqtt, ids[0], roster, "provider", timeout=2.0) as ledger,
        ):
            await ledger.submit(test_set.to_bytes())  # the test set, then the task's
            await ledger.submit(start.to_bytes())  # parameters come first
            receipt = await ledger.submit(signed.to_bytes())
            assert (receipt.tx_hash, receipt.height, receipt.index) == (signed.hash, 2, 0)
            again = await ledger.submit(signed.to_bytes())  # a replay: the first receipt
            assert (again.height, again.index) == (2, 0)
            fork = envelope.sign(ids[0], TASK, Attestation("x", bytes(32), b""), prev=GENESIS)
            with pytest.raises(RefusedError) as refused:
                await ledger.submit(fork.to_bytes())
            assert refused.value.reason is RefusalReason.STALE_PREV
            head = await ledger.query("head", sender=0)
            assert head.records == (signed.hash,)
            tx = await ledger.query("tx", tx_hash=signed.hash)
            recorded = Transaction.from_bytes(tx.records[0])
            assert recorded.hash == signed.hash and recorded.payload is None  # not in blocks
            # the payload (the signed body) is kept by the SHA-256 its signed header names
            blob = await ledger.blob(signed.header.payload_sha256)
            assert blob == signed.payload and hashlib.sha256(blob).digest() == (
                signed.header.payload_sha256
            )
            missing = await ledger.query("blob", tx_hash=bytes(32))
            assert not missing.ok and "no blob" in missing.error
    finally:
        service.cancel()
        with pytest.raises(asyncio.CancelledError):
            await service


class _LosesItsFirstPublication:
    """Publishes through ``mqtt`` all but the first publication: a submission lost with
    a ledger writer that died holding it."""

    def __init__(self, mqtt: Publisher) -> None:
        self.mqtt = mqtt
        self.sent = 0

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.sent += 1
        if self.sent > 1:
            await self.mqtt.publish(topic, payload, qos=qos)


async def test_a_lost_submission_is_sent_again_before_the_patience_runs_out(
    broker: int, tmp_path: Path
) -> None:
    # The provider waits up to a minute for the receipt of an evaluation (the ledger
    # re-derives it). Before, it sent nothing more in that minute, so a writer that died
    # with the submission stalled training for the whole of it; now it sends again every
    # timeout, and the patience only bounds how long it keeps trying.
    roster, ids, config = _deployment(tmp_path, broker)
    service = asyncio.create_task(LedgerService(config, 101).run())
    test_set, start = task_opening(ids[0], TASK)
    try:
        async with (
            mqtt_client("127.0.0.1", broker, "provider-0") as mqtt,
            LedgerClient(mqtt, ids[0], roster, "provider", timeout=0.5, retries=60) as ledger,
        ):
            await ledger.submit(test_set.to_bytes())
            lossy = _LosesItsFirstPublication(mqtt)
            ledger.mqtt = lossy
            receipt = await asyncio.wait_for(
                ledger.submit_for_receipt(start.to_bytes(), patience=3600.0), 30.0
            )
            assert receipt[0].tx_hash == start.hash and lossy.sent >= 2
            # the patience still bounds the whole: with nothing answering it gives up
            ledger.mqtt = _LosesItsFirstPublication(_Nowhere())
            ledger.retries = 1
            fork = envelope.sign(ids[0], TASK, Attestation("x", bytes(32), b""), prev=start.hash)
            with pytest.raises(LedgerTimeoutError):
                await ledger.submit_for_receipt(fork.to_bytes(), patience=1.0)
    finally:
        service.cancel()
        with pytest.raises(asyncio.CancelledError):
            await service


class _Nowhere:
    """A bus that delivers nothing."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        return None


async def test_a_follower_raises_an_alarm_on_an_invalid_block(tmp_path: Path) -> None:
    roles = {0: Role.PROVIDER, 1: Role.USER}
    ids = {pid: Identity.generate(pid) for pid in roles}
    roster = Roster(TASK, [Member(ids[pid].public, role) for pid, role in roles.items()])
    store = SqliteStore(tmp_path / "l.sqlite")
    writer = LedgerNode(LedgerState(roster), store, BlobStore(tmp_path / "b"))
    writer.is_writer = True
    loop = asyncio.create_task(writer.write_loop())
    prev = GENESIS
    for k in range(3):
        signed = envelope.sign(ids[1], TASK, Attestation(f"a{k}", bytes(32), b""), prev=prev)
        await writer.submit(signed.to_bytes())
        prev = signed.hash
    loop.cancel()
    follower = LedgerNode(LedgerState(roster), SqliteStore(tmp_path / "l.sqlite"))
    assert await follower.sync() == writer.state.height + 1 and follower.alarm is None
    # a block whose transaction is re-signed by an impostor, written straight to the store
    block = Block.from_bytes((await store.read(1, 2))[0])
    bad_tx = Transaction(block.txs[0].header_bytes, bytes(64), block.txs[0].payload)
    store.overwrite(1, Block.build(1, block.prev_hash, block.timestamp, [bad_tx]).to_bytes())
    fresh = LedgerNode(LedgerState(roster), SqliteStore(tmp_path / "l.sqlite"))
    assert await fresh.sync() == 0
    assert fresh.alarm is not None and "height 1" in fresh.alarm
    assert fresh.state.height == 0  # nothing from the bad block on was applied
