"""Issue 14, item 7 ("Only signed payloads are kept"): a ledger node writes a model-sized
payload to its blob store only if the ledger committed its hash, or its envelope's signed
header verifies against the roster (a member allowed to send that type, this task, the
bytes hashing to the signed SHA-256). Anything else is refused with a typed error and
nothing reaches the blob directory; what a verified sender parks before commit is bounded
per sender, and a commit frees the bound.

No broker: the service's bus handler and the node are driven directly. Provider 0, users
1..7, ledger node 8, admin 9 (``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fairbus import envelope, topics
from fairbus.envelope import GENESIS, SignedEnvelope
from fairbus.identity import Identity
from fairbus.ledger.recorded import Recorded, ledger_submission
from fairbus.ledger.records import Committed
from fairbus.ledger.state import LedgerState, RefusalReason
from fairbus.roster import Roster
from fairbus.task import TaskParams
from fairbus.wire.messages import GlobalModel, MaskedUpload, QueryResponse
from fairbus_ledger_service.blobs import BlobStore
from fairbus_ledger_service.config import LedgerConfig
from fairbus_ledger_service.node import (
    MAX_PARKED_BLOBS,
    PARKED_MODELS,
    BlobRefusedError,
    LedgerNode,
    ParkedBlobsError,
    Refused,
    largest_model_payload,
)
from fairbus_ledger_service.service import LedgerService
from fairbus_ledger_service.stores import SqliteStore
from tests.conftest import TASK

PROVIDER, LEDGER, ADMIN = 0, 8, 9
MB = 1_000_000


def upload(
    who: Identity, data: bytes, *, task: str = TASK, prev: bytes = GENESIS
) -> SignedEnvelope:
    """``who``'s masked upload of ``data`` for round 1, attempt 0, group 0."""
    body = MaskedUpload(0, len(data) // 4, data)
    return envelope.sign(who, task, body, prev=prev, round=1, attempt=0)


def model(provider: Identity, data: bytes, round: int, prev: bytes) -> SignedEnvelope:
    return envelope.sign(
        provider, TASK, GlobalModel(len(data) // 4, data), prev=prev, round=round, attempt=0
    )


def payload(size: int, tag: int) -> bytes:
    """``size`` bytes, distinct for each ``tag``."""
    return tag.to_bytes(4, "little") + bytes(size - 4)


def on_bus(env: SignedEnvelope) -> bytes:
    """``env`` as the bus carries it (:class:`Recorded`; the node does not read the
    receipt, so none is needed to show what it keeps)."""
    return Recorded(env, b"").to_bytes()


def files(root: Path) -> list[Path]:
    """Every file under ``root``, temporary ones included."""
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture
async def node(roster: Roster, tmp_path: Path) -> AsyncIterator[LedgerNode]:
    store = SqliteStore(tmp_path / "ledger.sqlite")
    node = LedgerNode(LedgerState(roster), store, BlobStore(tmp_path / "blobs"))
    node.is_writer = True
    yield node
    node.close()
    await store.close()


@pytest.fixture
def service(
    node: LedgerNode, identities: dict[int, Identity], roster: Roster, tmp_path: Path
) -> LedgerService:
    """A ledger service around ``node``, never connected: its bus handler is called."""
    (tmp_path / "roster.toml").write_text(roster.to_toml())
    identities[LEDGER].save(tmp_path / "keys")
    config = LedgerConfig(
        roster=tmp_path / "roster.toml",
        keys=tmp_path / "keys",
        store="sqlite",
        sqlite=tmp_path / "ledger.sqlite",
        etcd=(),
        blobs=tmp_path / "blobs",
        broker=("127.0.0.1", 1883),
    )
    svc = LedgerService(config, LEDGER)
    svc.node = node
    return svc


async def publish_upload(service: LedgerService, env: SignedEnvelope, user: int = 1) -> None:
    await service._on_message(topics.upload(TASK, user), on_bus(env))


def forgeries(ids: dict[int, Identity]) -> list[tuple[str, SignedEnvelope, RefusalReason]]:
    """One forged model-sized envelope for each way a header can fail, each with its own
    1 MB payload; none may leave a byte in the blob store."""
    honest = upload(ids[1], payload(MB, 1))
    tampered = payload(MB, 2)
    answer = QueryResponse(1, True, "", (payload(MB, 3),))
    answer_env = envelope.sign(ids[LEDGER], TASK, answer, prev=GENESIS)
    return [
        (
            "a bad signature",
            SignedEnvelope(honest.header, honest.header_bytes, honest.payload, bytes(64)),
            RefusalReason.BAD_SIGNATURE,
        ),
        (
            "signed by a key not in the roster",
            upload(Identity.generate(1), payload(MB, 4)),
            RefusalReason.BAD_SIGNATURE,
        ),
        (
            "an unknown sender",
            upload(Identity.generate(55), payload(MB, 5)),
            RefusalReason.UNKNOWN_SENDER,
        ),
        (
            "an upload signed by the provider",
            upload(ids[PROVIDER], payload(MB, 6)),
            RefusalReason.ROLE_NOT_ALLOWED,
        ),
        (
            "a global model signed by a user",
            model(ids[1], payload(MB, 7), 1, GENESIS),
            RefusalReason.ROLE_NOT_ALLOWED,
        ),
        (
            "an upload signed by the admin",
            upload(ids[ADMIN], payload(MB, 8)),
            RefusalReason.ROLE_NOT_ALLOWED,
        ),
        (
            "another task's upload",
            upload(ids[1], payload(MB, 9), task="other-task"),
            RefusalReason.WRONG_TASK,
        ),
        (
            "a payload that is not the signed one",
            SignedEnvelope(honest.header, honest.header_bytes, tampered, honest.signature),
            RefusalReason.PAYLOAD_MISMATCH,
        ),
        (
            "a model-sized type the ledger does not record",
            answer_env,
            RefusalReason.TYPE_NOT_RECORDED,
        ),
    ]


def test_the_default_bounds_are_four_of_the_largest_model(node: LedgerNode) -> None:
    assert node.max_parked_blobs == MAX_PARKED_BLOBS == 4
    largest = largest_model_payload(node.limits)
    assert largest == node.limits.max_model_bytes + 4096
    assert node.max_parked_bytes == PARKED_MODELS * largest == 4 * largest


async def test_forged_payloads_are_refused_typed_and_nothing_is_written(
    node: LedgerNode, service: LedgerService, identities: dict[int, Identity], tmp_path: Path
) -> None:
    blobs = tmp_path / "blobs"
    cases = forgeries(identities)
    for what, env, reason in cases:
        with pytest.raises(BlobRefusedError) as caught:
            node.transaction_of_envelope(env)
        assert caught.value.reason is reason, f"{what}: {caught.value}"
        assert caught.value.tx_hash == env.hash, what
        assert files(blobs) == [], what
    # the same, from the bus (dropped) and submitted whole (refused, naming the envelope)
    for _, env, _ in cases:
        await publish_upload(service, env)
    loop = asyncio.create_task(node.write_loop())
    try:
        outcomes = [await node.submit(env.to_bytes()) for _, env, _ in cases]
    finally:
        loop.cancel()
    for (what, env, reason), outcome in zip(cases, outcomes, strict=True):
        assert isinstance(outcome, Refused), what
        assert (outcome.reason, outcome.tx_hash) == (reason, env.hash), f"{what}: {outcome}"
    assert files(blobs) == []
    assert node.state.height == -1
    assert all(node.parked(pid) == (0, 0) for pid in (*identities, 55))


async def test_fifteen_forged_ten_mb_publishes_leave_the_store_empty(
    node: LedgerNode, service: LedgerService, tmp_path: Path
) -> None:
    """The issue's measurement: 15 × 10 MB forged publishes once left 166 MB on disk."""
    impostor = Identity.generate(1)  # claims to be user 1
    for k in range(15):
        await publish_upload(service, upload(impostor, payload(10 * MB, k)))
    assert files(tmp_path / "blobs") == []
    assert node.parked(1) == (0, 0)


async def test_an_honest_upload_is_kept(
    node: LedgerNode, service: LedgerService, identities: dict[int, Identity]
) -> None:
    env = upload(identities[1], payload(MB, 1))
    await publish_upload(service, env)
    assert node.blobs is not None
    assert node.blobs.get(env.header.payload_sha256) == env.payload
    assert node.parked(1) == (1, len(env.payload))
    # seen again (a retained message, a retry): kept once, counted once
    await publish_upload(service, env)
    assert node.parked(1) == (1, len(env.payload))


async def test_a_sender_past_its_bound_is_refused_and_keeps_what_it_parked(
    node: LedgerNode,
    service: LedgerService,
    identities: dict[int, Identity],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    user = identities[2]
    kept = [upload(user, payload(MB, k)) for k in range(MAX_PARKED_BLOBS)]
    for env in kept:
        await publish_upload(service, env, user=2)
    assert node.parked(2) == (MAX_PARKED_BLOBS, sum(len(e.payload) for e in kept))
    extra = upload(user, payload(MB, 99))
    with caplog.at_level(logging.WARNING, logger="fairbus.ledger"):
        with pytest.raises(ParkedBlobsError) as caught:
            node.transaction_of_envelope(extra)
        await publish_upload(service, extra, user=2)  # from the bus: dropped the same way
    assert caught.value.reason is RefusalReason.TOO_LARGE
    assert caught.value.tx_hash == extra.hash
    assert "participant 2" in caught.value.detail and "awaiting commit" in caught.value.detail
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    secret = bytes(user.signing_key).hex()
    for record in warnings:
        line = record.getMessage()
        assert "\n" not in line and "participant 2" in line
        assert secret not in line and secret[:16] not in line
    assert node.blobs is not None and extra.header.payload_sha256 not in node.blobs
    for env in kept:  # nothing else lost
        assert node.blobs.get(env.header.payload_sha256) == env.payload
    assert len(files(tmp_path / "blobs")) == MAX_PARKED_BLOBS
    assert node.parked(2) == (MAX_PARKED_BLOBS, sum(len(e.payload) for e in kept))
    # another sender is not held up by user 2's bound
    other = upload(identities[3], payload(MB, 99))
    await publish_upload(service, other, user=3)
    assert other.header.payload_sha256 in node.blobs


async def test_the_byte_bound_refuses_too(
    roster: Roster, identities: dict[int, Identity], tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "ledger.sqlite")
    node = LedgerNode(
        LedgerState(roster), store, BlobStore(tmp_path / "blobs"), max_parked_bytes=3 * MB
    )
    try:
        first = upload(identities[4], payload(2 * MB, 1))
        second = upload(identities[4], payload(2 * MB, 2))
        node.transaction_of_envelope(first)
        with pytest.raises(ParkedBlobsError):
            node.transaction_of_envelope(second)
        assert node.parked(4) == (1, len(first.payload))
        assert len(files(tmp_path / "blobs")) == 1
    finally:
        node.close()
        await store.close()


async def test_a_commit_frees_the_bound_on_the_writer_and_on_a_follower(
    node: LedgerNode,
    service: LedgerService,
    identities: dict[int, Identity],
    roster: Roster,
    tmp_path: Path,
) -> None:
    provider = identities[PROVIDER]
    start = envelope.sign(provider, TASK, TaskParams().to_message(), prev=GENESIS)
    models, prev = [], start.hash
    for r in range(1, MAX_PARKED_BLOBS + 2):
        models.append(model(provider, payload(MB, r), r, prev))
        prev = models[-1].hash
    follower = LedgerNode(
        LedgerState(roster), SqliteStore(tmp_path / "ledger.sqlite"), BlobStore(tmp_path / "f")
    )
    try:
        for env in models[:MAX_PARKED_BLOBS]:
            await service._on_message(topics.provider_message(TASK, PROVIDER, "global_model"),
                                      on_bus(env))  # fmt: skip
            follower.transaction_of_envelope(env)
        still = sum(len(e.payload) for e in models[1:MAX_PARKED_BLOBS])
        for parker in (node, follower):
            with pytest.raises(ParkedBlobsError):
                parker.transaction_of_envelope(models[-1])
        # the task start and round 1's model commit (as participants submit them: the
        # model as its header only, its payload already on the bus)
        loop = asyncio.create_task(node.write_loop())
        try:
            done = [await node.submit(ledger_submission(e)) for e in (start, models[0])]
        finally:
            loop.cancel()
        assert all(isinstance(o, Committed) for o in done), done
        assert node.parked(PROVIDER) == (MAX_PARKED_BLOBS - 1, still)
        node.transaction_of_envelope(models[-1])
        assert node.blobs is not None and models[-1].header.payload_sha256 in node.blobs
        # a follower frees the bound when it applies the block from the store
        assert await follower.sync() == 2
        assert follower.parked(PROVIDER) == (MAX_PARKED_BLOBS - 1, still)
        follower.transaction_of_envelope(models[-1])
        assert follower.blobs is not None and models[-1].header.payload_sha256 in follower.blobs
    finally:
        follower.close()


async def test_a_committed_hash_is_kept_without_a_signature_or_a_bound(
    node: LedgerNode, identities: dict[int, Identity], roster: Roster, tmp_path: Path
) -> None:
    """A node that missed a committed payload takes its bytes from anyone: they hash to
    what the ledger recorded, and count against nobody."""
    provider = identities[PROVIDER]
    start = envelope.sign(provider, TASK, TaskParams().to_message(), prev=GENESIS)
    gm = model(provider, payload(MB, 1), 1, start.hash)
    loop = asyncio.create_task(node.write_loop())
    try:
        done = [await node.submit(ledger_submission(e)) for e in (start, gm)]
    finally:
        loop.cancel()
    assert all(isinstance(o, Committed) for o in done), done
    assert node.blobs is not None and gm.header.payload_sha256 not in node.blobs
    unsigned = SignedEnvelope(gm.header, gm.header_bytes, gm.payload, bytes(64))
    node.transaction_of_envelope(unsigned)
    assert node.blobs.get(gm.header.payload_sha256) == gm.payload
    assert node.parked(PROVIDER) == (0, 0)
    # but not other bytes under the committed header
    wrong = SignedEnvelope(gm.header, gm.header_bytes, payload(MB, 2), bytes(64))
    with pytest.raises(BlobRefusedError) as caught:
        node.transaction_of_envelope(wrong)
    assert caught.value.reason is RefusalReason.PAYLOAD_MISMATCH
    assert len(files(tmp_path / "blobs")) == 1


async def test_an_honest_whole_submission_keeps_its_payload_until_commit(
    node: LedgerNode, identities: dict[int, Identity]
) -> None:
    """The writer's own path (submit → decoder thread): the payload of an envelope
    submitted whole is verified, parked, and released by its commit."""
    provider = identities[PROVIDER]
    start = envelope.sign(provider, TASK, TaskParams().to_message(), prev=GENESIS)
    gm = model(provider, payload(MB, 1), 1, start.hash)
    loop = asyncio.create_task(node.write_loop())
    try:
        done = [await node.submit(e.to_bytes()) for e in (start, gm)]
    finally:
        loop.cancel()
    assert all(isinstance(o, Committed) for o in done), done
    assert node.blobs is not None and node.blobs.get(gm.header.payload_sha256) == gm.payload
    assert node.parked(PROVIDER) == (0, 0)
