"""What the fairness provider (:mod:`fairbus.runtime.provider`) and SecCL's server
(:mod:`fairbus.runtime.seccl_provider`) share on the bus: the task's data, the bus and
ledger connections, presence, the inbox the machine is fed from, the ledger submission
that relays missing payloads, and the round records in the state folder.

:class:`ProviderLoop` holds these; a subclass holds its machine and says how one step of
it runs (:meth:`ProviderLoop._step`), what it does with the outputs
(:meth:`ProviderLoop._carry_out`) and what it takes from the users' topics
(:meth:`ProviderLoop._on_user_message`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Set
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from fairbus import topics
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.evaluation import ExactEvaluator, QuantizedTestSet
from fairbus.identity import Identity, broker_password_path, require_broker_password
from fairbus.ledger.records import Committed
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import (
    ChainHead,
    Event,
    Joined,
    Output,
    Received,
    SecclEvent,
    SecclOutput,
    Tick,
)
from fairbus.roster import Role, Roster
from fairbus.rounds import RoundRecord
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import BusConnection, Presence
from fairbus.runtime.metrics import RuntimeMetrics
from fairbus.runtime.participant import route_from_ledger
from fairbus.runtime.presence import PresenceTracker
from fairbus.runtime.state import prepare_state_folder, state_io
from fairbus_ledger_service.client import LedgerClient

log = logging.getLogger("fairbus.provider")

LEDGER_WORK_PATIENCE = 60.0
"""Seconds to wait for the receipt of a transaction the ledger works on before it admits
it: the task start (it loads the exact evaluation and decodes the recorded test set) and,
beyond four times this process's own evaluation time, an evaluation (it re-derives every
number). Waiting costs nothing; giving up stops the provider."""
TICK = 0.25
NO_USERS_RETRY = 2.0
"""Seconds to wait for users before trying a round again when too few are online."""

EventT = TypeVar("EventT", Event, SecclEvent)
OutputT = TypeVar("OutputT", Output, SecclOutput)


class ProviderError(FairbusError):
    pass


@dataclass(frozen=True)
class TaskData:
    """What the provider reads of the task's data set: the test set it records and
    evaluates on, and how many training samples the users share among them."""

    test_set: QuantizedTestSet
    train_samples: int


def load_task_data(config: RuntimeConfig) -> TaskData:
    """The task's test set, as the provider records it and evaluates on it, and the
    size of the training set the users' partitions are cut from."""
    from fairbus.training.data import load_dataset

    t = config.training
    train, test = load_dataset(t.dataset, t.data_dir, seed=t.seed)
    test_set = QuantizedTestSet.quantize(test.x.numpy(), test.y.numpy(), test.num_classes)
    return TaskData(test_set, len(train))


class ProviderLoop(ABC, Generic[EventT, OutputT]):
    """A provider on the bus that feeds its machine from one inbox (``EventT``) and
    carries out what it returns (``OutputT``); the subclass sets the bus subscriptions."""

    participants = "users"
    """What the log lines call the users."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.roster = Roster.load(config.roster)
        self.pid = self.roster.provider
        self.identity = Identity.load(config.keys, self.pid)
        self.task = self.roster.task
        self.users = self.roster.with_role(Role.USER)
        self.out_dir = prepare_state_folder(config.state / "provider")
        self.records: list[RoundRecord] = []
        self.presence = PresenceTracker(frozenset(self.users), config.provider.presence_grace)
        self._inbox: asyncio.Queue[EventT] = asyncio.Queue()
        self._round_over = asyncio.Event()
        self._record: RoundRecord | None = None
        self._evaluator: ExactEvaluator | None = None
        self._task_data: TaskData | None = None
        self.bus = BusConnection(
            *config.broker,
            task=self.task,
            role="provider",
            pid=self.pid,
            password=require_broker_password(config.keys, self.pid),
            password_file=broker_password_path(config.keys, self.pid),
            subscriptions=[],
            on_message=self._on_message,
        )
        self.ledger = LedgerClient(
            self.bus, self.identity, self.roster, "provider", timeout=config.ledger_timeout
        )
        self.metrics = RuntimeMetrics.start(config.metrics, "provider", self.pid, self.bus)

    # --- what the subclass says ----------------------------------------------------------------

    @abstractmethod
    async def _play(self) -> list[RoundRecord]:
        """Once on the bus: play the rounds and return their records."""

    @abstractmethod
    def _on_user_message(self, kind: str, recipient: int | None, data: bytes) -> None:
        """A message on a user's topic other than its presence."""

    @abstractmethod
    async def _step(self, event: EventT) -> list[OutputT]:
        """One step of the machine."""

    @abstractmethod
    async def _carry_out(self, outputs: list[OutputT]) -> None:
        """Carry out the machine's outputs."""

    @abstractmethod
    def _online(self) -> Set[int]:
        """The users the machine counts as online."""

    @abstractmethod
    def _eligible(self) -> int:
        """How many users may take part at most."""

    @abstractmethod
    def _relayed(self) -> list[bytes]:
        """The recorded envelopes to hand a ledger node that lacks a payload."""

    # --- bus ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, data: bytes) -> None:
        """Route by topic; the bytes go to the machine (or the ledger client) unparsed."""
        parsed = route_from_ledger(self.task, self.ledger, topic, data)
        if parsed is None:
            return
        if parsed.role != Role.USER.value or parsed.sender not in self.users:
            return
        if parsed.kind == "presence":
            presence = Presence.parse(data)
            if presence is not None:
                for event in self.presence.saw(parsed.sender, presence, time.monotonic()):
                    self._inbox.put_nowait(event)
        else:
            self._on_user_message(parsed.kind, parsed.recipient, data)

    # --- the loop ------------------------------------------------------------------------------

    async def _serve(self) -> list[RoundRecord]:
        """:meth:`_play` on the bus, with the clock (:meth:`_tick`) running meanwhile."""
        ticker = asyncio.create_task(self._tick())
        try:
            return await self.bus.serve(self._play())
        finally:
            ticker.cancel()

    async def _ledger_head(self) -> bytes:
        """The provider's chain head on the ledger (:data:`GENESIS` for a new task)."""
        answer = await self.ledger.query("head", sender=self.pid)
        return answer.records[0] if answer.ok and answer.records else GENESIS

    async def _wait_for_users(self) -> None:
        """Feed the machine until enough users are online or ``join_timeout`` passes."""
        eligible = self._eligible()
        want = min(self.config.provider.min_users or eligible, eligible)
        deadline = time.monotonic() + self.config.provider.join_timeout
        log.info("waiting for %d of %d %s (at most %.0f s)", want, len(self.users),
                 self.participants, self.config.provider.join_timeout)  # fmt: skip
        while time.monotonic() < deadline:
            await self._drain()
            if len(self._online()) >= want:
                break
            await asyncio.sleep(0.1)
        await self._drain()
        log.info("%s online: %s", self.participants, sorted(self._online()))

    async def _drain(self) -> None:
        """Hand the machine every queued event (between rounds)."""
        while not self._inbox.empty():
            await self._feed(self._inbox.get_nowait())

    async def _feed(self, event: EventT) -> None:
        """One event into the machine, its outputs carried out. A user that (re)joins
        continues its chain from the ledger's head first."""
        if isinstance(event, Joined):
            await self._resync_chain(event.user)
        start = time.perf_counter()
        outputs = await self._step(event)
        if isinstance(event, Received) and self._record is not None:
            self._record.timings_s["aggregation"] += time.perf_counter() - start
        await self._carry_out(outputs)

    async def _resync_chain(self, user: int) -> None:
        """A returning user's chain continues from the ledger's head for it: a message it
        committed just before it died may never have reached the provider."""
        try:
            answer = await self.ledger.query("head", sender=user)
        except FairbusError as exc:
            log.warning("no ledger head for returning user %d: %s", user, exc)
            return
        if answer.ok and answer.records:
            await self._carry_out(await self._step(ChainHead(user, answer.records[0])))

    async def _tick(self) -> None:
        """The machine's clock (its deadlines), and the end of each presence grace period."""
        while True:
            await asyncio.sleep(TICK)
            for event in self.presence.expire(time.monotonic()):
                self._inbox.put_nowait(event)
            self._inbox.put_nowait(Tick(time.time()))

    async def _submit_relaying(
        self, submission: bytes, kind: str, patience: float | None
    ) -> tuple[Committed, bytes]:
        """Commit ``submission`` on the ledger and return what it committed and the
        receipt. A ledger node takes model-sized payloads from the bus and may have missed
        some (a broker restart, a late subscription): then :meth:`_relayed` is handed over
        and the submission made again. Any other refusal goes to :meth:`_refused`."""
        try:
            return await self.ledger.submit_for_receipt(submission, patience)
        except RefusedError as exc:
            if exc.reason is not RefusalReason.MISSING_PAYLOAD:
                self._refused(kind, exc)
                raise
            relayed = self._relayed()
            log.warning("the ledger lacks payloads of the %s (%s); relaying %d", kind,
                        exc.detail, len(relayed))  # fmt: skip
            for data in relayed:
                await self.bus.publish(topics.relayed_payload(self.task, self.pid), data)
            return await self.ledger.submit_for_receipt(submission, patience)

    def _refused(self, kind: str, exc: RefusedError) -> None:
        """A refusal other than a missing payload; returning re-raises it."""

    # --- the state folder ----------------------------------------------------------------------

    async def _keep_round(self, record: RoundRecord, params: npt.NDArray[np.float32]) -> None:
        """A decided round: the test accuracy of its global model ``params`` (in a worker
        thread) into ``record``, which joins :attr:`records`; the model is saved."""
        assert self._evaluator is not None
        start = time.perf_counter()
        record.global_accuracy = await asyncio.to_thread(self._evaluator.accuracy, params)
        record.timings_s["global_evaluation"] = time.perf_counter() - start
        record.bytes = dict(record.bytes)
        self.records.append(record)
        self._save_global_model(params)

    def _write(self, record: RoundRecord) -> None:
        """Append ``record`` to ``rounds.jsonl``."""
        path = self.out_dir / "rounds.jsonl"
        with state_io("write", path), path.open("a") as f:
            f.write(json.dumps(record.to_json()) + "\n")

    def _save_global_model(self, params: npt.NDArray[np.float32]) -> None:
        """The round's global model as ``global_model.npy``."""
        model_path = self.out_dir / "global_model.npy"
        with state_io("write", model_path):
            np.save(model_path, params)

    def _build_evaluator(self) -> ExactEvaluator:
        """The task's test set (recorded before the task start) and the exact evaluation
        the ledger re-derives."""
        t = self.config.training
        if t.threads:
            import torch

            torch.set_num_threads(t.threads)
        self._task_data = load_task_data(self.config)
        return ExactEvaluator(t.model_name, self._task_data.test_set)
