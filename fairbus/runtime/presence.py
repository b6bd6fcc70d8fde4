"""Users' presence turned into the provider machine's :class:`Joined` and
:class:`Dropped` events (issue 14, item 3: presence is not a verdict).

An ``offline`` presence — a Last Will, or a retained one replayed while a broker
restarts — counts as a dropout only once it has lasted ``grace`` seconds without an
``online`` from the user; the provider's phase deadline catches a user that hangs while
its socket stays open. An ``online`` naming a new session while the user is still counted
online is a restarted process, which lost its keys and shares: it is dropped and joins
again at once. No I/O: the driver feeds it what arrives and the time.
"""

from __future__ import annotations

from fairbus.protocol.events import Dropped, Joined
from fairbus.runtime.connection import Presence


class PresenceTracker:
    def __init__(self, users: frozenset[int], grace: float) -> None:
        self.users = users
        self.grace = grace
        self.online: set[int] = set()
        self._offline_since: dict[int, float] = {}
        self._sessions: dict[int, str] = {}

    def saw(self, user: int, presence: Presence, now: float) -> list[Joined | Dropped]:
        """``user``'s presence at ``now`` (seconds, any monotonic clock)."""
        if user not in self.users:
            return []
        if not presence.online:
            if user in self.online:
                self._offline_since.setdefault(user, now)
            return []
        self._offline_since.pop(user, None)
        earlier = self._sessions.get(user)
        self._sessions[user] = presence.session
        if user not in self.online:
            self.online.add(user)
            return [Joined(user)]
        if earlier is not None and earlier != presence.session:
            return [Dropped(user), Joined(user)]
        return []

    def expire(self, now: float) -> list[Joined | Dropped]:
        """The users whose offline presence has lasted the grace period by ``now``."""
        gone = sorted(u for u, t in self._offline_since.items() if now - t >= self.grace)
        for user in gone:
            del self._offline_since[user]
            self.online.discard(user)
        return [Dropped(user) for user in gone]
