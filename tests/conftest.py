"""Shared fixtures: identities, a roster, and real services on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from fairbus.identity import Identity
from fairbus.roster import Member, Role, Roster

settings.register_profile(
    "fairbus", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=40
)
settings.load_profile("fairbus")

TASK = "test-task"


@pytest.fixture(scope="session")
def identities() -> dict[int, Identity]:
    """Provider 0, users 1..7, ledger 8, admin 9."""
    return {pid: Identity.generate(pid) for pid in range(10)}


@pytest.fixture(scope="session")
def roster(identities: dict[int, Identity]) -> Roster:
    def role(pid: int) -> Role:
        return {0: Role.PROVIDER, 8: Role.LEDGER, 9: Role.ADMIN}.get(pid, Role.USER)

    return Roster(TASK, [Member(i.public, role(pid)) for pid, i in identities.items()])


def find_service_binary(name: str, *candidates: str) -> str:
    """Path of a service binary the test needs.

    Under CI=true a missing binary fails the test (CI installs them; a skip there would
    hide a broken install). Elsewhere it skips with the command that installs it.
    """
    for candidate in (name, *candidates):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    message = f"{name} is not installed (apt-get install -y mosquitto etcd-server)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)
