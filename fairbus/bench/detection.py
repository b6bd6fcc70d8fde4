"""``fairbus bench detection``: does Algorithm 6 find the attackers, and only them?

A suite is a list of :class:`Scenario` (policy as data): who attacks how, among how
many users, on what split of the data, for how many rounds and seeds. For each
scenario and seed one defended simulation; for each attacked scenario also one
undefended FedAvg run with the same attackers. Reports detection rate, false
exclusions, rounds to detection and final accuracy against the no-attack run of the
same setting and the undefended runs.

Two suites: :data:`PAPER` (poisoners + free-riders among 9 users, the default table)
and :data:`FAIRNESS` (issue 13: non-IID data, disguised free-riders, poisoners of other
step sizes, label-flippers, 15 and 30 users, 50 rounds), with the issue's targets.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fairbus.detection import DetectionParams
from fairbus.errors import FairbusError
from fairbus.protocol.provider import ProviderConfig
from fairbus.rounds import RoundRecord
from fairbus.simulator import Simulation, SimulationConfig
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.config import TrainConfig
from fairbus.training.data import PARTITIONS, Partition, uses_alpha


@dataclass(frozen=True)
class Scenario:
    """One row of the bench. ``attacks`` lists (attack, how many users make it); which
    users they are is a seeded choice per seed (:func:`attackers_for`)."""

    name: str
    users: int = 9
    partition: Partition = "iid"
    alpha: float = 0.5
    """The Dirichlet concentration of the non-IID split (unused with "iid")."""
    attacks: tuple[tuple[Attack, int], ...] = ()
    rounds: int | None = None
    """Rounds per run; None: the command's ``--rounds``."""
    seeds: int | None = None
    """Seeds; None: the command's ``--seeds``; a number: that many, at most ``--seeds``."""
    detected_target: float | None = None
    """The share of attackers that must be excluded (issue 13: 3+3 of 9, 80%)."""

    def __post_init__(self) -> None:
        if self.users < 3:
            raise FairbusError(f"scenario {self.name!r}: at least 3 users")
        if self.partition not in PARTITIONS or not self.alpha > 0:
            raise FairbusError(
                f"scenario {self.name!r}: partition one of {', '.join(PARTITIONS)}, alpha > 0"
            )
        if any(count < 1 for _, count in self.attacks):
            raise FairbusError(f"scenario {self.name!r}: every attack needs at least one user")
        if any(not attack.malicious for attack, _ in self.attacks):
            raise FairbusError(f"scenario {self.name!r}: an attack must not be honest")
        if self.attackers >= self.users:
            raise FairbusError(f"scenario {self.name!r}: needs at least one honest user")
        for what in (self.rounds, self.seeds):
            if what is not None and what < 1:
                raise FairbusError(f"scenario {self.name!r}: rounds and seeds must be >= 1")
        target = self.detected_target
        if target is not None and not 0 <= target <= 1:
            raise FairbusError(f"scenario {self.name!r}: detected_target must be in [0, 1]")

    @property
    def attackers(self) -> int:
        return sum(count for _, count in self.attacks)

    def count(self, behaviour: Behaviour) -> int:
        """How many users make an attack of this kind."""
        return sum(n for attack, n in self.attacks if attack.behaviour is behaviour)

    def rounds_for(self, rounds: int) -> int:
        """Its rounds, given the command's ``--rounds``."""
        return self.rounds if self.rounds is not None else rounds

    def seeds_for(self, seeds: int) -> int:
        """Its seeds, given the command's ``--seeds``."""
        return seeds if self.seeds is None else min(self.seeds, seeds)

    @property
    def all_out_target(self) -> float | None:
        """Issue 13: wherever attackers are at most a third of the users, every attacker
        is out by round :data:`DETECT_BY` in at least this share of the seeds."""
        if self.attacks and 3 * self.attackers <= self.users:
            return ALL_OUT_SHARE
        return None

    def describe(self) -> str:
        """The attackers in words: "2 P + 2 F", "2 disguised F (noise 0.001)"."""
        if not self.attacks:
            return "none"
        return " + ".join(f"{n} {_attack_name(a)}" for a, n in self.attacks)


def _attack_name(attack: Attack) -> str:
    b = attack.behaviour
    if b is Behaviour.POISONER:
        return "P" if attack.poison_scale == 1 else f"P ×{attack.poison_scale:g}"
    if b is Behaviour.FREE_RIDER:
        return "F"
    if b is Behaviour.DISGUISED_FREE_RIDER:
        return f"disguised F (noise {attack.noise_std:g})"
    if b is Behaviour.LABEL_FLIPPER:
        return "label flip"
    return str(b)


def pf(poisoners: int, free_riders: int) -> tuple[tuple[Attack, int], ...]:
    """Poisoners (scale 1) and free-riders, poisoners first: the paper's attackers."""
    both = ((Attack(Behaviour.POISONER), poisoners), (Attack(Behaviour.FREE_RIDER), free_riders))
    return tuple((attack, n) for attack, n in both if n)


DETECT_BY = 10
"""Issue 13: attackers are to be out by this round (or the last round, if earlier)."""
ALL_OUT_SHARE = 0.95
"""Issue 13: the share of seeds with every attacker out by round :data:`DETECT_BY`."""
FEW_SEEDS = 5
"""Seeds of the scenarios with 15 or 30 users or 50 rounds (at most ``--seeds``)."""

SCENARIOS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (3, 3))
"""The paper suite's poisoners + free-riders among 9 users."""

PAPER: tuple[Scenario, ...] = tuple(Scenario(f"{p}+{f}", attacks=pf(p, f)) for p, f in SCENARIOS)
"""The default table: the paper's attackers among 9 users, IID, ``--seeds`` × ``--rounds``."""

FAIRNESS: tuple[Scenario, ...] = (
    Scenario("iid 0+0"),
    Scenario("iid 1+1", attacks=pf(1, 1)),
    Scenario("iid 2+2", attacks=pf(2, 2)),
    Scenario("iid 3+3", attacks=pf(3, 3), detected_target=0.8),
    Scenario("non-iid 0+0", partition="dirichlet", alpha=0.5),
    Scenario("non-iid 2+2", partition="dirichlet", alpha=0.5, attacks=pf(2, 2)),
    Scenario("2-3 classes 0+0", partition="classes"),
    Scenario("2-3 classes 2+2", partition="classes", attacks=pf(2, 2)),
    Scenario("less data 0+0", partition="quantity", alpha=0.5),
    Scenario("less data 2+2", partition="quantity", alpha=0.5, attacks=pf(2, 2)),
    *(
        Scenario(
            f"disguised {noise:g}",
            attacks=((Attack(Behaviour.DISGUISED_FREE_RIDER, noise_std=noise), 2),),
        )
        for noise in (1e-4, 1e-3, 1e-2)
    ),
    *(
        Scenario(
            f"poison x{scale:g}", attacks=((Attack(Behaviour.POISONER, poison_scale=scale), 2),)
        )
        for scale in (0.5, 3.0)
    ),
    Scenario("label flip", attacks=((Attack(Behaviour.LABEL_FLIPPER), 2),)),
    Scenario("15 users 0+0", users=15, seeds=FEW_SEEDS),
    Scenario("15 users 3+3", users=15, attacks=pf(3, 3), seeds=FEW_SEEDS),
    Scenario("30 users 0+0", users=30, seeds=FEW_SEEDS),
    Scenario("30 users 6+6", users=30, attacks=pf(6, 6), seeds=FEW_SEEDS),
    Scenario("50 rounds 0+0", rounds=50, seeds=FEW_SEEDS),
)
"""Issue 13's scenarios. "2-3 classes" gives each user two or three classes, "less data"
IID labels in shares drawn from Dir(0.5) over the users (the smallest under 3%:
:func:`fairbus.training.data.partition`), the issue's users with skewed or less data.
The 9-user ones over 10 rounds take ``--seeds`` and
``--rounds``; those with 15 or 30 users and the 50-round one :data:`FEW_SEEDS`. "15 users
0+0" and "30 users 0+0" are not named by the issue: they are the no-attack runs the
attacked ones at those sizes are compared with (and they must exclude no one)."""

SUITES: dict[str, tuple[Scenario, ...]] = {"paper": PAPER, "fairness": FAIRNESS}


def select(suite: Sequence[Scenario], names: Iterable[str]) -> tuple[Scenario, ...]:
    """The scenarios of ``suite`` named in ``names`` (all of them for none), in suite order."""
    wanted = set(names)
    unknown = wanted - {s.name for s in suite}
    if unknown:
        known = ", ".join(repr(s.name) for s in suite)
        raise FairbusError(f"no scenario {sorted(unknown)} in the suite; it has {known}")
    return tuple(s for s in suite if not wanted or s.name in wanted)


@dataclass(frozen=True)
class RunSpec:
    """One simulation: a scenario's seed, defended (Alg. 6) or undefended FedAvg."""

    scenario: Scenario
    seed: int
    defended: bool
    base: SimulationConfig
    """Users, rounds and the data split (the scenario's), and the provider's policy."""

    @property
    def setting(self) -> tuple[int, str, float | None, int]:
        """What the no-attack run it is compared with shares: users, data split, rounds."""
        b = self.base
        return (b.users, b.partition, b.alpha if uses_alpha(b.partition) else None, b.rounds)


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    attackers: frozenset[int]
    excluded_round: dict[int, int]
    final_accuracy: float
    mean_scores: dict[int, float]
    """Each user's score_i (Alg. 6, lines 9-15) averaged over the rounds it was scored."""
    failed_rounds: tuple[int, ...] = ()
    """The rounds that could not start or finish (no grouping passed the exposure check)."""

    @property
    def detected(self) -> set[int]:
        return set(self.excluded_round) & self.attackers

    def to_json(self) -> dict[str, object]:
        """One run as ``fairbus bench detection --runs-out`` writes it (a JSON line)."""
        return {
            "scenario": self.spec.scenario.name,
            "seed": self.spec.seed,
            "defended": self.spec.defended,
            "attackers": sorted(self.attackers),
            "excluded_round": {str(u): r for u, r in sorted(self.excluded_round.items())},
            "false_exclusions": sorted(self.false_exclusions),
            "final_accuracy": self.final_accuracy,
            "mean_scores": {str(u): s for u, s in sorted(self.mean_scores.items())},
            "failed_rounds": list(self.failed_rounds),
        }

    @property
    def false_exclusions(self) -> set[int]:
        return set(self.excluded_round) - self.attackers


def attackers_for(spec: RunSpec) -> dict[int, Attack]:
    """Which users attack: a seeded choice, in the order of the scenario's attacks
    (poisoners first in the paper's). Not a secret: it only sets up the experiment."""
    users = spec.base.users
    order = np.random.default_rng(10_000 + spec.seed).permutation(np.arange(1, users + 1))
    chosen = (int(u) for u in order)
    return {next(chosen): attack for attack, n in spec.scenario.attacks for _ in range(n)}


def trace_one(spec: RunSpec) -> tuple[dict[int, Attack], list[RoundRecord]]:
    """Run one simulation (one thread): who attacked how, and every round's record
    (groups with their accuracy, contribution and score; τ, the clean level, the key
    users and the violators): what ``fairbus bench detection --trace`` prints."""
    import torch

    torch.set_num_threads(1)
    attacks = attackers_for(spec)
    config = replace(
        spec.base,
        seed=spec.seed,
        attacks=attacks,
        provider=replace(spec.base.provider, defended=spec.defended, seed=spec.seed),
    )
    return attacks, Simulation(config).run()


def run_one(spec: RunSpec) -> RunResult:
    """Run one simulation (one thread) and keep what the summaries need."""
    attacks, records = trace_one(spec)
    excluded_round: dict[int, int] = {}
    scores: dict[int, list[float]] = {}
    for record in records:
        for user in record.violators:
            excluded_round.setdefault(user, record.round)
        for user, assessment in record.scores.items():
            if assessment["score"] is not None:
                scores.setdefault(user, []).append(float(assessment["score"]))
    return RunResult(
        spec,
        frozenset(attacks),
        excluded_round,
        records[-1].global_accuracy,
        {u: statistics.fmean(v) for u, v in scores.items()},
        tuple(record.round for record in records if record.failed is not None),
    )


def run_all(
    specs: list[RunSpec],
    workers: int,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Every run, in order, on ``workers`` processes; ``on_result`` sees each as it
    finishes (in order), ``progress`` how many have."""
    if workers <= 1:
        finished: Iterable[RunResult] = map(run_one, specs)
        return _collect(finished, progress, on_result)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        return _collect(pool.imap(run_one, specs), progress, on_result)


def _collect(
    finished: Iterable[RunResult],
    progress: Callable[[int], None] | None,
    on_result: Callable[[RunResult], None] | None,
) -> list[RunResult]:
    results = []
    for result in finished:
        results.append(result)
        if on_result:
            on_result(result)
        if progress:
            progress(len(results))
    return results


@dataclass(frozen=True)
class Tally:
    """The numbers of one scenario's runs."""

    seeds: int
    detection_rate: float | None
    """Share of attackers excluded; None without attackers."""
    false_exclusions: int
    seeds_with_false_exclusion: int
    seeds_all_caught_in_time: int
    rounds_to_detection_mean: float | None
    rounds_to_detection_max: int | None
    accuracy_defended: float
    accuracy_undefended: float | None
    score_honest: float | None
    score_attackers: float | None
    seeds_with_failed_round: int = 0
    """Seeds whose defended run had a round that could not start or finish (no grouping
    passed the exposure check): a task that stalls learns nothing more."""


def tally(defended: Sequence[RunResult], undefended: Sequence[RunResult], within: int) -> Tally:
    """Count one scenario's defended runs (and the undefended runs' accuracy); an
    attacker counts as caught in time when it is excluded by round ``within``."""
    attackers = sum(len(r.attackers) for r in defended)
    detected = sum(len(r.detected) for r in defended)
    rounds = [r.excluded_round[u] for r in defended for u in r.detected]
    return Tally(
        len(defended),
        detected / attackers if attackers else None,
        sum(len(r.false_exclusions) for r in defended),
        sum(1 for r in defended if r.false_exclusions),
        sum(
            1
            for r in defended
            if r.detected == set(r.attackers)
            and all(r.excluded_round[u] <= within for u in r.attackers)
        ),
        statistics.fmean(rounds) if rounds else None,
        max(rounds) if rounds else None,
        statistics.fmean(r.final_accuracy for r in defended),
        statistics.fmean(r.final_accuracy for r in undefended) if undefended else None,
        _mean_score(defended, honest=True),
        _mean_score(defended, honest=False),
        sum(1 for r in defended if r.failed_rounds),
    )


@dataclass(frozen=True)
class ScenarioSummary:
    """A row of the paper suite's table."""

    poisoners: int
    free_riders: int
    seeds: int
    detection_rate: float | None
    """Share of attackers excluded; None without attackers."""
    false_exclusions: int
    seeds_with_false_exclusion: int
    seeds_all_caught_in_time: int
    rounds_to_detection_mean: float | None
    rounds_to_detection_max: int | None
    accuracy_defended: float
    accuracy_no_attack: float
    accuracy_undefended: float | None
    score_honest: float | None = None
    """Mean score_i of the honest users; the paper's Fig. 5 has them well above ..."""
    score_attackers: float | None = None
    """... the attackers', even with 3+3; means over users, rounds scored and seeds."""
    seeds_with_failed_round: int = 0
    """Seeds whose defended run had a round that failed (:attr:`Tally.seeds_with_failed_round`)."""

    @property
    def meets_target(self) -> bool:
        if self.poisoners + self.free_riders == 0:
            return self.false_exclusions == 0
        if self.poisoners >= 3:
            return self.false_exclusions <= 1
        return self.seeds_all_caught_in_time == self.seeds and self.false_exclusions == 0


def summarize(results: Iterable[RunResult], within: int) -> list[ScenarioSummary]:
    """The paper suite's rows (its scenarios that were run), in its order."""
    results = list(results)
    no_attack = [r.final_accuracy for r in results if r.spec.defended and not r.attackers]
    summaries = []
    for scenario in PAPER:
        mine = [r for r in results if r.spec.scenario.name == scenario.name]
        defended = [r for r in mine if r.spec.defended]
        if not defended:
            continue
        t = tally(defended, [r for r in mine if not r.spec.defended], within)
        summaries.append(
            ScenarioSummary(
                scenario.count(Behaviour.POISONER),
                scenario.count(Behaviour.FREE_RIDER),
                t.seeds,
                t.detection_rate,
                t.false_exclusions,
                t.seeds_with_false_exclusion,
                t.seeds_all_caught_in_time,
                t.rounds_to_detection_mean,
                t.rounds_to_detection_max,
                t.accuracy_defended,
                statistics.fmean(no_attack) if no_attack else float("nan"),
                t.accuracy_undefended,
                t.score_honest,
                t.score_attackers,
                t.seeds_with_failed_round,
            )
        )
    return summaries


@dataclass(frozen=True)
class SuiteSummary:
    """A row of a named suite's table (:data:`FAIRNESS`), with issue 13's targets."""

    name: str
    users: int
    partition: str
    alpha: float | None
    attacks: str
    attackers: int
    rounds: int
    within: int
    """Attackers count as caught in time when excluded by this round."""
    tally: Tally
    accuracy_no_attack: float | None
    """The defended no-attack runs of the same users, data split and rounds."""
    all_out_target: float | None
    detected_target: float | None
    misses: tuple[str, ...]
    """The targets missed, in words (none: the row meets every target)."""

    @property
    def meets_target(self) -> bool:
        return not self.misses


def summarize_suite(results: Iterable[RunResult], suite: Sequence[Scenario]) -> list[SuiteSummary]:
    """One row per scenario of ``suite`` that was run, in suite order."""
    results = list(results)
    reference: dict[tuple[int, str, float | None, int], list[float]] = {}
    for r in results:
        if r.spec.defended and not r.spec.scenario.attacks:
            reference.setdefault(r.spec.setting, []).append(r.final_accuracy)
    rows = []
    for scenario in suite:
        mine = [r for r in results if r.spec.scenario.name == scenario.name]
        defended = [r for r in mine if r.spec.defended]
        if not defended:
            continue
        base = defended[0].spec.base
        within = min(DETECT_BY, base.rounds)
        t = tally(defended, [r for r in mine if not r.spec.defended], within)
        same = reference.get(defended[0].spec.setting)
        rows.append(
            SuiteSummary(
                scenario.name,
                scenario.users,
                scenario.partition,
                scenario.alpha if uses_alpha(scenario.partition) else None,
                scenario.describe(),
                scenario.attackers,
                base.rounds,
                within,
                t,
                statistics.fmean(same) if same else None,
                scenario.all_out_target,
                scenario.detected_target,
                missed_targets(scenario, t),
            )
        )
    return rows


def missed_targets(scenario: Scenario, t: Tally) -> tuple[str, ...]:
    """Issue 13's targets the runs miss: no honest user excluded, anywhere; every attacker
    out by round 10 in ≥ 95% of the seeds where attackers are at most a third of the
    users; the scenario's share of attackers detected (3+3 of 9: 80%)."""
    missed = []
    if t.false_exclusions:
        missed.append(f"{t.false_exclusions} false")
    share = scenario.all_out_target
    if share is not None and t.seeds_all_caught_in_time < math.ceil(share * t.seeds - 1e-9):
        missed.append(f"all out {t.seeds_all_caught_in_time}/{t.seeds} < {share:.0%}")
    target = scenario.detected_target
    if target is not None and (t.detection_rate or 0.0) < target:
        missed.append(f"detected {t.detection_rate or 0.0:.0%} < {target:.0%}")
    return tuple(missed)


def _mean_score(runs: Sequence[RunResult], *, honest: bool) -> float | None:
    values = [
        score
        for r in runs
        for user, score in r.mean_scores.items()
        if (user not in r.attackers) == honest
    ]
    return statistics.fmean(values) if values else None


def build_suite_specs(
    suite: Sequence[Scenario],
    seeds: int,
    rounds: int,
    detection: DetectionParams,
    key_repeats: int,
    basic_groupings: int,
    train: TrainConfig | None = None,
) -> list[RunSpec]:
    """Every run of ``suite``: per scenario and seed a defended run, and with attackers an
    undefended one; ``seeds`` and ``rounds`` are the command's (:meth:`Scenario.seeds_for`);
    ``train`` the users' local training (None: :class:`TrainConfig`'s defaults)."""
    names = [s.name for s in suite]
    if len(set(names)) != len(names):
        raise FairbusError("scenario names must be distinct")
    provider = ProviderConfig(
        detection=detection, key_repeats=key_repeats, basic_groupings=basic_groupings
    )
    specs = []
    for scenario in suite:
        base = SimulationConfig(
            users=scenario.users,
            rounds=scenario.rounds_for(rounds),
            partition=scenario.partition,
            alpha=scenario.alpha,
            train=train or TrainConfig(),
            provider=provider,
        )
        for seed in range(scenario.seeds_for(seeds)):
            specs.append(RunSpec(scenario, seed, True, base))
            if scenario.attacks:
                specs.append(RunSpec(scenario, seed, False, base))
    return specs


def build_specs(
    seeds: int,
    rounds: int,
    detection: DetectionParams,
    key_repeats: int,
    basic_groupings: int,
    train: TrainConfig | None = None,
) -> list[RunSpec]:
    """The paper suite's runs."""
    return build_suite_specs(PAPER, seeds, rounds, detection, key_repeats, basic_groupings, train)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))
