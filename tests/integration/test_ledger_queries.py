"""Who may read what from the ledger's queries (issue 12, item 1), on a real Mosquitto
and a ledger node (SQLite store): the uploads of a complete group add up to the group's
sum without any key, so masked uploads — an upload's payload (blob), a round's
transactions, another participant's upload transaction — go only to the provider, the
ledger nodes and admins. A user who asks gets ``ok=False``, a ``role_not_allowed:``
reason and no record; global models and chain heads stay readable by every member."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS, SignedEnvelope
from fairbus.identity import Identity
from fairbus.ledger.records import Transaction
from fairbus.roster import Member, Role, Roster
from fairbus.wire.messages import Announce, GlobalModel, GroupSpec, MaskedUpload, QueryResponse
from fairbus_broker.mqtt import mqtt_client
from fairbus_ledger_service.blobs import BlobError
from fairbus_ledger_service.client import LedgerClient
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.service import LedgerService
from tests.conftest import find_service_binary
from tests.integration.test_services import free_port, running
from tests.support_ledger import task_opening

TASK = "queries"
PROVIDER, LEDGER, ADMIN = 0, 101, 200
USERS = (1, 2, 3)
D = 1_000
REFUSED = "role_not_allowed:"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    binary = find_service_binary("mosquitto", "/usr/sbin/mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with running([binary, "-c", str(conf)], port):
        yield port


@dataclass
class Round:
    """Round 1 on the ledger: its global model, announcement and every upload."""

    clients: dict[int, LedgerClient]
    model: SignedEnvelope
    uploads: dict[int, SignedEnvelope]


@pytest.fixture
async def round_one(broker: int, tmp_path: Path) -> AsyncIterator[Round]:
    roles = {PROVIDER: Role.PROVIDER, LEDGER: Role.LEDGER, ADMIN: Role.ADMIN}
    roles |= {u: Role.USER for u in USERS}
    ids = {pid: Identity.generate(pid) for pid in roles}
    roster = Roster(TASK, [Member(ids[pid].public, role) for pid, role in roles.items()])
    (tmp_path / "roster.toml").write_text(roster.to_toml())
    ids[LEDGER].save(tmp_path / "keys")
    cfg = tmp_path / "ledger.toml"
    cfg.write_text(
        f'roster = "roster.toml"\nstore = "sqlite"\nsqlite = "l.sqlite"\n'
        f'broker = "127.0.0.1:{broker}"\n'
    )
    service = asyncio.create_task(LedgerService(LedgerConfig.load(cfg), LEDGER).run())
    try:
        async with AsyncExitStack() as stack:
            clients = {}
            for pid in (PROVIDER, ADMIN, *USERS):
                mqtt = await stack.enter_async_context(
                    mqtt_client("127.0.0.1", broker, f"{roles[pid].value}-{pid}")
                )
                clients[pid] = await stack.enter_async_context(
                    LedgerClient(mqtt, ids[pid], roster, roles[pid].value, timeout=2.0)
                )
            provider = clients[PROVIDER]
            test_set, start = task_opening(ids[PROVIDER], TASK)
            await provider.submit(test_set.to_bytes())
            await provider.submit(start.to_bytes())
            params = np.linspace(-1, 1, D, dtype="<f4").tobytes()
            model = envelope.sign(
                ids[PROVIDER], TASK, GlobalModel(D, params), prev=start.hash, round=1, attempt=0
            )
            await provider.submit(model.to_bytes())
            grouping = Announce(
                bytes(32), D, 16, (GroupSpec(0, "basic", USERS, None, 3),), (), (), (), 1.0, 1.0, 1
            )
            announce = envelope.sign(
                ids[PROVIDER], TASK, grouping, prev=model.hash, round=1, attempt=0
            )
            await provider.submit(announce.to_bytes())
            uploads = {}
            rng = np.random.default_rng(1)
            for u in USERS:
                masked = rng.integers(0, 2**31 - 1, size=D, dtype="<u4").tobytes()
                uploads[u] = envelope.sign(
                    ids[u], TASK, MaskedUpload(0, D, masked), prev=GENESIS, round=1, attempt=0
                )
                # submitted whole: the node keeps the payload in its blob store
                await clients[u].submit(uploads[u].to_bytes())
            yield Round(clients, model, uploads)
    finally:
        service.cancel()
        with pytest.raises(asyncio.CancelledError):
            await service


def _refused(answer: QueryResponse, *words: str) -> None:
    assert not answer.ok and answer.records == ()
    assert answer.error.startswith(REFUSED), answer.error
    for word in words:
        assert word in answer.error, answer.error


async def test_a_user_is_refused_another_users_upload_and_the_round(round_one: Round) -> None:
    user = round_one.clients[2]
    other = round_one.uploads[1]
    _refused(
        await user.query("blob", tx_hash=other.header.payload_sha256),
        "not a recorded global model or participant 2's own upload",
        "provider",
    )
    with pytest.raises(BlobError, match=REFUSED):
        await user.blob(other.header.payload_sha256)
    _refused(await user.query("round", round=1), "round 1", "masked uploads")
    _refused(await user.query("tx", tx_hash=other.hash), "participant 1's upload")
    # nor does a user learn whether some blob exists
    _refused(await user.query("blob", tx_hash=bytes(32)))


async def test_the_provider_and_an_admin_are_served(round_one: Round) -> None:
    for pid in (PROVIDER, ADMIN):
        reader = round_one.clients[pid]
        for upload in round_one.uploads.values():
            assert await reader.blob(upload.header.payload_sha256) == upload.payload
        answer = await reader.query("round", round=1)
        assert answer.ok, answer.error
        recorded = [Transaction.from_bytes(r) for r in answer.records]
        uploads = {t.hash for t in recorded if t.envelope.header.type == "upload"}
        assert uploads == {u.hash for u in round_one.uploads.values()}
        tx = await reader.query("tx", tx_hash=round_one.uploads[3].hash)
        assert tx.ok and Transaction.from_bytes(tx.records[0]).hash == round_one.uploads[3].hash
        missing = await reader.query("blob", tx_hash=bytes(32))
        assert not missing.ok and "no blob" in missing.error


async def test_every_member_reads_global_models_heads_and_its_own_upload(
    round_one: Round,
) -> None:
    for u in USERS:
        user = round_one.clients[u]
        model = round_one.model
        assert await user.blob(model.header.payload_sha256) == model.payload
        head = await user.query("head", sender=u)
        assert head.ok and head.records == (round_one.uploads[u].hash,)
        own = round_one.uploads[u]
        assert await user.blob(own.header.payload_sha256) == own.payload
        tx = await user.query("tx", tx_hash=own.hash)
        assert tx.ok and Transaction.from_bytes(tx.records[0]).hash == own.hash
