"""One participant's MQTT session, kept up: presence, subscriptions, reconnect with backoff.

On every (re)connect it publishes a retained ``online`` on its presence topic, with a
retained ``offline`` Last Will, and subscribes again. The session is persistent
(``clean_session`` off, a stable client id), so QoS 1 messages sent while it was briefly
away are queued by the broker and delivered on reconnect: the machine it feeds resumes
its current phase. Publishing waits for the connection and retries across a reconnect,
and after an acknowledgement later than aiomqtt waits (:meth:`BusConnection.publish`).

A broker that cannot be reached is reported in one log line at the first failure and then
every :data:`REPORT_EVERY` seconds while it is retried. A login the broker refuses (a
wrong password, a login it does not know) is not retried: :meth:`BusConnection.serve`
ends with a :class:`BrokerLoginError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import nacl.utils

from fairbus import topics
from fairbus.errors import OperatorError
from fairbus_broker.mqtt import login_refused, mqtt_client, refusal_reason

log = logging.getLogger("fairbus.bus")
T = TypeVar("T")

ONLINE = b"online"
OFFLINE = b"offline"
SESSION_BYTES = 8
"""Random bytes naming one process's session in its ``online`` presence."""


@dataclass(frozen=True)
class Presence:
    """A participant's retained presence: online (with the session of the process that
    said so: a restarted process has a new one) or offline."""

    online: bool
    session: str = ""

    @classmethod
    def parse(cls, data: bytes) -> Presence | None:
        """``online <session>``, a bare ``online`` (no session) or ``offline``; None for
        anything else."""
        if data == OFFLINE:
            return cls(False)
        word, _, session = data.partition(b" ")
        if word != ONLINE or len(session) > 2 * SESSION_BYTES or not session.isalnum():
            return cls(True) if data == ONLINE else None
        return cls(True, session.decode("ascii"))


KEEPALIVE = 10
"""Seconds: the broker fires the Last Will after 1.5 × this without a packet from a hung
client (a killed one's socket closes at once)."""
REPORT_EVERY = 30.0
"""Seconds between the warnings that the broker still cannot be reached."""
RESEND_AFTER = 0.2
"""Seconds before a publish that failed is sent again (once connected)."""


class BrokerLoginError(OperatorError):
    """The broker refused this participant's login (CONNACK "bad user name or password"
    or "not authorized"): the password file does not match what the broker was given."""


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
        backoff: tuple[float, float] = (0.2, 2.0),
        password_file: Path | None = None,
        report_every: float = REPORT_EVERY,
    ) -> None:
        """``password_file`` (where ``password`` came from) is named when the broker
        refuses the login; ``report_every`` is the seconds between "still cannot reach
        the broker" warnings."""
        self.task, self.role, self.pid = task, role, pid
        self.host, self.port = host, port
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.backoff = backoff
        self.password_file = password_file
        self.report_every = report_every
        self.presence_topic = topics.presence(task, role, pid)
        self.session = nacl.utils.random(SESSION_BYTES).hex()
        """This process's session (a reconnect keeps it; a restart draws a new one)."""
        identifier = topics.username(role, pid)
        self.login = identifier
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

    async def serve(self, body: Coroutine[Any, Any, T]) -> T:
        """Run ``body`` while :meth:`run` keeps the session up; say offline when it ends
        (returns, raises or is cancelled). When the session ends for good (a refused
        login), ``body`` is cancelled and the :class:`BrokerLoginError` raised."""
        connection = asyncio.create_task(self.run())
        work = asyncio.ensure_future(body)
        try:
            await asyncio.wait({connection, work}, return_when=asyncio.FIRST_COMPLETED)
            failed = connection.done() and not connection.cancelled() and connection.exception()
            if failed and not work.done():
                work.cancel()
                await asyncio.wait({work})
                connection.result()  # raises the refusal
            return await work
        finally:
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
            await self.leave()
            if connection.done() and not connection.cancelled():
                connection.exception()  # retrieved: asyncio must not log it as lost
            connection.cancel()

    async def run(self) -> None:
        """Connect, and connect again whenever the connection is lost, until cancelled.
        A refused login raises :class:`BrokerLoginError` at once; an unreachable broker
        is retried with backoff for ever, and reported at the first failure and then
        every ``report_every`` seconds."""
        delay = self.backoff[0]
        down_since: float | None = None  # the first miss of the current run of failures
        next_report = 0.0
        while not self._stopping:
            was_connected = False  # this attempt got in
            try:
                async with self.client:
                    # Subscribed before saying online: whoever reacts to the presence
                    # (the provider starting a round) must not outrun the subscriptions.
                    for topic in self.subscriptions:
                        await self.client.subscribe(topic, qos=topics.QOS)
                    online = ONLINE + b" " + self.session.encode()
                    await self.client.publish(
                        self.presence_topic, online, qos=topics.QOS, retain=True
                    )
                    self.connected.set()
                    was_connected = True
                    delay = self.backoff[0]
                    if down_since is None:
                        log.info("%s: connected to %s:%d", self.login, self.host, self.port)
                    else:
                        log.info("%s: connected to %s:%d after %.0f s", self.login, self.host,
                                 self.port, time.monotonic() - down_since)  # fmt: skip
                    down_since = None
                    async for message in self.client.messages:
                        if isinstance(message.payload, bytes | bytearray):
                            self.on_message(str(message.topic), bytes(message.payload))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                if self._stopping:
                    return
                if login_refused(exc):
                    raise self._refused(exc) from None
                now = time.monotonic()
                if was_connected or down_since is None:
                    down_since, next_report = now, now + self.report_every
                    what = "bus lost" if was_connected else "cannot reach the broker"
                    log.warning("%s: %s (%s); retrying %s:%d, and saying so every %.0f s "
                                "until it answers", self.login, what, exc, self.host, self.port,
                                self.report_every)  # fmt: skip
                elif now >= next_report:
                    next_report = now + self.report_every
                    log.warning("%s: still cannot reach the broker at %s:%d after %.0f s (%s); "
                                "retrying", self.login, self.host, self.port, now - down_since,
                                exc)  # fmt: skip
                else:
                    log.debug("%s: broker at %s:%d: %s; again in %.1f s", self.login,
                              self.host, self.port, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    def _refused(self, exc: aiomqtt.MqttError) -> BrokerLoginError:
        """The one-line error for a login the broker refused."""
        where = f" from {self.password_file}" if self.password_file is not None else ""
        return BrokerLoginError(
            f"the broker at {self.host}:{self.port} refused the login {self.login!r} "
            f"({refusal_reason(exc)}): its password{where} is not the one the broker has, "
            "or the broker's roster lacks this participant (restart `fairbus broker` with "
            "the same roster and keys)"
        )

    async def publish(self, topic: str, payload: bytes, qos: int = topics.QOS) -> None:
        """Publish once connected; a publish that fails is sent again once connected,
        never given up.

        A failure is not proof that the connection is gone: aiomqtt raises the same
        :class:`aiomqtt.MqttError` for a PUBACK later than its timeout (10 s) on a
        connection that is still up — a loaded broker, or this process stopped (SIGSTOP)
        with a publish in flight and continued after the timeout (the expired timer fires
        before the PUBACK, behind what arrived meanwhile, is read). Only :meth:`run`
        knows: it clears :attr:`connected` when the connection is lost and sets it again
        on the next one. (Clearing it here left a participant whose connection stayed up
        waiting for ever: it received everything and never sent again.) A publish sent
        twice is delivered twice, as QoS 1 allows; receivers take a repeat as one (a
        sealed share again is refused as a replay, an upload or a ledger submission again
        is the same transaction)."""
        while True:
            await self.connected.wait()
            try:
                await self.client.publish(topic, payload, qos=qos)
            except aiomqtt.MqttError as exc:
                if self.connected.is_set():  # not (yet) known to be lost: say so
                    log.warning("%s: a publish on %s failed (%s); sending it again once connected",
                                self.login, topic, exc)  # fmt: skip
                await asyncio.sleep(RESEND_AFTER)
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
