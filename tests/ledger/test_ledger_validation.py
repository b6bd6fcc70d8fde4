"""The ledger's validation on both stores: a real run commits; every bad input is refused
with its reason and changes nothing (etcd: a real 3-member cluster on loopback)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS
from fairbus.errors import WireError
from fairbus.identity import Identity
from fairbus.ledger.records import Block, Committed, Transaction
from fairbus.ledger.state import LedgerState, RefusalReason, replay
from fairbus.roster import Member, Role, Roster
from fairbus.simulator import DropoutPlan
from fairbus.wire.messages import (
    Attestation,
    Decision,
    Evaluation,
    GroupAccuracy,
    MaskedUpload,
    RosterChange,
)
from fairbus_ledger_service.audit import audit, read_export, verify, write_export
from fairbus_ledger_service.blobs import BlobStore
from fairbus_ledger_service.etcd_cluster import EtcdCluster
from fairbus_ledger_service.node import LedgerNode, Refused
from fairbus_ledger_service.stores import BlockStore, EtcdStore, SqliteStore, block_key
from tests.conftest import find_service_binary
from tests.support_ledger import ADMIN_ID, RecordedRun, record_run


@pytest.fixture(scope="module")
def run() -> RecordedRun:
    return record_run()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    binary = find_service_binary("etcd", "/usr/bin/etcd")
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 3, binary) as c:
        yield c


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlockStore]:
    if request.param == "sqlite":
        s: BlockStore = SqliteStore(tmp_path / "ledger.sqlite")
    else:
        cluster = request.getfixturevalue("cluster")
        s = await EtcdStore.connect(cluster.endpoints, "simulation")
        await s.client.delete_prefix(b"/fairbus/")
    yield s
    await s.close()


async def writer(run: RecordedRun, store: BlockStore, tmp_path: Path) -> LedgerNode:
    node = LedgerNode(LedgerState(run.roster), store, BlobStore(tmp_path / "blobs"))
    await node.sync()
    node.is_writer = True
    return node


async def submit_all(node: LedgerNode, envelopes: list[bytes]) -> list[Committed | Refused]:
    task = asyncio.create_task(node.write_loop())
    try:
        return [await node.submit(e) for e in envelopes]
    finally:
        task.cancel()


async def test_a_whole_run_commits_and_any_node_replays_it(
    run: RecordedRun, store: BlockStore, tmp_path: Path
) -> None:
    node = await writer(run, store, tmp_path)
    outcomes = await submit_all(node, run.envelopes)
    refused = [o for o in outcomes if isinstance(o, Refused)]
    assert refused == []
    assert node.state.current_round == 3
    assert node.state.excluded <= {2, 7}  # only attackers can be excluded
    # a second node re-validates every block from the store and reaches the same state
    blocks = [Block.from_bytes(b) for b in await store.read(0)]
    follower = replay(run.roster, blocks)
    assert follower.head_hash == node.state.head_hash
    assert follower.heads == node.state.heads
    assert follower.excluded == node.state.excluded
    # model-sized payloads are not in blocks but in the blob store, by hash
    upload = next(b for b in blocks for t in b.txs if t.envelope.header.type == "upload")
    tx = next(t for t in upload.txs if t.envelope.header.type == "upload")
    assert tx.payload is None and node.blobs is not None
    assert tx.envelope.header.payload_sha256 in node.blobs


async def test_a_replayed_transaction_gets_its_first_receipt(
    run: RecordedRun, store: BlockStore, tmp_path: Path
) -> None:
    node = await writer(run, store, tmp_path)
    first = await submit_all(node, run.envelopes[:3])
    height = node.state.height
    again = await submit_all(node, [run.envelopes[1]])
    assert isinstance(first[1], Committed) and isinstance(again[0], Committed)
    assert again[0].duplicate and (again[0].height, again[0].index) == (
        first[1].height,
        first[1].index,
    )
    assert node.state.height == height  # nothing applied


async def test_submissions_are_decoded_off_the_event_loop_and_in_order(
    run: RecordedRun, tmp_path: Path
) -> None:
    """Issue 12, item 4: decoding (and writing a blob) happens on the node's decoder
    thread, so a 16 MiB nested payload does not stall the writer's loop; submissions keep
    their order, so every sender's chain is committed as sent."""
    store = SqliteStore(tmp_path / "ledger.sqlite")
    node = await writer(run, store, tmp_path)
    threads: list[int] = []
    decode = node.transaction_of

    def recording(data: bytes) -> Transaction:
        threads.append(threading.get_ident())
        return decode(data)

    node.transaction_of = recording  # type: ignore[method-assign]
    nested = b"\x91" * (16 * 1024 * 1024)  # an array in an array in an array ...
    loop = asyncio.create_task(node.write_loop())
    try:
        pending = [node.submit_nowait(nested), *map(node.submit_nowait, run.envelopes[:20])]
        outcomes = await asyncio.gather(*pending)
    finally:
        loop.cancel()
        node.close()
        await store.close()
    assert isinstance(outcomes[0], Refused)
    assert outcomes[0].reason in (RefusalReason.MALFORMED, RefusalReason.TOO_LARGE)
    assert all(isinstance(o, Committed) for o in outcomes[1:]), outcomes[1:]
    assert threading.get_ident() not in threads and len(set(threads)) == 1
    committed = [o for o in outcomes[1:] if isinstance(o, Committed)]
    assert [(o.height, o.index) for o in committed] == sorted(
        (o.height, o.index) for o in committed
    )


async def test_bad_inputs_are_refused_with_their_reason_and_change_nothing(
    run: RecordedRun, store: BlockStore, tmp_path: Path
) -> None:
    node = await writer(run, store, tmp_path)
    # commit the first round up to (not including) its decision
    decision_at = next(
        k for k, e in enumerate(run.envelopes) if envelope.parse(e).header.type == "decision"
    )
    done = await submit_all(node, run.envelopes[:decision_at])
    assert all(isinstance(o, Committed) for o in done)
    before = (node.state.height, dict(node.state.heads), node.state.excluded)
    provider = run.identities[0]
    user3 = run.identities[3]
    stranger = Identity.generate(3)  # claims to be user 3, key not in the roster
    outsider = Identity.generate(55)  # not in the roster at all
    head3 = node.state.head(3)
    head0 = node.state.head(0)
    upload = MaskedUpload(0, 2, b"\x00" * 8)
    decision_env = envelope.parse(run.envelopes[decision_at])
    real = envelope.verify(decision_env, run.roster).message
    assert isinstance(real, Decision)
    unfair = Decision(real.tau, real.scores, real.key_users, tuple(sorted({*real.violators, 5})))
    r, a = decision_env.header.round, decision_env.header.attempt
    unsigned = envelope.sign(user3, "simulation", upload, prev=head3, round=r, attempt=a)
    cases: list[tuple[str, bytes, RefusalReason]] = [
        ("garbage bytes", b"\xc1" * 300, RefusalReason.MALFORMED),  # 0xc1: never msgpack
        ("empty", b"", RefusalReason.MALFORMED),
        (
            "unsigned",
            envelope.SignedEnvelope(
                unsigned.header, unsigned.header_bytes, unsigned.payload, bytes(64)
            ).to_bytes(),
            RefusalReason.BAD_SIGNATURE,
        ),
        (
            "signed by a key not in the roster",
            envelope.sign(
                stranger, "simulation", upload, prev=head3, round=r, attempt=a
            ).to_bytes(),
            RefusalReason.BAD_SIGNATURE,
        ),
        (
            "a sender not in the roster",
            envelope.sign(
                outsider, "simulation", upload, prev=GENESIS, round=r, attempt=a
            ).to_bytes(),
            RefusalReason.UNKNOWN_SENDER,
        ),
        (
            "a role that may not send it (a user's decision)",
            envelope.sign(user3, "simulation", real, prev=head3, round=r, attempt=a).to_bytes(),
            RefusalReason.ROLE_NOT_ALLOWED,
        ),
        (
            "a stale prev (a fork of user 3's chain)",
            envelope.sign(user3, "simulation", upload, prev=GENESIS, round=r, attempt=a).to_bytes(),
            RefusalReason.STALE_PREV,
        ),
        (
            "a replay into another task",
            envelope.sign(user3, "other-task", upload, prev=head3, round=r, attempt=a).to_bytes(),
            RefusalReason.WRONG_TASK,
        ),
        (
            "an oversize body",
            envelope.sign(
                provider,
                "simulation",
                Evaluation(tuple(GroupAccuracy(k, 0.5, 0.25, 2.5) for k in range(3000))),
                prev=head0,
                round=r,
                attempt=a,
            ).to_bytes(),
            RefusalReason.TOO_LARGE,
        ),
        (
            "a decision that contradicts Algorithm 6",
            envelope.sign(
                provider, "simulation", unfair, prev=head0, round=r, attempt=a
            ).to_bytes(),
            RefusalReason.CONTRACT_VIOLATION,
        ),
        (
            "an upload signed by the admin",
            envelope.sign(
                run.identities[ADMIN_ID], "simulation", upload, prev=GENESIS, round=r, attempt=a
            ).to_bytes(),
            RefusalReason.ROLE_NOT_ALLOWED,
        ),
    ]
    outcomes = await submit_all(node, [data for _, data, _ in cases])
    for (what, _, reason), outcome in zip(cases, outcomes, strict=True):
        assert isinstance(outcome, Refused), what
        assert outcome.reason is reason, f"{what}: {outcome}"
        assert outcome.detail, what
    assert (node.state.height, node.state.heads, node.state.excluded) == before
    # and the real decision still commits afterwards: nothing was lost
    rest = await submit_all(node, run.envelopes[decision_at:])
    assert all(isinstance(o, Committed) for o in rest)


async def _tamper(store: BlockStore, height: int, data: bytes) -> None:
    if isinstance(store, SqliteStore):
        store.overwrite(height, data)
    else:
        assert isinstance(store, EtcdStore)
        await store.client.put(block_key(store.prefix, height), data)


async def test_a_block_tampered_in_the_store_is_named_by_verify_and_audit(
    run: RecordedRun, store: BlockStore, tmp_path: Path
) -> None:
    node = await writer(run, store, tmp_path)
    await submit_all(node, run.envelopes)
    raw = await store.read(0)
    assert verify(raw, run.roster).ok
    assert audit(raw, run.roster, node.blobs).ok
    # the provider's first evaluation, rewritten in place: one accuracy changed
    height, k = next(
        (h, k)
        for h, data in enumerate(raw)
        for k, tx in enumerate(Block.from_bytes(data).txs)
        if tx.envelope.header.type == "evaluation"
    )
    block = Block.from_bytes(raw[height])
    tx = block.txs[k]
    assert tx.payload is not None
    forged = tx.payload.replace(b"accuracy\xcb", b"accuracy\xcb\x3f\xef", 1)[: len(tx.payload)]
    assert forged != tx.payload
    txs = list(block.txs)
    txs[k] = Transaction(tx.header_bytes, tx.signature, forged)
    bad = Block(block.height, block.prev_hash, block.tx_root, block.timestamp, tuple(txs))
    await _tamper(store, height, bad.to_bytes())
    raw = await store.read(0)
    for report in (verify(raw, run.roster), audit(raw, run.roster)):
        assert not report.ok
        assert report.problem is not None
        assert report.problem.startswith(f"block {height}"), report.problem
        assert f"transaction {k}" in report.problem
    # a consistent-looking rebuild (new root) breaks the link of the next block instead
    rebuilt = Block.build(block.height, block.prev_hash, block.timestamp, txs)
    await _tamper(store, height, rebuilt.to_bytes())
    report = verify(await store.read(0), run.roster)
    assert report.problem is not None and f"block {height}" in report.problem


async def test_an_export_verifies_like_the_store(
    run: RecordedRun, store: BlockStore, tmp_path: Path
) -> None:
    node = await writer(run, store, tmp_path)
    await submit_all(node, run.envelopes[:20])
    path = tmp_path / "ledger.export"
    assert write_export(path, await store.read(0)) == node.state.height + 1
    assert verify(read_export(path), run.roster).ok
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(WireError, match="truncated"):
        verify(read_export(path), run.roster)


async def test_a_roster_change_by_the_admin_admits_a_new_member(
    run: RecordedRun, store: BlockStore, tmp_path: Path
) -> None:
    node = await writer(run, store, tmp_path)
    admin = run.identities[ADMIN_ID]
    newcomer = Identity.generate(42)
    attest = Attestation("hello", bytes(32), b"")
    before = envelope.sign(newcomer, "simulation", attest, prev=GENESIS).to_bytes()
    grown = Roster("simulation", [*run.roster.values(), Member(newcomer.public, Role.USER)])
    moved = Roster("elsewhere", list(grown.values()))
    change = envelope.sign(admin, "simulation", RosterChange(grown.to_toml()), prev=GENESIS)
    bad = envelope.sign(
        admin, "simulation", RosterChange(moved.to_toml()), prev=change.hash
    ).to_bytes()
    not_admin = envelope.sign(
        run.identities[3], "simulation", RosterChange(grown.to_toml()), prev=GENESIS
    ).to_bytes()
    outcomes = await submit_all(node, [before, not_admin, change.to_bytes(), bad, before])
    reasons = [o.reason if isinstance(o, Refused) else None for o in outcomes]
    assert reasons == [
        RefusalReason.UNKNOWN_SENDER,  # not yet a member
        RefusalReason.ROLE_NOT_ALLOWED,  # only the admin changes the roster
        None,
        RefusalReason.WRONG_TASK,  # a roster may not move the ledger to another task
        None,  # the same attestation, now from a member
    ]
    assert 42 in node.state.roster
    raw = await store.read(0)
    assert verify(raw, run.roster).ok  # verify applies the change as it comes
    assert audit(raw, run.roster).ok


async def test_dropouts_commit_and_a_closed_attempt_takes_no_more_uploads(tmp_path: Path) -> None:
    """A run with a dropout in negotiation (regrouped: the new announcement names the
    known groups) and one after an upload (finished on the complete groups: the
    evaluation covers only those, and Alg. 6 is re-derived on them) commits whole; an
    upload for the closed attempt is refused."""
    plans = (DropoutPlan(1, 4, "negotiation"), DropoutPlan(2, 5, "upload"))
    run = record_run(rounds=2, dropouts=plans)
    node = await writer(run, SqliteStore(tmp_path / "l.sqlite"), tmp_path)
    outcomes = await submit_all(node, run.envelopes)
    refused = [o for o in outcomes if isinstance(o, Refused)]
    assert not refused, refused[:3]
    assert node.state.rounds[2].closed and node.state.rounds[2].evaluation is not None
    record = node.state.rounds[2]
    user = next(m for g in record.announce.groups for m in g.members if m != 5)
    gid = next(g.gid for g in record.announce.groups if user in g.members)
    late = envelope.sign(
        run.identities[user],
        run.roster.task,
        MaskedUpload(gid, 1, bytes(4)),
        prev=node.state.head(user),
        round=2,
        attempt=record.attempt,
    )
    outcome = (await submit_all(node, [late.to_bytes()]))[0]
    assert isinstance(outcome, Refused) and outcome.reason is RefusalReason.OUT_OF_ORDER
