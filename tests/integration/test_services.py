"""The real services the networked runtime stands on: Mosquitto and etcd, on loopback.

Each is started on a free port, used, and stopped by the test. Under CI=true a
missing binary fails the test; elsewhere it skips with the install command.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiomqtt
import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS
from fairbus.identity import Identity
from fairbus.roster import Roster
from fairbus.wire.messages import MaskedUpload
from fairbus_ledger_service.deployment import wait_for_port
from fairbus_ledger_service.etcd_cluster import free_port
from tests.conftest import TASK, find_service_binary


@contextmanager
def running(argv: list[str], port: int) -> Iterator[int]:
    """Start a service, wait until ``port`` listens, stop it on exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    binary = find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "max_packet_size 67108864\nmax_queued_messages 100000\npersistence false\n"
    )
    with running([binary, "-c", str(conf)], port):
        yield port


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[int]:
    binary = find_service_binary("etcd", "/usr/bin/etcd")
    client, peer = free_port(), free_port()
    argv = [
        binary,
        "--name",
        "t0",
        "--data-dir",
        str(tmp_path / "etcd"),
        "--listen-client-urls",
        f"http://127.0.0.1:{client}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{client}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"t0=http://127.0.0.1:{peer}",
    ]
    with running(argv, client):
        yield client


async def test_signed_upload_crosses_mosquitto_intact(
    mosquitto: int, identities: dict[int, Identity], roster: Roster
) -> None:
    import numpy as np

    from fairbus.csprng import random_field
    from fairbus.wire.messages import vector_to_bytes

    masked = random_field(582_026)  # the paper's MNIST CNN size
    env = envelope.sign(
        identities[3],
        TASK,
        MaskedUpload(0, masked.size, vector_to_bytes(masked)),
        prev=GENESIS,
        round=1,
        attempt=0,
    )
    topic = f"fairbus/{TASK}/user/3/upload"
    async with (
        aiomqtt.Client("127.0.0.1", mosquitto, identifier="provider") as sub,
        aiomqtt.Client("127.0.0.1", mosquitto, identifier="user-3") as pub,
    ):
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, env.to_bytes(), qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(sub.messages))
    assert isinstance(message.payload, bytes | bytearray)
    verified = envelope.open_envelope(bytes(message.payload), roster)
    assert isinstance(verified.message, MaskedUpload)
    np.testing.assert_array_equal(verified.message.vector(), masked)


async def test_etcd_compare_and_swap(etcd: int) -> None:
    import aetcd

    async with aetcd.Client(host="127.0.0.1", port=etcd) as client:
        await client.put(b"/fairbus/head", b"h0")
        ok, _ = await client.transaction(
            compare=[client.transactions.value(b"/fairbus/head") == b"h0"],
            success=[client.transactions.put(b"/fairbus/head", b"h1")],
            failure=[],
        )
        assert ok
        stale, _ = await client.transaction(
            compare=[client.transactions.value(b"/fairbus/head") == b"h0"],
            success=[client.transactions.put(b"/fairbus/head", b"h2")],
            failure=[],
        )
        assert not stale
        value = await client.get(b"/fairbus/head")
        assert value is not None and value.value == b"h1"
