"""Algorithm 3 of the fairness paper: intra-group key negotiation by Shamir sharing.

Pure functions, one per step, so the user state machine (and the simulator, the
demo and the benchmark) call exactly the same code. Line numbers refer to
Algorithm 3 in ``shared/papers/000_5bf3e0ead588fffe.txt``:

* line 2  – :func:`draw_rand`: user i presents a random vector rand_gi;
* line 3  – :func:`deal_shares`: s_gij ← sharing(rand_gi, |I_g|, t) for every j;
* line 7  – :func:`sum_received`: s_gi ← add(s_gji, j ∈ I_g);
* line 11 – :func:`recover_group_sum`: s_g ← reconstruction(s_gj, j ∈ I_g);
* line 12 – :func:`derive_key`: sk_gi ← rand_gi − s_g / |I_g|.

The paper shares with t = |I_g|; fairbus lets t be any 1 ≤ t ≤ |I_g|.
By Eq. (1), Σ_i sk_gi ≡ 0 (mod p), which :func:`keys_sum_to_zero` checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fairbus import field, shamir
from fairbus.csprng import expand_field, new_seed, substream_seed
from fairbus.errors import MismatchedShareError, ShamirError
from fairbus.field import FieldVector
from fairbus.shamir import Share

MIN_GROUP_SIZE = 3


@dataclass(frozen=True)
class GroupKeying:
    """Who is in a group and how its keys are shared.

    ``members`` are roster ids in ascending order; member k's Shamir point is k + 1.
    """

    members: tuple[int, ...]
    threshold: int

    def __post_init__(self) -> None:
        if len(self.members) < MIN_GROUP_SIZE:
            raise ShamirError(
                f"a group needs at least {MIN_GROUP_SIZE} members, got {len(self.members)}"
            )
        if list(self.members) != sorted(set(self.members)):
            raise ShamirError(f"group members must be distinct and ascending: {self.members}")
        if not 1 <= self.threshold <= len(self.members):
            raise ShamirError(f"threshold must be in 1..{len(self.members)}, got {self.threshold}")

    @classmethod
    def of(cls, members: Sequence[int], threshold: int | None = None) -> GroupKeying:
        """A keying for ``members`` (any order); threshold defaults to |I_g| as in the paper."""
        ordered = tuple(sorted(members))
        return cls(ordered, len(ordered) if threshold is None else threshold)

    @property
    def size(self) -> int:
        return len(self.members)

    def point_of(self, member: int) -> int:
        try:
            return self.members.index(member) + 1
        except ValueError:
            raise ShamirError(f"user {member} is not in group {self.members}") from None


@dataclass(frozen=True, eq=False)
class Dealt:
    """What one user produced in lines 2–3: its secret vector and one share per member."""

    rand: FieldVector
    shares: Mapping[int, Share]


def draw_rand(length: int, *, seed: bytes | None = None) -> FieldVector:
    """Line 2: a uniform random vector rand_gi (libsodium, expanded from a fresh seed)."""
    return expand_field(substream_seed(new_seed() if seed is None else seed, b"rand"), length)


def deal_shares(keying: GroupKeying, length: int, *, seed: bytes | None = None) -> Dealt:
    """Lines 2–3: draw rand_gi and share it among the group; shares keyed by recipient id."""
    seed = new_seed() if seed is None else seed
    rand = draw_rand(length, seed=seed)
    shares = shamir.share(rand, keying.size, keying.threshold, seed=substream_seed(seed, b"shares"))
    return Dealt(rand, {member: s for member, s in zip(keying.members, shares, strict=True)})


def sum_received(keying: GroupKeying, me: int, received: Mapping[int, Share]) -> Share:
    """Line 7: add the shares every member j dealt to me, giving my share of s_g.

    ``received`` maps dealer id → share and must hold exactly one share from every
    member (my own included), each taken at my point.
    """
    expected = set(keying.members)
    if set(received) != expected:
        missing = sorted(expected - set(received))
        extra = sorted(set(received) - expected)
        raise MismatchedShareError(
            f"user {me} needs a share from every member of {keying.members}: "
            f"missing {missing}, unexpected {extra}"
        )
    point = keying.point_of(me)
    for dealer, s in received.items():
        if s.x != point:
            raise MismatchedShareError(
                f"share from user {dealer} is at x={s.x}, but user {me}'s point is {point}"
            )
    return shamir.add_shares([received[j] for j in keying.members])


def recover_group_sum(keying: GroupKeying, summed: Mapping[int, Share]) -> FieldVector:
    """Line 11: reconstruct s_g = Σ_j rand_gj from the members' summed shares."""
    unknown = sorted(set(summed) - set(keying.members))
    if unknown:
        raise MismatchedShareError(f"summed shares from non-members {unknown}")
    for member, s in summed.items():
        if s.x != keying.point_of(member):
            raise MismatchedShareError(
                f"summed share of user {member} is at x={s.x}, expected {keying.point_of(member)}"
            )
    return shamir.reconstruct(list(summed.values()), keying.threshold)


def derive_key(rand: FieldVector, group_sum: FieldVector, group_size: int) -> FieldVector:
    """Line 12: sk_gi = rand_gi − s_g · |I_g|⁻¹ (mod p)."""
    if rand.shape != group_sum.shape:
        raise MismatchedShareError(
            f"rand has {rand.shape[0]} elements but s_g has {group_sum.shape[0]}"
        )
    return field.sub(rand, field.mul_scalar(group_sum, field.inverse(group_size)))


def keys_sum_to_zero(keys: Sequence[FieldVector]) -> bool:
    """Eq. (1): Σ_i sk_gi ≡ 0 (mod p)."""
    return not field.sum_vectors(list(keys)).any()


def negotiate_in_process(keying: GroupKeying, length: int) -> dict[int, FieldVector]:
    """Run all of Algorithm 3 for one group in this process; returns sk_gi per member.

    For tests and benchmarks. Real users run the same steps,
    exchanging shares through sealed envelopes.
    """
    dealt = {i: deal_shares(keying, length) for i in keying.members}
    summed = {
        i: sum_received(keying, i, {j: dealt[j].shares[i] for j in keying.members})
        for i in keying.members
    }
    keys: dict[int, FieldVector] = {}
    for i in keying.members:
        group_sum = recover_group_sum(keying, summed)
        keys[i] = derive_key(dealt[i].rand, group_sum, keying.size)
    return keys
