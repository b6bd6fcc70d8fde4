"""The provider machine, driven directly: events in, outputs out, no transport, no
training. Every transaction it emits goes through the ledger's validation state machine
(an :class:`~fairbus.ledger.inprocess.InProcessLedger`), which must admit it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pytest

from fairbus import envelope
from fairbus.aggregation import GroupModel, UndefendedFedAvg
from fairbus.envelope import GENESIS
from fairbus.exposure import exposing_sets
from fairbus.field import FixedPointCodec, sum_vectors
from fairbus.ledger.recorded import Recorded, open_recorded
from fairbus.protocol.events import (
    GLOBAL_MODEL,
    PROVIDER,
    USERS,
    ChainHead,
    CloseAttempt,
    Commit,
    Dropped,
    Evaluate,
    Evaluated,
    Event,
    Joined,
    Received,
    Refused,
    RoundDone,
    RoundFailed,
    Send,
    StartRound,
    Tick,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig, ProviderPhase
from fairbus.roster import Roster
from fairbus.wire.messages import (
    Announce,
    Attestation,
    Dropout,
    GlobalModel,
    MaskedUpload,
    TaskStart,
)
from tests.support_machines import (
    FORGERIES,
    LEDGER_ID,
    PROVIDER_ID,
    TASK,
    Driver,
    Target,
    Task,
    count,
    delta,
    forge,
    initial_model,
    kinds,
    make_task,
    of_type,
    receipted,
)


def _phase(task: Task) -> ProviderPhase:
    return task.provider.phase


def _announce(data: bytes, roster: Roster) -> Announce:
    message = open_recorded(data, roster).message
    assert isinstance(message, Announce)
    return message


@pytest.mark.parametrize("n", [3, 4, 6])
def test_a_whole_round_driven_by_hand(n: int) -> None:
    """StartRound → task start, global model, announcement → users deal sealed shares →
    Trained → signed, chained uploads → the provider decrypts each group (Evaluate) →
    Evaluated → evaluation and decision → RoundDone; each group's decrypted sum is the sum
    of its members' plaintext encodings, bit for bit."""
    task = make_task(n, config=ProviderConfig(keying="shamir"))  # Alg. 3's shares
    provider, ledger, users, roster = task.provider, task.ledger, task.users, task.roster

    start = provider.handle(StartRound(0.0))
    assert kinds(start) == ["Commit:task_start", "Commit:global_model", "Commit:announce"]
    assert all(isinstance(c, Commit) and c.to == USERS for c in start)
    assert (provider.phase, provider.round, provider.attempt) == (ProviderPhase.COLLECTING, 1, 0)
    broadcasts = [(c.kind, ledger.commit(c.envelope)) for c in of_type(start, Commit)]
    assert ledger.height == 2
    assert open_recorded(broadcasts[0][1], roster).message == provider.config.task.to_message()
    model = open_recorded(broadcasts[1][1], roster).message
    assert isinstance(model, GlobalModel)
    assert np.array_equal(np.frombuffer(model.data, "<f4"), initial_model())
    announce = _announce(broadcasts[2][1], roster)
    groups = {g.gid: g.members for g in announce.groups}
    assert {u for members in groups.values() for u in members} == set(users)
    assert all(len(members) >= 3 for members in groups.values())

    # The users take the recorded broadcasts: train once, deal a share to every other
    # member of each of their groups (Alg. 3, lines 2-4), upload nothing yet.
    inbox: dict[int, list[Event]] = {u: [] for u in users}
    trains: dict[int, Train] = {}
    for u, machine in users.items():
        out = [o for kind, data in broadcasts for o in machine.handle(Received(kind, data))]
        assert kinds(out).count("Train") == 1 and not count(out, Commit, Refused)
        trains[u] = of_type(out, Train)[0]
        assert trains[u].round == 1 and np.array_equal(trains[u].global_params, initial_model())
        joined = [members for members in groups.values() if u in members]
        want = sorted((v, "share") for members in joined for v in members if v != u)
        sends = [(s.to, s) for s in of_type(out, Send) if isinstance(s.to, int)]
        assert sorted((to, s.kind) for to, s in sends) == want
        for to, s in sends:
            inbox[to].append(Received(s.kind, s.data))

    # Shares in, summed shares out (lines 7-8), until the keys are derived (lines 11-12).
    summed = 0
    while any(inbox.values()):
        later: dict[int, list[Event]] = {u: [] for u in users}
        for u, events in inbox.items():
            for event in events:
                out = users[u].handle(event)
                assert kinds(out) == ["Send:summed_share"] * len(out), kinds(out)
                summed += len(out)
                for s in of_type(out, Send):
                    assert isinstance(s.to, int)
                    later[s.to].append(Received(s.kind, s.data))
        inbox = later
    assert summed == sum(len(m) * (len(m) - 1) for m in groups.values())

    # Trained: one masked upload per group, signed and chained, to the provider.
    models = {u: (trains[u].global_params + delta(u, 1)).astype(np.float32) for u in users}
    uploads = []
    for u in users:
        out = users[u].handle(Trained(1, models[u]))
        commits = of_type(out, Commit)
        assert kinds(out) == ["Commit:upload"] * len(out) and commits
        mine = sorted(g for g, members in groups.items() if u in members)
        assert sorted(c.envelope.header.group or 0 for c in commits) == mine
        prev = GENESIS
        for c in commits:
            header = c.envelope.header
            assert (c.to, header.sender, header.round, header.attempt) == (PROVIDER, u, 1, 0)
            assert header.prev == prev
            prev = c.envelope.hash
        uploads += commits

    # The provider takes each upload with its receipt; a complete group is decrypted.
    evaluates: list[Evaluate] = []
    for c in uploads:
        out = provider.handle(Received("upload", ledger.commit(c.envelope)))
        assert not of_type(out, Refused), out
        evaluates += of_type(out, Evaluate)
        assert provider.chain_head(c.envelope.header.sender) == c.envelope.hash
    assert provider.phase is ProviderPhase.EVALUATING
    assert sorted(e.gid for e in evaluates) == sorted(groups)
    for e in evaluates:
        plain = np.mean([models[u].astype(np.float64) for u in groups[e.gid]], axis=0)
        np.testing.assert_allclose(e.params, plain, rtol=0, atol=2**-16)

    out = []
    for e in evaluates:
        out += provider.handle(Evaluated(1, 0, e.gid, 0.9))
    assert kinds(out) == ["Commit:evaluation", "Commit:decision", "RoundDone"]
    for c in of_type(out, Commit):
        ledger.commit(c.envelope)  # the ledger re-derives the decision (Alg. 6)
    done = of_type(out, RoundDone)[0]
    assert _phase(task) is ProviderPhase.IDLE
    assert (done.round, done.attempts) == (1, 1) and not done.dropped and not done.violators
    codec = FixedPointCodec(announce.frac_bits)
    means = {e.gid: e.params for e in evaluates}
    for g in done.groups:
        members = groups[g.gid]
        encodings = [codec.encode(models[u], summands=len(members)) for u in members]
        assert np.array_equal(g.field_sum, sum_vectors(encodings))
        assert np.array_equal(g.mean, means[g.gid])
    assert done.global_params.shape == initial_model().shape
    assert not np.array_equal(done.global_params, initial_model())


def test_rounds_chain_the_global_model_through_the_ledger() -> None:
    """Three rounds: each starts from the model the previous one aggregated (here the
    undefended average of the basic groups: the mean of every user's model)."""
    task = make_task(6, config=ProviderConfig(strategy=UndefendedFedAvg()))
    driver = Driver(task)
    previous = initial_model()
    for r in (1, 2, 3):
        since = len(driver.log)
        done = driver.play_round(float(r))
        trains = of_type(driver.outputs(since=since), Train)
        assert len(trains) == 6 and all(np.array_equal(t.global_params, previous) for t in trains)
        want = np.mean([driver.models[u, r].astype(np.float64) for u in task.users], axis=0)
        np.testing.assert_allclose(done.global_params, want, rtol=0, atol=2**-15)
        previous = done.global_params
    assert driver.refusals() == []
    # task_start only once; the provider's transactions form one chain on the ledger
    assert len(driver.commits("task_start")) == 1 and len(driver.commits("decision")) == 3
    last = of_type(driver.outputs(PROVIDER), Commit)[-1]
    assert task.ledger.head(PROVIDER_ID) == last.envelope.hash


def _holding_uploads(target: Target, event: Event) -> bool:
    return target == PROVIDER and isinstance(event, Received) and event.kind == "upload"


@pytest.mark.parametrize("how", sorted(FORGERIES))
def test_an_upload_without_a_valid_receipt_is_refused_and_changes_nothing(how: str) -> None:
    task = make_task(6)
    driver = Driver(task, hold=_holding_uploads)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    assert len(driver.held) == len(driver.commits("upload")) > 1
    first, second = (e for _, e in driver.held[:2])
    assert isinstance(first, Received) and isinstance(second, Received)
    sender = Recorded.from_bytes(first.data).envelope.header.sender
    forged = forge(how, first.data, second.data, task)
    out = task.provider.handle(Received("upload", forged))
    assert [(type(o).__name__, getattr(o, "reason", "")) for o in out] == [
        ("Refused", FORGERIES[how])
    ]
    assert task.provider.chain_head(sender) == GENESIS
    assert task.provider.phase is ProviderPhase.COLLECTING

    driver.release()  # the real uploads, with their receipts: the round completes
    done = driver.round_done()
    assert driver.refusals() == [] and len(done.groups) == len(_announce_of(driver, 0).groups)
    assert task.provider.chain_head(sender) == task.ledger.head(sender)


def test_a_second_delivery_of_an_upload_is_ignored() -> None:
    """MQTT's QoS 1 delivers at least once (and a persistent session again after a
    restart): the same recorded upload twice changes nothing and is not an error."""
    task = make_task(6)
    driver = Driver(task, hold=_holding_uploads)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    _, first = driver.held[0]
    assert isinstance(first, Received)
    assert not of_type(task.provider.handle(first), Refused)
    sender = Recorded.from_bytes(first.data).envelope.header.sender
    head = task.provider.chain_head(sender)
    assert task.provider.handle(first) == []
    assert task.provider.chain_head(sender) == head
    driver.release(lambda t, e: e is not first)
    assert driver.round_done().round == 1 and driver.refusals() == []


def test_start_round_while_a_round_runs_is_refused() -> None:
    task = make_task(6)
    driver = Driver(task)
    driver.handle(PROVIDER, StartRound(0.0))
    height = task.ledger.height
    again = task.provider.handle(StartRound(1.0))
    assert [(type(o).__name__, getattr(o, "reason", "")) for o in again] == [
        ("Refused", "RoundInProgress")
    ]
    assert (task.provider.round, task.provider.attempt) == (1, 0)
    assert task.ledger.height == height
    driver.pump()
    assert driver.round_done().round == 1
    assert driver.play_round(2.0).round == 2
    assert driver.refusals() == []


def test_a_receipted_upload_moves_the_providers_view_of_a_users_chain() -> None:
    """User 1's chain grew on the ledger where the provider did not see it (here a
    recorded attestation; in practice an upload committed while the provider was down):
    its next upload carries a receipt, so the ledger took that link; the provider's view
    moves to it (a ChainHead from the ledger does the same)."""
    task = make_task(6)
    driver = Driver(task)
    driver.play_round(0.0)
    user = task.identities[1]
    seen = task.ledger.head(1)
    assert task.provider.chain_head(1) == seen
    attestation = Attestation("note", bytes(32), b"")
    signed = envelope.sign(user, task.roster.task, attestation, prev=seen)
    task.ledger.commit(signed)
    back = task.ledger.head(1)
    assert back == signed.hash
    driver.handle(1, ChainHead(1, back))  # the user resumes from the ledger's head
    driver.hold = _holding_uploads
    since = len(driver.log)
    driver.handle(PROVIDER, StartRound(1.0))
    driver.pump()
    mine = [
        e
        for _, e in driver.held
        if isinstance(e, Received) and Recorded.from_bytes(e.data).envelope.header.sender == 1
    ]
    assert mine
    assert task.provider.handle(ChainHead(1, seen)) == []  # a stale view, as after a restart
    assert task.provider.handle(mine[0]) == []
    upload = Recorded.from_bytes(mine[0].data).envelope
    assert task.provider.chain_head(1) == upload.hash
    assert task.provider.handle(mine[0]) == []  # delivered again: nothing new
    driver.release(lambda t, e: e is not mine[0])  # the others: the round completes
    assert driver.round_done(since).round == 2
    assert [r.reason for _, r in driver.refusals()] == []


def test_presence_decides_who_takes_part_in_the_next_round() -> None:
    # one focus group per key user: this test is about presence, not grouping's search
    task = make_task(6, online={1, 2, 3, 4, 5}, config=ProviderConfig(key_repeats=1))
    driver = Driver(task, online={1, 2, 3, 4, 5})

    def grouped(done: RoundDone) -> set[int]:
        return {u for g in done.groups for u in g.members}

    assert grouped(driver.play_round(0.0)) == {1, 2, 3, 4, 5}
    assert driver.handle(PROVIDER, Joined(6)) == []
    driver.online.add(6)
    for outsider in (PROVIDER_ID, LEDGER_ID, 999):  # not users: never grouped
        out = driver.handle(PROVIDER, Joined(outsider))
        assert [(type(o).__name__, getattr(o, "reason", "")) for o in out] == [
            ("Refused", "NotAUser")
        ]
    assert grouped(driver.play_round(1.0)) == {1, 2, 3, 4, 5, 6}
    assert driver.handle(PROVIDER, Dropped(3)) == []  # between rounds: nothing to void
    driver.online.discard(3)
    done = driver.play_round(2.0)
    assert grouped(done) == {1, 2, 4, 5, 6} and done.attempts == 1
    assert [r.reason for _, r in driver.refusals()] == ["NotAUser"] * 3
    # the users ignore presence: it is the provider's business
    for event in (Joined(3), Dropped(2), Tick(5.0)):
        assert task.users[1].handle(event) == []


@pytest.mark.parametrize("when", ["negotiation", "upload"])
def test_a_dropout_closes_the_attempt_and_the_round_completes_without_the_user(
    when: str,
) -> None:
    """Dropped while uploads are collected: a recorded dropout, CloseAttempt, and — from
    what the ledger recorded — a regrouping of the survivors (whose announcement names
    the complete groups of the closed attempt) or the round on its complete groups."""
    task = make_task(6)

    def hold(target: Target, event: Event) -> bool:
        return when == "upload" and target == 6 and isinstance(event, Trained)

    driver = Driver(task, hold=hold)
    driver.handle(PROVIDER, StartRound(0.0))
    if when == "upload":
        driver.pump()  # everyone but user 6 uploads
        assert task.provider.phase is ProviderPhase.COLLECTING
    out = driver.handle(PROVIDER, Dropped(6))
    assert kinds(out) == ["Commit:dropout", "CloseAttempt"]
    body = envelope.verify(of_type(out, Commit)[0].envelope, task.roster).message
    assert isinstance(body, Dropout) and body.users == (6,)
    assert of_type(out, CloseAttempt)[0] == CloseAttempt(1, 0)
    assert task.provider.phase is ProviderPhase.REGROUPING
    driver.online.discard(6)
    driver.pump()

    done = driver.round_done()
    assert done.dropped == {6} and all(6 not in g.members for g in done.groups)
    assert driver.refusals() == []
    recorded = task.ledger.uploads(1, 0)
    if when == "negotiation":
        assert recorded == frozenset() and done.attempts == 2
    complete = {
        g.members
        for g in _announce_of(driver, attempt=0).groups
        if all((g.gid, m) in recorded for m in g.members)
    }
    if done.attempts == 2:
        assert complete <= set(_announce_of(driver, attempt=1).prior_groups)
    else:  # no grouping of the survivors passes the exposure check
        assert {g.members for g in done.groups} <= complete


def _announce_of(driver: Driver, attempt: int) -> Announce:
    for c in driver.commits("announce"):
        if c.envelope.header.attempt == attempt:
            message = envelope.verify(c.envelope, driver.task.roster).message
            assert isinstance(message, Announce)
            return message
    raise AssertionError(f"no announcement of attempt {attempt}")


def _silent(driver: Driver, hang: Callable[[Target, Event], bool]) -> RoundDone:
    """Round 1 with user 6 hanging as ``hang`` says, until the provider's deadline."""
    task = driver.task
    driver.hold = hang
    driver.handle(PROVIDER, StartRound(100.0))
    driver.pump()
    assert task.provider.phase is ProviderPhase.COLLECTING
    assert driver.handle(PROVIDER, Tick(129.0)) == []  # phase_timeout is 30 s
    out = driver.handle(PROVIDER, Tick(131.0))
    assert kinds(out) == ["Commit:dropout", "CloseAttempt"]
    driver.online.discard(6)
    driver.pump()
    return driver.round_done()


def test_a_user_silent_past_the_deadline_is_dropped() -> None:
    """User 6 negotiates its keys but never uploads (it hangs in training)."""
    driver = Driver(make_task(6, config=ProviderConfig(phase_timeout=30.0)))
    done = _silent(driver, lambda target, event: target == 6 and isinstance(event, Trained))
    assert done.dropped == {6} and all(6 not in g.members for g in done.groups)
    assert driver.refusals() == []


def test_a_user_that_hangs_before_dealing_shares_is_dropped_alone() -> None:
    """User 6 takes nothing in: its group mates derive no key for the groups they share
    with it and upload only to their others. At the deadline only user 6, who uploaded
    nothing, is late; its mates stay online and take part in the next attempt."""
    task = make_task(9, config=ProviderConfig(phase_timeout=30.0))
    driver = Driver(task)
    done = _silent(driver, lambda target, event: target == 6)
    assert done.dropped == {6}
    assert task.provider.online == {1, 2, 3, 4, 5, 7, 8, 9}
    (dropout,) = driver.commits("dropout")
    body = envelope.verify(dropout.envelope, task.roster).message
    assert isinstance(body, Dropout) and body.users == (6,)


def test_at_the_deadline_a_user_that_uploaded_to_some_of_its_groups_is_late_for_the_rest() -> None:
    """Every member of the incomplete groups uploaded somewhere: those who did not upload
    to them are late (the deadline still ends the attempt)."""
    task = make_task(9, config=ProviderConfig(phase_timeout=30.0))
    driver = Driver(task)
    seen: list[int] = []

    def hang(target: Target, event: Event) -> bool:
        # the provider receives user 6's first upload only (6 hung after it)
        if target != PROVIDER or not isinstance(event, Received) or event.kind != "upload":
            return False
        if Recorded.from_bytes(event.data).envelope.header.sender != 6:
            return False
        seen.append(6)
        return len(seen) > 1

    done = _silent(driver, hang)
    assert len(seen) > 1  # user 6 is in more than one group
    assert done.dropped == {6}
    assert task.provider.online == {1, 2, 3, 4, 5, 7, 8, 9}


def test_the_task_start_records_the_configured_parameters_once() -> None:
    config = ProviderConfig(seed=3)
    task = make_task(3, config=config)
    driver = Driver(task)
    driver.play_round(0.0)
    driver.play_round(1.0)
    (start,) = driver.commits("task_start")
    body = envelope.verify(start.envelope, task.roster).message
    assert isinstance(body, TaskStart) and body == config.task.to_message()
    assert start.envelope.header.prev == GENESIS
    assert task.ledger.state.task == config.task


@pytest.mark.parametrize(
    "event", [Joined(999), Dropped(999), Dropped(PROVIDER_ID), Joined(LEDGER_ID)]
)
def test_presence_of_someone_who_is_not_a_user_is_refused_mid_round(event: Event) -> None:
    """Presence for an id that is not a user of the roster (999, the provider, a ledger
    node) is refused and changes nothing: no dropout, the round completes."""
    task = make_task(6)
    driver = Driver(task, hold=_holding_uploads)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    online = set(task.provider.online)
    out = task.provider.handle(event)
    assert [(type(o).__name__, getattr(o, "reason", "")) for o in out] == [("Refused", "NotAUser")]
    assert task.provider.online == online and task.provider.phase is ProviderPhase.COLLECTING
    driver.release()
    done = driver.round_done()
    assert done.attempts == 1 and not done.dropped and driver.refusals() == []


def _upload(task: Task, user: int, group: int, length: int = 10) -> bytes:
    """A masked upload ``user`` signs on top of its chain head, receipted directly by the
    ledger node (the ledger itself would refuse it)."""
    body = MaskedUpload(group, length, bytes(4 * length))
    head = task.provider.chain_head(user)
    env = envelope.sign(task.identities[user], TASK, body, prev=head, round=1, attempt=0)
    return receipted(env, task.node)


@pytest.mark.parametrize("case", ["no such group", "not its group", "a second upload"])
def test_an_upload_the_ledger_would_never_record_is_refused_and_changes_nothing(
    case: str,
) -> None:
    task = make_task(6)
    driver = Driver(task, hold=_holding_uploads)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    announce = _announce_of(driver, 0)
    user = 1
    mine = [g.gid for g in announce.groups if user in g.members]
    if case == "no such group":
        gid = 999
    elif case == "not its group":
        gid = next(g.gid for g in announce.groups if user not in g.members)
    else:  # user 1's first real upload arrives, then another one to the same group
        first = next(
            e
            for _, e in driver.held
            if isinstance(e, Received)
            and Recorded.from_bytes(e.data).envelope.header.sender == user
        )
        assert not of_type(task.provider.handle(first), Refused)
        driver.held = [(t, e) for t, e in driver.held if e is not first]
        gid = Recorded.from_bytes(first.data).envelope.header.group or 0
        assert gid in mine
    head = task.provider.chain_head(user)
    out = task.provider.handle(Received("upload", _upload(task, user, gid)))
    assert [(type(o).__name__, getattr(o, "reason", "")) for o in out] == [
        ("Refused", "GroupingError")
    ]
    assert task.provider.chain_head(user) == head  # nothing changed: the chain neither
    driver.release()  # the real uploads: the round completes
    done = driver.round_done()
    assert done.attempts == 1 and not done.dropped and driver.refusals() == []


def test_an_upload_of_the_wrong_length_is_refused() -> None:
    """The ledger records an upload's header only, so it may hold one of the wrong
    length: the provider refuses it (and continues the sender's chain from it)."""
    task = make_task(6)
    driver = Driver(task, hold=_holding_uploads)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    announce = _announce_of(driver, 0)
    gid = next(g.gid for g in announce.groups if 1 in g.members)
    out = task.provider.handle(Received("upload", _upload(task, 1, gid, length=9)))
    assert [(type(o).__name__, getattr(o, "reason", "")) for o in out] == [
        ("Refused", "GroupingError")
    ]
    assert task.provider.phase is ProviderPhase.COLLECTING


@dataclass(frozen=True)
class KeepsTheModel:
    """A test strategy: the global model never changes (as when no group is clean)."""

    secure: ClassVar[bool] = True

    def aggregate(
        self,
        current: npt.NDArray[np.float32],
        groups: Sequence[GroupModel],
        violators: Iterable[int],
    ) -> npt.NDArray[np.float32]:
        return current


def test_a_round_from_the_same_global_model_counts_the_earlier_rounds_sums() -> None:
    """Issue 12, item 5: round 2 starts from round 1's model, so users may train the
    same models again; its grouping counts round 1's groups (the ledger refuses one that
    leaves them out), and where none passes the round fails rather than expose anyone."""
    config = ProviderConfig(strategy=KeepsTheModel(), key_repeats=2, seed=4)
    driver = Driver(make_task(12, config=config))
    first = driver.play_round(0.0)
    earlier = {g.members for g in first.groups}
    since = len(driver.log)
    driver.handle(PROVIDER, StartRound(1.0))
    driver.pump()
    failed = of_type(driver.outputs(PROVIDER, since), RoundFailed)
    announced = [_announcement(driver, c) for c in driver.commits("announce")][1:]
    if failed:
        assert not announced and "keeps every model hidden" in failed[0].reason
        return
    (second,) = announced
    assert earlier <= set(second.prior_groups)
    groups = [*earlier, *(g.members for g in second.groups)]
    assert exposing_sets(groups, range(1, 13), c=1) == []
    assert driver.refusals() == []


def _announcement(driver: Driver, commit: Commit) -> Announce:
    message = envelope.verify(commit.envelope, driver.task.roster).message
    assert isinstance(message, Announce)
    return message


def test_when_no_grouping_of_all_survivors_is_safe_some_sit_the_attempt_out() -> None:
    """A dropout after one upload in each of two basic groups (and none complete): their
    sums may be known (each member counts the groups it uploaded to), so a partition of
    all eight survivors would give the sum of the two users left in the dropout's basic
    group. Rather than fail the round — whose global model a later round would repeat,
    with the same known groups, for ever — the next attempt leaves the fewest users out
    that makes a safe grouping, and the round completes."""
    driver = Driver(make_task(9), hold=lambda target, event: isinstance(event, Trained))
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    first = _announce_of(driver, attempt=0)
    g1, g2, g3 = [g.members for g in first.groups if g.kind == "basic"][:3]
    driver.release(lambda target, event: target in (g1[0], g2[0]))
    victim = g3[0]
    driver.online.discard(victim)
    driver.handle(PROVIDER, Dropped(victim))
    driver.pump()
    second = _announce_of(driver, attempt=1)
    assert {g1, g2} <= set(second.prior_groups)
    grouped = {m for g in second.groups for m in g.members}
    survivors = set(range(1, 10)) - {victim}
    assert grouped < survivors  # someone sits out
    groups = [*second.prior_groups, *(g.members for g in second.groups)]
    assert exposing_sets(groups, range(1, 10), c=1) == []
    driver.release()
    done = driver.round_done()
    assert done.attempts == 2 and {m for g in done.groups for m in g.members} == grouped
    assert driver.refusals() == []


def test_a_second_dropout_after_a_finish_on_complete_groups_counts_every_known_group() -> None:
    """Issue 14's prior-groups regression. Two basic groups complete on the ledger, but
    the uploads of one member of each have not reached the provider. The first of them
    drops: no grouping of the survivors passes the check, so the round goes on with the
    complete groups the provider holds or will. Then the second drops and the round
    fails. What the provider counts as known must be every group of the attempt whose
    sum the ledger holds — also the one the finish left out: the next round, from the
    same global model, must name it, or the ledger refuses its announcement (this
    Driver raises on a refusal)."""
    task = make_task(9)
    driver = Driver(task, hold=lambda target, event: isinstance(event, Trained))
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    g1, g2, _ = [g.members for g in _announce_of(driver, attempt=0).groups if g.kind == "basic"][:3]
    victim, late = g2[0], g1[0]

    def undelivered(target: Target, event: Event) -> bool:
        if target != PROVIDER or not isinstance(event, Received) or event.kind != "upload":
            return False
        return Recorded.from_bytes(event.data).envelope.header.sender in (victim, late)

    driver.hold = undelivered  # recorded on the ledger, not yet at the provider
    driver.release(lambda target, event: target in (*g1, *g2))
    driver.online.discard(victim)
    driver.handle(PROVIDER, Dropped(victim))
    driver.pump()
    assert len(driver.commits("announce")) == 1, "the survivors could be regrouped"
    assert task.provider.phase is ProviderPhase.COLLECTING  # on the complete groups
    assert g2 not in {g.members for g in task.provider.grouping.groups}  # type: ignore[union-attr]
    driver.online.discard(late)
    driver.handle(PROVIDER, Dropped(late))
    driver.pump()
    assert of_type(driver.outputs(PROVIDER), RoundFailed)
    driver.held = []
    driver.hold = lambda target, event: False
    driver.handle(PROVIDER, StartRound(1.0))  # round 2, from the same global model
    driver.pump()
    second = [_announcement(driver, c) for c in driver.commits("announce")][1:]
    assert second and g2 in second[0].prior_groups


def test_near_chance_the_provider_asks_for_the_global_models_rank_before_it_finishes() -> None:
    """With ``rank_below`` and τ below it, the round's contributions need the global
    model's rank (issue 13): once every group's accuracy is in, the provider asks for an
    evaluation of the round's global model (gid ``GLOBAL_MODEL``), once, and records the
    evaluation only when it comes. An answer it did not ask for changes nothing; with τ
    at or above ``rank_below`` it never asks."""
    detection = replace(ProviderConfig().detection, rank_below=0.35)
    task = make_task(6, config=ProviderConfig(detection=detection))
    assert task.provider.handle(Evaluated(1, 0, GLOBAL_MODEL, 0.1, 4.0)) == []
    driver = Driver(task, accuracy=lambda e: 0.1, rank=lambda e: 4.0)
    done = driver.play_round()
    log = driver.outputs(PROVIDER)
    asks = [k for k, o in enumerate(log) if isinstance(o, Evaluate) and o.gid == GLOBAL_MODEL]
    assert len(asks) == 1
    ask = log[asks[0]]
    assert isinstance(ask, Evaluate) and np.array_equal(ask.params, initial_model())
    groups = [k for k, o in enumerate(log) if isinstance(o, Evaluate) and o.gid != GLOBAL_MODEL]
    evaluation = [k for k, o in enumerate(log) if isinstance(o, Commit) and o.kind == "evaluation"]
    assert max(groups) < asks[0] < evaluation[0]
    assert done.round == 1 and _phase(task) is ProviderPhase.IDLE
    assert task.provider.handle(Evaluated(1, 0, GLOBAL_MODEL, 0.1, 4.0)) == []

    learnt = Driver(make_task(6, config=ProviderConfig(detection=detection)))  # accuracy 0.9
    learnt.play_round()
    assert not [o for o in of_type(learnt.outputs(PROVIDER), Evaluate) if o.gid == GLOBAL_MODEL]
