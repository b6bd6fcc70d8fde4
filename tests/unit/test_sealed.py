"""Sealed direct envelopes: a share opens only for its recipient, in its context, once."""

import dataclasses

import numpy as np
import pytest

from fairbus import shamir
from fairbus.csprng import random_field
from fairbus.errors import ReplayError, RoleError, SealError, WireError
from fairbus.identity import Identity
from fairbus.roster import Roster
from fairbus.sealed import ReplayGuard, SealContext, SealedOuter, open_share, seal_share
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS
from tests.conftest import TASK

CTX = SealContext(TASK, round=4, attempt=1, group=2)


@pytest.fixture
def share() -> shamir.Share:
    return shamir.share(random_field(100), 3, 3)[1]


def test_seal_and_open(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share
) -> None:
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    opened = open_share(data, identities[2], roster, CTX)
    assert opened.sender == 1 and opened.kind == "share" and opened.context == CTX
    assert opened.share.x == share.x
    np.testing.assert_array_equal(opened.share.values, share.values)
    assert share.values.tobytes() not in data  # encrypted, not merely wrapped


@pytest.mark.parametrize(
    "other",
    [
        dataclasses.replace(CTX, round=5),
        dataclasses.replace(CTX, attempt=2),
        dataclasses.replace(CTX, group=3),
        dataclasses.replace(CTX, task="another"),
    ],
)
def test_share_replayed_into_another_context_is_refused(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share, other: SealContext
) -> None:
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    with pytest.raises(ReplayError):
        open_share(data, identities[2], roster, other)


def test_rewritten_outer_context_is_caught_inside(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share
) -> None:
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    outer = SealedOuter.from_wire(codec.unpack(data, DEFAULT_LIMITS), "", DEFAULT_LIMITS)
    moved = dataclasses.replace(outer, round=5, kind="summed_share")
    ctx5 = dataclasses.replace(CTX, round=5)
    with pytest.raises(ReplayError, match="was moved"):
        open_share(codec.pack(moved.to_wire()), identities[2], roster, ctx5)


def test_share_for_someone_else_is_refused(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share
) -> None:
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    with pytest.raises(ReplayError, match="addressed to 2"):
        open_share(data, identities[3], roster, CTX)
    # relabelled for user 3: the box was made for user 2's key, so it does not open
    outer = SealedOuter.from_wire(codec.unpack(data, DEFAULT_LIMITS), "", DEFAULT_LIMITS)
    relabelled = codec.pack(dataclasses.replace(outer, recipient=3).to_wire())
    with pytest.raises(SealError):
        open_share(relabelled, identities[3], roster, CTX)


def test_wrong_sender_key_or_tampered_box_is_refused(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share
) -> None:
    impostor = Identity(1, identities[5].signing_key, identities[5].box_key)
    data = seal_share(impostor, roster, 2, CTX, "share", share)
    with pytest.raises(SealError, match="does not open"):
        open_share(data, identities[2], roster, CTX)
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    outer = SealedOuter.from_wire(codec.unpack(data, DEFAULT_LIMITS), "", DEFAULT_LIMITS)
    box = bytearray(outer.box)
    box[len(box) // 2] ^= 0x10
    tampered = codec.pack(dataclasses.replace(outer, box=bytes(box)).to_wire())
    with pytest.raises(SealError):
        open_share(tampered, identities[2], roster, CTX)


def test_replayed_share_in_the_same_context_is_refused_once_seen(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share
) -> None:
    guard = ReplayGuard()
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    guard.admit(open_share(data, identities[2], roster, CTX))
    with pytest.raises(ReplayError, match="already received"):
        guard.admit(open_share(data, identities[2], roster, CTX))
    # a fresh sealing of the same share is still a second share from the same sender
    again = seal_share(identities[1], roster, 2, CTX, "share", share)
    with pytest.raises(ReplayError):
        guard.admit(open_share(again, identities[2], roster, CTX))
    summed = seal_share(identities[1], roster, 2, CTX, "summed_share", share)
    guard.admit(open_share(summed, identities[2], roster, CTX))
    guard.forget(CTX)
    guard.admit(open_share(data, identities[2], roster, CTX))


def test_only_users_exchange_shares(
    identities: dict[int, Identity], roster: Roster, share: shamir.Share
) -> None:
    with pytest.raises(RoleError):
        seal_share(identities[1], roster, 0, CTX, "share", share)  # 0 is the provider
    data = seal_share(identities[1], roster, 2, CTX, "share", share)
    with pytest.raises(WireError):
        open_share(data[:-10], identities[2], roster, CTX)
