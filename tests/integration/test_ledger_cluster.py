"""Three ledger node processes over a real 3-member etcd cluster and Mosquitto, under a
steady stream of submissions: kill -9 the writer, then the etcd leader; nothing
acknowledged is lost or duplicated, every node ends on the same chain, a new writer
commits within seconds, and a killed node restarted catches up."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fairbus import envelope, topics
from fairbus.envelope import GENESIS
from fairbus.ledger.records import Block
from fairbus.wire.messages import Attestation, Query, QueryResponse
from fairbus_broker.mqtt import mqtt_client
from fairbus_ledger_service.audit import audit
from fairbus_ledger_service.client import LedgerClient
from fairbus_ledger_service.deployment import LocalLedger
from tests.conftest import find_service_binary

TASK = "ledger-cluster"
NODES = (101, 102, 103)
STREAM_USERS = (1, 2, 3, 4, 5, 6)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalLedger]:
    mosquitto = find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    etcd = find_service_binary("etcd", "/usr/bin/etcd")
    with LocalLedger(tmp_path, TASK, NODES, STREAM_USERS, 3, mosquitto, etcd) as d:
        yield d


@dataclass
class Acked:
    tx_hash: bytes
    height: int
    index: int
    at: float


async def stream(
    d: LocalLedger, user: int, stop: asyncio.Event, acked: list[Acked], heads: dict[int, bytes]
) -> None:
    """One user's chain of attestations, each submitted until it has its receipt."""
    identity = d.identities[user]
    prev = GENESIS
    async with (
        mqtt_client("127.0.0.1", d.broker_port, f"user-{user}") as mqtt,
        LedgerClient(mqtt, identity, d.roster, "user", timeout=1.0, retries=60) as ledger,
    ):
        for k in itertools.count():
            if stop.is_set():
                return
            note = os.urandom(900)  # ~1 KB transactions
            body = Attestation(f"stream/{k}", bytes(32), note)
            signed = envelope.sign(identity, TASK, body, prev=prev)
            receipt = await ledger.submit(signed.to_bytes())
            acked.append(Acked(receipt.tx_hash, receipt.height, receipt.index, time.monotonic()))
            prev = heads[user] = signed.hash


async def until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def heads_seen_by_each_node(d: LocalLedger, sender: int) -> dict[int, bytes]:
    """Ask every ledger node for ``sender``'s chain head; node id → answer."""
    asker = d.identities[0]
    answers: dict[int, bytes] = {}
    async with mqtt_client("127.0.0.1", d.broker_port, "provider-0") as mqtt:
        await mqtt.subscribe(topics.ledger_response(TASK, "+", 0), qos=1)
        query = Query(7, "head", None, sender, None)
        signed = envelope.sign(asker, TASK, query, prev=GENESIS)
        await mqtt.publish(topics.ledger_query(TASK, "provider", 0), signed.to_bytes(), qos=1)
        try:
            async with asyncio.timeout(2):
                async for message in mqtt.messages:
                    assert isinstance(message.payload, bytes)
                    verified = envelope.open_envelope(message.payload, d.roster)
                    assert isinstance(verified.message, QueryResponse)
                    answers[verified.header.sender] = verified.message.records[0]
                    if len(answers) == sum(p.poll() is None for p in d.processes.values()):
                        break
        except TimeoutError:
            pass
    return answers


async def test_writer_and_etcd_leader_killed_under_load_lose_nothing(
    deployment: LocalLedger,
) -> None:
    d = deployment
    stop = asyncio.Event()
    acked: list[Acked] = []
    heads: dict[int, bytes] = {}
    streams = [asyncio.create_task(stream(d, u, stop, acked, heads)) for u in STREAM_USERS]
    try:
        await until(lambda: len(acked) >= 200, 60, "the first 200 receipts")
        # 1. kill -9 the writer
        writer = await d.writer()
        assert writer in NODES
        d.kill_node(writer)
        killed_at = time.monotonic()
        await until(lambda: acked[-1].at > killed_at + 0.5, 30, "a commit by a new writer")
        gap = min(a.at for a in acked if a.at > killed_at) - killed_at
        assert gap < 10, f"no commit for {gap:.1f} s after the writer died"
        new_writer = await d.writer()
        assert new_writer in NODES and new_writer != writer
        # 2. kill -9 the etcd leader
        leader = d.etcd.leader()
        d.etcd.kill(leader)
        killed_at = time.monotonic()
        await until(
            lambda: acked[-1].at > killed_at + 0.5, 30, "a commit after the etcd leader died"
        )
        # 3. the killed ledger node comes back and catches up
        d.etcd.start(leader)
        d.start_node(writer)
        count = len(acked)
        await until(lambda: len(acked) >= count + 100, 60, "100 more receipts")
    finally:
        stop.set()
        await asyncio.gather(*streams, return_exceptions=True)
    raw = await d.blocks()
    blocks = [Block.from_bytes(b) for b in raw]
    where = {tx.hash: (b.height, k) for b in blocks for k, tx in enumerate(b.txs)}
    all_hashes = [tx.hash for b in blocks for tx in b.txs]
    assert len(all_hashes) == len(set(all_hashes)), "a transaction was committed twice"
    for a in acked:  # nothing acknowledged is lost, and each is where its receipt says
        assert where.get(a.tx_hash) == (a.height, a.index)
    assert audit(raw, d.roster).ok
    # every node, the restarted one included, ends on the same chain heads
    deadline = time.monotonic() + 60
    for user in STREAM_USERS:
        while True:
            answers = await heads_seen_by_each_node(d, user)
            if set(answers) == set(NODES) and set(answers.values()) == {heads[user]}:
                break
            assert time.monotonic() < deadline, f"nodes disagree on user {user}: {answers}"
