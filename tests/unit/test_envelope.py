"""Signed envelopes: signature, payload hash, roles, canonical form and hash chains."""

import pytest

from fairbus import envelope
from fairbus.envelope import GENESIS, ChainTracker
from fairbus.errors import (
    ChainError,
    ReplayError,
    RoleError,
    SchemaError,
    SignatureError,
    UnknownSenderError,
)
from fairbus.identity import Identity
from fairbus.roster import Roster
from fairbus.wire import codec
from fairbus.wire.messages import Announce, GroupSpec, MaskedUpload, Presence
from tests.conftest import TASK


def upload(sender: Identity, prev: bytes = GENESIS, round_: int = 1) -> envelope.SignedEnvelope:
    return envelope.sign(
        sender, TASK, MaskedUpload(0, 3, b"\x01" * 12), prev=prev, round=round_, attempt=0
    )


def test_sign_and_open(identities: dict[int, Identity], roster: Roster) -> None:
    env = upload(identities[3])
    verified = envelope.open_envelope(env.to_bytes(), roster)
    assert verified.header.sender == 3 and verified.header.round == 1
    assert isinstance(verified.message, MaskedUpload)
    assert verified.message.vector().tolist() == [0x01010101] * 3
    assert verified.hash == env.hash and len(env.hash) == 32


def test_flipped_signature_bit_is_refused(identities: dict[int, Identity], roster: Roster) -> None:
    env = upload(identities[3])
    for bit in (0, 200, 511):
        sig = bytearray(env.signature)
        sig[bit // 8] ^= 1 << (bit % 8)
        forged = envelope.SignedEnvelope(env.header, env.header_bytes, env.payload, bytes(sig))
        with pytest.raises(SignatureError, match="participant 3"):
            envelope.open_envelope(forged.to_bytes(), roster)


def test_wrong_key_is_refused(identities: dict[int, Identity], roster: Roster) -> None:
    # user 4 signs an upload that claims to come from user 3
    impostor = Identity(3, identities[4].signing_key, identities[4].box_key)
    with pytest.raises(SignatureError):
        envelope.open_envelope(upload(impostor).to_bytes(), roster)
    stranger = Identity.generate(77)
    with pytest.raises(UnknownSenderError, match="77"):
        envelope.open_envelope(upload(stranger).to_bytes(), roster)


def test_role_must_be_allowed_to_send_the_type(
    identities: dict[int, Identity], roster: Roster
) -> None:
    announce = Announce(
        b"\x00" * 32, 10, 16, (GroupSpec(0, "basic", (1, 2, 3), None, 3),), (), (), (), 1.0, 2.0, 1
    )
    env = envelope.sign(identities[3], TASK, announce, prev=GENESIS, round=1, attempt=0)
    with pytest.raises(RoleError, match="only provider"):
        envelope.open_envelope(env.to_bytes(), roster)
    env = envelope.sign(identities[0], TASK, announce, prev=GENESIS, round=1, attempt=0)
    assert envelope.open_envelope(env.to_bytes(), roster).message == announce


def test_tampered_payload_is_refused(identities: dict[int, Identity], roster: Roster) -> None:
    env = upload(identities[3])
    other = MaskedUpload(0, 3, b"\x02" * 12).payload()
    tampered = envelope.SignedEnvelope(env.header, env.header_bytes, other, env.signature)
    with pytest.raises(SignatureError, match="payload"):
        envelope.open_envelope(tampered.to_bytes(), roster)


def test_other_task_is_refused(identities: dict[int, Identity], roster: Roster) -> None:
    env = envelope.sign(identities[3], "other-task", Presence("online", "user"), prev=GENESIS)
    with pytest.raises(ReplayError, match="other-task"):
        envelope.open_envelope(env.to_bytes(), roster)


def test_non_canonical_header_is_refused(identities: dict[int, Identity], roster: Roster) -> None:
    env = upload(identities[3])
    import msgpack

    header = msgpack.unpackb(env.header_bytes)
    reordered = msgpack.packb(dict(reversed(list(header.items()))), use_bin_type=True)
    signature = identities[3].signing_key.sign(reordered).signature
    data = codec.pack({"h": reordered, "p": env.payload, "s": signature})
    with pytest.raises(SchemaError, match="canonical"):
        envelope.open_envelope(data, roster)


def test_round_and_attempt_only_where_relevant(identities: dict[int, Identity]) -> None:
    with pytest.raises(SchemaError):
        envelope.sign(identities[3], TASK, MaskedUpload(0, 1, b"\0" * 4), prev=GENESIS)
    with pytest.raises(SchemaError):
        envelope.sign(
            identities[3], TASK, Presence("online", "user"), prev=GENESIS, round=1, attempt=0
        )


def test_hash_chain_refuses_forged_prev_and_replay(
    identities: dict[int, Identity], roster: Roster
) -> None:
    chain = ChainTracker()
    first = upload(identities[3])
    chain.accept(envelope.open_envelope(first.to_bytes(), roster).envelope)
    second = upload(identities[3], prev=first.hash, round_=2)
    # forged prev: claims to follow something that is not user 3's head
    forged = upload(identities[3], prev=b"\x42" * 32, round_=2)
    with pytest.raises(ChainError, match="fork or a forged link"):
        chain.accept(forged)
    # a second envelope on the same prev (a fork) after the real one is refused too
    chain.accept(second)
    fork = upload(identities[3], prev=first.hash, round_=3)
    with pytest.raises(ChainError):
        chain.accept(fork)
    with pytest.raises(ReplayError, match="already accepted"):
        chain.accept(second)
    with pytest.raises(ReplayError):
        chain.accept(first)
    assert chain.head(3) == second.hash
    assert chain.head(4) == GENESIS
    chain.accept(upload(identities[4]))  # other senders have chains of their own
