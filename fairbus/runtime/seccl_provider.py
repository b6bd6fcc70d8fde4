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
(:func:`fairbus.runtime.provider_loop.load_task_data`), recorded before the task start so
that the task start names it. Not yet: recovery from the ledger after a restart (a
SecCL provider that finds its chain on the ledger stops with one line) and a hot standby.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Set

from fairbus import topics
from fairbus.envelope import GENESIS
from fairbus.ledger.recorded import Recorded, ledger_submission
from fairbus.ledger.state import RefusedError
from fairbus.protocol.events import (
    Commit,
    Received,
    Refused,
    RoundFailed,
    SecclEvent,
    SecclOutput,
    SecclRoundDone,
    StartRound,
)
from fairbus.protocol.seccl_provider import SecclServerConfig, SecclServerMachine
from fairbus.rounds import RoundRecord
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.provider_loop import (
    LEDGER_WORK_PATIENCE,
    NO_USERS_RETRY,
    ProviderError,
    ProviderLoop,
    TaskData,
)
from fairbus.task import TaskParams
from fairbus.wire.messages import SECCL, EvaluationSpec

log = logging.getLogger("fairbus.provider")

USER_KINDS = frozenset({"seccl_update", "seccl_evaluation"})
"""What the server takes from the participants' topics (each with its receipt)."""


def seccl_task(config: RuntimeConfig, data: TaskData, users: int) -> TaskParams:
    """The task start of a ``seccl`` task: the mode, θ and λ of the configuration, the
    test set recorded before it, and the local training each of the ``users`` is asked
    for (:meth:`~fairbus.training.config.TrainConfig.recorded`)."""
    t = config.training
    train = t.train.for_task(data.train_samples, users)
    committed = data.test_set.to_message()
    spec = EvaluationSpec(t.model_name, hashlib.sha256(committed.payload()).digest())
    return TaskParams(
        config.detection,
        config.collusion,
        config.keying,
        spec,
        mode=SECCL,
        theta=config.theta,
        candidate_share=config.candidate_share,
        **train.recorded(),
    )


class SecclProviderRuntime(ProviderLoop[SecclEvent, SecclOutput]):
    """SecCL's server on the bus; :meth:`run` plays ``[provider] rounds`` rounds."""

    participants = "participants"

    def __init__(self, config: RuntimeConfig) -> None:
        if not config.seccl:
            raise ProviderError(f"the task's mode is {config.mode!r}, not 'seccl'")
        super().__init__(config)
        self.machine: SecclServerMachine | None = None
        self._relay: list[bytes] = []
        """The task's test set and the round's changes as received (recorded envelopes),
        to hand a ledger node that lacks one when it re-derives the election."""
        self.bus.subscriptions = [
            topics.seccl_changes(self.task),
            topics.seccl_evaluations(self.task),
            topics.user_presences(self.task),
            *self.ledger.topics,
        ]

    # --- bus ---------------------------------------------------------------------------------

    def _on_user_message(self, kind: str, recipient: int | None, data: bytes) -> None:
        """A participant's change or evaluation goes to the machine; a change is also
        kept to relay to the ledger."""
        if kind in USER_KINDS and recipient is None:
            if kind == "seccl_update":
                self._relay.append(data)
            self._inbox.put_nowait(Received(kind, data))

    def _online(self) -> Set[int]:
        assert self.machine is not None
        return self.machine.online

    def _eligible(self) -> int:
        return len(self.users)

    def _relayed(self) -> list[bytes]:
        return self._relay

    def _refused(self, kind: str, exc: RefusedError) -> None:
        raise ProviderError(f"the ledger refused the provider's {kind}: {exc}") from None

    async def _step(self, event: SecclEvent) -> list[SecclOutput]:
        """One step of the machine, on the event loop (its steps are short)."""
        assert self.machine is not None
        return self.machine.handle(event)

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> list[RoundRecord]:
        """Play the rounds and return their records. A login the broker refuses ends it
        (:class:`~fairbus.runtime.connection.BrokerLoginError`)."""
        self._evaluator = await asyncio.to_thread(self._build_evaluator)
        return await self._serve()

    async def _play(self) -> list[RoundRecord]:
        from fairbus.training.models import initial_params

        assert self._task_data is not None
        t = self.config.training
        await self.bus.connected.wait()
        if await self._ledger_head() != GENESIS:
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

    async def _play_round(self) -> None:
        assert self.machine is not None
        await self._drain()
        record = RoundRecord.empty(self.machine.round + 1, attempts=1)
        self._record = record
        self._round_over.clear()
        self._relay = self._relay[:1] if self.machine.started else []  # keep the test set
        start = time.perf_counter()
        await self._carry_out(await self._step(StartRound(time.time())))
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
        committed, receipt = await self._submit_relaying(ledger_submission(env), kind, patience)
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
        assert self._record is not None
        record = self._record
        record.candidates = list(done.candidates)
        record.borda = dict(sorted(done.totals.items()))
        record.dropped = sorted(set(done.participants) - set(done.totals))
        await self._keep_round(record, done.global_params)
        log.info("round %d: accuracy %.3f, candidates %s, Borda totals %s", record.round,
                 record.global_accuracy, record.candidates, record.borda)  # fmt: skip
        self._round_over.set()
