"""The embedded broker: amqtt 0.12.1 in-process, with the roster's users and ACL.

For one machine with nothing installed (``fairbus broker --embedded``, the demo); Mosquitto
is the production broker (docs/architecture.md, "Measured facts": amqtt is MQTT 3.1.1
only, ~90 MB/s, no keepalive enforcement).

Why two small plugins of our own instead of amqtt's ``FileAuthPlugin`` and
``TopicAccessControlListPlugin``:

- ``FileAuthPlugin`` verifies only argon2/bcrypt (and, before Python 3.13, sha512-crypt)
  hashes, not Mosquitto's PBKDF2 ``$7$`` ones; :class:`FairbusAuthPlugin` verifies the very
  hashes Mosquitto gets (:mod:`fairbus_broker.passwords`), so both brokers share one user database.
- amqtt's topic ACL matcher (``topic_ac``) lets a requested ``#`` pass where the grant has
  ``+``: with ``fairbus/t/provider/+/+`` granted, a subscription to
  ``fairbus/t/provider/+/#`` is accepted and then receives the provider's ledger
  submissions. :class:`FairbusTopicPlugin` checks that a subscription is a subset of a
  grant (:func:`fairbus_broker.acl.filter_covers`), re-checks every delivery (``RECEIVE``) and every
  publish against the same :func:`fairbus_broker.acl.permissions` Mosquitto's ACL file is made of.
- amqtt checks no ACL on a client's Last Will and has no ``use_username_as_clientid``:
  the auth plugin refuses a connection whose Will topic lies outside the client's write
  rights, and one whose client id is neither its username (``user-4``) nor starts with
  it and a dash (``user-4-probe``), so no login holds a session under another
  participant's id; a participant may still open extra connections under ids of its own.
  (Mosquitto instead replaces every client id by the username, so there a second
  connection of ``user-4`` takes over the first.)

Limits of amqtt that remain (it is the one-machine broker; bind it to loopback):

- It has no maximum packet size: it reads any publish up to MQTT's 256 MiB limit, so the
  2.3 MB uploads pass and ``max_packet_size`` is not enforced; ``max_queued_messages``,
  ``max_inflight_messages`` and ``persistence`` have no amqtt counterpart here.
- It looks up (and, with ``clean_session``, clears) the session named by a CONNECT's client
  id *before* the credentials are checked: a CONNECT with a wrong password, or another
  user's login, and the client id ``provider-0`` is refused, yet the connected provider
  loses its subscriptions (verified with amqtt 0.12.1; with ``clean_session`` false the
  connected client is even disconnected). Fixing that means replacing amqtt's private
  ``Broker._initialize_client_session``; we do not. Anyone who can reach the port can do
  it, which is one more reason to bind the embedded broker to loopback only.
- A publish refused by the ACL is acknowledged (PUBACK at QoS 1) and silently dropped, as
  Mosquitto does; the connection stays up.

Two amqtt 0.12.1 bugs are worked around in :class:`_FairbusAmqttBroker` (both verified):

- On every CONNECT amqtt sends the new client the retained messages matching *every*
  subscription in the broker, anyone's, with no ACL check: a user that subscribed to
  nothing received the retained presence of other users, which only the provider may
  read. Retained messages now go only to a client holding that subscription (and so
  having passed the subscribe check).
- It iterates its subscription table across ``await``s (the topic check of each delivery,
  the retained messages of a connecting client) while other clients subscribe, and then
  fails with "dictionary changed size during iteration": a message being broadcast is
  lost for every remaining subscriber, or a connecting client has its CONNACK but is never
  served. The table now iterates over a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from fairbus_broker.acl import Permissions, acl_entries, may_publish, may_receive, may_subscribe
from fairbus_broker.config import BrokerConfig
from fairbus_broker.errors import BrokerError
from fairbus_broker.logins import Logins, load_logins
from fairbus_broker.passwords import hash_password, verify_password

log = logging.getLogger(__name__)


class _SnapshotDict(dict[str, list[Any]]):
    """amqtt's subscription table (filter → [(session, qos)]), whose iterations walk a copy,
    so that amqtt may ``await`` inside them (see :class:`_FairbusAmqttBroker`)."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, list[Any]]]:  # type: ignore[override]
        return [(k, list(v)) for k, v in super().items()]


class _FairbusAmqttBroker(Broker):  # type: ignore[misc]  # amqtt ships no types
    """amqtt's ``Broker`` with the two fixes described in the module docstring."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._subscriptions: dict[str, list[Any]] = _SnapshotDict()  # start() only clears it

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(held.client_id == session.client_id for held, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class FairbusAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    """Password (or TLS client-certificate) logins, Mosquitto semantics; see the module."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)
        """Username → ``$7$`` PBKDF2 hash (:func:`fairbus_broker.passwords.hash_password`)."""
        writable: dict[str, list[str]] = field(default_factory=dict)
        """Username → write filters, to check the Last Will at connect."""
        certificates: bool = False
        """Take the username from the client certificate's CN, ignore passwords."""

    async def authenticate(self, *, session: Session) -> bool:
        cfg: FairbusAuthPlugin.Config = self.context.config
        if cfg.certificates:
            username = _certificate_cn(session)
            if username is None:
                return _refuse(session, "no verified client certificate")
            session.username = username
        else:
            username = session.username
            hashed = cfg.users.get(username or "")
            if hashed is None or not verify_password(session.password or "", hashed):
                return _refuse(session, "unknown user or wrong password")
        if username not in cfg.writable:
            return _refuse(session, f"{username!r} is not in the roster")
        client_id = session.client_id or ""
        if client_id != username and not client_id.startswith(f"{username}-"):
            return _refuse(session, "the client id is not the username or its own extension")
        perms = Permissions(tuple(cfg.writable[username]), ())
        if session.will_flag and not may_publish(perms, session.will_topic or ""):
            return _refuse(session, f"Last Will topic {session.will_topic!r} is not its own")
        return True


class FairbusTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    """Publish, subscribe and receive checks from :func:`fairbus_broker.acl.permissions`."""

    @dataclass
    class Config:
        write: dict[str, list[str]] = field(default_factory=dict)
        read: dict[str, list[str]] = field(default_factory=dict)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        cfg: FairbusTopicPlugin.Config = self.context.config
        self._perms = {
            user: Permissions(tuple(cfg.write[user]), tuple(cfg.read.get(user, ())))
            for user in cfg.write
        }

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        perms = self._perms.get(session.username or "") if session is not None else None
        if perms is None or not topic:
            return False
        if action == Action.PUBLISH:
            allowed = may_publish(perms, topic)
        elif action == Action.SUBSCRIBE:
            allowed = may_subscribe(perms, topic)
        elif action == Action.RECEIVE:
            allowed = may_receive(perms, topic)
        else:
            allowed = False
        if not allowed:
            log.info("refused %s of %r by %s", action, topic, session.username)  # type: ignore[union-attr]
        return allowed


def amqtt_config(config: BrokerConfig, logins: Logins) -> dict[str, Any]:
    """The amqtt ``Broker`` configuration: one listener and the two plugins above."""
    entries = acl_entries(logins.roster)
    certificates = config.tls is not None and config.tls.require_certificate
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{config.host}:{config.port}"}
    if config.tls is not None:
        listener |= {
            "ssl": True,
            "cafile": str(config.tls.cafile),
            "certfile": str(config.tls.certfile),
            "keyfile": str(config.tls.keyfile),
        }
    return {
        "listeners": {"default": listener},
        "plugins": {
            f"{__name__}.FairbusAuthPlugin": {
                "users": {} if certificates else {
                    user: hash_password(pw) for user, pw in logins.passwords.items()
                },
                "writable": {user: list(p.write) for user, p in entries.items()},
                "certificates": certificates,
            },
            f"{__name__}.FairbusTopicPlugin": {
                "write": {user: list(p.write) for user, p in entries.items()},
                "read": {user: list(p.read) for user, p in entries.items()},
            },
        },
    }  # fmt: skip


class EmbeddedBroker:
    """An amqtt broker for the length of an ``async with`` block, listening once entered."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.logins: Logins | None = None
        self._broker: _FairbusAmqttBroker | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host  # noqa: S104

    @property
    def port(self) -> int:
        return self.config.port

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._broker is not None:
            raise BrokerError("this EmbeddedBroker is already running")
        self.logins = load_logins(self.config)
        broker = _FairbusAmqttBroker(amqtt_config(self.config, self.logins))
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps every start failure in its own BrokerError
            raise BrokerError(
                f"embedded broker cannot listen on {self.config.host}:{self.config.port}: {exc}"
            ) from exc
        self._broker = broker

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()


async def serve_embedded(config: BrokerConfig, stop: asyncio.Event | None = None) -> None:
    """Run the embedded broker until ``stop`` is set (or SIGTERM/SIGINT when not given)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    async with EmbeddedBroker(config):
        await stop.wait()


def run_embedded(config: BrokerConfig) -> int:
    """Run the embedded broker in the foreground until SIGTERM or SIGINT; returns 0."""
    logging.getLogger("transitions").setLevel(logging.WARNING)  # a line per state change
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_embedded(config))
    return 0


def _certificate_cn(session: Session) -> str | None:
    ssl_object = session.ssl_object
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None  # none presented, or not verified against the CA
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _refuse(session: Session, why: str) -> bool:
    log.info(
        "refused connection of client %r (user %r): %s", session.client_id, session.username, why
    )
    return False
