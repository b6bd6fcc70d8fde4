""":meth:`BusConnection.publish` when a publish fails: a PUBACK later than aiomqtt waits
on a connection that stays up (a loaded broker; a participant stopped with SIGSTOP in
the middle of a publish and continued after aiomqtt's timeout) must not stop the
participant from ever publishing again; a lost connection is waited out.

The regression: a stopped user's share publish timed out on resume ("Operation timed
out"), ``publish`` cleared :attr:`BusConnection.connected`, which only a reconnect sets,
and the connection never dropped: the user received every later round and never sent
anything again (tests/e2e/test_presence_and_restarts.py, the SIGSTOP test)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

import aiomqtt
import pytest
from amqtt.broker import Broker

from fairbus import topics
from fairbus.runtime.connection import BusConnection
from fairbus_ledger_service.etcd_cluster import free_port

TOPIC = topics.direct("t", 3, 4, "share")


def bus(port: int = 1883, subscriptions: list[str] | None = None) -> BusConnection:
    """User 3's connection to a broker on loopback, anonymous."""
    return BusConnection(
        "127.0.0.1",
        port,
        task="t",
        role="user",
        pid=3,
        password=None,
        subscriptions=subscriptions or [],
        on_message=lambda topic, data: None,
        backoff=(0.01, 0.01),
    )


class LatePubackClient:
    """Stands in for the aiomqtt client: the connection stays up (or, with ``drop``, is
    lost with the failed publish and taken again); the first publish on :data:`TOPIC`
    fails as aiomqtt fails one whose PUBACK comes later than its timeout."""

    def __init__(self, *, drop: bool = False) -> None:
        self.drop = drop
        self.connects = 0
        self.sent: list[tuple[int, bytes]] = []  # (connection, payload) of each publish
        self.failed = 0
        self._lost = asyncio.Event()

    async def __aenter__(self) -> LatePubackClient:
        self.connects += 1
        self._lost = asyncio.Event()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def subscribe(self, topic: str, qos: int) -> None:
        return None

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        if topic != TOPIC:
            return
        if not self.failed:
            self.failed += 1
            if self.drop:
                self._lost.set()
            raise aiomqtt.MqttError("Operation timed out")
        self.sent.append((self.connects, payload))

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[aiomqtt.Message]:
        await self._lost.wait()
        raise aiomqtt.MqttError("Unexpected disconnection")
        yield  # an async generator that yields nothing


async def _publish_twice(connection: BusConnection) -> None:
    await connection.connected.wait()
    await connection.publish(TOPIC, b"first")
    await connection.publish(TOPIC, b"second")


async def test_a_late_puback_on_a_live_connection_does_not_stop_publishing() -> None:
    """The publish is sent again on the same connection, and so is the next one (before
    the fix both waited for a reconnect that never came)."""
    connection = bus()
    client = LatePubackClient()
    connection.client = client  # type: ignore[assignment]
    async with asyncio.timeout(5):
        await connection.serve(_publish_twice(connection))
    assert client.failed == 1 and client.connects == 1
    assert client.sent == [(1, b"first"), (1, b"second")]
    assert connection.sent_bytes == {"share": len(b"first") + len(b"second")}


async def test_a_publish_cut_by_a_lost_connection_goes_out_on_the_next() -> None:
    connection = bus()
    client = LatePubackClient(drop=True)
    connection.client = client  # type: ignore[assignment]
    async with asyncio.timeout(5):
        await connection.serve(_publish_twice(connection))
    assert client.connects == 2
    assert client.sent == [(2, b"first"), (2, b"second")]


# --- with aiomqtt, paho and amqtt: a PUBACK held up on a connection that stays up ---------


class Proxy:
    """TCP on loopback between a client and a broker; :meth:`pause` holds back what the
    broker sends (PUBACKs included) until :meth:`resume`, as a stopped process's socket
    does."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, gated=False)),
            asyncio.create_task(self._pipe(up_reader, writer, gated=True)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for w in (writer, up_writer):
                w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool
    ) -> None:
        while data := await reader.read(65536):
            if gated:
                await self.flowing.wait()
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            # the connections' handlers end with their sockets


@contextlib.asynccontextmanager
async def amqtt_broker() -> AsyncIterator[int]:
    """An anonymous amqtt broker on a free loopback port."""
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield port
    finally:
        await broker.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_puback_held_past_the_timeout_with_real_clients() -> None:
    """A real aiomqtt client through a proxy that holds the broker's bytes for 1 s while a
    publish waits for its PUBACK (aiomqtt gives up after 0.3 s here): the publish is sent
    again, the next one goes out, and a subscriber gets both (the first perhaps twice)."""
    got: list[bytes] = []
    async with amqtt_broker() as broker_port:
        proxy = Proxy(broker_port)
        port = await proxy.start()
        sender = bus(port)
        sender.client.timeout = 0.3  # aiomqtt's wait for a PUBACK (10 s by default)
        receiver = BusConnection(
            "127.0.0.1", broker_port, task="t", role="user", pid=4, password=None,
            subscriptions=[topics.direct_inbox("t", 4)],
            on_message=lambda topic, data: got.append(data),
        )  # fmt: skip

        async def body() -> None:
            await sender.connected.wait()
            await receiver.connected.wait()
            proxy.pause()
            first = asyncio.create_task(sender.publish(TOPIC, b"first"))
            await asyncio.sleep(1.0)  # past aiomqtt's timeout: the PUBACK is held up
            assert not first.done() and sender.connected.is_set()
            proxy.resume()
            await first
            await sender.publish(TOPIC, b"second")
            while b"second" not in got:
                await asyncio.sleep(0.02)

        async def receive() -> None:
            await receiver.serve(asyncio.Event().wait())

        receiving = asyncio.create_task(receive())
        try:
            async with asyncio.timeout(10):
                await sender.serve(body())
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            await proxy.close()
    assert set(got) == {b"first", b"second"} and got[-1] == b"second"
