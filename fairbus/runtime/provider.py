"""``fairbus provider``: the provider machine
(:class:`fairbus.protocol.provider.ProviderMachine`) driven over the bus.

The driver only feeds the machine events (:class:`StartRound`, what arrives on the bus as
:class:`Received` bytes, :class:`Joined`/:class:`Dropped` from presence,
:class:`ChainHead` from the ledger for a returning user, :class:`Tick`, and the answers
to its effects) and carries out what comes back: a :class:`Commit` is committed on the
ledger (model-sized ones as header only; the ledger nodes keep the payload from the bus)
and then broadcast with its receipt; a :class:`Send` is published as it is (under
plain FedAvg, the global model in the clear). The machine checks every upload's receipt
and signature itself. One :class:`RoundRecord` per round goes to
``<state>/provider/rounds.jsonl``. ``[provider] secure = false`` runs the
:class:`~fairbus.aggregation.PlainFedAvg` policy through the same loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from fairbus import topics
from fairbus.aggregation import PlainFedAvg
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.evaluation import ExactEvaluator, QuantizedTestSet
from fairbus.identity import Identity, broker_password_path, require_broker_password
from fairbus.ledger.recorded import Recorded, ledger_submission
from fairbus.ledger.records import Transaction
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import (
    AttemptClosed,
    ChainHead,
    CloseAttempt,
    Commit,
    Evaluate,
    Evaluated,
    Event,
    Joined,
    Output,
    Received,
    Refused,
    RoundDone,
    RoundFailed,
    Send,
    StartRound,
    Tick,
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine
from fairbus.protocol.recovery import (
    LedgerHistory,
    RecoveryError,
    Replayed,
    blobs_needed,
    replay,
)
from fairbus.roster import Role, Roster
from fairbus.rounds import RoundRecord, record_round
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import BusConnection, Presence
from fairbus.runtime.failpoints import crash_after
from fairbus.runtime.metrics import RuntimeMetrics
from fairbus.runtime.presence import PresenceTracker
from fairbus.runtime.standby import when_elected
from fairbus.runtime.state import prepare_state_folder, state_io
from fairbus_ledger_service.client import LedgerClient

log = logging.getLogger("fairbus.provider")

OPENING_LINKS = 2
"""The provider's links before round 1: its test set and its task start."""
LEDGER_WORK_PATIENCE = 60.0
"""Seconds to wait for the receipt of a transaction the ledger works on before it admits
it: the task start (it loads the exact evaluation and decodes the recorded test set) and,
beyond four times this process's own evaluation time, an evaluation (it re-derives every
number). Waiting costs nothing; giving up stops the provider."""
TICK = 0.25
CLOSE_TIMEOUT = 30.0
"""Seconds to wait for a ledger node that shows a recorded dropout."""
NO_USERS_RETRY = 2.0
"""Seconds to wait for users before trying a round again when too few are online."""


class ProviderError(FairbusError):
    pass


@dataclass(frozen=True)
class TaskData:
    """What the provider reads of the task's data set: the test set it records and
    evaluates on, and how many training samples the users share among them."""

    test_set: QuantizedTestSet
    train_samples: int


def machine_config(config: RuntimeConfig, data: TaskData, users: int) -> ProviderConfig:
    """The machine's policy from the task's configuration: ``[provider] secure = false``
    is the :class:`~fairbus.aggregation.PlainFedAvg` aggregation policy. The test set is
    recorded before the task start (the ledger re-derives every accuracy on it), and the
    task start records the local steps each of the ``users`` takes."""
    train = config.training.train.for_task(data.train_samples, users)
    policy = replace(
        config.provider_config(),
        model_name=config.training.model_name,
        test_set=data.test_set.to_message(),
        local_steps=train.local_steps,
    )
    return policy if config.provider.secure else replace(policy, strategy=PlainFedAvg())


def load_task_data(config: RuntimeConfig) -> TaskData:
    """The task's test set, as the provider records it and evaluates on it, and the
    size of the training set the users' partitions are cut from."""
    from fairbus.training.data import load_dataset

    t = config.training
    train, test = load_dataset(t.dataset, t.data_dir, seed=t.seed)
    test_set = QuantizedTestSet.quantize(test.x.numpy(), test.y.numpy(), test.num_classes)
    return TaskData(test_set, len(train))


class ProviderRuntime:
    def __init__(
        self,
        config: RuntimeConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.roster = Roster.load(config.roster)
        self.pid = self.roster.provider
        self.identity = Identity.load(config.keys, self.pid)
        self.task = self.roster.task
        self.users = self.roster.with_role(Role.USER)
        self.on_round = on_round
        self.out_dir = prepare_state_folder(config.state / "provider")
        self.records: list[RoundRecord] = []
        self.presence = PresenceTracker(frozenset(self.users), config.provider.presence_grace)
        self._inbox: asyncio.Queue[Event] = asyncio.Queue()
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
        self.bus.subscriptions = [topics.uploads(self.task), topics.user_presences(self.task),
                                  *self.ledger.topics]  # fmt: skip
        self.machine: ProviderMachine | None = None
        self._last_dropout = b""
        self._round_uploads: list[bytes] = []
        self._test_set: bytes | None = None
        """The round's uploads as received and the task's test set, recorded envelopes
        to relay to a ledger node that lacks one when it re-derives an evaluation."""
        self._to_evaluate: list[Evaluate] = []
        """The machine's Evaluate effects not carried out yet (one batch, when idle)."""

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
        user = parsed.sender
        if parsed.kind == "presence":
            presence = Presence.parse(data)
            if presence is not None:
                for event in self.presence.saw(user, presence, time.monotonic()):
                    self._inbox.put_nowait(event)
        elif parsed.kind == "upload" and parsed.recipient is None:
            self._round_uploads.append(data)
            self._inbox.put_nowait(Received("upload", data))

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> list[RoundRecord]:
        """Play ``rounds`` rounds and return their records. A login the broker refuses
        ends it (:class:`~fairbus.runtime.connection.BrokerLoginError`)."""
        self._evaluator = await asyncio.to_thread(self._build_evaluator)
        p = self.config.provider
        if p.etcd:  # a hot standby until elected (fairbus.runtime.standby)
            return await when_elected(p.etcd, self.task, self.pid, p.lease_ttl, self._serve)
        return await self._serve()

    async def _serve(self) -> list[RoundRecord]:
        ticker = asyncio.create_task(self._tick())
        try:
            return await self.bus.serve(self._play())
        finally:
            ticker.cancel()

    async def _play(self) -> list[RoundRecord]:
        """Once on the bus: check the ledger, wait for the users, play the rounds."""
        from fairbus.training.models import initial_params

        t = self.config.training
        await self.bus.connected.wait()
        head = await self._ledger_head()
        initial = initial_params(t.model_name, t.seed)
        decided = 0
        if head == GENESIS:
            self.machine = ProviderMachine(
                self.identity, self.roster, initial, self._machine_config(), online=()
            )
        else:
            replayed = await self._read_ledger(head)
            self.machine = await self._restore(replayed, initial)
            decided = replayed.decided_rounds
        await self._wait_for_users()
        while decided + len(self.records) < self.config.provider.rounds:
            try:
                await self._play_round()
            except RefusedError as exc:
                # The ledger holds something this machine does not know: rebuild it
                # from the ledger and go on (issue 14, item 3: never exit on a refusal).
                log.error("the ledger refused the provider's transaction (%s); rebuilding "
                          "from the ledger", exc)  # fmt: skip
                self.metrics.refused(exc.reason.value)
                replayed = await self._read_ledger(await self._ledger_head())
                self.machine = await self._restore(replayed, initial, online=self.presence.online)
                decided = replayed.decided_rounds - len(self.records)
        return self.records

    async def _read_ledger(self, head: bytes) -> Replayed:
        """The task as the ledger holds it: the provider's chain up to its task start
        (the test set, then the task start) and every round's transactions, replayed
        under the ledger's rules."""
        rounds: list[tuple[Transaction, ...]] = []
        while True:
            answer = await self.ledger.query("round", round=len(rounds) + 1)
            if not answer.ok or not answer.records:
                break
            rounds.append(tuple(Transaction.from_bytes(r) for r in answer.records))
        mine = [tx for txs in rounds[:1] for tx in txs if tx.envelope.header.sender == self.pid]
        link = mine[0].envelope.header.prev if mine else head
        opening: list[Transaction] = []
        while link != GENESIS:
            if len(opening) == OPENING_LINKS:
                raise RecoveryError("the provider's chain before round 1 is longer than a "
                                    "test set and a task start")  # fmt: skip
            answer = await self.ledger.query("tx", tx_hash=link)
            if not answer.ok or not answer.records:
                raise RecoveryError(f"no ledger node has the provider's {link.hex()[:16]}")
            opening.insert(0, Transaction.from_bytes(answer.records[0]))
            link = opening[0].envelope.header.prev
        if not opening or opening[-1].envelope.header.type != "task_start":
            raise RecoveryError("the provider's chain before round 1 ends in no task start")
        history = LedgerHistory(opening[-1], tuple(rounds), tuple(opening[:-1]))
        return await asyncio.to_thread(replay, self.roster, history)

    async def _restore(
        self,
        replayed: Replayed,
        initial: npt.NDArray[np.float32],
        online: Iterable[int] = (),
    ) -> ProviderMachine:
        """The provider machine rebuilt from the ledger and the blobs it names."""
        blobs = {d: await self.ledger.blob(d) for d in blobs_needed(replayed, self.pid)}
        machine = await asyncio.to_thread(
            ProviderMachine.restore,
            self.identity,
            self.roster,
            initial,
            self._machine_config(),
            replayed,
            blobs,
            online=set(online),
        )
        log.info(
            "resuming task %r from the ledger: %d rounds decided, round %d %s, excluded %s",
            self.task, replayed.decided_rounds, machine.next_round,
            "goes on" if machine.next_round == machine.round else "is next",
            sorted(machine.excluded),
        )  # fmt: skip
        return machine

    async def _ledger_head(self) -> bytes:
        answer = await self.ledger.query("head", sender=self.pid)
        return answer.records[0] if answer.ok and answer.records else GENESIS

    async def _wait_for_users(self) -> None:
        assert self.machine is not None
        eligible = len(set(self.users) - self.machine.excluded)  # a resumed task excludes some
        want = min(self.config.provider.min_users or eligible, eligible)
        deadline = time.monotonic() + self.config.provider.join_timeout
        log.info("waiting for %d of %d users (at most %.0f s)", want, len(self.users),
                 self.config.provider.join_timeout)  # fmt: skip
        while time.monotonic() < deadline:
            await self._drain()
            if len(self.machine.online) >= want:
                break
            await asyncio.sleep(0.1)
        await self._drain()
        log.info("users online: %s", sorted(self.machine.online))

    async def _drain(self) -> None:
        """Hand the machine every queued event (between rounds)."""
        while not self._inbox.empty():
            await self._feed(self._inbox.get_nowait())

    async def _feed(self, event: Event) -> None:
        """One event into the machine, its outputs carried out. A user that (re)joins
        continues its chain from the ledger's head first."""
        assert self.machine is not None
        if isinstance(event, Joined):
            await self._resync_chain(event.user)
        t0 = time.perf_counter()
        outputs = await self._step(event)
        if isinstance(event, Received) and self._record is not None:
            self._record.timings_s["aggregation"] += time.perf_counter() - t0
        await self._carry_out(outputs)

    async def _step(self, event: Event) -> list[Output]:
        """One step of the machine, in a worker thread: a step that searches for a
        grouping can take seconds, and meanwhile the event loop must keep the broker's
        keepalive and the etcd lease going. Only this coroutine chain steps the machine,
        one step at a time, so the machine needs no lock."""
        assert self.machine is not None
        return await asyncio.to_thread(self.machine.handle, event)

    async def _play_round(self) -> None:
        assert self.machine is not None
        machine = self.machine
        await self._drain()
        # A user dropped for missing a deadline while still connected gets another chance.
        for user in sorted(self.presence.online - machine.online - machine.excluded):
            await self._feed(Joined(user))
        record = RoundRecord.empty(machine.next_round)
        self._record = record
        self._round_over.clear()
        self._round_uploads = []
        self._to_evaluate = []  # a rebuilt machine answers no earlier machine's effects
        start = time.perf_counter()
        await self._carry_out(await self._step(StartRound(time.time())))
        record.timings_s["announce"] = time.perf_counter() - start
        while not self._round_over.is_set():
            # Complete groups wait for their evaluation until the events that came in
            # meanwhile are handled: those that complete more groups then join the batch.
            if self._to_evaluate and self._inbox.empty():
                await self._evaluate_pending()
            else:
                await self._feed(await self._inbox.get())
        record.timings_s["round"] = time.perf_counter() - start
        self.metrics.round_ended(record)
        if record.failed is None:
            self._write(record)
        else:
            log.warning("round %d failed: %s; waiting for users", record.round, record.failed)
            await asyncio.sleep(NO_USERS_RETRY)

    def _write(self, record: RoundRecord) -> None:
        path = self.out_dir / "rounds.jsonl"
        with state_io("write", path), path.open("a") as f:
            f.write(json.dumps(record.to_json()) + "\n")

    async def _resync_chain(self, user: int) -> None:
        """A returning user's chain continues from the ledger's head for it: an upload it
        committed just before it died may never have reached the provider."""
        assert self.machine is not None
        try:
            answer = await self.ledger.query("head", sender=user)
        except FairbusError as exc:
            log.warning("no ledger head for returning user %d: %s", user, exc)
            return
        if answer.ok and answer.records:
            await self._carry_out(await self._step(ChainHead(user, answer.records[0])))

    async def _tick(self) -> None:
        """The machine's clock, and the end of each presence grace period."""
        while True:
            await asyncio.sleep(TICK)
            for event in self.presence.expire(time.monotonic()):
                self._inbox.put_nowait(event)
            self._inbox.put_nowait(Tick(time.time()))

    async def _carry_out(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Commit):
                await self._commit(out)
            elif isinstance(out, Send):
                await self._publish(out.kind, out.data)
            elif isinstance(out, Evaluate):
                self._to_evaluate.append(out)  # evaluated together, see _play_round
            elif isinstance(out, CloseAttempt):
                await self._close_attempt(out)
            elif isinstance(out, RoundDone):
                await self._done(out)
            elif isinstance(out, RoundFailed):
                assert self._record is not None
                self._record.failed = out.reason
                self._round_over.set()
            elif isinstance(out, Refused):
                log.warning("refused: %s: %s", out.reason, out.detail)
                self.metrics.refused(out.reason)
                if self._record is not None:
                    self._record.refusals.append(f"{out.reason}: {out.detail}")

    async def _commit(self, out: Commit) -> None:
        """Commit on the ledger, then publish with the receipt."""
        assert self._record is not None and self.machine is not None
        env, kind = out.envelope, out.kind
        start = time.perf_counter()
        # The ledger re-derives an evaluation as this process computed it, and loads the
        # test set the task start names: allow for that work on a busy ledger node.
        evaluated = self._record.timings_s.get("evaluation", 0.0)
        patience = {"evaluation": LEDGER_WORK_PATIENCE + 4 * evaluated,
                    "task_start": LEDGER_WORK_PATIENCE}.get(kind)  # fmt: skip
        submission = ledger_submission(env)
        try:
            committed, receipt = await self.ledger.submit_for_receipt(submission, patience)
        except RefusedError as exc:
            if exc.reason is not RefusalReason.MISSING_PAYLOAD:
                raise
            # A ledger node takes model-sized payloads from the bus and missed some (a
            # broker restart, a late subscription): hand them over and submit again.
            relayed = [*([self._test_set] if self._test_set else []), *self._round_uploads]
            log.warning("the ledger lacks payloads of the %s (%s); relaying %d", kind,
                        exc.detail, len(relayed))  # fmt: skip
            for data in relayed:
                await self.bus.publish(topics.relayed_payload(self.task, self.pid), data)
            committed, receipt = await self.ledger.submit_for_receipt(submission, patience)
        crash_after(kind, self._record.round)
        self.metrics.committed(kind, time.perf_counter() - start, committed.height)
        if kind == "dropout":
            self._last_dropout = committed.tx_hash
        self._record.ledger_height = committed.height
        self._record.timings_s["ledger"] = (
            self._record.timings_s.get("ledger", 0.0) + time.perf_counter() - start
        )
        if kind == "test_set":  # for the ledger nodes only
            self._test_set = Recorded(env, receipt).to_bytes()
            await self.bus.publish(topics.relayed_payload(self.task, self.pid), self._test_set)
        else:
            await self._publish(kind, Recorded(env, receipt).to_bytes())
        crash_after(f"published-{kind}", self._record.round)
        if kind == "announce":
            self._record.prior_groups = [list(g) for g in self.machine.prior_groups]
        if kind == "dropout":
            log.info("round %d: users dropped out; attempt %d closed", self._record.round,
                     self.machine.attempt)  # fmt: skip

    async def _publish(self, kind: str, payload: bytes) -> None:
        """A broadcast on the provider's own topic for ``kind``, counted in the round's bytes."""
        await self.bus.publish(topics.provider_message(self.task, self.pid, kind), payload)
        if self._record is not None:
            self._record.bytes[kind] = self._record.bytes.get(kind, 0) + len(payload)

    async def _close_attempt(self, effect: CloseAttempt) -> None:
        """Tell the machine which uploads the ledger recorded for the closed attempt. The
        round's records are asked for until they include the dropout (a node that has
        not caught up yet would answer with an older view); after it the ledger takes no
        more uploads for the attempt, so the answer is final."""
        assert self.machine is not None
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            answer = await self.ledger.query("round", round=effect.round)
            txs = [Transaction.from_bytes(record) for record in answer.records]
            if any(tx.hash == self._last_dropout for tx in txs):
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"no ledger node shows round {effect.round}'s dropout")
            await asyncio.sleep(0.05)
        uploads = frozenset(
            (tx.envelope.header.group, tx.envelope.header.sender)
            for tx in txs
            if tx.envelope.header.type == "upload"
            and tx.envelope.header.attempt == effect.attempt
            and tx.envelope.header.group is not None
        )
        closed = AttemptClosed(effect.round, effect.attempt, uploads)
        await self._carry_out(await self._step(closed))

    async def _evaluate_pending(self) -> None:
        """The group models the machine asked for and not yet evaluated, in one batched
        pass (``ExactEvaluator.corrects``, issue 16, item 3), answered in the order asked.
        The machine only records an accuracy until it holds every group's, so answering
        once the events that came meanwhile are handled changes none of its decisions,
        and the accuracies are the per-group ones."""
        assert self._evaluator is not None and self._record is not None
        effects, self._to_evaluate = self._to_evaluate, []
        start = time.perf_counter()
        accuracies = await asyncio.to_thread(
            self._evaluator.accuracies, [effect.params for effect in effects]
        )
        self._record.timings_s["evaluation"] += time.perf_counter() - start
        for effect, accuracy in zip(effects, accuracies, strict=True):
            start = time.perf_counter()
            event = Evaluated(effect.round, effect.attempt, effect.gid, accuracy)
            outputs = await self._step(event)
            self._record.timings_s["detection"] += time.perf_counter() - start
            await self._carry_out(outputs)

    async def _done(self, done: RoundDone) -> None:
        assert self._record is not None and self._evaluator is not None
        record = self._record
        record_round(record, done)
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
        log.info("round %d: accuracy %.3f, key users %s, violators %s, excluded %s",
                 record.round, record.global_accuracy, record.key_users, record.violators,
                 record.excluded)  # fmt: skip
        self._round_over.set()
        if self.on_round is not None:
            self.on_round(record)

    def _machine_config(self) -> ProviderConfig:
        if self._task_data is None:
            raise ProviderError("the provider's test set is not loaded yet")
        return machine_config(self.config, self._task_data, len(self.users))

    def _build_evaluator(self) -> ExactEvaluator:
        """The task's test set and the exact evaluation the ledger re-derives."""
        t = self.config.training
        if t.threads:
            import torch

            torch.set_num_threads(t.threads)
        self._task_data = load_task_data(self.config)
        return ExactEvaluator(t.model_name, self._task_data.test_set)
