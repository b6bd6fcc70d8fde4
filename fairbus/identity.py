"""Per-participant identities: an Ed25519 signing key and an X25519 box key.

Each secret lives in its own file with mode 0600 (``<dir>/<id>.sign.key`` and
``<dir>/<id>.box.key``, 32 raw bytes hex-encoded with a trailing newline). Files
that are readable by group or others are refused on load, as ssh refuses them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.utils
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fairbus.errors import IdentityError

KEY_BYTES = 32
MQTT_KEY_FILE = "broker password file"


@dataclass(frozen=True)
class PublicIdentity:
    """What the roster knows of a participant."""

    participant_id: int
    verify_key: VerifyKey
    box_public: PublicKey

    @property
    def verify_hex(self) -> str:
        return bytes(self.verify_key).hex()

    @property
    def box_hex(self) -> str:
        return bytes(self.box_public).hex()


@dataclass(frozen=True)
class Identity:
    """A participant's own secret keys. ``repr`` never shows them."""

    participant_id: int
    signing_key: SigningKey
    box_key: PrivateKey

    def __repr__(self) -> str:
        return f"Identity(participant_id={self.participant_id}, keys=<hidden>)"

    @classmethod
    def generate(cls, participant_id: int) -> Identity:
        """Fresh keys from libsodium's CSPRNG."""
        _check_id(participant_id)
        return cls(participant_id, SigningKey.generate(), PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(
            self.participant_id, self.signing_key.verify_key, self.box_key.public_key
        )

    def save(self, directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write both key files with mode 0600; refuses to clobber unless ``overwrite``."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        sign_path, box_path = key_paths(directory, self.participant_id)
        for path in (sign_path, box_path):
            if path.exists() and not overwrite:
                raise IdentityError(f"{path} exists; refusing to overwrite a key file")
        _write_secret(sign_path, bytes(self.signing_key))
        _write_secret(box_path, bytes(self.box_key))
        return sign_path, box_path

    @classmethod
    def load(cls, directory: Path, participant_id: int) -> Identity:
        """Read both key files, refusing missing, malformed or over-readable ones."""
        _check_id(participant_id)
        sign_path, box_path = key_paths(directory, participant_id)
        try:
            signing = SigningKey(_read_secret(sign_path))
            box = PrivateKey(_read_secret(box_path))
        except CryptoError as exc:
            raise IdentityError(
                f"key files for {participant_id} are not valid keys: {exc}"
            ) from exc
        return cls(participant_id, signing, box)


def broker_password_path(directory: Path, participant_id: int) -> Path:
    return directory / f"{participant_id}.mqtt.key"


def new_broker_password(directory: Path, participant_id: int, *, overwrite: bool = False) -> str:
    """Write a fresh broker password (32 CSPRNG bytes, hex) to ``<id>.mqtt.key``, mode 0600.

    The participant logs in to the broker with it; the broker keeps only its hash.
    """
    _check_id(participant_id)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = broker_password_path(directory, participant_id)
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} exists; refusing to overwrite a key file")
    secret = nacl.utils.random(KEY_BYTES)
    _write_secret(path, secret)
    return secret.hex()


def load_broker_password(directory: Path, participant_id: int) -> str | None:
    """The participant's broker password, or None when it has no ``<id>.mqtt.key``
    (what ``fairbus broker`` reads: such a member gets no login). A participant that logs
    in uses :func:`require_broker_password`."""
    _check_id(participant_id)
    path = broker_password_path(directory, participant_id)
    if not path.exists():
        return None
    return _read_secret(path, MQTT_KEY_FILE).hex()


def require_broker_password(directory: Path, participant_id: int) -> str:
    """The participant's broker password from ``<id>.mqtt.key``. A participant of a task
    always logs in with one (the broker refuses anonymous clients): a missing, unreadable
    or over-readable file is an :class:`IdentityError` naming it, never a silent
    anonymous login."""
    _check_id(participant_id)
    path = broker_password_path(directory, participant_id)
    try:
        path.lstat()
    except FileNotFoundError:
        raise IdentityError(
            f"{MQTT_KEY_FILE} {path} does not exist: participant {participant_id} logs in to "
            "the broker with the password `fairbus keys new` writes there (and `fairbus "
            "broker` reads from the same keys folder)"
        ) from None
    except OSError:
        pass  # _read_secret names the problem
    return _read_secret(path, MQTT_KEY_FILE).hex()


def key_paths(directory: Path, participant_id: int) -> tuple[Path, Path]:
    return directory / f"{participant_id}.sign.key", directory / f"{participant_id}.box.key"


def _check_id(participant_id: int) -> None:
    if isinstance(participant_id, bool) or not isinstance(participant_id, int):
        raise IdentityError(f"participant id must be an int, got {participant_id!r}")
    if not 0 <= participant_id < 2**32:
        raise IdentityError(f"participant id must be in 0..2^32-1, got {participant_id}")


def _write_secret(path: Path, key: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, but an existing tmp might be wider
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_secret(path: Path, what: str = "key file") -> bytes:
    """The key in ``path``; every refusal (missing, over-readable, unreadable, not a key)
    is one :class:`IdentityError` naming the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist (run `fairbus keys new`)") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
            f"(run `chmod 600 {path}`)"
        )
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise IdentityError(
            f"cannot read {what} {path}: {exc.strerror or exc} (it must be a file of "
            "this account with mode 0600)"
        ) from None
    if len(text) > 4 * KEY_BYTES:
        raise IdentityError(f"{what} {path} is too long to be a key")
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise IdentityError(f"{what} {path} is not hex") from None
    if len(key) != KEY_BYTES:
        raise IdentityError(f"{what} {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key
