"""SecCL simulated end to end: real training on digits, peer F-scores, the Borda
election, the ledger's contract re-deriving every election and new global model, and
``fairbus simulate --mode seccl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fairbus.errors import FairbusError
from fairbus.ledger.state import LedgerState
from fairbus.ledger.verify import EvaluationCheck
from fairbus.rounds import RoundRecord
from fairbus.seccl_simulation import SecclSimulation, SecclSimulationConfig, validation_split
from fairbus.training.attacks import Attack, Behaviour
from fairbus_cli.main import app


def test_a_seccl_run_is_recorded_and_re_derived_by_an_auditor() -> None:
    blobs: dict[bytes, bytes] = {}
    flippers = {5: Attack(Behaviour.LABEL_FLIPPER), 6: Attack(Behaviour.LABEL_FLIPPER)}
    config = SecclSimulationConfig(
        users=6, rounds=2, candidate_share=0.4, attacks=flippers, attack_from=2
    )
    sim = SecclSimulation(config, on_blob=blobs.__setitem__)
    records = sim.run()
    assert [r.failed for r in records] == [None, None]
    assert all(r.refusals == [] for r in records)
    assert all(len(r.candidates) == 2 for r in records)  # M = 0.4 · 6
    assert all(set(r.borda) == set(range(1, 7)) for r in records)
    # colluders: from round 2 each flipper puts the other on top of its ballot (2 points)
    assert records[1].borda[5] >= 2 and records[1].borda[6] >= 2
    assert records[1].global_accuracy > 0.5  # 0.887 with these seeds
    # an auditor with the blobs replays every block and re-derives every election
    state = LedgerState(sim.roster, evaluations=EvaluationCheck(blobs.get))
    for block in sim.ledger.blocks:
        state.apply_block(block)
    assert state.task is not None and state.task.mode == "seccl"
    for r in records:
        candidates = state.seccl_rounds[r.round].candidates
        assert candidates is not None and list(candidates.candidates) == r.candidates
    # the record reads back from its JSON line
    back = RoundRecord.from_json(json.loads(json.dumps(records[1].to_json())))
    assert back.borda == records[1].borda and back.candidates == records[1].candidates


def test_each_participant_keeps_a_private_validation_split() -> None:
    fit, held = validation_split(50, 0.2, seed=0, user=3)
    assert len(held) == 10 and len(fit) == 40
    assert set(fit).isdisjoint(held) and set(fit) | set(held) == set(range(50))
    again = validation_split(50, 0.2, seed=0, user=3)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(validation_split(50, 0.2, seed=0, user=4)[1], held)
    assert len(validation_split(2, 0.2, seed=0, user=1)[1]) == 1
    with pytest.raises(FairbusError):
        validation_split(1, 0.2, seed=0, user=1)
    with pytest.raises(FairbusError):
        validation_split(10, 1.0, seed=0, user=1)


def test_cli_simulate_seccl_writes_json_lines_plots_and_an_audited_ledger(
    tmp_path: Path,
) -> None:
    out = tmp_path / "seccl"
    args = ["simulate", "--mode", "seccl", "--users", "5", "--rounds", "2", "--theta", "0.1",
            "--candidate-share", "0.4", "--label-flippers", "5",
            "--attack-from", "2", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(len(line["candidates"]) == 2 for line in lines)
    for png in ("accuracy.png", "candidates.png"):
        assert (out / png).stat().st_size > 1000
    assert "audit: OK" in result.output and "SecCL task" in result.output
    bad = CliRunner().invoke(app, ["simulate", "--mode", "fedavg", "--out", str(out)])
    assert bad.exit_code != 0


def test_the_paper_figures_runs() -> None:
    from fairbus.bench import seccl

    assert sorted(seccl.flippers(20, 0.25)) == [16, 17, 18, 19, 20]
    assert len(seccl.flippers(20, 0.1)) == 2 and seccl.flippers(20, 0.0) == {}
    fig4 = seccl.figure4_runs(seccl.DEFAULT_BASE)
    assert [(r.config.users, r.config.candidate_share) for r in fig4] == [
        (20, 0.2), (20, 0.4), (30, 0.2), (30, 0.4)
    ]  # fmt: skip
    fig5 = seccl.figure5_runs(seccl.DEFAULT_BASE)
    assert [len(r.config.attacks) for r in fig5] == [2, 4, 5, 6]
    assert all(r.config.attack_from == 5 and r.config.collude for r in fig5)
    assert all(r.config.train.lr == 0.02 and r.config.train.batch_size == 32 for r in fig5)


@pytest.mark.parametrize(("given", "seccl", "fairness"), [(None, 1.0, 0.5), (0.25, 0.25, 0.25)])
def test_the_restricted_softmax_is_the_fairness_modes_default_not_seccls(
    given: float | None, seccl: float, fairness: float
) -> None:
    from fairbus.seccl_simulation import PAPER_TRAINING
    from fairbus.training.config import TrainConfig
    from fairbus_cli.simulate import _train_config

    def scale(defaults: TrainConfig) -> float:
        return _train_config(defaults, None, None, 20, None, True, given, 0.0).absent_class_scale

    assert (scale(PAPER_TRAINING), scale(TrainConfig())) == (seccl, fairness)
