"""Compact keying: group masks from pairwise X25519 agreements (issue 16, item 2).

Not in the fairness paper, whose Algorithm 3 (:mod:`fairbus.keyneg`) has every member
deal Shamir shares of a random vector as long as the model to every other member, and
then send the sum of what it received to all of them: 2(|I_g| − 1) model-length vectors
sent per member and group, 13 times the model per user and round at 9 users. Here each
member derives its key sk_gi from what it already has, its X25519 key and its group
mates' public keys in the roster, as in the pairwise masks of Bonawitz et al. (CCS 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", §4):

    sk_gi = Σ_{j ∈ I_g, j > i} PRG(s_gij) − Σ_{j ∈ I_g, j < i} PRG(s_gij)   (mod p)

where s_gij is a 32-byte seed both i and j derive from their X25519 agreement, bound to
the task, round, attempt, group and its members (keyed BLAKE2b), and PRG is libsodium's
``randombytes_deterministic`` (:func:`fairbus.csprng.expand_field`). Every pair's stream
is added by one member and subtracted by the other, so Σ_i sk_gi ≡ 0 (mod p), Eq. (1)
of the paper, as Algorithm 3's keys do, and Algorithms 4 and 5 are unchanged: the sum
of a complete group's masked uploads is the group sum.

Nothing goes on the wire for it. Bonawitz et al. also Shamir-share each user's seeds so
the server can remove a dropped user's masks; fairbus never does that (a group with a
dropout is voided and its survivors are regrouped with fresh keys), so the seeds need no
sharing. What a coalition learns is what it learns under Algorithm 3 with threshold
|I_g|: sk_gi holds a stream of i's agreement with every other member, so the members
other than i can remove i's mask only all together, and then they know i's model from
the group sum and their own anyway. Fresh per attempt: the context names the attempt,
so no mask is ever used twice.

Cost per member and group: |I_g| − 1 agreements (one X25519 multiplication each, done
once per pair and process: :class:`PairwiseKeys` caches them) and |I_g| − 1 expansions
of a model-length stream; ``fairbus bench crypto`` measures it against one expansion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import Box

from fairbus import field as gf
from fairbus.csprng import SEED_BYTES, expand_field
from fairbus.errors import ShamirError
from fairbus.field import FieldVector
from fairbus.identity import Identity
from fairbus.roster import Roster

PERSON = b"fairbus-pairmask"
"""BLAKE2b personalisation of the pair seeds (16 bytes): no other fairbus hash uses it."""


@dataclass(frozen=True)
class MaskContext:
    """What a pair seed is bound to: one group of one attempt of one round of a task."""

    task: str
    round: int
    attempt: int
    group: int
    members: tuple[int, ...]

    def encode(self, low: int, high: int) -> bytes:
        """An unambiguous byte string of the context and the pair (every field framed by
        its length or fixed width)."""
        task = self.task.encode()
        parts = [len(task).to_bytes(2, "big"), task]
        for number in (self.round, self.attempt, self.group, low, high, len(self.members)):
            parts.append(number.to_bytes(8, "big"))
        parts += [m.to_bytes(8, "big") for m in self.members]
        return b"".join(parts)


@dataclass
class PairwiseKeys:
    """One user's pairwise keying: its identity, the roster's public keys, and the
    X25519 agreements computed so far (one per group mate, reused across groups and
    rounds; the context makes every seed fresh)."""

    identity: Identity
    roster: Roster
    _agreed: dict[int, bytes] = field(default_factory=dict, repr=False)

    def agreement(self, peer: int) -> bytes:
        """The 32-byte shared key with ``peer`` (X25519, then HSalsa20: NaCl's ``Box``
        precomputation, the same on both sides)."""
        if peer == self.identity.participant_id:
            raise ShamirError("a user has no pairwise agreement with itself")
        key = self._agreed.get(peer)
        if key is None:
            public = self.roster[peer].identity.box_public
            key = bytes(Box(self.identity.box_key, public).shared_key())
            self._agreed[peer] = key
        return key

    def pair_seed(self, peer: int, context: MaskContext) -> bytes:
        """s_gij: the seed of the stream this user and ``peer`` share in ``context``."""
        me = self.identity.participant_id
        low, high = min(me, peer), max(me, peer)
        return bytes(
            blake2b(
                context.encode(low, high),
                digest_size=SEED_BYTES,
                key=self.agreement(peer),
                person=PERSON,
                encoder=RawEncoder,
            )
        )

    def group_key(self, context: MaskContext, length: int) -> FieldVector:
        """sk_gi for this user in ``context`` (see the module docstring)."""
        me = self.identity.participant_id
        members = context.members
        if me not in members or list(members) != sorted(set(members)):
            raise ShamirError(f"user {me} cannot key group {members}: not a sorted member list")
        key: FieldVector = np.zeros(length, dtype=np.uint32)
        for peer in members:
            if peer == me:
                continue
            stream = expand_field(self.pair_seed(peer, context), length)
            key = gf.add(key, stream) if me < peer else gf.sub(key, stream)
        return key


def keys_in_process(
    identities: Sequence[Identity], roster: Roster, context: MaskContext, length: int
) -> dict[int, FieldVector]:
    """Every member's key for one group, in this process (tests and benchmarks)."""
    return {
        i.participant_id: PairwiseKeys(i, roster).group_key(context, length) for i in identities
    }
