"""``fairbus simulate``: N users, a provider and the ledger in one process.

The simulator only drives the sans-I/O machines of :mod:`fairbus.protocol` — the same
ones the MQTT runtime drives — with the real crypto: every share is sealed per
recipient, every upload signed and chained. Every ledger transaction the machines emit
(:class:`~fairbus.protocol.events.Commit`) is admitted by the ledger's own validation
state machine (:class:`~fairbus.ledger.inprocess.InProcessLedger`) and delivered with its
signed receipt, as on the bus; a dropout's attempt is closed from what that ledger
recorded, and a provider transaction the ledger refuses (a decision the Alg. 6 contract
does not re-derive, say) stops the simulation with the refusal. It carries out the
machines' effects (training, evaluation) with real PyTorch on real data, injects
dropouts, and records one :class:`~fairbus.rounds.RoundRecord` per round
(``docs/architecture.md``, "The one path").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fairbus.errors import FairbusError
from fairbus.evaluation import ExactEvaluator, QuantizedTestSet
from fairbus.identity import Identity
from fairbus.ledger.inprocess import BlobSink, BlockSink, InProcessLedger
from fairbus.ledger.state import RefusedError
from fairbus.protocol.events import (
    PROVIDER,
    USERS,
    AttemptClosed,
    ChainHead,
    CloseAttempt,
    Commit,
    Dropped,
    Evaluate,
    Evaluated,
    Event,
    Excluded,
    Joined,
    Output,
    Received,
    Refused,
    RoundDone,
    RoundFailed,
    Send,
    StartRound,
    Tick,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine, ProviderPhase
from fairbus.protocol.user import UserMachine
from fairbus.roster import Member, Role, Roster
from fairbus.rounds import RoundRecord, record_round
from fairbus.training.attacks import Attack
from fairbus.training.data import DATASET_MODELS, Partition, check_partition, load_dataset
from fairbus.training.local import TrainConfig
from fairbus.training.models import initial_params
from fairbus.training.workers import (
    InProcessTraining,
    LocalTraining,
    TrainingJob,
    TrainingSpec,
    WorkerTraining,
)
from fairbus.wire.messages import PAIRWISE

PROVIDER_ID = 0
LEDGER_NODE_ID = 100_000
"""The simulated ledger node's id in the roster (users are 1..N)."""


class LedgerRefusalError(FairbusError):
    """The ledger refused a provider transaction: the simulation stops with the refusal."""


@dataclass(frozen=True)
class DropoutPlan:
    """Kill ``user`` in ``round``: mid key negotiation (with pairwise keys, which need
    none: while it trains), or after its first upload."""

    round: int
    user: int
    phase: Literal["negotiation", "upload"]
    rejoin: bool = True


@dataclass(frozen=True)
class SimulationConfig:
    users: int = 9
    rounds: int = 10
    seed: int = 0
    dataset: str = "digits"
    data_dir: Path | None = None
    model: str | None = None
    partition: Partition = "iid"
    alpha: float = 0.5
    train: TrainConfig = field(default_factory=TrainConfig)
    attacks: dict[int, Attack] = field(default_factory=dict)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    dropouts: tuple[DropoutPlan, ...] = ()
    workers: int = 1
    """Processes training the users (:mod:`fairbus.training.workers`); 1 trains them in
    this process. The models are the same either way."""

    @property
    def model_name(self) -> str:
        return self.model or DATASET_MODELS[self.dataset]


@dataclass(frozen=True)
class SimulationParties:
    """A simulated task's parties: fresh identities for the provider, the one ledger
    node and each user, their roster, and the in-process ledger the node keeps. Shared
    by :class:`Simulation` and :class:`fairbus.seccl_simulation.SecclSimulation`."""

    provider: Identity
    users: dict[int, Identity]
    roster: Roster
    ledger: InProcessLedger

    @classmethod
    def generate(
        cls,
        user_ids: list[int],
        *,
        on_block: BlockSink | None = None,
        on_blob: BlobSink | None = None,
    ) -> SimulationParties:
        """New identities (the provider's, the node's, then the users' in order) and a
        ledger that hands its blocks and blobs to ``on_block`` and ``on_blob``."""
        provider = Identity.generate(PROVIDER_ID)
        node = Identity.generate(LEDGER_NODE_ID)
        users = {u: Identity.generate(u) for u in user_ids}
        roster = Roster(
            "simulation",
            [Member(provider.public, Role.PROVIDER), Member(node.public, Role.LEDGER)]
            + [Member(i.public, Role.USER) for i in users.values()],
        )
        ledger = InProcessLedger(roster, node, on_block=on_block, on_blob=on_blob)
        return cls(provider, users, roster, ledger)


def commit_on_record(
    ledger: InProcessLedger,
    record: RoundRecord,
    source: int | str,
    out: Commit,
    coordinator: str,
    resync: Callable[[int, ChainHead], None],
) -> bytes | None:
    """Commit ``out`` on the simulated ledger and count it in the round's ``record``
    (height, bytes by kind). A user's refused transaction is noted, the user handed the
    ledger's chain head through ``resync`` (its next transaction links to it) and None
    returned; the ``coordinator``'s stops the simulation with :class:`LedgerRefusalError`."""
    try:
        data = ledger.commit(out.envelope)
    except RefusedError as exc:
        if not isinstance(source, int):
            raise LedgerRefusalError(
                f"round {record.round}: the ledger refused the {coordinator}'s {out.kind!r}: {exc}"
            ) from None
        record.refusals.append(f"ledger: user {source}'s {out.kind}: {exc}")
        resync(source, ChainHead(source, ledger.head(source)))
        return None
    record.ledger_height = ledger.height
    record.bytes[out.kind] = record.bytes.get(out.kind, 0) + len(data)
    return data


class Simulation:
    """One training run. ``run()`` plays every round and returns the records.

    ``on_block`` and ``on_blob`` receive every committed block and every model-sized
    payload (to keep the ledger for ``fairbus audit``)."""

    def __init__(
        self,
        config: SimulationConfig,
        *,
        on_block: BlockSink | None = None,
        on_blob: BlobSink | None = None,
    ) -> None:
        if config.users < 3:
            raise FairbusError("a simulation needs at least 3 users")
        check_partition(config.partition)
        self.config = config
        self.user_ids = list(range(1, config.users + 1))
        unknown = set(config.attacks) - set(self.user_ids)
        if unknown:
            raise FairbusError(f"attacks configured for unknown users {sorted(unknown)}")
        if config.users >= LEDGER_NODE_ID:
            raise FairbusError(f"a simulation takes fewer than {LEDGER_NODE_ID} users")
        if config.workers < 1:
            raise FairbusError(f"workers must be at least 1, got {config.workers}")
        parties = SimulationParties.generate(self.user_ids, on_block=on_block, on_blob=on_blob)
        provider, self.identities = parties.provider, parties.users
        self.roster, self.ledger = parties.roster, parties.ledger
        train, test = load_dataset(config.dataset, config.data_dir, seed=config.seed)
        self.train = config.train.for_task(len(train), config.users)
        spec = TrainingSpec(
            config.model_name,
            config.dataset,
            config.data_dir,
            config.partition,
            config.alpha,
            config.seed,
            tuple(self.user_ids),
            self.train,
            dict(config.attacks),
        )
        self.training: LocalTraining = (
            WorkerTraining(spec, config.workers)
            if config.workers > 1
            else InProcessTraining(spec, spec.trainers(self.user_ids, train))
        )
        test_set = QuantizedTestSet.quantize(test.x.numpy(), test.y.numpy(), test.num_classes)
        self.evaluator = ExactEvaluator(config.model_name, test_set)
        self.provider = ProviderMachine(
            provider,
            self.roster,
            initial_params(config.model_name, config.seed),
            replace(
                config.provider,
                model_name=config.model_name,
                test_set=test_set.to_message(),
                **self.train.recorded(),
            ),
        )
        c = config.provider.collusion
        self.machines = {
            u: UserMachine(self.identities[u], self.roster, collusion=c) for u in self.user_ids
        }
        self.alive = set(self.user_ids)
        self._queue: deque[tuple[int | str, str, bytes, int | str]] = deque()
        self._record: RoundRecord | None = None
        self._plan: dict[int, DropoutPlan] = {}
        self._killed_this_round: list[DropoutPlan] = []
        self._closing: list[CloseAttempt] = []
        self._evaluating: list[Evaluate] = []
        self._training: list[tuple[int, Train]] = []

    # --- driving ------------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        """Play every round, then :meth:`close`."""
        records = []
        try:
            for r in range(1, self.config.rounds + 1):
                record = self.play_round(r)
                records.append(record)
                if on_round is not None:
                    on_round(record)
        finally:
            self.close()
        return records

    def close(self) -> None:
        """Stop the training workers, if any (:attr:`SimulationConfig.workers`)."""
        self.training.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def play_round(self, r: int) -> RoundRecord:
        for plan in self._killed_this_round:
            if plan.rejoin:
                self._revive(plan.user)
        self._killed_this_round = []
        self._plan = {p.user: p for p in self.config.dropouts if p.round == r}
        record = RoundRecord.empty(r)
        self._record = record
        started = time.perf_counter()
        now = float(r) * 10 * self.config.provider.phase_timeout
        self._provider_step(StartRound(now))
        self._pump()
        for _ in range(self.config.users):
            if self.provider.phase is ProviderPhase.IDLE or record.failed:
                break
            # Everything deliverable was delivered and the round is not done: let the
            # provider's deadline pass, as a stalled or vanished user would make it.
            now += self.config.provider.phase_timeout + 1
            self._provider_step(Tick(now))
            self._pump()
        if self.provider.phase is not ProviderPhase.IDLE and not record.failed:
            record.failed = f"round {r} did not complete"
        record.timings_s["round"] = time.perf_counter() - started
        record.global_accuracy = self.evaluator.accuracy(self.provider.global_params)
        record.bytes = dict(record.bytes)
        return record

    def _pump(self) -> None:
        while True:
            self._deliver_queued()
            if self._training:
                self._train_pending()
                continue
            if self._evaluating:
                self._evaluate_pending()
                continue
            if not self._closing:
                return
            close = self._closing.pop(0)
            # The ledger takes no upload for the attempt after the recorded dropout, so
            # what it holds now is final (a killed user's upload may be recorded and
            # never delivered, as when a process dies between commit and publish).
            uploads = self.ledger.uploads(close.round, close.attempt)
            closed = AttemptClosed(close.round, close.attempt, uploads)
            self._provider_step(closed)

    def _provider_step(self, event: Event) -> None:
        """Step the provider on a start, a deadline or a closed attempt: where it groups
        (Alg. 2) and checks the grouping, timed as ``grouping``."""
        self._dispatch(PROVIDER, self._timed("grouping", lambda: self.provider.handle(event)))

    def _deliver_queued(self) -> None:
        while self._queue:
            to, kind, data, source = self._queue.popleft()
            if source != PROVIDER and source not in self.alive:
                continue  # sent by a user that has since been killed
            if to == PROVIDER:
                self._deliver_to_provider(kind, data, source)
            elif isinstance(to, int) and to in self.alive:
                self._deliver_to_user(to, Received(kind, data))

    def _deliver_to_provider(self, kind: str, data: bytes, source: int | str) -> None:
        phase = "aggregation" if kind == "upload" else "negotiation"
        self._dispatch(
            PROVIDER, self._timed(phase, lambda: self.provider.handle(Received(kind, data)))
        )
        plan = self._plan.get(source) if isinstance(source, int) else None
        if plan is not None and plan.phase == "upload" and kind == "upload":
            self._kill(plan)

    def _deliver_to_user(self, user: int, event: Event) -> None:
        machine = self.machines[user]
        phase = "upload" if isinstance(event, Trained) else "negotiation"
        self._dispatch(user, self._timed(phase, lambda: machine.handle(event)))

    def _dispatch(self, source: int | str, outputs: list[Output]) -> None:
        record = self._record
        assert record is not None
        for out in outputs:
            if isinstance(out, Commit):
                self._commit(source, out)
            elif isinstance(out, Send):
                record.bytes[out.kind] = record.bytes.get(out.kind, 0) + len(out.data)
                self._queue.append((out.to, out.kind, out.data, source))
                if out.kind == "summed_share":
                    for plan in list(self._plan.values()):
                        if plan.phase == "negotiation" and plan.user in self.alive:
                            self._kill(plan)
            elif isinstance(out, Train):
                assert isinstance(source, int)
                dying = self._plan.get(source)
                if dying is not None and dying.phase == "negotiation" and self._no_shares:
                    self._kill(dying)  # pairwise keys: nothing to negotiate; dies training
                    continue
                # Trained together once everything in flight is delivered (see _pump).
                self._training.append((source, out))
            elif isinstance(out, Evaluate):
                # Evaluated together once everything in flight is delivered (see _pump).
                self._evaluating.append(out)
            elif isinstance(out, CloseAttempt):
                # Answered once everything in flight is delivered (see _pump), the way the
                # ledger answers once the dropout is recorded.
                self._closing.append(out)
            elif isinstance(out, RoundDone):
                self._done(out)
            elif isinstance(out, RoundFailed):
                record.failed = out.reason
            elif isinstance(out, Refused):
                record.refusals.append(f"{source}: {out.reason}: {out.detail}")
            elif isinstance(out, Excluded):
                pass  # the provider's RoundDone already names the round's violators

    def _commit(self, source: int | str, out: Commit) -> None:
        """Commit on the ledger, then send with the receipt (as a participant does)."""
        record = self._record
        assert record is not None
        start = time.perf_counter()
        data = commit_on_record(self.ledger, record, source, out, "provider", self._deliver_to_user)
        self._add_time("ledger", start)
        if data is None:
            return
        if out.kind == "announce":
            record.prior_groups = [list(g) for g in self.provider.prior_groups]
        targets = sorted(self.alive) if out.to == USERS else [out.to]
        for target in targets:
            self._queue.append((target, out.kind, data, source))

    def _evaluate_pending(self) -> None:
        """The group models the provider asked for since the last time, evaluated in one
        batched pass (``ExactEvaluator.scores``, issue 16, item 3), then answered in
        the order asked. The machine only records an accuracy until it holds every
        group's, so answering after the deliveries in flight (rather than at once)
        changes none of its decisions, and the accuracies are the per-group ones."""
        effects, self._evaluating = self._evaluating, []
        start = time.perf_counter()
        scores = self.evaluator.scores([effect.params for effect in effects])
        self._add_time("evaluation", start)
        for effect, score in zip(effects, scores, strict=True):
            start = time.perf_counter()
            outputs = self.provider.handle(
                Evaluated(effect.round, effect.attempt, effect.gid, score.accuracy,
                          score.mean_rank, score.class_right, score.class_called)
            )  # fmt: skip
            self._add_time("detection", start)
            self._dispatch(PROVIDER, outputs)

    def _add_time(self, phase: str, start: float) -> None:
        assert self._record is not None
        self._record.timings_s[phase] += time.perf_counter() - start

    def _train_pending(self) -> None:
        """The trainings asked for since the last time, in one batch (over the training
        workers, if any: :attr:`SimulationConfig.workers`), then each model handed to its
        user in the order asked. A user's trainer advances the same way whenever it
        trains, so batching changes no model; a user killed before the batch ran (it
        died while training) hands nothing over."""
        record = self._record
        assert record is not None
        pending, self._training = self._training, []
        jobs = [TrainingJob(user, effect.global_params, effect.round) for user, effect in pending]
        models = self._timed("training", lambda: self.training.train(jobs))
        for (user, effect), params in zip(pending, models, strict=True):
            record.local_models[user] = params
            if user in self.alive:
                self._deliver_to_user(user, Trained(effect.round, params))

    def _done(self, done: RoundDone) -> None:
        assert self._record is not None
        record_round(self._record, done)

    # --- dropouts -------------------------------------------------------------------------------

    @property
    def _no_shares(self) -> bool:
        """Whether the task's groups key without shares (:mod:`fairbus.pairwise`)."""
        return self.config.provider.keying == PAIRWISE

    def _kill(self, plan: DropoutPlan) -> None:
        self.alive.discard(plan.user)
        self._plan.pop(plan.user, None)
        self._killed_this_round.append(plan)
        self._dispatch(PROVIDER, self.provider.handle(Dropped(plan.user)))

    def _revive(self, user: int) -> None:
        # A restarted user keeps its keys and resumes its chain from the ledger's head
        # (an upload it signed just before dying may or may not have been recorded); the
        # provider continues the user's chain from the same head.
        head = self.ledger.head(user)
        self.machines[user] = UserMachine(
            self.identities[user], self.roster, prev=head, collusion=self.config.provider.collusion
        )
        self.alive.add(user)
        self._dispatch(PROVIDER, self.provider.handle(ChainHead(user, head)))
        self._dispatch(PROVIDER, self.provider.handle(Joined(user)))

    def _timed(self, phase: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self._add_time(phase, start)
