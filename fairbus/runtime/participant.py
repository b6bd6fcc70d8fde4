"""What every process of a task on the bus does with a message first
(:func:`route_from_ledger`), and what the fairness user (:mod:`fairbus.runtime.user`) and
the SecCL participant (:mod:`fairbus.runtime.seccl_user`) share
(:class:`UserParticipant`): the roster check, the state folder, the bus, ledger and
metrics connections, the chain head to resume from, and committing a message on the
ledger before publishing it with its receipt.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

from fairbus import topics
from fairbus.errors import EnvelopeError, RosterError
from fairbus.identity import Identity, broker_password_path, require_broker_password
from fairbus.ledger.recorded import Recorded, ledger_submission
from fairbus.ledger.state import RefusedError
from fairbus.protocol.events import Commit
from fairbus.roster import Role, Roster
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import BusConnection
from fairbus.runtime.metrics import RuntimeMetrics
from fairbus.runtime.user_state import UserState
from fairbus.training.attacks import Attack
from fairbus_ledger_service.client import LedgerClient, LedgerTimeoutError

log = logging.getLogger("fairbus.user")


def route_from_ledger(
    task: str, ledger: LedgerClient, topic: str, data: bytes
) -> topics.Topic | None:
    """The parsed ``topic`` of a message for the process's machine; None for one of
    another task or shape, and for a ledger node's answer, which goes to ``ledger``."""
    parsed = topics.parse(task, topic)
    if parsed is None:
        return None
    if parsed.from_ledger:
        ledger.dispatch(data)
        return None
    return parsed


class UserParticipant(ABC):
    """A user of the roster on the bus; the subclass holds its machine, sets the bus
    subscriptions and routes what arrives (:meth:`_on_message`)."""

    def __init__(self, config: RuntimeConfig, user_id: int, attack: Attack | None) -> None:
        self.config = config
        self.me = user_id
        self.attack = attack or Attack()
        self.roster = Roster.load(config.roster)
        try:
            self.roster.member(user_id, roles=[Role.USER])
        except EnvelopeError as exc:  # not in the roster, or not as a user
            raise RosterError(f"{config.roster}: {exc}") from None
        self.identity = Identity.load(config.keys, user_id)
        self.task = self.roster.task
        self.state = UserState(config.state / f"user-{user_id}")
        self.bus = BusConnection(
            *config.broker,
            task=self.task,
            role="user",
            pid=user_id,
            password=require_broker_password(config.keys, user_id),
            password_file=broker_password_path(config.keys, user_id),
            subscriptions=[],
            on_message=self._on_message,
        )
        self.ledger = LedgerClient(
            self.bus, self.identity, self.roster, "user", timeout=config.ledger_timeout
        )
        self.metrics = RuntimeMetrics.start(config.metrics, "user", user_id, self.bus)

    @abstractmethod
    def _on_message(self, topic: str, data: bytes) -> None:
        """What arrives on the bus."""

    @abstractmethod
    async def _resume_chain(self) -> None:
        """Hand the machine the chain head to continue from (:meth:`_chain_head`)."""

    async def _chain_head(self) -> bytes:
        """The ledger's head for this user, which wins over the saved one (a message
        signed just before a crash may or may not have committed); the saved one when no
        ledger node answers."""
        saved = self.state.chain_head()
        try:
            answer = await self.ledger.query("head", sender=self.me)
            head = answer.records[0] if answer.ok and answer.records else saved
        except LedgerTimeoutError:
            log.warning("user %d: no ledger answer; resuming from the saved chain head", self.me)
            head = saved
        if head != saved:
            log.info("user %d: chain head %s from the ledger", self.me, head.hex()[:16])
            self.state.save_chain_head(head)
        return head

    async def _commit_and_publish(self, out: Commit, round_: int) -> float | None:
        """Commit ``out`` on the ledger, then publish it with the receipt on this user's
        topic for its kind; the seconds the ledger took. None when it was not committed
        (or not known to be): the chain resumes from whatever the ledger holds as this
        user's head. ``round_`` is the machine's round (the user took part in it)."""
        start = time.perf_counter()
        try:
            committed, receipt = await self.ledger.submit_for_receipt(
                ledger_submission(out.envelope)
            )
        except (RefusedError, LedgerTimeoutError) as exc:
            if isinstance(exc, RefusedError):
                self.metrics.refused(exc.reason.value)
            log.warning("user %d: %s not recorded: %s", self.me, out.kind, exc)
            await self._resume_chain()
            return None
        seconds = time.perf_counter() - start
        self.metrics.committed(out.kind, seconds, committed.height)
        self.metrics.took_part(round_)
        self.state.save_chain_head(out.envelope.hash)
        await self.bus.publish(
            topics.message(self.task, "user", self.me, out.kind),
            Recorded(out.envelope, receipt).to_bytes(),
        )
        return seconds
