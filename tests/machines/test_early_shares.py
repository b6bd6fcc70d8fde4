"""Shares that reach a user before the announcement of their round and attempt ("early").

A group mate that got the broadcasts first deals its shares at once, so a user must keep
a few. It keeps only authentic ones (opened on arrival), only from members of its own
groups where it holds the announcement, and otherwise at most a few per sender, each no
larger than a share of the model; the rest is refused and not kept."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from fairbus.ledger.recorded import open_recorded
from fairbus.protocol.events import PROVIDER, Event, Received, Refused, StartRound
from fairbus.protocol.provider import ProviderConfig
from fairbus.protocol.user import EARLY_PER_SENDER, EARLY_REFUSED, UserMachine
from fairbus.sealed import SealContext, SealedOuter, seal_share
from fairbus.shamir import Share
from fairbus.wire import codec
from fairbus.wire.messages import Announce
from tests.support_machines import TASK, Driver, Target, Task, make_task

ME = 1
MiB = 1024 * 1024

ALG3 = ProviderConfig(keying="shamir")
"""These tests follow Alg. 3's shares (the pairwise keying sends none)."""


def _reasons(outputs: Sequence[object]) -> list[str]:
    return [o.reason for o in outputs if isinstance(o, Refused)]


def _detail(outputs: Sequence[object]) -> str:
    (refused,) = [o for o in outputs if isinstance(o, Refused)]
    return refused.detail


def _forged(sender: int, round: int, group: int, size: int) -> bytes:
    """A sealed share in the right shape whose box is ``size`` random bytes: anyone on
    the broker can send one, claiming any sender."""
    outer = SealedOuter(TASK, round, 0, group, sender, ME, "share", os.urandom(size))
    return codec.pack(outer.to_wire())


def _authentic(task: Task, sender: int, round: int, group: int, values: int) -> bytes:
    share = Share(1, np.zeros(values, np.uint32))
    context = SealContext(TASK, round, 0, group)
    return seal_share(task.identities[sender], task.roster, ME, context, "share", share)


def _flood(
    machine: UserMachine, round: int, make: Callable[[int, int, int, int], bytes]
) -> list[str]:
    """40 early shares of 1 MiB, claiming senders 2..6 in turn; the reasons refused."""
    reasons: list[str] = []
    for k in range(40):
        data = make(2 + k % 5, round, k, MiB)
        out = machine.handle(Received("share", data))
        assert len(out) == 1, out
        reasons += _reasons(out)
    return reasons


def test_forty_forged_one_mib_early_shares_are_not_kept() -> None:
    task = make_task(6, config=ALG3)
    machine = task.users[ME]
    # before any round: the model's size is unknown, but a forged box does not open
    assert _flood(machine, 1, _forged) == ["SealError"] * 40
    assert machine.early_kept == (0, 0)
    # during a round: the model's size is known; nothing larger than its share is kept,
    # forged or sealed by a real (malicious) member
    driver = Driver(task)
    driver.play_round(0.0)
    assert _flood(machine, 2, _forged) == [EARLY_REFUSED] * 40

    def authentic(sender: int, round: int, group: int, size: int) -> bytes:
        return _authentic(task, sender, round, group, size // 4)

    assert _flood(machine, 2, authentic) == [EARLY_REFUSED] * 40
    assert machine.early_kept == (0, 0)
    assert driver.play_round(1.0).round == 2  # the user still plays its part
    assert driver.refusals() == []


def test_at_most_a_few_early_shares_are_kept_per_sender() -> None:
    task = make_task(6, config=ALG3)
    machine = task.users[ME]
    kept = 0
    for group in range(EARLY_PER_SENDER + 4):
        out = machine.handle(Received("share", _authentic(task, 2, 5, group, 10)))
        if out:
            assert _reasons(out) == [EARLY_REFUSED] and "already kept" in _detail(out)
        else:
            kept += 1
    assert kept == EARLY_PER_SENDER
    # the same one twice is refused too; another sender has its own allowance
    assert _reasons(machine.handle(Received("share", _authentic(task, 3, 5, 0, 10)))) == []
    assert _reasons(machine.handle(Received("share", _authentic(task, 3, 5, 0, 10)))) == [
        EARLY_REFUSED
    ]
    count, size = machine.early_kept
    assert count == EARLY_PER_SENDER + 1 and size < (count * 1024)


def test_an_early_summed_share_is_refused() -> None:
    task = make_task(6, config=ALG3)
    machine = task.users[ME]
    share = Share(2, np.zeros(10, np.uint32))
    context = SealContext(TASK, 1, 0, 0)
    data = seal_share(task.identities[2], task.roster, ME, context, "summed_share", share)
    assert _reasons(machine.handle(Received("summed_share", data))) == [EARLY_REFUSED]
    assert machine.early_kept == (0, 0)


def test_early_shares_from_group_mates_are_kept_and_used() -> None:
    """Round 2: user 1 gets the broadcasts last; its group mates' shares wait for it."""
    task = make_task(6, config=ALG3)
    held_back = {"on": False}

    def hold(target: Target, event: Event) -> bool:
        return (
            held_back["on"]
            and target == ME
            and isinstance(event, Received)
            and event.kind in ("global_model", "announce")
        )

    driver = Driver(task, hold=hold)
    driver.play_round(0.0)
    held_back["on"] = True
    since = len(driver.log)
    driver.handle(PROVIDER, StartRound(1.0))
    driver.pump()
    count, size = task.users[ME].early_kept
    assert count > 0 and size > 0
    driver.release()
    assert driver.round_done(since).round == 2 and driver.refusals() == []
    assert task.users[ME].early_kept == (0, 0)


def test_with_the_announcement_in_hand_only_group_mates_shares_are_kept() -> None:
    """The announcement is in, the model not yet: an early share for a group user 1 is
    not in, or from someone not in its group, is refused; its mates' are kept."""
    task = make_task(6, config=ALG3)

    def hold(target: Target, event: Event) -> bool:
        return target == ME and isinstance(event, Received) and event.kind == "global_model"

    driver = Driver(task, hold=hold)
    driver.handle(PROVIDER, StartRound(0.0))
    announce = next(
        e for t, e in driver.queue if t == ME and isinstance(e, Received) and e.kind == "announce"
    )
    driver.handle(ME, announce)  # user 1 holds the announcement, waits for the model
    driver.pump()
    machine = task.users[ME]
    kept, _ = machine.early_kept
    assert kept > 0  # its mates dealt theirs
    message = open_recorded(announce.data, task.roster).message
    assert isinstance(message, Announce)
    mine = [g for g in message.groups if ME in g.members]
    mate = mine[0].members[-1]
    other = next((g for g in message.groups if ME not in g.members and mate in g.members), None)
    bad = [_authentic(task, mate, 1, 999, 10)]
    if other is not None:
        bad.append(_authentic(task, mate, 1, other.gid, 10))
    for data in bad:
        out = machine.handle(Received("share", data))
        assert _reasons(out) == [EARLY_REFUSED] and "no such group" in _detail(out)
    assert machine.early_kept[0] == kept
    driver.release()
    assert driver.round_done().round == 1
    assert driver.refusals() == []
