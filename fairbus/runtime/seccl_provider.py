"""``fairbus provider`` for a task whose mode is ``seccl``: SecCL's parameter server
(:class:`fairbus.protocol.seccl_provider.SecclServerMachine`) driven over the bus.

SecCL ("Message Interaction Protocol", Participant-Server and Server-TBB Interaction):
every message is a ledger transaction (the trusted bulletin board) and travels with
its receipt (the paper's Tx-ID). The driver only feeds the machine events —
:class:`StartRound`, the participants' recorded type (a) and type (b) messages as
:class:`Received` bytes (``…/user/<id>/seccl_update``, ``…/seccl_evaluation``),
:class:`Joined`/:class:`Dropped` from presence, :class:`ChainHead` for a returning
user, :class:`Tick` for the phase deadlines — and carries out what comes back: a
:class:`Commit` is committed on the ledger (the model-sized test set and global model as
their headers; the ledger nodes keep the payloads from the bus) and then broadcast with
its receipt on the provider's topic for its type. The consensus contract on the ledger
re-derives the election and the new global model from the recorded changes before it
admits the candidates. One :class:`~fairbus.rounds.RoundRecord` per round goes to
``<state>/provider/rounds.jsonl`` (with the candidates and Borda totals), and the global
model to ``global_model.npy``.

The pieces are the fairness provider's: :class:`BusConnection`, :class:`LedgerClient`,
:class:`PresenceTracker`, the state folder, :class:`RuntimeMetrics`, the task's test set
(:func:`fairbus.runtime.provider.load_task_data`), recorded before the task start so
that the task start names it. Not yet: recovery from the ledger after a restart (a
SecCL provider that finds its chain on the ledger stops with one line) and a hot standby.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time

import numpy as np

from fairbus import topics
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.evaluation import ExactEvaluator
from fairbus.identity import Identity, broker_password_path, require_broker_password
from fairbus.ledger.recorded import Recorded, ledger_submission
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import (
    ChainHead,
    Commit,
    Joined,
    Received,
    Refused,
    RoundFailed,
    SecclEvent,
    SecclOutput,
    SecclRoundDone,
    StartRound,
    Tick,
)
from fairbus.protocol.seccl_provider import SecclServerConfig, SecclServerMachine
from fairbus.roster import Role, Roster
from fairbus.rounds import RoundRecord
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import BusConnection, Presence
from fairbus.runtime.metrics import RuntimeMetrics
from fairbus.runtime.presence import PresenceTracker
from fairbus.runtime.provider import (
    LEDGER_WORK_PATIENCE,
    NO_USERS_RETRY,
    TICK,
    ProviderError,
    TaskData,
    load_task_data,
)
from fairbus.runtime.state import prepare_state_folder, state_io
from fairbus.task import TaskParams
from fairbus.wire.messages import SECCL, EvaluationSpec
from fairbus_ledger_service.client import LedgerClient

log = logging.getLogger("fairbus.provider")

USER_KINDS = frozenset({"seccl_update", "seccl_evaluation"})
"""What the server takes from the participants' topics (each with its receipt)."""


def seccl_task(config: RuntimeConfig, data: TaskData, users: int) -> TaskParams:
    """The task start of a ``seccl`` task: the mode, θ and λ of the configuration, the
    test set recorded before it, and the local steps each of the ``users`` takes."""
    t = config.training
    train = t.train.for_task(data.train_samples, users)
    committed = data.test_set.to_message()
    spec = EvaluationSpec(t.model_name, hashlib.sha256(committed.payload()).digest())
    return TaskParams(
        config.detection,
        config.collusion,
        config.keying,
        spec,
        train.local_steps,
        SECCL,
        config.theta,
        config.candidate_share,
    )


class SecclProviderRuntime:
    """SecCL's server on the bus; :meth:`run` plays ``[provider] rounds`` rounds."""

    def __init__(self, config: RuntimeConfig) -> None:
        if not config.seccl:
            raise ProviderError(f"the task's mode is {config.mode!r}, not 'seccl'")
        self.config = config
        self.roster = Roster.load(config.roster)
        self.pid = self.roster.provider
        self.identity = Identity.load(config.keys, self.pid)
        self.task = self.roster.task
        self.users = self.roster.with_role(Role.USER)
        self.out_dir = prepare_state_folder(config.state / "provider")
        self.records: list[RoundRecord] = []
        self.presence = PresenceTracker(frozenset(self.users), config.provider.presence_grace)
        self._inbox: asyncio.Queue[SecclEvent] = asyncio.Queue()
        self._round_over = asyncio.Event()
        self._record: RoundRecord | None = None
        self._evaluator: ExactEvaluator | None = None
        self._task_data: TaskData | None = None
        self.machine: SecclServerMachine | None = None
        self._relay: list[bytes] = []
        """The task's test set and the round's changes as received (recorded envelopes),
        to hand a ledger node that lacks one when it re-derives the election."""
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
        self.bus.subscriptions = [
            topics.seccl_changes(self.task),
            topics.seccl_evaluations(self.task),
            topics.user_presences(self.task),
            *self.ledger.topics,
        ]

    # --- bus ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, data: bytes) -> None:
        """Route by topic; the bytes go to the machine (or the ledger client) unparsed."""
        parsed = topics.parse(self.task, topic)
        if parsed is None:
            return
        if parsed.from_ledger:
            self.ledger.dispatch(data)
            return
        if parsed.role != Role.USER.value or parsed.sender not in self.users:
            return
        if parsed.kind == "presence":
            presence = Presence.parse(data)
            if presence is not None:
                for event in self.presence.saw(parsed.sender, presence, time.monotonic()):
                    self._inbox.put_nowait(event)
        elif parsed.kind in USER_KINDS and parsed.recipient is None:
            if parsed.kind == "seccl_update":
                self._relay.append(data)
            self._inbox.put_nowait(Received(parsed.kind, data))

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> list[RoundRecord]:
        """Play the rounds and return their records. A login the broker refuses ends it
        (:class:`~fairbus.runtime.connection.BrokerLoginError`)."""
        self._evaluator = await asyncio.to_thread(self._build_evaluator)
        ticker = asyncio.create_task(self._tick())
        try:
            return await self.bus.serve(self._play())
        finally:
            ticker.cancel()

    async def _play(self) -> list[RoundRecord]:
        from fairbus.training.models import initial_params

        assert self._task_data is not None
        t = self.config.training
        await self.bus.connected.wait()
        answer = await self.ledger.query("head", sender=self.pid)
        if answer.ok and answer.records and answer.records[0] != GENESIS:
            raise ProviderError(
                f"task {self.task!r} already has the provider's transactions on the ledger; a "
                "SecCL provider does not resume a task yet: start a new task (a fresh ledger)"
            )
        task = seccl_task(self.config, self._task_data, len(self.users))
        self.machine = SecclServerMachine(
            self.identity,
            self.roster,
            initial_params(t.model_name, t.seed),
            SecclServerConfig(
                task, self._task_data.test_set.to_message(), self.config.provider.phase_timeout
            ),
            online=(),
        )
        await self._wait_for_users()
        while len(self.records) < self.config.provider.rounds:
            await self._play_round()
        return self.records

    async def _wait_for_users(self) -> None:
        assert self.machine is not None
        want = min(self.config.provider.min_users or len(self.users), len(self.users))
        deadline = time.monotonic() + self.config.provider.join_timeout
        log.info("waiting for %d of %d participants (at most %.0f s)", want, len(self.users),
                 self.config.provider.join_timeout)  # fmt: skip
        while time.monotonic() < deadline:
            await self._drain()
            if len(self.machine.online) >= want:
                break
            await asyncio.sleep(0.1)
        await self._drain()
        log.info("participants online: %s", sorted(self.machine.online))

    async def _drain(self) -> None:
        """Hand the machine every queued event (between rounds)."""
        while not self._inbox.empty():
            await self._feed(self._inbox.get_nowait())

    async def _feed(self, event: SecclEvent) -> None:
        """One event into the machine, its outputs carried out. A user that (re)joins
        continues its chain from the ledger's head first."""
        assert self.machine is not None
        if isinstance(event, Joined):
            await self._resync_chain(event.user)
        start = time.perf_counter()
        outputs = self.machine.handle(event)
        if isinstance(event, Received) and self._record is not None:
            self._record.timings_s["aggregation"] += time.perf_counter() - start
        await self._carry_out(outputs)

    async def _resync_chain(self, user: int) -> None:
        assert self.machine is not None
        try:
            answer = await self.ledger.query("head", sender=user)
        except FairbusError as exc:
            log.warning("no ledger head for returning user %d: %s", user, exc)
            return
        if answer.ok and answer.records:
            await self._carry_out(self.machine.handle(ChainHead(user, answer.records[0])))

    async def _play_round(self) -> None:
        assert self.machine is not None
        await self._drain()
        record = RoundRecord.empty(self.machine.round + 1, attempts=1)
        self._record = record
        self._round_over.clear()
        self._relay = self._relay[:1] if self.machine.started else []  # keep the test set
        start = time.perf_counter()
        await self._carry_out(self.machine.handle(StartRound(time.time())))
        record.timings_s["announce"] = time.perf_counter() - start
        while not self._round_over.is_set():
            await self._feed(await self._inbox.get())
        record.timings_s["round"] = time.perf_counter() - start
        self.metrics.round_ended(record)
        if record.failed is None:
            self._write(record)
        else:
            log.warning("round %d failed: %s; waiting for participants", record.round,
                        record.failed)  # fmt: skip
            await asyncio.sleep(NO_USERS_RETRY)

    async def _tick(self) -> None:
        """The machine's clock (its phase deadlines) and the presence grace periods."""
        while True:
            await asyncio.sleep(TICK)
            for event in self.presence.expire(time.monotonic()):
                self._inbox.put_nowait(event)
            self._inbox.put_nowait(Tick(time.time()))

    async def _carry_out(self, outputs: list[SecclOutput]) -> None:
        record = self._record
        for out in outputs:
            if isinstance(out, Commit):
                await self._commit(out)
            elif isinstance(out, SecclRoundDone):
                await self._done(out)
            elif isinstance(out, RoundFailed):
                if record is not None:
                    record.failed = out.reason
                self._round_over.set()
            elif isinstance(out, Refused):
                log.warning("refused: %s: %s", out.reason, out.detail)
                self.metrics.refused(out.reason)
                if record is not None:
                    record.refusals.append(f"{out.reason}: {out.detail}")

    async def _commit(self, out: Commit) -> None:
        """Commit on the ledger, then publish with the receipt (the test set below the
        provider's ``ledger`` subtree, for the ledger nodes only)."""
        assert self._record is not None
        env, kind = out.envelope, out.kind
        start = time.perf_counter()
        patience = LEDGER_WORK_PATIENCE if kind in ("task_start", "seccl_candidates") else None
        submission = ledger_submission(env)
        try:
            committed, receipt = await self.ledger.submit_for_receipt(submission, patience)
        except RefusedError as exc:
            if exc.reason is not RefusalReason.MISSING_PAYLOAD:
                raise ProviderError(f"the ledger refused the provider's {kind}: {exc}") from None
            # A ledger node takes the changes from the bus and missed some: hand them over.
            log.warning("the ledger lacks payloads of the %s (%s); relaying %d", kind,
                        exc.detail, len(self._relay))  # fmt: skip
            for data in self._relay:
                await self.bus.publish(topics.relayed_payload(self.task, self.pid), data)
            committed, receipt = await self.ledger.submit_for_receipt(submission, patience)
        self.metrics.committed(kind, time.perf_counter() - start, committed.height)
        self._record.ledger_height = committed.height
        timings = self._record.timings_s
        timings["ledger"] = timings.get("ledger", 0.0) + time.perf_counter() - start
        data = Recorded(env, receipt).to_bytes()
        if kind == "test_set":
            self._relay.insert(0, data)
            await self.bus.publish(topics.relayed_payload(self.task, self.pid), data)
            return
        await self.bus.publish(topics.provider_message(self.task, self.pid, kind), data)
        self._record.bytes[kind] = self._record.bytes.get(kind, 0) + len(data)
        if kind == "seccl_close":
            log.info("round %d: a phase closed at its deadline", self._record.round)

    async def _done(self, done: SecclRoundDone) -> None:
        assert self._record is not None and self._evaluator is not None
        record = self._record
        record.candidates = list(done.candidates)
        record.borda = dict(sorted(done.totals.items()))
        record.dropped = sorted(set(done.participants) - set(done.totals))
        start = time.perf_counter()
        record.global_accuracy = await asyncio.to_thread(
            self._evaluator.accuracy, done.global_params
        )
        record.timings_s["global_evaluation"] = time.perf_counter() - start
        record.bytes = dict(record.bytes)
        self.records.append(record)
        model_path = self.out_dir / "global_model.npy"
        with state_io("write", model_path):
            np.save(model_path, done.global_params)
        log.info("round %d: accuracy %.3f, candidates %s, Borda totals %s", record.round,
                 record.global_accuracy, record.candidates, record.borda)  # fmt: skip
        self._round_over.set()

    def _write(self, record: RoundRecord) -> None:
        path = self.out_dir / "rounds.jsonl"
        with state_io("write", path), path.open("a") as f:
            f.write(json.dumps(record.to_json()) + "\n")

    def _build_evaluator(self) -> ExactEvaluator:
        """The task's test set (recorded before the task start) and the global model's
        test accuracy, for the round records."""
        t = self.config.training
        if t.threads:
            import torch

            torch.set_num_threads(t.threads)
        self._task_data = load_task_data(self.config)
        return ExactEvaluator(t.model_name, self._task_data.test_set)
