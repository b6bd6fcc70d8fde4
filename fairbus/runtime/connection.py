"""One participant's MQTT session, kept up: presence, subscriptions, reconnect with backoff.

On every (re)connect it publishes a retained ``online`` on its presence topic, with a
retained ``offline`` Last Will, and subscribes again. The session is persistent
(``clean_session`` off, a stable client id), so QoS 1 messages sent while it was briefly
away are queued by the broker and delivered on reconnect: the machine it feeds resumes
its current phase. Publishing waits for the connection and retries across a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiomqtt

from fairbus import topics
from fairbus_broker.mqtt import mqtt_client

log = logging.getLogger("fairbus.bus")

ONLINE = b"online"
OFFLINE = b"offline"
KEEPALIVE = 10
"""Seconds: the broker fires the Last Will after 1.5 × this without a packet from a hung
client (a killed one's socket closes at once)."""


class BusConnection:
    """:meth:`run` keeps the session up; nothing arrives and nothing is sent without it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        task: str,
        role: str,
        pid: int,
        password: str | None,
        subscriptions: list[str],
        on_message: Callable[[str, bytes], None],
        backoff: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        self.task, self.role, self.pid = task, role, pid
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.backoff = backoff
        self.presence_topic = topics.presence(task, role, pid)
        identifier = topics.username(role, pid)
        self.client = mqtt_client(
            host,
            port,
            identifier,
            username=identifier if password is not None else None,
            password=password,
            will=aiomqtt.Will(self.presence_topic, OFFLINE, qos=topics.QOS, retain=True),
            clean_session=False,
            keepalive=KEEPALIVE,
        )
        self.connected = asyncio.Event()
        self.sent_bytes: dict[str, int] = {}
        """Bytes published, by the topic's kind (:func:`fairbus.topics.parse`)."""
        self._stopping = False

    async def run(self) -> None:
        """Connect, and connect again whenever the connection is lost, until cancelled."""
        delay = self.backoff[0]
        while not self._stopping:
            try:
                async with self.client:
                    # Subscribed before saying online: whoever reacts to the presence
                    # (the provider starting a round) must not outrun the subscriptions.
                    for topic in self.subscriptions:
                        await self.client.subscribe(topic, qos=topics.QOS)
                    await self.client.publish(
                        self.presence_topic, ONLINE, qos=topics.QOS, retain=True
                    )
                    self.connected.set()
                    delay = self.backoff[0]
                    log.info("%s-%d: connected", self.role, self.pid)
                    async for message in self.client.messages:
                        if isinstance(message.payload, bytes | bytearray):
                            self.on_message(str(message.topic), bytes(message.payload))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                if self._stopping:
                    return
                log.warning("%s-%d: bus lost (%s); again in %.1f s", self.role, self.pid,
                            exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    async def publish(self, topic: str, payload: bytes, qos: int = topics.QOS) -> None:
        """Publish once connected; a publish cut by a lost connection is sent again."""
        while True:
            await self.connected.wait()
            try:
                await self.client.publish(topic, payload, qos=qos)
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.05)
                continue
            parsed = topics.parse(self.task, topic)
            kind = topic if parsed is None else parsed.kind
            self.sent_bytes[kind] = self.sent_bytes.get(kind, 0) + len(payload)
            return

    async def leave(self) -> None:
        """Say ``offline`` (a clean disconnect does not fire the Last Will)."""
        self._stopping = True
        if self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.publish(self.presence_topic, OFFLINE, qos=topics.QOS, retain=True)
