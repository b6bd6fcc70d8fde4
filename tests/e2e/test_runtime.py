"""The networked runtime end to end, every participant a real process: the broker
(Mosquitto with the roster's passwords and ACL, or the embedded amqtt broker), the ledger
(3 etcd members + 3 ledger nodes, or one SQLite node), the provider and 9 users. After
each run, the ledger passes ``fairbus audit`` (every hash, signature, chain link and
blob, and every detection decision re-derived)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fairbus import envelope, topics
from fairbus.envelope import GENESIS
from fairbus.errors import SignatureError
from fairbus.identity import Identity, load_broker_password
from fairbus.ledger.recorded import ReceiptError, Recorded, open_recorded
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import Received, Refused
from fairbus.protocol.provider import ProviderMachine
from fairbus.roster import Roster
from fairbus.runtime.local import CLI, LocalTask
from fairbus.training.attacks import Behaviour
from fairbus.training.models import initial_params
from fairbus.wire.messages import MaskedUpload
from fairbus_broker.mqtt import mqtt_client
from fairbus_ledger_service.client import LedgerClient
from tests.conftest import find_service_binary

pytestmark = pytest.mark.services

ATTACKS = {2: Behaviour.POISONER, 7: Behaviour.FREE_RIDER}
ROUND_TIMEOUT = 120.0


def _audit(task: LocalTask, node: int = 101) -> None:
    """``fairbus audit`` on ``node``'s store and blobs (while the ledger still runs). A
    payload follows its committed header on the bus, so an upload committed a moment ago
    may have no blob yet: a "no blob" is asked again for a few seconds, nothing else."""
    deadline = time.monotonic() + 10.0
    while True:
        result = subprocess.run(
            [*CLI, "audit", "--config", str(task.root / f"ledger-{node}.toml")],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,  # it re-derives every evaluation (issue 13): slow on a loaded machine
        )
        in_flight = "no blob" in result.stdout and time.monotonic() < deadline
        if result.returncode == 0 or not in_flight:
            break
        time.sleep(1.0)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit: OK" in result.stdout


def _check_rounds(records: list[dict[str, object]], n: int) -> None:
    """``n`` rounds completed, every group of at least 3, no honest user excluded. (A
    round that could not be regrouped is retried under the next round number.)"""
    assert len(records) >= n
    for r in records[:n]:
        # uploads already in flight when a dropout closed the attempt are turned away
        stale = all(x.startswith("StaleUpload") for x in r["refusals"])  # type: ignore[attr-defined]
        assert r["failed"] is None and stale and (r["dropped"] or not r["refusals"]), r
        assert all(len(g["members"]) >= 3 for g in r["groups"])  # type: ignore[attr-defined]
    excluded = set(records[n - 1]["excluded"])  # type: ignore[call-overload]
    assert excluded <= set(ATTACKS), f"honest users excluded: {excluded - set(ATTACKS)}"


def _wait(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    ("store", "broker", "keying"),
    [("etcd", "mosquitto", "shamir"), ("sqlite", "embedded", "pairwise")],
    ids=["mosquitto+3-etcd+3-ledger-nodes+alg-3", "embedded-broker+sqlite-ledger+pairwise"],
)
def test_three_rounds_of_nine_users_on_a_whole_stack(
    tmp_path: Path, store: str, broker: str, keying: str
) -> None:
    if broker == "mosquitto":
        find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    if store == "etcd":
        find_service_binary("etcd", "/usr/bin/etcd")
    with LocalTask(tmp_path, 9, 3, ATTACKS, store=store, broker=broker,
                   top={"keying": keying}) as task:  # fmt: skip
        records = task.wait_for_round(3, 3 * ROUND_TIMEOUT)
        _check_rounds(records, 3)
        sent = _bytes_sent_by_kind(task)
        assert ("share" in sent) == (keying == "shamir"), sent  # pairwise keys: no shares
        _foreign_client_is_refused_by_the_acl(task)
        _audit(task)


def _bytes_sent_by_kind(task: LocalTask) -> dict[str, int]:
    """What the users sent in their last round, by message kind (their stats)."""
    sent: dict[str, int] = {}
    for path in (task.root / "state").glob("user-*/stats.json"):
        for kind, count in json.loads(path.read_text())["round_bytes"].items():
            sent[kind] = sent.get(kind, 0) + int(count)
    return sent


def _foreign_client_is_refused_by_the_acl(task: LocalTask) -> None:
    """Someone holding user 4's broker password publishes into user 3's upload topic:
    the broker's ACL drops it, so the provider (here a client with the provider's
    login, the provider process having stopped) never sees it; the same client's
    publish into user 4's own topic arrives."""
    task.kill(0)
    assert task.ledger is not None
    roster, keys, port = task.ledger.roster, task.root / "keys", task.ledger.broker_port

    async def attempt() -> list[str]:
        seen: list[str] = []
        provider_password = load_broker_password(keys, 0)
        thief_password = load_broker_password(keys, 4)
        async with (
            mqtt_client(
                "127.0.0.1", port, "provider-0", username="provider-0", password=provider_password
            ) as watcher,  # fmt: skip
            mqtt_client(
                "127.0.0.1", port, "user-4", username="user-4", password=thief_password
            ) as thief,  # fmt: skip
        ):
            await watcher.subscribe(topics.uploads(roster.task), qos=1)
            await thief.publish(topics.upload(roster.task, 3), b"forged", qos=1)
            await thief.publish(topics.upload(roster.task, 4), b"own topic", qos=1)

            async def collect() -> None:
                async for message in watcher.messages:
                    seen.append(str(message.topic))

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collect(), 2.0)
        return seen

    seen = asyncio.run(attempt())
    assert topics.upload(roster.task, 4) in seen
    assert topics.upload(roster.task, 3) not in seen


def test_plain_fedavg_runs_through_the_same_loop(tmp_path: Path) -> None:
    """``[provider] secure = false``: the PlainFedAvg policy, through the same runtime
    loop and machines. The global model goes out in the clear and each user's model comes
    back in the clear on its upload topic: no groups, no shares, nothing on the ledger."""
    with LocalTask(tmp_path, 4, 2, {}, store="sqlite", broker="embedded",
                   provider={"secure": False}) as task:  # fmt: skip
        records = task.wait_for_round(2, 2 * ROUND_TIMEOUT)
    for r in records:
        assert r["groups"] == [] and r["attempts"] == 1 and r["failed"] is None, r
        assert r["ledger_height"] is None and not r["refusals"] and not r["dropped"]
        assert set(r["bytes"]) == {"plain_model"}  # type: ignore[call-overload]
    trained = np.load(tmp_path / "state" / "provider" / "global_model.npy")
    assert not np.allclose(trained, initial_params("digits_cnn", 0))  # the users' mean
    for user in range(1, 5):
        stats = json.loads((tmp_path / "state" / f"user-{user}" / "stats.json").read_text())
        sent = {kind for kind, n in stats["round_bytes"].items() if n}
        assert sent == {"upload"} and stats["timings"]["uploads"] == 1


def test_dropouts_regroup_and_rejoin(tmp_path: Path) -> None:
    """Round 2: kill -9 of user 3 before its uploads (negotiating and training): the
    survivors are regrouped (attempt + 1). Once it is back, in a round of all 9: kill -9
    of the first user to upload, right after its upload: the round completes (regrouped,
    or on the groups complete before the dropout). Then user 9 dies for good. The
    restarted users are grouped again; training goes on without 9."""
    with LocalTask(tmp_path, 9, 30, {}, store="sqlite", broker="embedded",
                   training={"local_epochs": 40}) as task:  # fmt: skip
        task.wait_for_round(1, ROUND_TIMEOUT)
        # Round 2 is announced: keys are being negotiated while the models train (40
        # local epochs take seconds here), so nobody has uploaded yet.
        time.sleep(0.3)
        task.kill(3)
        records = task.wait_for_round(2, ROUND_TIMEOUT)
        # regrouped (attempt + 1), or finished on the groups complete when its offline
        # presence had lasted the grace period
        assert 3 in records[1]["dropped"]  # type: ignore[operator]
        assert all(3 not in g["members"] for g in records[1]["groups"])  # type: ignore[attr-defined]
        task.start_user(3)
        log3 = tmp_path / "participant-3.log"
        _wait(lambda: log3.read_text().count("user-3: connected") >= 2, ROUND_TIMEOUT, "user 3")
        done = task.rounds_done()
        full = int(done[-1]["round"]) + 2  # type: ignore[call-overload]  # starts after 3 is back

        def first_uploader() -> int | None:
            for user in (4, 5, 6, 8):
                stats = tmp_path / "state" / f"user-{user}" / "stats.json"
                try:
                    if json.loads(stats.read_text())["round"] == full:
                        return user
                except (OSError, ValueError):
                    continue
            return None

        _wait(lambda: first_uploader() is not None, 3 * ROUND_TIMEOUT, "an upload")
        victim = first_uploader()
        assert victim is not None
        task.kill(victim)  # it has uploaded; the slower users have not
        _wait(lambda: any(r["round"] == full for r in task.rounds_done()), ROUND_TIMEOUT,
              f"round {full}")  # fmt: skip
        record = next(r for r in task.rounds_done() if r["round"] == full)
        # regrouped (attempt + 1), or finished on the groups complete before the dropout
        # (then user 3's groups may be among those left out: it is checked below)
        assert victim in record["dropped"]  # type: ignore[operator]
        task.start_user(victim)
        task.kill(9)  # never comes back
        back = tmp_path / f"participant-{victim}.log"
        _wait(lambda: back.read_text().count("connected") >= 2, ROUND_TIMEOUT, "the victim")
        after = len(task.rounds_done())

        def took_part(user: int, record: dict[str, object]) -> bool:
            members = {m for g in record["groups"] for m in g["members"]}  # type: ignore[attr-defined]
            return user in members and user not in record["dropped"]  # type: ignore[operator]

        def rejoined() -> bool:
            later = task.rounds_done()[after:]
            return all(any(took_part(u, r) for r in later) for u in (victim, 3))

        # both restarted users are grouped again and finish a round (a first training
        # in a fresh process may miss one deadline on a busy machine)
        _wait(rejoined, 4 * ROUND_TIMEOUT, "the restarted users in a completed round")
        records = task.rounds_done()
        _check_rounds(records, len(records))
        assert not any(took_part(9, r) for r in records[after + 1 :])  # 9 never comes back
        _audit(task)


def test_a_broker_restart_mid_round_is_ridden_out(tmp_path: Path) -> None:
    """Mosquitto is stopped during round 2 and started again a second later (without
    persistence: every session and retained presence is gone). The provider, the users
    and the ledger node reconnect with backoff and subscribe again; training goes on."""
    find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    with LocalTask(tmp_path, 9, 4, ATTACKS, store="sqlite", broker="mosquitto",
                   training={"local_epochs": 20}) as task:  # fmt: skip
        assert task.ledger is not None
        task.wait_for_round(1, ROUND_TIMEOUT)
        time.sleep(0.3)
        task.ledger.restart_broker(down_for=1.0)
        records = task.wait_for_round(4, 4 * ROUND_TIMEOUT)
        assert len(records) >= 4
        excluded = set(records[-1]["excluded"])  # type: ignore[call-overload]
        assert excluded <= set(ATTACKS)
        logs = "".join((tmp_path / f"participant-{p}.log").read_text() for p in (0, 1))
        assert "bus lost" in logs
        _audit(task)


def test_killed_ledger_writer_during_a_round(tmp_path: Path) -> None:
    find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    find_service_binary("etcd", "/usr/bin/etcd")
    with LocalTask(tmp_path, 9, 3, ATTACKS, store="etcd", broker="mosquitto") as task:
        assert task.ledger is not None
        task.wait_for_round(1, ROUND_TIMEOUT)
        time.sleep(0.5)  # inside round 2
        writer = asyncio.run(task.ledger.wait_for_writer())
        task.ledger.kill_node(writer)
        records = task.wait_for_round(3, 3 * ROUND_TIMEOUT)
        _check_rounds(records, 3)
        survivor = next(n for n in task.ledger.nodes if n != writer)
        _audit(task, survivor)


def test_a_forged_upload_claiming_to_be_user_3_is_refused(tmp_path: Path) -> None:
    """User 4 signs an upload whose header names user 3: the ledger refuses it (so it
    never gets a receipt), its signature does not verify, and with a genuine receipt for
    another transaction the provider machine refuses it all the same."""
    with LocalTask(tmp_path, 9, 1, {}, store="sqlite", broker="mosquitto") as task:
        assert task.ledger is not None
        records = task.wait_for_round(1, ROUND_TIMEOUT)
        roster = task.ledger.roster
        thief = Identity.load(tmp_path / "keys", 4)
        body = MaskedUpload(records[0]["groups"][0]["gid"], 4, np.zeros(4, "<u4").tobytes())  # type: ignore[index]
        honest = envelope.sign(thief, roster.task, body, prev=GENESIS, round=1, attempt=0)
        forged = envelope.from_parts(
            honest.header_bytes.replace(b"\xa6sender\x04", b"\xa6sender\x03"),
            honest.payload,
            honest.signature,
        )
        assert forged.header.sender == 3
        forged_bytes = forged.to_bytes()
        port = task.ledger.broker_port

        async def submit() -> RefusedError:
            password = load_broker_password(tmp_path / "keys", 4)
            async with (
                mqtt_client(
                    "127.0.0.1",
                    port,
                    "user-4-forger",
                    username="user-4",
                    password=password,
                ) as mqtt,  # fmt: skip
                LedgerClient(mqtt, thief, roster, "user", timeout=2.0) as ledger,
            ):
                with pytest.raises(RefusedError) as refused:
                    await ledger.submit(forged_bytes)
                return refused.value

        refusal = asyncio.run(submit())
        assert refusal.reason is RefusalReason.BAD_SIGNATURE

        with pytest.raises(SignatureError):
            envelope.verify(forged, roster)

        # On the bus, with a genuine receipt for another transaction: the provider
        # machine checks the receipt itself and refuses the upload.
        receipt_of_another = _any_receipt(tmp_path, roster)
        on_the_bus = Recorded(forged, receipt_of_another).to_bytes()
        with pytest.raises(ReceiptError):
            open_recorded(on_the_bus, roster)
        provider = Identity.load(tmp_path / "keys", 0)
        machine = ProviderMachine(provider, roster, np.zeros(4, np.float32))
        (out,) = machine.handle(Received("upload", on_the_bus))
        assert isinstance(out, Refused) and out.reason == "ReceiptError"
        _audit(task)


def _any_receipt(root: Path, roster: Roster) -> bytes:
    """A genuine ledger receipt, for some other transaction: ask the ledger to commit an
    attestation as user 5 and keep its receipt."""
    from fairbus.wire.messages import Attestation

    user = Identity.load(root / "keys", 5)
    config = (root / "task.toml").read_text()
    port = int(config.split("127.0.0.1:")[1].split('"')[0])

    async def commit() -> bytes:
        password = load_broker_password(root / "keys", 5)
        async with (
            mqtt_client(
                "127.0.0.1", port, "user-5-extra", username="user-5", password=password
            ) as mqtt,  # fmt: skip
            LedgerClient(mqtt, user, roster, "user", timeout=2.0) as ledger,
        ):
            head = (await ledger.query("head", sender=5)).records[0]
            note = envelope.sign(user, roster.task, Attestation("note", bytes(32), b""), prev=head)
            _, receipt = await ledger.submit_for_receipt(note.to_bytes())
            return receipt

    return asyncio.run(commit())
