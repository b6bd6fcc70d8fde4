"""What a user refuses from the provider: a malformed announcement (threshold, members,
group sizes, kinds), a global model of the wrong length, a grouping that exposes a model
once the groups this user itself uploaded to are counted. Each is a typed refusal that
changes nothing; the user then plays the real round to its end.

The bad broadcasts are signed by the provider and receipted directly by the ledger node
(:func:`~tests.support_machines.from_provider`): the ledger itself would refuse most of
them, so these test the user's own checks, as defence in depth."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from fairbus import envelope
from fairbus.errors import ReplayError
from fairbus.ledger.recorded import open_recorded
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.protocol.events import (
    PROVIDER,
    Commit,
    Event,
    Joined,
    Received,
    Refused,
    Send,
    StartRound,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig
from fairbus.protocol.user import UserPhase
from fairbus.sealed import SealContext, seal_share
from fairbus.shamir import Share
from fairbus.wire.messages import Announce, Dropout, GlobalModel, GroupSpec
from tests.support_machines import (
    LEDGER_ID,
    PROVIDER_ID,
    TASK,
    Driver,
    Target,
    Task,
    count,
    from_provider,
    make_task,
    of_type,
)

ME = 1


def _held_for(kinds: tuple[str, ...]) -> Callable[[Target, Event], bool]:
    def hold(target: Target, event: Event) -> bool:
        return target == ME and isinstance(event, Received) and event.kind in kinds

    return hold


def _round_with_held(task: Task, *kinds: str) -> tuple[Driver, dict[str, Received]]:
    """Round 1 started and pumped, with user 1's deliveries of ``kinds`` held back."""
    driver = Driver(task, hold=_held_for(kinds))
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    held = {e.kind: e for _, e in driver.held if isinstance(e, Received)}
    assert set(held) == set(kinds)
    return driver, held


def _announce(event: Received, task: Task) -> Announce:
    message = open_recorded(event.data, task.roster).message
    assert isinstance(message, Announce)
    return message


def _plays_the_real_round(driver: Driver) -> None:
    """Release what was held: user 1 takes its part and the round completes."""
    driver.release()
    done = driver.round_done()
    assert done.round == 1 and done.attempts == 1
    assert any(ME in g.members for g in done.groups)
    assert driver.refusals() == []


def _only_refusal(out: list[object], reason: str) -> Refused:
    assert len(out) == 1 and isinstance(out[0], Refused), out
    assert out[0].reason == reason, out[0]
    return out[0]


Mutation = Callable[[tuple[GroupSpec, ...]], tuple[GroupSpec, ...]]


def _first(change: Callable[[GroupSpec], GroupSpec]) -> Mutation:
    return lambda groups: (change(groups[0]), *groups[1:])


def _members(g: GroupSpec, members: tuple[int, ...]) -> GroupSpec:
    return dataclasses.replace(g, members=members, threshold=len(members))


MALFORMED: dict[str, tuple[Mutation, str]] = {
    "threshold 1 in a group": (
        _first(lambda g: dataclasses.replace(g, threshold=1)),
        "Shamir threshold 1",
    ),
    "threshold 2 in a group": (
        _first(lambda g: dataclasses.replace(g, threshold=2)),
        "Shamir threshold 2",
    ),
    "threshold above the group size": (
        _first(lambda g: dataclasses.replace(g, threshold=len(g.members) + 1)),
        "must equal the group size",
    ),
    "members unsorted": (
        _first(lambda g: dataclasses.replace(g, members=g.members[::-1])),
        "out of order",
    ),
    "a member twice": (  # the wire schema already refuses it (SchemaError)
        _first(lambda g: _members(g, tuple(sorted((*g.members, g.members[0]))))),
        "must be distinct",
    ),
    "unknown id 999": (
        _first(lambda g: _members(g, (*g.members[:-1], 999))),
        "[999], not users",
    ),
    "the provider as a member": (
        _first(lambda g: _members(g, (PROVIDER_ID, *g.members[1:]))),
        f"[{PROVIDER_ID}], not users",
    ),
    "the ledger node as a member": (
        _first(lambda g: _members(g, (*g.members[:-1], LEDGER_ID))),
        f"[{LEDGER_ID}], not users",
    ),
    "a group of two": (
        _first(lambda g: _members(g, g.members[:2])),
        "2 members, fewer than 3",
    ),
    "a focus group without its key user": (
        _first(
            lambda g: dataclasses.replace(
                g, kind="focus", focus=next(u for u in range(1, 7) if u not in g.members)
            )
        ),
        "does not contain its key user",
    ),
    "a focus group naming no key user": (
        _first(lambda g: dataclasses.replace(g, kind="focus", focus=None)),
        "does not contain its key user",
    ),
    "a basic group naming a focus user": (
        _first(lambda g: dataclasses.replace(g, kind="basic", focus=g.members[0])),
        "names a focus user",
    ),
    "two groups with one id": (
        lambda groups: (groups[0], dataclasses.replace(groups[1], gid=groups[0].gid)),
        "group ids repeat",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_announcement_is_refused_and_the_user_plays_the_real_round(
    case: str,
) -> None:
    task = make_task(6)
    driver, held = _round_with_held(task, "announce")
    machine = task.users[ME]
    real = _announce(held["announce"], task)
    mutate, why = MALFORMED[case]
    bad = dataclasses.replace(real, groups=mutate(real.groups))
    out = machine.handle(Received("announce", from_provider(task, bad)))
    reason = "SchemaError" if case == "a member twice" else "GroupingError"
    refused = _only_refusal(list(out), reason)
    assert why in refused.detail, refused.detail
    assert (machine.phase, machine.round, machine.attempt) == (UserPhase.IDLE, 0, -1)
    _plays_the_real_round(driver)


def test_the_provider_announces_every_threshold_equal_to_its_group_size() -> None:
    driver = Driver(make_task(6, config=ProviderConfig(key_repeats=2)))
    driver.play_round(0.0)
    driver.play_round(1.0)
    announcements = [_message(driver, c) for c in driver.commits("announce")]
    assert len(announcements) == 2
    for announce in announcements:
        assert all(g.threshold == len(g.members) for g in announce.groups)
    with pytest.raises(TypeError):  # there is no threshold to configure
        ProviderConfig(threshold=2)  # type: ignore[call-arg]


BAD_MODELS: dict[str, GlobalModel] = {
    "bytes not a whole number of values": GlobalModel(10, bytes(41)),
    "fewer bytes than the header says": GlobalModel(10, bytes(36)),
    "NaN in the model": GlobalModel(10, np.full(10, np.nan, dtype="<f4").tobytes()),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_global_model_of_the_wrong_length_is_refused(case: str) -> None:
    task = make_task(6)
    driver, _ = _round_with_held(task, "global_model", "announce")
    machine = task.users[ME]
    out = machine.handle(Received("global_model", from_provider(task, BAD_MODELS[case])))
    _only_refusal(list(out), "SchemaError")
    assert (machine.phase, machine.round) == (UserPhase.IDLE, 0)
    _plays_the_real_round(driver)


def test_an_announcement_naming_another_model_size_is_refused() -> None:
    task = make_task(6)
    driver, held = _round_with_held(task, "announce")
    machine = task.users[ME]
    real = _announce(held["announce"], task)
    bad = dataclasses.replace(real, model_params=real.model_params + 1)
    refused = _only_refusal(
        list(machine.handle(Received("announce", from_provider(task, bad)))), "GroupingError"
    )
    assert "model size" in refused.detail
    _plays_the_real_round(driver)


def test_an_announcement_that_omits_a_known_group_never_reaches_the_users() -> None:
    """Attempt 0: every group but user 7's completes (7 never uploads). An attempt 1 that
    leaves a complete group A out of ``prior_groups`` and groups A with one more user
    (whose model would be A ∪ {x} − A) is refused by the ledger, so no user ever gets a
    receipt for it; users rely on that check (they cannot tell a complete group from an
    incomplete one themselves)."""
    task = make_task(7)
    stuck = 7

    def hold(target: Target, event: Event) -> bool:
        return target == stuck and isinstance(event, Trained)

    driver = Driver(task, hold=hold)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    real = _message(driver, driver.commits("announce")[0])
    uploads = task.ledger.uploads(1, 0)
    complete = [
        g.members
        for g in real.groups
        if stuck not in g.members
        and len(g.members) == 3
        and all((g.gid, m) in uploads for m in g.members)
    ]
    assert complete
    a = complete[0]
    rest = tuple(u for u in sorted(task.users) if u not in a and u != stuck)
    exposing = (tuple(sorted((*a, stuck))), rest)
    groups = tuple(GroupSpec(k, "basic", g, None, len(g)) for k, g in enumerate(exposing))
    attempt1 = dataclasses.replace(real, groups=groups, key_users=(), prior_groups=())
    provider = task.provider_identity
    head = task.ledger.head(task.roster.provider)
    dropout = envelope.sign(
        provider, task.roster.task, Dropout((stuck,), (0,)), prev=head, round=1, attempt=0
    )
    task.ledger.commit(dropout)
    signed = envelope.sign(
        provider, task.roster.task, attempt1, prev=dropout.hash, round=1, attempt=1
    )
    with pytest.raises(RefusedError) as refused:
        task.ledger.commit(signed)
    assert refused.value.reason is RefusalReason.BAD_GROUPING
    assert "omit groups whose sums are known" in refused.value.detail


def _message(driver: Driver, commit: Commit) -> Announce:
    message = envelope.verify(commit.envelope, driver.task.roster).message
    assert isinstance(message, Announce)
    return message


def test_a_user_in_no_group_does_not_train() -> None:
    """User 7 is online for the driver but not for the provider: it receives round 1's
    broadcasts but is in no group, so it does not train. Once the provider groups it
    (round 2), it trains."""
    task = make_task(7, online=range(1, 7))
    driver = Driver(task)
    since = len(driver.log)
    done = driver.play_round(0.0)
    assert all(7 not in g.members for g in done.groups)
    assert driver.outputs(7, since) == []
    assert task.users[7].round == 1 and task.users[7].phase is UserPhase.IDLE
    assert driver.handle(PROVIDER, Joined(7)) == []
    since = len(driver.log)
    done = driver.play_round(1.0)
    assert any(7 in g.members for g in done.groups)
    assert [t.round for t in of_type(driver.outputs(7, since), Train)] == [2]
    assert driver.refusals() == []


def test_a_late_summed_share_after_the_key_is_derived_does_nothing() -> None:
    """Defence in depth: were a group's threshold below its size (users refuse such an
    announcement), the key is derived from the first t summed shares and a later one
    must neither derive again nor fail (it used to trip an assert and kill the user)."""
    task = make_task(3)
    machine = task.users[ME]
    machine.round, machine.attempt = 1, 0
    spec = GroupSpec(0, "basic", (1, 2, 3), None, 2)
    out = machine._deal(spec, 10)  # an announcement cannot get here
    assert count(out, Send) == 2
    context = SealContext(TASK, 1, 0, 0)
    for sender in (2, 3):
        share = Share(1, np.zeros(10, np.uint32))
        data = seal_share(task.identities[sender], task.roster, ME, context, "share", share)
        machine.handle(Received("share", data))
    state = machine._groups[0]
    assert ME in state.summed
    summed = Share(2, np.zeros(10, np.uint32))
    data = seal_share(task.identities[2], task.roster, ME, context, "summed_share", summed)
    assert not count(machine.handle(Received("summed_share", data)), Refused)
    assert state.rand is None  # derived from two summed shares: t = 2
    uploaded = machine.handle(Trained(1, np.zeros(10, np.float32)))
    assert count(uploaded, Commit) == 1 and state.key is None  # the key is spent
    late = Share(3, np.zeros(10, np.uint32))
    data = seal_share(task.identities[3], task.roster, ME, context, "summed_share", late)
    assert not count(machine.handle(Received("summed_share", data)), Refused, Commit)
    # and a replayed summed share is a typed refusal
    out = machine.handle(Received("summed_share", data))
    _only_refusal(list(out), ReplayError.__name__)


def test_an_announcement_below_the_users_collusion_bound_is_refused() -> None:
    task = make_task(6)
    driver, held = _round_with_held(task, "announce")
    machine = task.users[ME]
    real = _announce(held["announce"], task)
    assert real.collusion == 1  # the task's c, recorded at task start
    bad = dataclasses.replace(real, collusion=0)
    refused = _only_refusal(
        list(machine.handle(Received("announce", from_provider(task, bad)))), "GroupingError"
    )
    assert "collusion bound 0 is below this user's 1" in refused.detail
    assert (machine.phase, machine.round, machine.attempt) == (UserPhase.IDLE, 0, -1)
    _plays_the_real_round(driver)


@pytest.mark.parametrize("voided", [False, True])
def test_a_user_counts_the_groups_it_uploaded_to_earlier_in_the_round(voided: bool) -> None:
    """User 1 uploads to its group G in attempt 0; the provider never sees the uploads.
    An attempt 1 whose ``prior_groups`` leave G out and that groups 1 with all of G but
    one member (G − G' is the difference of two models) is refused by user 1 itself: it
    counts every group it uploaded to unless the attempt's dropout voided that group."""
    task = make_task(6)

    def hold(target: Target, event: Event) -> bool:
        return target == PROVIDER and isinstance(event, Received) and event.kind == "upload"

    driver = Driver(task, hold=hold)
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    machine = task.users[ME]
    real = _message(driver, driver.commits("announce")[0])
    (mine,) = [g for g in real.groups if ME in g.members]
    assert driver.commits("upload", ME)  # it uploaded to G
    mate, dropped = (u for u in mine.members if u != ME)
    outsiders = [u for u in sorted(task.users) if u not in mine.members]
    regrouped = (tuple(sorted((ME, mate, outsiders[0]))), tuple(sorted((dropped, *outsiders[1:]))))
    groups = tuple(GroupSpec(k, "basic", g, None, 3) for k, g in enumerate(regrouped))
    attempt1 = dataclasses.replace(real, groups=groups, key_users=(), prior_groups=())
    notice = Dropout((dropped,), (mine.gid,) if voided else ())
    machine.handle(Received("dropout", from_provider(task, notice)))
    out = list(machine.handle(Received("announce", from_provider(task, attempt1, attempt=1))))
    if voided:  # a voided group's sum is never complete: nothing to count
        assert not of_type(out, Refused) and machine.attempt == 1
        return
    refused = _only_refusal(out, "GroupingError")
    exposed = sorted((dropped, outsiders[0]))  # G − {1, mate, outsider}
    assert "{" + f"{exposed[0]}, {exposed[1]}" + "}" in refused.detail, refused.detail
    assert machine.attempt == 0
