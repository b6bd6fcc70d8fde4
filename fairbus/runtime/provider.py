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
import logging
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from fairbus import topics
from fairbus.aggregation import PlainFedAvg
from fairbus.envelope import GENESIS
from fairbus.ledger.recorded import Recorded, ledger_submission
from fairbus.ledger.records import Transaction
from fairbus.ledger.state import RefusedError
from fairbus.protocol.events import (
    AttemptClosed,
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
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine
from fairbus.protocol.recovery import (
    LedgerHistory,
    RecoveryError,
    Replayed,
    blobs_needed,
    replay,
)
from fairbus.rounds import RoundRecord, record_round
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.failpoints import crash_after
from fairbus.runtime.provider_loop import (
    LEDGER_WORK_PATIENCE,
    NO_USERS_RETRY,
    TICK,
    ProviderError,
    ProviderLoop,
    TaskData,
    load_task_data,
)
from fairbus.runtime.standby import when_elected

log = logging.getLogger("fairbus.provider")

OPENING_LINKS = 2
"""The provider's links before round 1: its test set and its task start."""
CLOSE_TIMEOUT = 30.0
"""Seconds to wait for a ledger node that shows a recorded dropout."""

__all__ = [
    "LEDGER_WORK_PATIENCE",
    "NO_USERS_RETRY",
    "TICK",
    "ProviderError",
    "ProviderRuntime",
    "TaskData",
    "load_task_data",
    "machine_config",
]


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
        **train.recorded(),
    )
    return policy if config.provider.secure else replace(policy, strategy=PlainFedAvg())


class ProviderRuntime(ProviderLoop[Event, Output]):
    """The fairness provider on the bus; :meth:`run` plays ``[provider] rounds`` rounds."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.on_round = on_round
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

    def _on_user_message(self, kind: str, recipient: int | None, data: bytes) -> None:
        """A user's upload goes to the machine, and is kept to relay to the ledger."""
        if kind == "upload" and recipient is None:
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

    def _online(self) -> Set[int]:
        assert self.machine is not None
        return self.machine.online

    def _eligible(self) -> int:
        assert self.machine is not None
        return len(set(self.users) - self.machine.excluded)  # a resumed task excludes some

    def _relayed(self) -> list[bytes]:
        return [*([self._test_set] if self._test_set else []), *self._round_uploads]

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
        # A refusal other than a missing payload goes up to _play, which rebuilds.
        committed, receipt = await self._submit_relaying(ledger_submission(env), kind, patience)
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
        pass (``ExactEvaluator.scores``, issue 16, item 3), answered in the order asked.
        The machine only records an accuracy until it holds every group's, so answering
        once the events that came meanwhile are handled changes none of its decisions,
        and the accuracies are the per-group ones."""
        assert self._evaluator is not None and self._record is not None
        effects, self._to_evaluate = self._to_evaluate, []
        start = time.perf_counter()
        scores = await asyncio.to_thread(
            self._evaluator.scores, [effect.params for effect in effects]
        )
        self._record.timings_s["evaluation"] += time.perf_counter() - start
        for effect, score in zip(effects, scores, strict=True):
            start = time.perf_counter()
            event = Evaluated(
                effect.round,
                effect.attempt,
                effect.gid,
                score.accuracy,
                score.mean_rank,
                score.class_right,
                score.class_called,
            )
            outputs = await self._step(event)
            self._record.timings_s["detection"] += time.perf_counter() - start
            await self._carry_out(outputs)

    async def _done(self, done: RoundDone) -> None:
        assert self._record is not None
        record = self._record
        record_round(record, done)
        await self._keep_round(record, done.global_params)
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
