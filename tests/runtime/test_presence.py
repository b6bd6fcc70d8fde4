"""Presence is not a verdict (issue 14, item 3): what the provider's driver makes of the
retained presences and Last Wills it sees, with a clock the test turns."""

from __future__ import annotations

import pytest

from fairbus.protocol.events import Dropped, Joined
from fairbus.runtime.connection import OFFLINE, ONLINE, Presence
from fairbus.runtime.presence import PresenceTracker

USERS = frozenset({1, 2, 3})


def test_presence_payloads_are_parsed_strictly() -> None:
    assert Presence.parse(OFFLINE) == Presence(False)
    assert Presence.parse(ONLINE) == Presence(True)
    assert Presence.parse(ONLINE + b" 0123456789abcdef") == Presence(True, "0123456789abcdef")
    for bad in (b"", b"online ", b"online 0123456789abcdef0", b"online a b", b"offline x",
                b"onlinex", b"online \xff"):  # fmt: skip
        assert Presence.parse(bad) is None, bad


def test_an_offline_counts_only_after_the_grace_period() -> None:
    tracker = PresenceTracker(USERS, grace=5.0)
    assert tracker.saw(1, Presence(True, "a"), 0.0) == [Joined(1)]
    assert tracker.saw(1, Presence(False), 10.0) == []
    assert tracker.expire(14.9) == [] and 1 in tracker.online
    assert tracker.expire(15.0) == [Dropped(1)] and 1 not in tracker.online
    assert tracker.expire(99.0) == []  # once
    assert tracker.saw(1, Presence(True, "a"), 100.0) == [Joined(1)]


def test_a_broker_restart_within_the_grace_period_changes_nothing() -> None:
    """Last Wills as the broker goes down, then the same sessions back online."""
    tracker = PresenceTracker(USERS, grace=5.0)
    for u in USERS:
        tracker.saw(u, Presence(True, f"s{u}"), 0.0)
    for u in USERS:
        assert tracker.saw(u, Presence(False), 1.0) == []
    for u in USERS:
        assert tracker.saw(u, Presence(True, f"s{u}"), 3.0) == []
    assert tracker.expire(60.0) == [] and tracker.online == set(USERS)


def test_a_restarted_process_is_dropped_and_joins_again_at_once() -> None:
    tracker = PresenceTracker(USERS, grace=5.0)
    tracker.saw(2, Presence(True, "old"), 0.0)
    tracker.saw(2, Presence(False), 1.0)
    assert tracker.saw(2, Presence(True, "new"), 2.0) == [Dropped(2), Joined(2)]
    assert tracker.expire(60.0) == [] and tracker.online == {2}


@pytest.mark.parametrize("user", [0, 4, 999])
def test_presence_of_someone_who_is_not_a_user_is_ignored(user: int) -> None:
    tracker = PresenceTracker(USERS, grace=0.0)
    assert tracker.saw(user, Presence(True, "x"), 0.0) == []
    assert tracker.online == set()
