"""The provider and user machines driven in one process, with the real crypto."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fairbus import field
from fairbus.aggregation import CleanGroupAverage, GroupModel
from fairbus.errors import FairbusError
from fairbus.exposure import exposing_sets
from fairbus.field import FixedPointCodec
from fairbus.ledger.recorded import Recorded
from fairbus.protocol.events import Received
from fairbus.protocol.provider import ProviderConfig
from fairbus.simulator import DropoutPlan, LedgerRefusalError, Simulation, SimulationConfig
from fairbus.training.local import TrainConfig
from fairbus_cli.main import app

FAST = TrainConfig(local_epochs=2)


def _check_round_invariants(record) -> None:  # type: ignore[no-untyped-def]
    assert record.failed is None, record.failed
    assert record.groups, "the round completed"
    assert all(len(g["members"]) >= 3 for g in record.groups)
    final = [g["members"] for g in record.groups]
    assert exposing_sets([*record.prior_groups, *final], c=1) == []


@pytest.mark.parametrize("keying", ["shamir", "pairwise"])
def test_decrypted_group_means_equal_the_plaintext_bit_for_bit(keying: str) -> None:
    provider = ProviderConfig(keying=keying)
    sim = Simulation(SimulationConfig(users=9, rounds=1, seed=3, train=FAST, provider=provider))
    record = sim.play_round(1)
    _check_round_invariants(record)
    codec = FixedPointCodec()
    assert len(record.groups) >= 6
    for g in record.groups:
        members = g["members"]
        plain = field.sum_vectors(
            [codec.encode(record.local_models[u], summands=len(members)) for u in members]
        )
        np.testing.assert_array_equal(record.field_sums[g["gid"]], plain)
    assert record.bytes["upload"] > 0
    assert ("share" in record.bytes) == (keying == "shamir")  # pairwise keys send none
    assert set(record.timings_s) >= {"training", "negotiation", "aggregation", "evaluation"}


def test_a_task_with_collusion_bound_two_groups_in_fours_and_exposes_no_one() -> None:
    config = SimulationConfig(
        users=9, rounds=1, seed=2, train=FAST, provider=ProviderConfig(collusion=2)
    )
    record = Simulation(config).play_round(1)
    assert record.failed is None and record.groups
    assert all(len(g["members"]) >= 4 for g in record.groups)
    assert exposing_sets([g["members"] for g in record.groups], range(1, 10), c=2) == []


@pytest.mark.parametrize("phase", ["negotiation", "upload"])
def test_a_dropout_regroups_the_survivors_and_the_round_completes(phase: str) -> None:
    plan = DropoutPlan(round=1, user=4, phase=phase)  # type: ignore[arg-type]
    sim = Simulation(SimulationConfig(users=9, rounds=2, seed=1, train=FAST, dropouts=(plan,)))
    first = sim.play_round(1)
    _check_round_invariants(first)
    assert first.dropped == [4]
    if phase == "negotiation":
        assert first.attempts == 2 and all(4 not in g["members"] for g in first.groups)
    else:
        # User 4 uploaded to one group and died: that group is complete, its others are
        # not. Regrouping the survivors would expose it (a complete basic grouping of all
        # plus any partition of the survivors), so the round finishes on the complete
        # groups it holds: no group waits on user 4, and nothing is exposed.
        assert first.attempts == 1 and 0 < len(first.groups) < 8
    second = sim.play_round(2)  # the restarted user rejoins
    _check_round_invariants(second)
    assert any(4 in g["members"] for g in second.groups)
    assert second.attempts == 1


def test_a_user_that_never_comes_back_does_not_stall_training() -> None:
    plan = DropoutPlan(round=1, user=2, phase="negotiation", rejoin=False)
    sim = Simulation(SimulationConfig(users=9, rounds=2, seed=2, train=FAST, dropouts=(plan,)))
    records = sim.run()
    for record in records:
        _check_round_invariants(record)
    assert all(2 not in g["members"] for g in records[1].groups)


def test_forged_uploads_are_refused_and_replayed_ones_change_nothing() -> None:
    sim = Simulation(SimulationConfig(users=6, rounds=1, seed=4, train=FAST))
    captured: list[bytes] = []
    original = sim._deliver_to_provider

    def spy(kind: str, data: bytes, source: int | str) -> None:
        if kind == "upload":
            captured.append(data)
        original(kind, data, source)

    sim._deliver_to_provider = spy  # type: ignore[method-assign]
    record = sim.play_round(1)
    assert record.failed is None and captured
    assert record.ledger_height == sim.ledger.height > 0
    model = sim.provider.global_params.copy()
    # delivered again (MQTT QoS 1 is at least once): ignored, nothing moves
    assert sim.provider.handle(Received("upload", captured[0])) == []
    assert np.array_equal(sim.provider.global_params, model)
    # The same upload without its receipt: not acted on at all.
    bare = Recorded.from_bytes(captured[1])
    stripped = sim.provider.handle(Received("upload", bare.envelope.to_bytes()))
    assert [type(r).__name__ for r in stripped] == ["Refused"]


def test_cli_simulate_writes_json_lines_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--users",
            "6",
            "--rounds",
            "2",
            "--local-epochs",
            "2",
            "--poisoners",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    for key in (
        "global_accuracy",
        "groups",
        "scores",
        "key_users",
        "violators",
        "timings_s",
        "bytes",
    ):
        assert key in first
    for png in ("accuracy.png", "scores.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timings = first["timings_s"]
    assert timings["round"] >= timings["training"] > 0
    assert timings["grouping"] > 0 and timings["ledger"] > 0
    assert "seconds per round, by phase" in result.output


def test_configuration_errors_are_clear() -> None:
    from fairbus.errors import FairbusError
    from fairbus.training.attacks import Attack, Behaviour

    with pytest.raises(FairbusError, match="unknown users"):
        Simulation(SimulationConfig(users=4, attacks={7: Attack(Behaviour.POISONER)}))
    with pytest.raises(FairbusError, match="at least 3"):
        Simulation(SimulationConfig(users=2))
    with pytest.raises(FairbusError, match="partition"):
        Simulation(SimulationConfig(partition="zipf"))  # type: ignore[arg-type]
    with pytest.raises(FairbusError, match="unknown data set"):
        Simulation(SimulationConfig(dataset="imagenet"))
    with pytest.raises(FairbusError, match="workers"):
        Simulation(SimulationConfig(workers=0))
    assert dataclasses.is_dataclass(ProviderConfig())


@pytest.mark.parametrize("seed", range(5))
def test_a_poisoner_and_a_free_rider_are_excluded_and_no_honest_user_is(seed: int) -> None:
    """9 users on digits, one poisoner and one free-rider, the provider's defaults."""
    from fairbus.bench.detection import PAPER, RunSpec, attackers_for, run_one

    spec = RunSpec(PAPER[1], seed, True, SimulationConfig(users=9, rounds=8))
    assert PAPER[1].name == "1+1"
    assert len(attackers_for(spec)) == 2
    result = run_one(spec)
    assert result.detected == set(result.attackers)
    assert result.false_exclusions == set()


def test_clean_group_average_falls_back_to_the_group_that_contributed_most() -> None:
    current = np.zeros(2, dtype=np.float32)

    def model(gid: int, members: tuple[int, ...], value: float, contribution: float) -> GroupModel:
        mean = np.full(2, value, dtype=np.float32)
        return GroupModel(gid, "basic", members, mean, scored=False, contribution=contribution)

    groups = [
        model(0, (1, 2, 3), 1.0, 0.2),
        model(1, (4, 5, 6), 3.0, 0.9),
        model(2, (7, 8, 9), 5.0, 2.0),
    ]
    # none scored: the clean group that contributed most (group 2 holds violator 9)
    assert CleanGroupAverage().aggregate(current, groups, {9}).tolist() == [3.0, 3.0]
    # without contributions: every clean group, weighted by size
    plain = [dataclasses.replace(g, contribution=None) for g in groups]
    assert CleanGroupAverage().aggregate(current, plain, {9}).tolist() == [2.0, 2.0]
    scored = [dataclasses.replace(groups[0], scored=True), *groups[1:]]
    assert CleanGroupAverage().aggregate(current, scored, {9}).tolist() == [1.0, 1.0]
    # every basic group holds a violator: the clean focus group moves the model, so the
    # next round does not start from the same model again
    lone = model(0, (1, 2, 3, 4, 5, 6), 1.0, 0.5)
    focus = dataclasses.replace(model(1, (2, 5, 6), 4.0, 0.4), kind="focus", scored=True)
    assert CleanGroupAverage().aggregate(current, [lone, focus], {1}).tolist() == [4.0, 4.0]
    assert CleanGroupAverage().aggregate(current, [lone], {1}).tolist() == [0.0, 0.0]


def test_clean_group_average_keeps_the_groups_near_the_most_accurate_one() -> None:
    current = np.zeros(2, dtype=np.float32)

    def model(gid: int, value: float, accuracy: float, scored: bool) -> GroupModel:
        mean = np.full(2, value, dtype=np.float32)
        members = (3 * gid + 1, 3 * gid + 2, 3 * gid + 3)
        return GroupModel(gid, "basic", members, mean, scored, 1.0, accuracy)

    # the model still learning: every group scored against a loose bar, the poisoned
    # one (0.1) too; only those that gained half of the best's 0.2 over chance count
    young = [model(0, 1.0, 0.10, True), model(1, 3.0, 0.30, True), model(2, 5.0, 0.24, True)]
    assert CleanGroupAverage().aggregate(current, young, set()).tolist() == [4.0, 4.0]
    every = CleanGroupAverage(accuracy_gain=None).aggregate(current, young, set())
    assert every.tolist() == [3.0, 3.0]
    # none near the best scored: the one of them that contributed most, as before
    unscored = [dataclasses.replace(g, scored=g.gid == 0) for g in young]
    unscored[2] = dataclasses.replace(unscored[2], contribution=2.0)
    assert CleanGroupAverage().aggregate(current, unscored, set()).tolist() == [5.0, 5.0]
    # converged: honest groups, skewed ones too, gain far more than half of the best's
    old = [model(0, 1.0, 0.93, True), model(1, 3.0, 0.95, True), model(2, 5.0, 0.71, True)]
    assert CleanGroupAverage().aggregate(current, old, set()).tolist() == [3.0, 3.0]
    assert CleanGroupAverage(accuracy_gain=0.9).aggregate(current, old, set()).tolist() == [
        2.0,
        2.0,
    ]
    # a group without an accuracy (none evaluated): every clean group, as before
    with pytest.raises(FairbusError, match="accuracy_gain"):
        CleanGroupAverage(accuracy_gain=1.5)
    unknown = [dataclasses.replace(g, accuracy=None) for g in old]
    assert CleanGroupAverage(accuracy_gain=0.9).aggregate(current, unknown, set()).tolist() == [
        3.0,
        3.0,
    ]


def test_clean_group_average_lets_the_best_ranked_group_move_a_model_at_chance() -> None:
    current = np.zeros(2, dtype=np.float32)

    def model(gid: int, value: float, accuracy: float, rank: float | None) -> GroupModel:
        mean = np.full(2, value, dtype=np.float32)
        members = (3 * gid + 1, 3 * gid + 2, 3 * gid + 3)
        return GroupModel(gid, "basic", members, mean, True, 1.0, accuracy, rank)

    def moved(policy: CleanGroupAverage, groups: list[GroupModel], bad: set[int]) -> float:
        values = policy.aggregate(current, groups, bad).tolist()
        assert values[0] == values[1]
        return float(values[0])

    ranked = CleanGroupAverage(rank_margin=0.3)
    # every group at chance, the poisoned one (0) a little more accurate by luck: the
    # group that ranks the true class highest moves the model alone
    stuck = [model(0, 1.0, 0.12, 4.6), model(1, 3.0, 0.10, 4.1), model(2, 8.0, 0.11, 4.4)]
    assert moved(ranked, stuck, set()) == 3.0
    # the best-ranked group holds a violator: the best clean one
    assert moved(ranked, stuck, {4}) == 8.0
    # equal ranks: the lower group id
    assert moved(ranked, [dataclasses.replace(g, rank=4.1) for g in stuck], set()) == 1.0
    # with rank_gain, the groups whose rank gained that share of the best's gain over a
    # guess's 4.5 (group 1 gained 0.4, group 2 0.1, group 0 lost)
    assert moved(dataclasses.replace(ranked, rank_gain=0.25), stuck, set()) == 5.5
    assert moved(dataclasses.replace(ranked, rank_gain=0.3), stuck, set()) == 3.0
    # off, or a rank missing: the accuracy path (groups 0 and 2 gained half of the
    # best's gain); the default margin, 0.05, chooses by rank here (best 0.12 < 0.15)
    assert moved(CleanGroupAverage(rank_margin=None), stuck, set()) == 4.5
    assert moved(CleanGroupAverage(), stuck, set()) == 3.0
    unranked = [*stuck[:2], dataclasses.replace(stuck[2], rank=None)]
    assert moved(ranked, unranked, set()) == 4.5
    # one group at the margin's edge: the accuracy path (every group, or the best)
    edge = [dataclasses.replace(stuck[0], accuracy=0.4), *stuck[1:]]
    assert moved(dataclasses.replace(ranked, accuracy_gain=None), edge, set()) == 4.0
    assert moved(dataclasses.replace(ranked, rank_margin=0.29), edge, set()) == 1.0
    assert moved(dataclasses.replace(ranked, rank_margin=0.31), edge, set()) == 3.0
    with pytest.raises(FairbusError, match="rank_margin"):
        CleanGroupAverage(rank_margin=-0.1)
    with pytest.raises(FairbusError, match="rank_gain"):
        CleanGroupAverage(rank_gain=1.5)


def test_clean_group_average_lets_the_most_accurate_group_stand_in_when_none_is_clean() -> None:
    current = np.zeros(2, dtype=np.float32)

    def model(
        gid: int, kind: str, members: tuple[int, ...], value: float, acc: float
    ) -> GroupModel:
        mean = np.full(2, value, dtype=np.float32)
        return GroupModel(gid, kind, members, mean, True, 1.0, acc, 1.0)

    # IID 2+2 seed 10, round 5: violators 3, 6 and 9 found, each group holds one
    groups = [
        model(0, "basic", (1, 8, 9), 1.0, 0.796),
        model(1, "basic", (3, 4, 7), 2.0, 0.847),
        model(2, "basic", (2, 5, 6), 3.0, 0.682),
        model(3, "focus", (5, 7, 9), 4.0, 0.782),
        model(4, "focus", (1, 6, 7), 5.0, 0.776),
        model(5, "focus", (1, 3, 5), 6.0, 0.862),
    ]
    found = {3, 6, 9}
    assert CleanGroupAverage().aggregate(current, groups, found).tolist() == [6.0, 6.0]
    kept = CleanGroupAverage(stand_in=False).aggregate(current, groups, found)
    assert kept.tolist() == [0.0, 0.0]
    # equal accuracies: the lower group id
    tied = [*groups[:5], dataclasses.replace(groups[5], accuracy=0.847)]
    assert CleanGroupAverage().aggregate(current, tied, found).tolist() == [2.0, 2.0]
    # any kind of group: here a basic one
    basic_best = [*groups[:5], dataclasses.replace(groups[5], accuracy=0.5)]
    assert CleanGroupAverage().aggregate(current, basic_best, found).tolist() == [2.0, 2.0]
    # an accuracy missing: kept, as before
    unknown = [*groups[:5], dataclasses.replace(groups[5], accuracy=None)]
    assert CleanGroupAverage().aggregate(current, unknown, found).tolist() == [0.0, 0.0]
    # a clean group exists (a focus group without a violator): it moves the model
    clean = [*groups, model(6, "reference", (2, 4, 8), 7.0, 0.7)]
    assert CleanGroupAverage().aggregate(current, clean, found).tolist() == [7.0, 7.0]


def test_a_decision_the_contract_refuses_stops_the_simulation() -> None:
    """The ledger re-derives every decision with the parameters recorded at task start;
    here the ledger's record is made to disagree with the provider (as if the provider
    decided with another policy than the one it recorded): the run stops with the
    refusal, and nothing after it is committed."""
    sim = Simulation(SimulationConfig(users=9, rounds=2, seed=4, train=FAST))
    first = sim.play_round(1)
    assert first.failed is None and first.ledger_height == sim.ledger.height
    task = sim.ledger.state.task
    assert task is not None and task == sim.provider.config.task
    # Under this policy a group scores only if it contributes at least the clean level;
    # the provider decides round 2 with its recorded, more tolerant one. The accuracy bar
    # stays the recorded one: with ``accurate_median`` it also picks the groups
    # contributions are measured along, and the evaluation would be refused first.
    strict = dataclasses.replace(
        task.detection,
        contribution_tolerance=0.0,
        weight_floor=None,
        noise_widening=None,
    )
    sim.ledger.state.task = dataclasses.replace(task, detection=strict)
    height = sim.ledger.height
    with pytest.raises(LedgerRefusalError, match=r"decision.*contract_violation"):
        sim.play_round(2)
    kinds = [tx.envelope.header.type for b in sim.ledger.blocks[height + 1 :] for tx in b.txs]
    assert "decision" not in kinds and "evaluation" in kinds
