import os
import stat
from pathlib import Path

import pytest

from fairbus.errors import IdentityError, RoleError, RosterError, UnknownSenderError
from fairbus.identity import Identity, key_paths
from fairbus.roster import Member, Role, Roster


def test_key_files_are_0600_and_round_trip(tmp_path: Path) -> None:
    os.umask(0o022)
    ident = Identity.generate(3)
    for path in ident.save(tmp_path / "keys"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(tmp_path / "keys", 3)
    assert bytes(loaded.signing_key) == bytes(ident.signing_key)
    assert bytes(loaded.box_key) == bytes(ident.box_key)
    assert "hidden" in repr(loaded) and bytes(ident.signing_key).hex() not in repr(loaded)


def test_key_files_are_not_overwritten_silently(tmp_path: Path) -> None:
    Identity.generate(3).save(tmp_path)
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        Identity.generate(3).save(tmp_path)
    Identity.generate(3).save(tmp_path, overwrite=True)


def test_unsafe_missing_or_malformed_key_files_are_refused(tmp_path: Path) -> None:
    Identity.generate(5).save(tmp_path)
    sign_path, box_path = key_paths(tmp_path, 5)
    sign_path.chmod(0o644)
    with pytest.raises(IdentityError, match="0644"):
        Identity.load(tmp_path, 5)
    sign_path.chmod(0o600)
    box_path.write_text("not hex\n")
    with pytest.raises(IdentityError, match="not hex"):
        Identity.load(tmp_path, 5)
    box_path.write_text("ab" * 16 + "\n")
    with pytest.raises(IdentityError, match="16 bytes"):
        Identity.load(tmp_path, 5)
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path, 6)
    with pytest.raises(IdentityError):
        Identity.generate(-1)


def _roster_text(members: list[Identity], roles: list[str]) -> str:
    roster = Roster("t", [Member(i.public, Role(r)) for i, r in zip(members, roles, strict=True)])
    return roster.to_toml()


def test_roster_round_trips_and_answers_roles() -> None:
    ids = [Identity.generate(k) for k in range(4)]
    text = _roster_text(ids, ["provider", "user", "user", "ledger"])
    roster = Roster.from_toml(text)
    assert roster.provider == 0
    assert roster.with_role(Role.USER) == [1, 2]
    assert roster[3].role is Role.LEDGER
    assert roster.to_toml() == text
    with pytest.raises(UnknownSenderError, match="not in the roster"):
        roster.member(42)
    with pytest.raises(RoleError, match="only provider"):
        roster.member(1, roles=[Role.PROVIDER])


KEY = "11" * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task = 'x'\n[[member]]\nid = 1\n", "missing keys"),
        ("task = 'x'\n[[member]\n", "not valid TOML"),
        ("[[member]]\nid=1\n", "'task' must be a string"),
        ("task = 'a b'\n", "task 'a b'"),
        ("task = 'x'\nextra = 1\n", "unknown top-level"),
        (f"task='x'\n[[member]]\nid=1\nrole='king'\nverify_key='{KEY}'\nbox_key='{KEY}'\n", "king"),
        (
            f"task='x'\n[[member]]\nid='1'\nrole='user'\nverify_key='{KEY}'\nbox_key='{KEY}'\n",
            "'id'",
        ),
        (f"task='x'\n[[member]]\nid=1\nrole='user'\nverify_key='zz'\nbox_key='{KEY}'\n", "not hex"),
        (f"task='x'\n[[member]]\nid=1\nrole='user'\nverify_key='11'\nbox_key='{KEY}'\n", "1 bytes"),
        (
            f"task='x'\n[[member]]\nid=1\nrole='user'\nverify_key='{KEY}'\nbox_key='{KEY}'\ncolor=3\n",
            "unknown keys",
        ),
    ],
)
def test_malformed_rosters_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(RosterError, match=message):
        Roster.from_toml(text)


def test_roster_refuses_duplicates_and_two_providers() -> None:
    a, b = Identity.generate(1), Identity.generate(2)
    with pytest.raises(RosterError, match="appears twice"):
        Roster("t", [Member(a.public, Role.USER), Member(a.public, Role.USER)])
    twin = Identity(2, a.signing_key, b.box_key)
    with pytest.raises(RosterError, match="reuses a public key"):
        Roster("t", [Member(a.public, Role.USER), Member(twin.public, Role.USER)])
    with pytest.raises(RosterError, match="more than one provider"):
        Roster("t", [Member(a.public, Role.PROVIDER), Member(b.public, Role.PROVIDER)])


def test_roster_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="does not exist"):
        Roster.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(RosterError, match="UTF-8"):
        Roster.load(bad)


def test_example_roster_in_configs_loads() -> None:
    roster = Roster.load(Path(__file__).resolve().parents[2] / "configs" / "roster.example.toml")
    assert roster.provider == 0
    assert len(roster.with_role(Role.USER)) == 9
