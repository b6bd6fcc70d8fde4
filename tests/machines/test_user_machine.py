"""The user machine, driven directly: events in, outputs out, no transport, no training.

Broadcasts reach it as the ledger delivers them (Recorded bytes: the envelope and a
ledger node's receipt); where a test needs a transaction the ledger itself would refuse,
it signs the receipt directly with the ledger node's identity, which tests the user's own
check as defence in depth."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS, SignedEnvelope
from fairbus.errors import GroupingError, ReplayError
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import (
    PROVIDER,
    ChainHead,
    Commit,
    Dropped,
    Evaluated,
    Event,
    Excluded,
    Joined,
    Received,
    Refused,
    Send,
    StartRound,
    Tick,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig
from fairbus.protocol.user import UserPhase, model_digest
from fairbus.sealed import SealContext, open_share
from fairbus.task import TaskParams
from fairbus.wire.messages import Announce, Decision, GlobalModel, GroupSpec, Message
from tests.support_machines import (
    FORGERIES,
    TASK,
    Driver,
    Target,
    Task,
    count,
    forge,
    kinds,
    make_task,
    of_type,
    receipted,
)

BROADCASTS = ("global_model", "announce")

ALG3 = ProviderConfig(keying="shamir")
"""These tests follow Alg. 3's shares (the pairwise keying sends none)."""


def _reasons(outputs: Iterable[object]) -> list[str]:
    return [o.reason for o in outputs if isinstance(o, Refused)]


def test_a_user_plays_its_part_of_a_round() -> None:
    """Train once; a sealed share for every other member of each of its groups; the
    summed shares; then, given its model, one signed masked upload per group, chained
    (nine users: two basic groupings, so every user is in two groups)."""
    task = make_task(9, config=ALG3)
    me = 1

    def hold_trained(target: Target, event: Event) -> bool:
        return target == me and isinstance(event, Trained)

    driver = Driver(task, hold=hold_trained)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    out = driver.outputs(me)
    (train,) = of_type(out, Train)
    assert train.round == 1 and not count(out, Commit, Refused)
    announce = envelope.verify(driver.commits("announce")[0].envelope, task.roster).message
    assert isinstance(announce, Announce)
    mine = [g for g in announce.groups if me in g.members]
    others = sorted(v for g in mine for v in g.members if v != me)
    shares = [s for s in of_type(out, Send) if s.kind == "share"]
    summed = [s for s in of_type(out, Send) if s.kind == "summed_share"]
    assert sorted(int(s.to) for s in shares) == others == sorted(int(s.to) for s in summed)
    # sealed: only its recipient opens a share, and only for its round, attempt and group
    share = shares[0]
    assert isinstance(share.to, int)
    gid = next(g.gid for g in mine if share.to in g.members)
    context = SealContext(TASK, 1, 0, gid)
    opened = open_share(share.data, task.identities[share.to], task.roster, context)
    assert opened.sender == me and opened.share.values.shape == (10,)
    bystander = next(u for u in task.users if u not in (me, share.to))
    with pytest.raises(ReplayError):
        open_share(share.data, task.identities[bystander], task.roster, context)
    with pytest.raises(ReplayError):
        open_share(share.data, task.identities[share.to], task.roster, SealContext(TASK, 2, 0, gid))

    # No model yet: nothing uploaded. The model: one upload per group, chained.
    assert not driver.commits("upload", me)
    since = len(driver.log)
    driver.release()
    uploads = of_type(driver.outputs(me, since), Commit)
    assert [c.to for c in uploads] == [PROVIDER] * len(mine)
    assert sorted(c.envelope.header.group or 0 for c in uploads) == sorted(g.gid for g in mine)
    assert uploads[0].envelope.header.prev == GENESIS
    assert uploads[1].envelope.header.prev == uploads[0].envelope.hash
    assert task.ledger.head(me) == uploads[-1].envelope.hash
    assert driver.round_done().round == 1 and driver.refusals() == []
    assert task.users[me].phase is UserPhase.IDLE  # the decision ended its round


@pytest.mark.parametrize("kind", BROADCASTS)
@pytest.mark.parametrize("how", sorted(FORGERIES))
def test_a_broadcast_without_a_valid_receipt_is_refused_and_changes_nothing(
    kind: str, how: str
) -> None:
    task = make_task(6, config=ALG3)
    me = 1

    def hold(target: Target, event: Event) -> bool:
        return target == me and isinstance(event, Received) and event.kind in BROADCASTS

    driver = Driver(task, hold=hold)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()  # the others deal their shares; user 1 keeps those for later
    held = {e.kind: e for _, e in driver.held if isinstance(e, Received)}
    assert set(held) == set(BROADCASTS)
    other = "announce" if kind == "global_model" else "global_model"
    forged = forge(how, held[kind].data, held[other].data, task)
    machine = task.users[me]

    out = machine.handle(Received(kind, forged))
    assert _reasons(out) == [FORGERIES[how]] and len(out) == 1
    out = machine.handle(held[other])  # the real other half of the round's start
    assert not count(out, Train, Send, Refused)
    assert (machine.phase, machine.round, machine.attempt) == (UserPhase.IDLE, 0, -1)

    since = len(driver.log)
    driver.carry(me, machine.handle(held[kind]))  # the real one: now it starts
    assert kinds(driver.outputs(me, since)).count("Train") == 1
    driver.held = []
    driver.pump()
    assert driver.round_done().round == 1 and driver.refusals() == []


@pytest.mark.parametrize("resume_from", ["own head", "another user's head", None])
def test_chain_head_resumes_a_restarted_users_chain(resume_from: str | None) -> None:
    """A restarted user has forgotten its chain head; its next upload must link to what
    the ledger holds, or the ledger refuses it."""
    task = make_task(6, config=ALG3)
    driver = Driver(task)
    driver.play_round(0.0)
    head = task.ledger.head(1)
    assert head != GENESIS
    machine = task.restart_user(1)
    if resume_from == "own head":
        assert machine.handle(ChainHead(1, head)) == []
        assert machine.prev == head
    elif resume_from == "another user's head":
        assert machine.handle(ChainHead(2, task.ledger.head(2))) == []
        assert machine.prev == GENESIS  # another participant's head is not its own
    since = len(driver.log)
    if resume_from == "own head":
        assert driver.play_round(1.0).round == 2 and driver.refusals() == []
        first = of_type(driver.outputs(1, since), Commit)[0]
        assert first.kind == "upload" and first.envelope.header.prev == head
    else:
        with pytest.raises(RefusedError) as refused:
            driver.play_round(1.0)
        assert refused.value.reason is RefusalReason.STALE_PREV
        assert "participant 1's" in refused.value.detail


def _sign_with_receipt(task: Task, message: Message, prev: bytes, round: int = 1) -> bytes:
    env = envelope.sign(task.provider_identity, TASK, message, prev=prev, round=round, attempt=0)
    return receipted(env, task.node)


def test_a_decision_naming_the_user_excludes_it_for_good() -> None:
    task = make_task(6, config=ALG3)

    def hold_decisions(target: Target, event: Event) -> bool:
        return isinstance(event, Received) and event.kind == "decision"

    driver = Driver(task, hold=hold_decisions)
    driver.play_round(0.0)
    # A decision the ledger would not take (Alg. 6 did not name user 1), receipted directly.
    decision = Decision(0.5, (), (), (1,))
    data = _sign_with_receipt(task, decision, task.ledger.head(0))
    assert task.users[1].handle(Received("decision", data)) == [Excluded(1)]
    assert task.users[2].handle(Received("decision", data)) == []
    assert task.users[1].phase is UserPhase.EXCLUDED
    driver.held = []
    since = len(driver.log)
    driver.handle(PROVIDER, StartRound(1.0))  # the provider did not exclude 1: grouped …
    driver.pump()
    assert driver.outputs(1, since) == []  # … but it takes no further part
    assert len(driver.commits("announce")) == 2
    assert task.users[1].handle(Trained(2, np.zeros(10, np.float32))) == []


def test_user_ignores_what_is_not_its_business() -> None:
    machine = make_task(3, config=ALG3).users[1]
    for event in (Joined(2), Dropped(2), Tick(1.0), Evaluated(1, 0, 0, 0.5)):
        assert machine.handle(event) == []
    assert machine.handle(Trained(1, np.zeros(10, np.float32))) == []  # no round yet
    with pytest.raises(TypeError):
        machine.handle(StartRound(0.0))


def _start(task: Task, announce: Announce, params: np.ndarray) -> tuple[bytes, SignedEnvelope]:
    """Task start and global model through the ledger; the announcement signed on top."""
    ledger, provider = task.ledger, task.provider_identity
    start = envelope.sign(provider, TASK, TaskParams().to_message(), prev=GENESIS)
    ledger.commit(start)
    model = envelope.sign(
        provider, TASK, GlobalModel(params.size, params.tobytes()), prev=start.hash,
        round=1, attempt=0,
    )  # fmt: skip
    recorded_model = ledger.commit(model)
    signed = envelope.sign(provider, TASK, announce, prev=model.hash, round=1, attempt=0)
    return recorded_model, signed


def _announce(groups: Sequence[tuple[int, ...]], digest: bytes, size: int) -> Announce:
    specs = tuple(GroupSpec(k, "basic", g, None, len(g)) for k, g in enumerate(groups))
    return Announce(digest, size, 16, specs, (), (), (), 1.0, 1.0, 1)


def test_users_refuse_a_grouping_that_exposes_someone() -> None:
    task = make_task(5, config=ALG3)
    params = np.zeros(10, dtype=np.float32)
    # (1,2,3) − (1,2,4) − … : these four sums determine users 3, 4 and 5
    crafted = [(1, 2, 3), (1, 2, 4), (3, 4, 5), (1, 2, 5)]
    model, signed = _start(task, _announce(crafted, model_digest(params), 10), params)
    with pytest.raises(RefusedError) as refused:
        task.ledger.commit(signed)  # the ledger refuses it …
    assert refused.value.reason is RefusalReason.BAD_GROUPING
    announce = receipted(signed, task.node)  # … and so would a user, had a node taken it
    for u, machine in task.users.items():
        assert machine.handle(Received("global_model", model)) == []
        out = machine.handle(Received("announce", announce))
        assert _reasons(out) == [GroupingError.__name__], u
        assert not count(out, Send, Train)
        assert machine.phase is UserPhase.IDLE and machine.round == 0


def test_users_refuse_an_announcement_whose_model_hash_differs() -> None:
    task = make_task(3, config=ALG3)
    params = np.ones(10, dtype=np.float32)
    announce = _announce([(1, 2, 3)], model_digest(params + 1), 10)
    model, signed = _start(task, announce, params)
    recorded = task.ledger.commit(signed)  # the ledger does not compare the hash
    for u, machine in task.users.items():
        assert machine.handle(Received("global_model", model)) == []
        out = machine.handle(Received("announce", recorded))
        assert _reasons(out) == [GroupingError.__name__], u
        assert not count(out, Send, Train)
