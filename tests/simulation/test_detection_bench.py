"""``fairbus bench detection``: the suites' scenarios, their runs and their targets."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fairbus.aggregation import CleanGroupAverage
from fairbus.bench import detection
from fairbus.bench.detection import (
    FAIRNESS,
    FEW_SEEDS,
    PAPER,
    RunResult,
    RunSpec,
    Scenario,
    attackers_for,
    build_specs,
    build_suite_specs,
    pf,
    run_one,
    summarize_suite,
    trace_one,
)
from fairbus.errors import FairbusError
from fairbus.simulator import SimulationConfig
from fairbus.task import DEFAULT_DETECTION
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.config import TrainConfig
from fairbus_cli import bench as bench_cli
from fairbus_cli.main import app

P, F = Behaviour.POISONER, Behaviour.FREE_RIDER


def _by_name() -> dict[str, Scenario]:
    return {s.name: s for s in FAIRNESS}


def _kinds(s: Scenario) -> Counter[tuple[Behaviour, float, float]]:
    return Counter({(a.behaviour, a.poison_scale, a.noise_std): n for a, n in s.attacks})


def test_the_fairness_suite_covers_issue_13s_scenarios() -> None:
    """IID 0+0 to 3+3 of 9; non-IID (α 0.5) 0+0 and 2+2; disguised free-riders at three
    noise levels; poisoners ×0.5 and ×3; label-flippers; 15 users 3+3; 30 users 6+6;
    0+0 over 50 rounds; the large and long ones on fewer seeds."""
    s = _by_name()
    for p in range(4):
        iid = s[f"iid {p}+{p}"]
        assert (iid.users, iid.partition, iid.rounds, iid.seeds) == (9, "iid", None, None)
        assert (iid.count(P), iid.count(F)) == (p, p) and iid.attackers == 2 * p
    assert s["iid 3+3"].detected_target == 0.8
    for p in (0, 2):
        skewed = s[f"non-iid {p}+{p}"]
        assert (skewed.users, skewed.partition, skewed.alpha) == (9, "dirichlet", 0.5)
        assert (skewed.count(P), skewed.count(F)) == (p, p)
        few = s[f"2-3 classes {p}+{p}"]
        assert (few.users, few.partition, few.count(P), few.count(F)) == (9, "classes", p, p)
        less = s[f"less data {p}+{p}"]
        assert (less.users, less.partition, less.alpha) == (9, "quantity", 0.5)
        assert (less.count(P), less.count(F)) == (p, p)
    disguised = {
        a.noise_std
        for x in FAIRNESS
        for a, n in x.attacks
        if a.behaviour is Behaviour.DISGUISED_FREE_RIDER and n == 2 and x.users == 9
    }
    assert disguised == {1e-4, 1e-3, 1e-2}
    scales = {
        a.poison_scale
        for x in FAIRNESS
        for a, n in x.attacks
        if a.behaviour is P and x.attackers == 2 and x.count(F) == 0
    }
    assert scales == {0.5, 3.0}
    assert _kinds(s["label flip"]) == {(Behaviour.LABEL_FLIPPER, 1.0, 1e-3): 2}
    for name, users, each in (("15 users 3+3", 15, 3), ("30 users 6+6", 30, 6)):
        large = s[name]
        assert (large.users, large.count(P), large.count(F)) == (users, each, each)
    long = s["50 rounds 0+0"]
    assert (long.users, long.rounds, long.attackers) == (9, 50, 0)
    for name in ("15 users 3+3", "30 users 6+6", "50 rounds 0+0", "15 users 0+0", "30 users 0+0"):
        assert s[name].seeds == FEW_SEEDS


def test_the_suites_run_specs() -> None:
    specs = build_suite_specs(FAIRNESS, 20, 10, DEFAULT_DETECTION, 6, 2)
    runs = Counter((spec.scenario.name, spec.defended) for spec in specs)
    for scenario in FAIRNESS:
        seeds = FEW_SEEDS if scenario.users > 9 or scenario.rounds == 50 else 20
        assert runs[scenario.name, True] == seeds, scenario.name
        # undefended FedAvg only where someone attacks
        assert runs[scenario.name, False] == (seeds if scenario.attacks else 0), scenario.name
    for spec in specs:
        b = spec.base
        assert (b.users, b.partition, b.alpha) == (
            spec.scenario.users,
            spec.scenario.partition,
            spec.scenario.alpha,
        )
        assert b.rounds == (50 if spec.scenario.name == "50 rounds 0+0" else 10)
        chosen = attackers_for(spec)
        assert len(chosen) == spec.scenario.attackers
        assert Counter(a for a in chosen.values()) == Counter(
            {a: n for a, n in spec.scenario.attacks}
        )
    # fewer seeds asked for than FEW_SEEDS: every scenario takes that many
    few = build_suite_specs(FAIRNESS, 2, 3, DEFAULT_DETECTION, 6, 2)
    assert {spec.seed for spec in few} == {0, 1}
    # the paper suite is what it was: 0+0 to 3+3 P+F among 9 users, IID
    paper = build_specs(3, 10, DEFAULT_DETECTION, 6, 2)
    assert len(paper) == 3 + 3 * 2 * 3
    assert [s.name for s in PAPER] == ["0+0", "1+1", "2+2", "3+3"]
    assert detection.SUITES == {"paper": PAPER, "fairness": FAIRNESS}
    # local training: the defaults, or what the bench is given (--local-steps)
    assert {spec.base.train for spec in specs} == {TrainConfig()}
    steps = build_suite_specs(FAIRNESS, 1, 3, DEFAULT_DETECTION, 6, 2, TrainConfig(local_steps=47))
    assert {spec.base.train.local_steps for spec in steps} == {47}


def test_attackers_are_the_seeded_choice_poisoners_first() -> None:
    """The same users as before scenarios existed (the seed's permutation, as the
    default table measured it: its first three for seeds 0, 1 and 7), poisoners first."""
    base = SimulationConfig(users=9, rounds=2)
    for seed, order in ((0, (6, 1, 3)), (1, (4, 9, 1)), (7, (5, 3, 8))):
        spec = RunSpec(Scenario("2+1", attacks=pf(2, 1)), seed, True, base)
        assert attackers_for(spec) == {
            int(order[0]): Attack(P),
            int(order[1]): Attack(P),
            int(order[2]): Attack(F),
        }


def test_scenarios_refuse_what_cannot_run() -> None:
    with pytest.raises(FairbusError, match="honest user"):
        Scenario("all", users=3, attacks=pf(2, 1))
    with pytest.raises(FairbusError, match="at least one user"):
        Scenario("none", attacks=((Attack(P), 0),))
    with pytest.raises(FairbusError, match="not be honest"):
        Scenario("honest", attacks=((Attack(), 1),))
    with pytest.raises(FairbusError, match="no scenario"):
        detection.select(FAIRNESS, ["iid 9+9"])
    assert detection.select(FAIRNESS, ["label flip", "iid 0+0"]) == (
        _by_name()["iid 0+0"],
        _by_name()["label flip"],
    )
    with pytest.raises(FairbusError, match="distinct"):
        build_suite_specs((PAPER[0], PAPER[0]), 1, 1, DEFAULT_DETECTION, 6, 2)


def _result(spec: RunSpec, excluded: dict[int, int], accuracy: float = 0.9) -> RunResult:
    return RunResult(spec, frozenset(attackers_for(spec)), excluded, accuracy, {})


def test_the_targets_follow_issue_13() -> None:
    """No false exclusion anywhere; all out by round 10 in ≥ 95% of seeds where attackers
    are at most a third; 3+3 of 9: ≥ 80% detected."""
    one = Scenario("1+1", attacks=pf(1, 1))
    many = Scenario("3+3", attacks=pf(3, 3), detected_target=0.8)
    honest = Scenario("0+0")
    base = SimulationConfig(users=9, rounds=12)

    def runs(scenario: Scenario, seeds: int, late: int = 0, false: int = 0) -> list[RunResult]:
        out = []
        for seed in range(seeds):
            spec = RunSpec(scenario, seed, True, base)
            out.append(_result(spec, dict.fromkeys(attackers_for(spec), 3)))
            out.append(_result(replace(spec, defended=False), {}, 0.5))
        for k in range(late):  # caught in round 11: too late
            r = out[2 * k]
            out[2 * k] = replace(r, excluded_round=dict.fromkeys(r.attackers, 11))
        for k in range(false):
            r = out[2 * k]
            honest_user = min(set(range(1, 10)) - r.attackers)
            out[2 * k] = replace(r, excluded_round={**r.excluded_round, honest_user: 2})
        return out

    clean = [_result(RunSpec(honest, seed, True, base), {}, 0.95) for seed in range(3)]
    rows = {r.name: r for r in summarize_suite(runs(one, 20, late=1) + clean, [one, honest])}
    assert rows["1+1"].all_out_target == 0.95 and rows["1+1"].meets_target  # 19/20
    assert rows["1+1"].within == 10 and rows["1+1"].tally.seeds_all_caught_in_time == 19
    assert rows["1+1"].accuracy_no_attack == pytest.approx(0.95)
    assert rows["1+1"].tally.accuracy_undefended == pytest.approx(0.5)
    assert rows["0+0"].meets_target and rows["0+0"].tally.detection_rate is None
    rows = {r.name: r for r in summarize_suite(runs(one, 20, late=2), [one])}
    assert rows["1+1"].misses == ("all out 18/20 < 95%",)
    assert rows["1+1"].accuracy_no_attack is None  # no no-attack run of this setting
    rows = {r.name: r for r in summarize_suite(runs(one, 20, false=1), [one])}
    assert rows["1+1"].misses == ("1 false",)
    # 3+3 of 9 are two thirds: no all-out target, but 80% detected
    rows = {r.name: r for r in summarize_suite(runs(many, 5, late=5), [many])}
    assert rows["3+3"].all_out_target is None and rows["3+3"].meets_target
    undetected = [replace(r, excluded_round={}) for r in runs(many, 5)]
    rows = {r.name: r for r in summarize_suite(undetected, [many])}
    assert rows["3+3"].misses == ("detected 0% < 80%",)
    # a stalled defended run is counted (an undefended one is not: it has no grouping
    # to fail), and the CLI says so under the table
    played = runs(one, 3)
    stalled = [replace(r, failed_rounds=(6, 7)) for r in played[:2]] + played[2:]
    rows = {r.name: r for r in summarize_suite(stalled, [one])}
    assert rows["1+1"].tally.seeds_with_failed_round == 1
    assert rows["1+1"].meets_target  # the line below the table says it, not the verdict
    with bench_cli.console.capture() as printed:
        bench_cli._print_stalls([("1+1", 1, 3), ("2+2", 0, 3)])
    assert printed.get().splitlines() == [
        "1+1: 1/3 seeds had a round that failed (no grouping passed the exposure check)"
    ]


def test_a_tiny_scenario_runs_and_summarises() -> None:
    """Poisoners ×3 among 9 users, 1 seed × 3 rounds, defended and undefended."""
    scenario = replace(_by_name()["poison x3"], rounds=3)
    specs = build_suite_specs([scenario], 1, 10, DEFAULT_DETECTION, 6, 2)
    assert [(s.seed, s.defended, s.base.rounds) for s in specs] == [(0, True, 3), (0, False, 3)]
    fast = TrainConfig(local_epochs=2)  # the bench's 20 epochs take longer than the point
    specs = [replace(s, base=replace(s.base, train=fast)) for s in specs]
    results = [run_one(spec) for spec in specs]
    assert all(len(r.attackers) == 2 for r in results)
    assert not results[1].excluded_round  # undefended FedAvg excludes no one
    (row,) = summarize_suite(results, [scenario])
    assert (row.name, row.users, row.rounds, row.tally.seeds) == ("poison x3", 9, 3, 1)
    assert row.within == 3  # caught in time: by round 10, or the last round if earlier
    assert row.attacks == "2 P ×3" and row.all_out_target == 0.95
    assert 0.0 <= row.tally.accuracy_defended <= 1.0
    assert row.tally.accuracy_undefended == results[1].final_accuracy


def test_a_trace_shows_every_groups_accuracy_contribution_and_score() -> None:
    """``--trace``: the round records carry what Alg. 6 compared (each group's
    contribution, its score, the round's clean level), and the printout marks the
    attackers and shows each group's contribution over the level."""
    scenario = replace(_by_name()["poison x3"], rounds=2)
    (spec, _) = build_suite_specs([scenario], 1, 10, DEFAULT_DETECTION, 6, 2)
    spec = replace(spec, base=replace(spec.base, train=TrainConfig(local_epochs=2)))
    attacks, records = trace_one(spec)
    assert attacks == attackers_for(spec) and len(records) == 2
    for record in records:
        assert record.level is not None
        assert all(isinstance(g["contribution"], float) for g in record.groups)
        assert all(isinstance(g["scored"], bool) for g in record.groups)
        assert set(record.weights) == {u for g in record.groups for u in g["members"]}
    with bench_cli.console.capture() as printed:
        bench_cli._print_trace("poison x3", 0, attacks, records)
    out = printed.get()
    poisoners = sorted(attacks)
    assert f"attackers: {poisoners[0]}P, {poisoners[1]}P" in out
    first = records[0]
    ratio = first.groups[0]["contribution"] / first.level
    assert "round 2: τ" in out and f"{ratio:.2f}" in out and "contribution / level" in out
    honest = min(set(records[-1].weights) - set(attacks))
    last = [line for line in out.splitlines() if line.startswith("  fitted θ: ")][-1]
    entries = last.removeprefix("  fitted θ: ").split(", ")
    assert f"{honest} {records[-1].weights[honest]:.2f}" in entries
    refused = CliRunner().invoke(app, ["bench", "detection", "--trace", "3"])
    assert refused.exit_code != 0 and "--trace needs one --scenario" in refused.output


def test_runs_out_appends_every_run_as_a_json_line(tmp_path: Path) -> None:
    out = tmp_path / "runs.jsonl"
    args = ["bench", "detection", "--suite", "fairness", "--scenario", "poison x0.5",
            "--seeds", "1", "--rounds", "2", "--workers", "1", "--runs-out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["scenario"], r["seed"], r["defended"]) for r in runs] == [
        ("poison x0.5", 0, True),
        ("poison x0.5", 0, False),
    ]
    (spec, _) = build_suite_specs([_by_name()["poison x0.5"]], 1, 2, DEFAULT_DETECTION, 6, 2)
    assert runs[0]["attackers"] == sorted(attackers_for(spec))
    assert 0.0 <= runs[0]["final_accuracy"] <= 1.0
    assert set(runs[0]["false_exclusions"]) <= set(map(int, runs[0]["excluded_round"]))
    refused = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "no" / "such.jsonl")])
    assert refused.exit_code != 0 and "cannot write" in refused.output


def test_violators_found_in_a_round_whose_every_group_holds_one_do_not_stop_training() -> None:
    """IID 2+2, seed 10, with weight_veto 0.4 (README, issue 13's seventh change): in
    round 5 users 3, 6 and 9 are found and every group of the round holds one of them.
    Kept, the model starts round 6 again; its sums count with round 5's in the exposure
    check, no grouping of the six left passes, and no round starts again. The most
    accurate group standing in moves the model, and the last attacker is found."""
    scenario = _by_name()["iid 2+2"]
    # the policy of the seventh change (rank_below, the eleventh, convict_below, the
    # twelfth, contributions on the feature layers, the fourteenth, and along the median
    # of the groups at least as accurate as τ, the fifteenth, find them otherwise)
    detection = replace(
        DEFAULT_DETECTION,
        weight_veto=0.4,
        rank_below=None,
        convict_below=None,
        contribution_layers="all",
        contribution_direction="accurate_median",
    )
    (spec,) = (
        s
        for s in build_suite_specs([scenario], 11, 10, detection, 6, 2)
        if s.seed == 10 and s.defended
    )
    base = replace(spec.base, rounds=6)
    kept = replace(base.provider, strategy=CleanGroupAverage(stand_in=False))
    stalled = run_one(replace(spec, base=replace(base, provider=kept)))
    assert stalled.excluded_round == {3: 5, 6: 5, 9: 5}, "the case this test reproduces"
    assert stalled.failed_rounds == (6,)
    result = run_one(replace(spec, base=base))
    assert result.failed_rounds == ()
    assert result.excluded_round == {3: 5, 6: 5, 9: 5, 2: 6}
    assert result.final_accuracy > stalled.final_accuracy
