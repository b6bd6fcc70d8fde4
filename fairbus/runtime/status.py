"""``fairbus status``: where a task stands, from the ledger and the presence topics.

It logs in to the broker as one of the roster's **admins**, not as the provider: the
admin may query the ledger for a round's transactions (:data:`UPLOAD_READERS`) and read
the retained presence topics (:func:`fairbus_broker.acl.permissions`), and no running
process holds its login (a second ``provider-0`` connection would take the running
provider's session over, Mosquitto using the login as client id). It needs the admin's
key files (``<id>.sign.key``, ``<id>.box.key``, ``<id>.mqtt.key``) in the task's
``keys`` folder; ``--as`` picks one where the roster has several.

From the ledger: its height and last block (a ``height`` query), the provider's last
transaction (``head``, then ``tx``): its type is the phase, its round and attempt where
the task stands; the round's transactions (``round``): uploads recorded for the current
attempt, the excluded users and key users (the latest announcement, plus the violators
of a recorded decision). From presence: who is online (retained ``online``/``offline``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from fairbus import envelope, topics
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError, OperatorError
from fairbus.identity import Identity, broker_password_path, require_broker_password
from fairbus.ledger.records import Transaction
from fairbus.roster import Role, Roster
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import Presence
from fairbus.wire.messages import Announce, Decision, Message
from fairbus_broker.mqtt import login_refused, mqtt_client, refusal_reason
from fairbus_ledger_service.client import LedgerClient, LedgerTimeoutError

PRESENCE_WAIT = 1.0
"""Seconds to collect the retained presences after subscribing (the broker sends them at
once)."""
PHASES = {
    None: "not started",
    "task_start": "task started",
    "global_model": "global model published",
    "announce": "key negotiation and upload",
    "dropout": "attempt closed after dropouts",
    "evaluation": "group models evaluated",
    "decision": "round done",
}
"""What the type of the provider's last transaction says about where the task stands."""


class StatusError(OperatorError):
    """``fairbus status`` could not tell: no admin key, the broker unreachable or refusing
    the login, or no ledger node answering."""


@dataclass
class TaskStatus:
    task: str
    observer: int
    """The admin whose login asked."""
    ledger_height: int
    ledger_head: str
    provider: int
    provider_online: bool
    round: int
    attempt: int | None
    last_transaction: str | None
    phase: str
    uploads: int
    """Uploads the ledger recorded for the current attempt."""
    groups: int
    key_users: list[int]
    excluded: list[int]
    violators: list[int]
    """Those of the current round's recorded decision (empty before it)."""
    online: list[int]
    offline: list[int]
    """Users whose retained presence says ``offline`` (they were on the bus before)."""
    unseen: list[int] = field(default_factory=list)
    """Users with no retained presence (never connected to this broker)."""

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def pick_admin(roster: Roster, config: RuntimeConfig, wanted: int | None) -> int:
    """``wanted``, or the roster's admin whose key files are in the keys folder."""
    admins = roster.with_role(Role.ADMIN)
    if wanted is not None:
        if wanted not in admins:
            raise StatusError(f"{config.roster}: participant {wanted} is not an admin "
                              f"(admins: {admins or 'none'})")  # fmt: skip
        return wanted
    have = [a for a in admins if broker_password_path(config.keys, a).exists()]
    if not have:
        raise StatusError(
            f"fairbus status logs in as one of the roster's admins ({admins or 'none'}); "
            f"{config.keys} holds no admin's key files (<id>.sign.key, <id>.mqtt.key)"
        )
    return have[0]


async def task_status(
    config: RuntimeConfig, *, admin: int | None = None, wait: float = PRESENCE_WAIT
) -> TaskStatus:
    """Ask the ledger and read the presences (module docstring)."""
    roster = Roster.load(config.roster)
    me = pick_admin(roster, config, admin)
    identity = Identity.load(config.keys, me)
    password = require_broker_password(config.keys, me)
    login = topics.username(Role.ADMIN.value, me)
    host, port = config.broker
    client = mqtt_client(host, port, f"{login}-status", username=login, password=password)
    ledger = LedgerClient(client, identity, roster, Role.ADMIN.value,
                          timeout=config.ledger_timeout, retries=1)  # fmt: skip
    presence: dict[tuple[str, int], bytes] = {}

    async def read() -> None:
        async for message in client.messages:
            if not isinstance(message.payload, bytes | bytearray):
                continue
            parsed = topics.parse(roster.task, str(message.topic))
            if parsed is None:
                continue
            if parsed.from_ledger:
                ledger.dispatch(bytes(message.payload))
            elif parsed.kind == "presence":
                presence[(parsed.role, parsed.sender)] = bytes(message.payload)

    try:
        async with client:
            for topic in [*ledger.topics, topics.presences(roster.task)]:
                await client.subscribe(topic, qos=topics.QOS)
            reader = asyncio.create_task(read())
            try:
                started = asyncio.get_running_loop().time()
                status = await _from_ledger(ledger, roster, me)
                left = wait - (asyncio.get_running_loop().time() - started)
                await asyncio.sleep(max(left, 0.0))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    except aiomqtt.MqttError as exc:
        if login_refused(exc):
            raise StatusError(f"the broker at {host}:{port} refused the login {login!r} "
                              f"({refusal_reason(exc)})") from None  # fmt: skip
        raise StatusError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    except LedgerTimeoutError:
        raise StatusError(
            f"no ledger node answered within {config.ledger_timeout} s (is a `fairbus ledger` "
            f"node of task {roster.task!r} on the broker at {host}:{port}?)"
        ) from None
    users = roster.with_role(Role.USER)

    def seen(role: Role, pid: int) -> Presence | None:
        data = presence.get((role.value, pid))
        return None if data is None else Presence.parse(data)

    def online(role: Role, pid: int) -> bool:
        said = seen(role, pid)
        return said is not None and said.online

    status.provider_online = online(Role.PROVIDER, status.provider)
    status.online = [u for u in users if online(Role.USER, u)]
    status.offline = [u for u in users if seen(Role.USER, u) == Presence(False)]
    status.unseen = [u for u in users if (Role.USER.value, u) not in presence]
    return status


async def _from_ledger(ledger: LedgerClient, roster: Roster, me: int) -> TaskStatus:
    height, head_block = await ledger.height()
    provider = roster.provider
    status = TaskStatus(
        task=roster.task, observer=me, ledger_height=height, ledger_head=head_block.hex(),
        provider=provider, provider_online=False, round=0, attempt=None,
        last_transaction=None, phase=PHASES[None], uploads=0, groups=0, key_users=[],
        excluded=[], violators=[], online=[], offline=[],
    )  # fmt: skip
    head = await _one(ledger, "head", sender=provider)
    if head is None or head == GENESIS:
        return status
    last = await _one(ledger, "tx", tx_hash=head)
    if last is None:
        raise StatusError(f"the ledger names provider {provider}'s last transaction "
                          f"{head.hex()[:16]} but does not serve it")  # fmt: skip
    header = Transaction.from_bytes(last).envelope.header
    status.last_transaction = header.type
    status.phase = PHASES.get(header.type, header.type)
    status.round = header.round or 0
    status.attempt = header.attempt
    for number in (status.round, status.round - 1):
        if number >= 1 and _read_round(status, await _round(ledger, roster, number)):
            break
    return status


def _read_round(status: TaskStatus, txs: list[tuple[str, int | None, Message | None]]) -> bool:
    """Fill ``status`` from one round's transactions; False if it holds no announcement."""
    announces = [(a or 0, m) for t, a, m in txs if t == "announce" and isinstance(m, Announce)]
    if not announces:
        return False
    attempt, announce = max(announces, key=lambda x: x[0])
    status.groups = len(announce.groups)
    status.key_users = sorted(announce.key_users)
    excluded = set(announce.excluded)
    if status.last_transaction in ("announce", "dropout", "evaluation", "decision"):
        status.uploads = sum(1 for t, a, _ in txs if t == "upload" and a == attempt)
    for t, _, m in txs:
        if t == "decision" and isinstance(m, Decision):
            status.violators = sorted(m.violators)
            status.key_users = sorted(m.key_users)
            excluded |= set(m.violators)
    status.excluded = sorted(excluded)
    return True


async def _one(ledger: LedgerClient, kind: str, **key: object) -> bytes | None:
    answer = await ledger.query(kind, **key)
    return answer.records[0] if answer.ok and answer.records else None


async def _round(
    ledger: LedgerClient, roster: Roster, number: int
) -> list[tuple[str, int | None, Message | None]]:
    """(type, attempt, body) of round ``number``'s transactions; the body of those kept
    in the block (a model-sized payload is in the blob stores: None)."""
    answer = await ledger.query("round", round=number)
    if not answer.ok:
        raise StatusError(f"the ledger refused round {number}'s records: {answer.error}")
    out: list[tuple[str, int | None, Message | None]] = []
    for record in answer.records:
        tx = Transaction.from_bytes(record)
        body: Message | None = None
        if tx.payload is not None:
            with contextlib.suppress(FairbusError):
                body = envelope.verify(tx.envelope, roster).message
        out.append((tx.envelope.header.type, tx.envelope.header.attempt, body))
    return out
