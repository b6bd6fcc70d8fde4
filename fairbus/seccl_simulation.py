"""``fairbus simulate --mode seccl``: SecCL's participants, server and ledger in one
process (SecCL, "Experimental Evaluation": the paper's own prototype also simulates the
participants' interaction in one Python server).

It drives the sans-I/O machines :class:`~fairbus.protocol.seccl_provider.
SecclServerMachine` and :class:`~fairbus.protocol.seccl_user.SecclUserMachine`: every
transaction they emit is admitted by the ledger's validation state machine, whose task
start records the mode ``seccl`` (:class:`~fairbus.ledger.inprocess.InProcessLedger`,
:mod:`fairbus.ledger.seccl`), then relayed with its receipt to the server and every
participant (the bulletin board: what is recorded is visible to all). It carries out
their effects with PyTorch: local training (attacks included) and the peer evaluations.

- Data: the training set is split among the participants (``iid`` or Dirichlet); each
  keeps ``validation_share`` (20%) of its own part, drawn by a seeded permutation (not
  a secret), as its private validation data and trains on the rest.
- Attacks (:mod:`fairbus.training.attacks`) start at round ``attack_from`` (the
  paper's Fig. 5: label-flippers from round 5); before it the attackers behave
  honestly. With ``collude`` (the default) every attacker also votes for the others
  from that round: in its type (b) message each fellow attacker gets the value 1.0 (the
  top of its ballot), the honest participants their true F-scores (SecCL, "Security
  against Collusions": "collusive adversaries may upload fake ranks").
- Each round's record (:class:`~fairbus.rounds.RoundRecord`) holds the global model's
  test accuracy, the candidates and the Borda totals.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairbus.errors import FairbusError
from fairbus.evaluation import QuantizedTestSet
from fairbus.ledger.inprocess import BlobSink, BlockSink
from fairbus.protocol.events import (
    PROVIDER,
    Commit,
    EvaluatePeers,
    PeersEvaluated,
    Received,
    Refused,
    RoundFailed,
    SecclEvent,
    SecclOutput,
    SecclRoundDone,
    StartRound,
    Train,
    Trained,
)
from fairbus.protocol.seccl_provider import SecclPhase, SecclServerConfig, SecclServerMachine
from fairbus.protocol.seccl_user import SecclUserMachine
from fairbus.rounds import RoundRecord
from fairbus.seccl import DEFAULT_CANDIDATE_SHARE, DEFAULT_THETA, macro_f_score
from fairbus.simulator import (
    LEDGER_NODE_ID,
    SimulationParties,
    commit_on_record,
)
from fairbus.task import TaskParams
from fairbus.training.attacks import Attack
from fairbus.training.config import TrainConfig, attack_seed, trainer_seed
from fairbus.training.data import (
    DATASET_MODELS,
    Dataset,
    Partition,
    check_partition,
    load_dataset,
    partition,
)
from fairbus.training.local import Evaluator, Trainer
from fairbus.training.models import initial_params
from fairbus.wire.messages import SECCL, EvaluationSpec

PAPER_TRAINING = TrainConfig(lr=0.02, batch_size=32, absent_class_scale=1.0)
"""SecCL's local training: "mini-batch size 32, learning rate 0.02" ("Experimental
Evaluation"), with the plain softmax the paper trains with (the restricted one is the
fairness mode's remedy for users lacking classes, issue 13); the paper names no epoch
count, so TrainConfig's stands."""
VALIDATION_SHARE = 0.2
"""The share of its own data each participant keeps as its private validation data."""


@dataclass(frozen=True)
class SecclSimulationConfig:
    users: int = 20
    rounds: int = 10
    seed: int = 0
    dataset: str = "digits"
    data_dir: Path | None = None
    model: str | None = None
    partition: Partition = "iid"
    alpha: float = 0.5
    train: TrainConfig = PAPER_TRAINING
    theta: float = DEFAULT_THETA
    candidate_share: float = DEFAULT_CANDIDATE_SHARE
    validation_share: float = VALIDATION_SHARE
    attacks: dict[int, Attack] = field(default_factory=dict)
    attack_from: int = 1
    """The first round in which the attackers attack (and collude)."""
    collude: bool = True
    """Attackers give each other the top of their ballots (from ``attack_from``)."""

    @property
    def model_name(self) -> str:
        return self.model or DATASET_MODELS[self.dataset]


def validation_split(
    n: int, share: float, seed: int, user: int
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int64]]]:
    """(training, validation) positions within a participant's ``n`` samples: a seeded
    permutation (not a secret), the last ``share`` of it (at least one sample, and at
    least one left to train on) for validation."""
    if not 0.0 < share < 1.0:
        raise FairbusError(f"the validation share must be in (0, 1), got {share}")
    if n < 2:
        raise FairbusError(f"participant {user} holds {n} sample(s): too few to split")
    generator = torch.Generator().manual_seed(trainer_seed(seed, user))
    order = torch.randperm(n, generator=generator).numpy().astype(np.int64)
    held = min(n - 1, max(1, round(share * n)))
    return np.sort(order[: n - held]), np.sort(order[n - held :])


class SecclSimulation:
    """One SecCL training run; ``run()`` plays every round and returns the records."""

    def __init__(
        self,
        config: SecclSimulationConfig,
        *,
        on_block: BlockSink | None = None,
        on_blob: BlobSink | None = None,
    ) -> None:
        if config.users < 3:
            raise FairbusError("a simulation needs at least 3 users")
        if config.users >= LEDGER_NODE_ID:
            raise FairbusError(f"a simulation takes fewer than {LEDGER_NODE_ID} users")
        check_partition(config.partition)
        self.config = config
        self.user_ids = list(range(1, config.users + 1))
        unknown = set(config.attacks) - set(self.user_ids)
        if unknown:
            raise FairbusError(f"attacks configured for unknown users {sorted(unknown)}")
        parties = SimulationParties.generate(self.user_ids, on_block=on_block, on_blob=on_blob)
        provider, self.identities = parties.provider, parties.users
        self.roster, self.ledger = parties.roster, parties.ledger
        train, test = load_dataset(config.dataset, config.data_dir, seed=config.seed)
        parts = partition(train, config.users, config.partition, config.alpha, config.seed)
        self.trainers: dict[int, Trainer] = {}
        self.validators: dict[int, Evaluator] = {}
        own: dict[int, Dataset] = {}
        for u, part in zip(self.user_ids, parts, strict=True):
            fit, held = validation_split(len(part), config.validation_share, config.seed, u)
            own[u] = train.subset(part[fit])
            self.validators[u] = Evaluator(config.model_name, train.subset(part[held]))
        self.train = config.train.for_task(sum(len(d) for d in own.values()), config.users)
        for u in self.user_ids:
            seed = trainer_seed(config.seed, u)
            self.trainers[u] = Trainer(config.model_name, own[u], self.train, seed=seed)
        self.tester = Evaluator(config.model_name, test)
        test_set = QuantizedTestSet.quantize(test.x.numpy(), test.y.numpy(), test.num_classes)
        committed = test_set.to_message()
        spec = EvaluationSpec(config.model_name, hashlib.sha256(committed.payload()).digest())
        task = TaskParams(
            evaluation=spec,
            mode=SECCL,
            theta=config.theta,
            candidate_share=config.candidate_share,
            **self.train.recorded(),
        )
        self.server = SecclServerMachine(
            provider,
            self.roster,
            initial_params(config.model_name, config.seed),
            SecclServerConfig(task, committed),
        )
        self.machines = {
            u: SecclUserMachine(self.identities[u], self.roster) for u in self.user_ids
        }
        self._queue: deque[tuple[int | str, str, bytes]] = deque()
        self._record: RoundRecord | None = None

    # --- driving ------------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        records = []
        for r in range(1, self.config.rounds + 1):
            record = self.play_round(r)
            records.append(record)
            if on_round is not None:
                on_round(record)
        return records

    def play_round(self, r: int) -> RoundRecord:
        record = RoundRecord.empty(r, attempts=1)
        self._record = record
        self._dispatch(PROVIDER, self.server.handle(StartRound(float(r))))
        while self._queue:
            to, kind, data = self._queue.popleft()
            self._deliver(to, Received(kind, data))
        if self.server.phase is not SecclPhase.IDLE and not record.failed:
            record.failed = f"round {r} did not complete"
        record.global_accuracy = self.tester.accuracy(self.server.global_params)
        record.bytes = dict(record.bytes)
        return record

    def _deliver(self, to: int | str, event: SecclEvent) -> None:
        if to == PROVIDER:
            start = time.perf_counter()
            outputs = self.server.handle(event)
            self._add_time("aggregation", start)
        elif isinstance(to, int):
            outputs = self.machines[to].handle(event)
        else:
            raise FairbusError(f"no machine {to!r}")
        self._dispatch(to, outputs)

    def _dispatch(self, source: int | str, outputs: list[SecclOutput]) -> None:
        record = self._record
        if record is None:
            raise FairbusError("no round in progress")
        for out in outputs:
            if isinstance(out, Commit):
                self._commit(source, out)
            elif isinstance(out, Train) and isinstance(source, int):
                self._train(source, out)
            elif isinstance(out, EvaluatePeers) and isinstance(source, int):
                self._evaluate(source, out)
            elif isinstance(out, SecclRoundDone):
                record.candidates = list(out.candidates)
                record.borda = dict(sorted(out.totals.items()))
            elif isinstance(out, RoundFailed):
                record.failed = out.reason
            elif isinstance(out, Refused):
                record.refusals.append(f"{source}: {out.reason}: {out.detail}")

    def _commit(self, source: int | str, out: Commit) -> None:
        """Commit on the ledger, then relay with the receipt to everyone else."""
        record = self._record
        if record is None:
            raise FairbusError("no round in progress")
        data = commit_on_record(self.ledger, record, source, out, "server", self._deliver)
        if data is None:
            return
        targets: list[int | str] = [PROVIDER, *self.user_ids]
        for target in targets:
            if target != source:
                self._queue.append((target, out.kind, data))

    def _attacking(self, user: int, round: int) -> Attack | None:
        attack = self.config.attacks.get(user)
        return attack if attack is not None and round >= self.config.attack_from else None

    def _train(self, user: int, effect: Train) -> None:
        attack = self._attacking(user, effect.round) or Attack()
        start = time.perf_counter()
        params = attack.local_model(
            effect.global_params,
            self.trainers[user],
            seed=attack_seed(self.config.seed, user, effect.round),
        )
        self._add_time("training", start)
        self._deliver(user, Trained(effect.round, params))

    def _evaluate(self, user: int, effect: EvaluatePeers) -> None:
        start = time.perf_counter()
        validator = self.validators[user]
        labels = validator.labels
        scores: dict[int, float] = {}
        for other, params in effect.models.items():
            if params is None or not np.isfinite(params).all():
                scores[other] = 0.0  # a malformed change, or a model that diverged
            else:
                scores[other] = macro_f_score(labels, validator.predict(params))
        if self.config.collude and self._attacking(user, effect.round) is not None:
            for other in scores:
                if self._attacking(other, effect.round) is not None:
                    scores[other] = 1.0  # the colluders' fake ranks: each other on top
        self._add_time("evaluation", start)
        self._deliver(user, PeersEvaluated(effect.round, scores))

    def _add_time(self, phase: str, start: float) -> None:
        if self._record is not None:
            self._record.timings_s[phase] += time.perf_counter() - start
