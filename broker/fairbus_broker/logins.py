"""The broker logins of a deployment: the roster plus each member's ``<id>.mqtt.key``."""

from __future__ import annotations

from dataclasses import dataclass

from fairbus import topics
from fairbus.identity import load_broker_password
from fairbus.roster import Roster
from fairbus_broker.config import BrokerConfig
from fairbus_broker.errors import BrokerError


@dataclass(frozen=True)
class Logins:
    """The roster and the plaintext password of each member that has one.

    ``repr`` never shows the passwords.
    """

    roster: Roster
    passwords: dict[str, str]
    """Broker username (``<role>-<id>``) → password, for members with an ``<id>.mqtt.key``."""

    def __repr__(self) -> str:
        return f"Logins(task={self.roster.task!r}, usernames={sorted(self.passwords)})"

    @property
    def without_password(self) -> list[str]:
        """Usernames of roster members that have no ``<id>.mqtt.key`` (no login)."""
        return [
            topics.username(m.role.value, pid)
            for pid, m in self.roster.items()
            if topics.username(m.role.value, pid) not in self.passwords
        ]


def load_logins(config: BrokerConfig) -> Logins:
    """Read the roster and every member's broker password from ``config.keys``.

    Members without a key file get no login. With password logins (no TLS client
    certificates) a deployment in which nobody can log in is refused, loudly.
    """
    roster = Roster.load(config.roster)
    passwords: dict[str, str] = {}
    for pid, member in roster.items():
        password = load_broker_password(config.keys, pid)
        if password is not None:
            passwords[topics.username(member.role.value, pid)] = password
    certificates = config.tls is not None and config.tls.require_certificate
    if not passwords and not certificates:
        raise BrokerError(
            f"no roster member has a broker password in {config.keys} "
            "(run `fairbus keys new --id N` for each participant); nobody could log in"
        )
    return Logins(roster, passwords)
