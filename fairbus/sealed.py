"""Sealed direct envelopes: Shamir shares end-to-end encrypted between two members.

NaCl ``Box`` (X25519 + XSalsa20-Poly1305, random 24-byte nonce) between the sender's
and recipient's roster keys. The context — task, round, attempt, group, sender,
recipient and kind — is written in clear on the outside (for routing) *and* bound
inside the ciphertext; the recipient opens a box only for the context it expects,
and the inner copy must match, so a share sealed for one (round, attempt, group,
recipient) is refused anywhere else. :class:`ReplayGuard` refuses the same share
twice within one context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from nacl.exceptions import CryptoError
from nacl.public import Box

from fairbus.errors import ReplayError, SchemaError, SealError
from fairbus.identity import Identity
from fairbus.roster import Role, Roster
from fairbus.shamir import Share
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    SEAL_BINDING_FIELDS,
    SHARE_KINDS,
    ShareBody,
    seal_binding,
    vector_from_bytes,
    vector_to_bytes,
)
from fairbus.wire.schema import Bin, Spec, WireStruct


@dataclass(frozen=True)
class SealContext:
    """Where a sealed share belongs: one group of one attempt of one round of a task."""

    task: str
    round: int
    attempt: int
    group: int


@dataclass(frozen=True)
class SealedOuter(WireStruct):
    task: str
    round: int
    attempt: int
    group: int
    sender: int
    recipient: int
    kind: str
    box: bytes
    FIELDS: ClassVar[dict[str, Spec]] = {**SEAL_BINDING_FIELDS, "box": Bin()}

    @property
    def context(self) -> SealContext:
        return SealContext(self.task, self.round, self.attempt, self.group)


@dataclass(frozen=True, eq=False)
class OpenedShare:
    sender: int
    kind: str
    context: SealContext
    share: Share


def seal_share(
    sender: Identity,
    roster: Roster,
    recipient: int,
    context: SealContext,
    kind: str,
    share: Share,
) -> bytes:
    """Encrypt ``share`` for ``recipient`` with the context bound inside."""
    if kind not in SHARE_KINDS:
        raise SchemaError(f"kind must be one of {SHARE_KINDS}, got {kind!r}")
    peer = roster.member(recipient, roles=[Role.USER])
    binding = {
        **dataclasses.asdict(context),
        "sender": sender.participant_id,
        "recipient": recipient,
        "kind": kind,
    }
    body = ShareBody(
        **binding,
        x=share.x,
        length=int(share.values.shape[0]),
        values=vector_to_bytes(share.values),
    )
    box = Box(sender.box_key, peer.identity.box_public).encrypt(codec.pack(body.to_wire()))
    return codec.pack(SealedOuter(**binding, box=bytes(box)).to_wire())


def open_share(
    data: bytes,
    me: Identity,
    roster: Roster,
    expected: SealContext,
    limits: WireLimits = DEFAULT_LIMITS,
) -> OpenedShare:
    """Decrypt a sealed share addressed to ``me`` for the ``expected`` context.

    Raises :class:`ReplayError` if it was sealed for another recipient or context,
    :class:`SealError` if the box does not open with the claimed sender's key.
    """
    outer = SealedOuter.from_wire(codec.unpack(data, limits), "sealed", limits)
    if outer.recipient != me.participant_id:
        raise ReplayError(
            f"sealed share is addressed to {outer.recipient}, not to {me.participant_id}"
        )
    if outer.context != expected:
        raise ReplayError(f"sealed share is for {outer.context}, expected {expected}")
    sender = roster.member(outer.sender, roles=[Role.USER])
    try:
        plain = Box(me.box_key, sender.identity.box_public).decrypt(outer.box)
    except CryptoError:
        raise SealError(
            f"sealed share from {outer.sender} does not open: wrong key or tampered box"
        ) from None
    body = ShareBody.from_wire(codec.unpack(plain, limits), "sealed.body", limits)
    if seal_binding(body) != seal_binding(outer):
        raise ReplayError(
            "sealed share was moved: it was sealed for "
            f"(round {body.round}, attempt {body.attempt}, group {body.group}, "
            f"recipient {body.recipient}, {body.kind})"
        )
    values = vector_from_bytes(body.values, body.length, what="share")
    return OpenedShare(outer.sender, outer.kind, outer.context, Share(body.x, values))


class ReplayGuard:
    """Refuses a second share of the same kind from the same sender in one context."""

    def __init__(self) -> None:
        self._seen: set[tuple[SealContext, int, str]] = set()

    def admit(self, opened: OpenedShare) -> None:
        key = (opened.context, opened.sender, opened.kind)
        if key in self._seen:
            raise ReplayError(
                f"a {opened.kind} from {opened.sender} for {opened.context} was already received"
            )
        self._seen.add(key)

    def forget(self, context: SealContext) -> None:
        """Drop what was seen for a finished or voided context."""
        self._seen = {k for k in self._seen if k[0] != context}
