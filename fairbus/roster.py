"""The roster: who may take part, in which role, with which public keys.

A TOML file (see ``configs/roster.example.toml``)::

    task = "digits-demo"

    [[member]]
    id = 0
    role = "provider"
    verify_key = "<64 hex digits: Ed25519 public key>"
    box_key = "<64 hex digits: X25519 public key>"

Loading is strict: unknown keys, duplicate ids or keys, bad hex, unknown roles and
a second provider are all :class:`RosterError` naming the entry and field.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PublicKey
from nacl.signing import VerifyKey

from fairbus.errors import RoleError, RosterError, UnknownSenderError
from fairbus.identity import KEY_BYTES, PublicIdentity

MAX_ROSTER_BYTES = 4 * 1024 * 1024
_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Role(StrEnum):
    PROVIDER = "provider"
    USER = "user"
    LEDGER = "ledger"
    ADMIN = "admin"


@dataclass(frozen=True)
class Member:
    identity: PublicIdentity
    role: Role
    name: str = ""

    @property
    def participant_id(self) -> int:
        return self.identity.participant_id


class Roster(Mapping[int, Member]):
    """An immutable map from participant id to :class:`Member`."""

    def __init__(self, task: str, members: Iterable[Member]) -> None:
        if not _TASK_RE.match(task):
            raise RosterError(
                f"task {task!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        self.task = task
        self._members: dict[int, Member] = {}
        seen_keys: dict[bytes, int] = {}
        for m in members:
            pid = m.participant_id
            if pid in self._members:
                raise RosterError(f"participant id {pid} appears twice in the roster")
            for key in (bytes(m.identity.verify_key), bytes(m.identity.box_public)):
                if key in seen_keys:
                    raise RosterError(
                        f"participant {pid} reuses a public key of participant {seen_keys[key]}"
                    )
                seen_keys[key] = pid
            self._members[pid] = m
        providers = self.with_role(Role.PROVIDER)
        if len(providers) > 1:
            raise RosterError(f"the roster names more than one provider: {providers}")

    def __getitem__(self, participant_id: int) -> Member:
        return self._members[participant_id]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._members))

    def __len__(self) -> int:
        return len(self._members)

    def with_role(self, role: Role) -> list[int]:
        return sorted(pid for pid, m in self._members.items() if m.role is role)

    @property
    def provider(self) -> int:
        providers = self.with_role(Role.PROVIDER)
        if not providers:
            raise RosterError("the roster names no provider")
        return providers[0]

    def member(self, participant_id: int, *, roles: Iterable[Role] | None = None) -> Member:
        """The member with this id, checking its role.

        Raises :class:`UnknownSenderError` for an id not in the roster and
        :class:`RoleError` for a member whose role is not among ``roles``.
        """
        m = self._members.get(participant_id)
        if m is None:
            raise UnknownSenderError(f"participant {participant_id} is not in the roster")
        if roles is not None:
            allowed = set(roles)
            if m.role not in allowed:
                names = ", ".join(sorted(r.value for r in allowed))
                raise RoleError(
                    f"participant {participant_id} is a {m.role.value}; only {names} may do this"
                )
        return m

    # --- files -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise RosterError(f"roster file {path} does not exist") from None
        except OSError as exc:
            raise RosterError(f"cannot read roster file {path}: {exc.strerror or exc}") from None
        if size > MAX_ROSTER_BYTES:
            raise RosterError(f"roster file {path} is {size} bytes, over {MAX_ROSTER_BYTES}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RosterError(f"roster file {path} is not UTF-8: {exc}") from None
        except OSError as exc:
            raise RosterError(f"cannot read roster file {path}: {exc.strerror or exc}") from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<roster>") -> Roster:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RosterError(f"{source}: not valid TOML: {exc}") from None
        extra = set(doc) - {"task", "member"}
        if extra:
            raise RosterError(f"{source}: unknown top-level keys {sorted(extra)}")
        task = doc.get("task")
        if not isinstance(task, str):
            raise RosterError(f"{source}: 'task' must be a string")
        entries = doc.get("member", [])
        if not isinstance(entries, list):
            raise RosterError(f"{source}: 'member' must be an array of tables ([[member]])")
        return cls(task, (_parse_member(e, k, source) for k, e in enumerate(entries)))

    def to_toml(self) -> str:
        lines = [f"task = {json.dumps(self.task)}", ""]
        for pid in self:
            m = self._members[pid]
            lines += [
                "[[member]]",
                f"id = {pid}",
                f"role = {json.dumps(m.role.value)}",
            ]
            if m.name:
                lines.append(f"name = {json.dumps(m.name)}")
            lines += [
                f"verify_key = {json.dumps(m.identity.verify_hex)}",
                f"box_key = {json.dumps(m.identity.box_hex)}",
                "",
            ]
        return "\n".join(lines)


_MEMBER_KEYS = {"id", "role", "name", "verify_key", "box_key"}


def _parse_member(entry: Any, index: int, source: str) -> Member:
    where = f"{source}: member #{index + 1}"
    if not isinstance(entry, dict):
        raise RosterError(f"{where} is not a table")
    extra = set(entry) - _MEMBER_KEYS
    if extra:
        raise RosterError(f"{where}: unknown keys {sorted(extra)}")
    missing = {"id", "role", "verify_key", "box_key"} - set(entry)
    if missing:
        raise RosterError(f"{where}: missing keys {sorted(missing)}")
    pid = entry["id"]
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 2**32:
        raise RosterError(f"{where}: 'id' must be an integer in 0..2^32-1, got {pid!r}")
    where = f"{source}: member id {pid}"
    try:
        role = Role(entry["role"])
    except ValueError:
        raise RosterError(
            f"{where}: role {entry['role']!r} is not one of {[r.value for r in Role]}"
        ) from None
    name = entry.get("name", "")
    if not isinstance(name, str) or len(name) > 128:
        raise RosterError(f"{where}: 'name' must be a string of at most 128 characters")
    verify = _hex_key(entry["verify_key"], f"{where}: verify_key")
    box = _hex_key(entry["box_key"], f"{where}: box_key")
    try:
        identity = PublicIdentity(pid, VerifyKey(verify), PublicKey(box))
    except CryptoError as exc:
        raise RosterError(f"{where}: invalid public key: {exc}") from None
    return Member(identity, role, name)


def _hex_key(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RosterError(f"{where} must be a hex string")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise RosterError(f"{where} is not hex") from None
    if len(key) != KEY_BYTES:
        raise RosterError(f"{where} is {len(key)} bytes, expected {KEY_BYTES}")
    return key
