"""A SecCL task end to end on the networked runtime (issue 15): every participant a real
process — Mosquitto with the roster's passwords and ACL, one SQLite ledger node, the
SecCL server (``fairbus provider``) and 6 participants (``fairbus user``) — for 2
rounds on digits. Every round's election is recorded, and the exported ledger passes
``fairbus audit``, which replays the consensus contract: the Borda election and the
new global model re-derived from the recorded evaluations and changes (SecCL,
"Consensus among Participants")."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fairbus.runtime.local import LocalTask
from fairbus.seccl import candidate_count
from fairbus.training.models import initial_params
from tests.conftest import find_service_binary
from tests.e2e.test_runtime import _audit

pytestmark = pytest.mark.services

USERS, ROUNDS = 6, 2
THETA, SHARE = 0.1, 0.4
ROUND_TIMEOUT = 180.0


def test_two_seccl_rounds_of_six_participants_on_mosquitto_and_sqlite(tmp_path: Path) -> None:
    find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    start = time.monotonic()
    with LocalTask(
        tmp_path,
        USERS,
        ROUNDS,
        broker="mosquitto",
        training={"local_epochs": 1},
        top={"mode": "seccl", "theta": THETA, "candidate_share": SHARE},
    ) as task:
        records = task.wait_for_round(ROUNDS, ROUNDS * ROUND_TIMEOUT)
        everyone = set(range(1, USERS + 1))
        m = candidate_count(SHARE, USERS)
        for r, record in enumerate(records[:ROUNDS], start=1):
            assert record["round"] == r and record["failed"] is None, record
            assert not record["refusals"], record["refusals"]
            candidates = record["candidates"]
            assert isinstance(candidates, list) and len(candidates) == m, record
            assert set(candidates) <= everyone
            borda = {int(u): p for u, p in record["borda"].items()}  # type: ignore[attr-defined]
            assert set(borda) == everyone, borda  # every participant's change was in
            # each of the 6 ballots gives M + (M - 1) + ... + 1 points
            assert sum(borda.values()) == USERS * m * (m + 1) // 2
            assert record["bytes"]["seccl_candidates"] > 0  # type: ignore[index]
        # the candidates' changes moved the global model (two rounds of top-10% changes
        # do not move digits past chance accuracy; the simulator agrees)
        model = np.load(tmp_path / "state" / "provider" / "global_model.npy")
        assert not np.array_equal(model, initial_params("digits_cnn", 0))
        _audit(task)
    print(f"SecCL e2e: {ROUNDS} rounds of {USERS} participants in "
          f"{time.monotonic() - start:.0f} s")  # fmt: skip
