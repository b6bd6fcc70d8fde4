"""Metrics and status on a running task (issue 14, item 5): a short real task (the
embedded broker, one SQLite ledger node, the provider and 6 users, each a process) with
metrics ports; the provider's and the ledger node's ``/metrics`` are scraped over HTTP,
and ``fairbus status --config task.toml --json`` is run against it while it runs and
after the users are gone."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairbus.identity import Identity, new_broker_password
from fairbus.roster import Member, Role, Roster
from fairbus.runtime.local import CLI, LocalTask
from fairbus_ledger_service.etcd_cluster import free_port

pytestmark = pytest.mark.services

USERS = 6
ADMIN = 200  # LocalLedger's roster: provider 0, users 1..N, ledger 101, admin 200


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → (labels, value) of ``http://127.0.0.1:<port>/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    (found,) = [v for got, v in metrics[name] if labels.items() <= got.items()]
    return found


def status(task: LocalTask) -> dict[str, object]:
    result = subprocess.run(
        [*CLI, "status", "--config", str(task.config), "--json", "--wait", "0.5"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict)
    return answer


def test_metrics_are_scraped_and_status_tells_where_a_running_task_stands(
    tmp_path: Path,
) -> None:
    provider_port, node_port = free_port(), free_port()
    with LocalTask(tmp_path, USERS, 50, {}, store="sqlite", broker="embedded",
                   training={"local_epochs": 1},
                   metrics={"provider_port": provider_port, "user_port": 0},
                   ledger_metrics_ports={101: node_port}) as task:  # fmt: skip
        task.wait_for_round(2, 120)
        running = status(task)
        assert running["task"] == task.task and running["observer"] == ADMIN
        assert running["provider"] == 0 and running["provider_online"] is True
        assert running["online"] == list(range(1, USERS + 1)), running
        assert running["excluded"] == [] and running["unseen"] == []
        assert int(running["round"]) >= 2  # type: ignore[call-overload]
        assert running["last_transaction"] in (
            "global_model", "announce", "dropout", "evaluation", "decision",
        )  # fmt: skip
        assert int(running["ledger_height"]) > 0  # type: ignore[call-overload]

        node = scrape(node_port)
        assert one(node, "fairbus_ledger_writer", node="101") == 1
        assert one(node, "fairbus_ledger_alarm", node="101") == 0
        assert one(node, "fairbus_connected", role="ledger") == 1
        # the node has the height status reported, or more by now
        assert one(node, "fairbus_ledger_height", node="101") >= running["ledger_height"]  # type: ignore[operator]
        committed = one(node, "fairbus_ledger_committed_total", node="101")
        assert committed == one(node, "fairbus_ledger_commit_seconds_count", node="101") > 0
        assert one(node, "fairbus_ledger_queries_total", kind="height", outcome="ok") >= 1
        assert one(node, "fairbus_ledger_blobs_total", outcome="kept") > 0  # uploads, models

        # The users go (kill -9): their Last Wills say offline; no round completes after.
        for user in range(1, USERS + 1):
            task.kill(user)
        deadline = time.monotonic() + 20
        while True:
            provider = scrape(provider_port)
            done = len(task.rounds_done())
            if one(provider, "fairbus_rounds_total", role="provider") == done:
                break
            assert time.monotonic() < deadline, "provider metrics never matched rounds.jsonl"
            time.sleep(0.2)
        assert done >= 2
        assert one(provider, "fairbus_round", role="provider") == task.rounds_done()[-1]["round"]
        assert one(provider, "fairbus_attempts_total", role="provider") >= done
        assert one(provider, "fairbus_connected", role="provider", participant="0") == 1
        assert one(provider, "fairbus_excluded_users", role="provider") == 0
        assert one(provider, "fairbus_sent_bytes_total", kind="announce") > 0
        assert one(provider, "fairbus_sent_bytes_total", kind="global_model") > 0
        assert one(provider, "fairbus_commit_seconds_count", kind="announce") >= done
        assert one(provider, "fairbus_phase_seconds_count", phase="round") >= done
        assert one(provider, "fairbus_ledger_height", role="provider") > 0

        gone = status(task)
        assert gone["online"] == [] and gone["offline"] == list(range(1, USERS + 1)), gone
        assert gone["provider_online"] is True
        assert int(gone["round"]) >= done  # type: ignore[call-overload]


def test_status_without_a_broker_is_one_operator_error(tmp_path: Path) -> None:
    """No broker at the configured address: one line on stderr, exit status 2."""
    roles = {0: Role.PROVIDER, 1: Role.USER, 2: Role.USER, 3: Role.USER, 101: Role.LEDGER,
             ADMIN: Role.ADMIN}  # fmt: skip
    identities = {pid: Identity.generate(pid) for pid in roles}
    roster = Roster("t", [Member(identities[pid].public, role) for pid, role in roles.items()])
    (tmp_path / "roster.toml").write_text(roster.to_toml())
    identities[ADMIN].save(tmp_path / "keys")
    new_broker_password(tmp_path / "keys", ADMIN)
    config = tmp_path / "task.toml"
    config.write_text(f'roster = "roster.toml"\nbroker = "127.0.0.1:{free_port()}"\n')
    result = subprocess.run([*CLI, "status", "--config", str(config)], capture_output=True,
                            text=True, check=False, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: cannot reach the broker at 127.0.0.1:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
