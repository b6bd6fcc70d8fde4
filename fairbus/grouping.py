"""Algorithm 2 of the fairness paper (user grouping by user type) and the exposure check.

Basic groupings (``basic_groupings`` of them, lines 2-8) partition all users at
random into groups of three (groups of 3-5 when the count is not divisible by 3);
every member marks a basic group *active*. Focus groups (lines 9-16) put each key
user with two general users, ``key_repeats`` (KIN) times; the key user marks them
active, the two general users *passive*. Not in the paper: *reference* groups of three
trusted general users, active for no one, show what a clean group achieves this round
(:func:`fairbus.detection.group_contributions`).

The privacy invariant (docs/architecture.md, "Trust and privacy") is enforced here: the
group sums the provider can decrypt within a round (over all attempts) must not determine
any single user's model, i.e. no unit vector e_u lies in the row space of the group
incidence matrix.
A grouping that fails is resampled; if no sample passes, focus repeats are reduced,
then basic groupings; if nothing works a :class:`GroupingError` says so. Users run
:func:`check_grouping` on what they receive and refuse a grouping that fails it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from fairbus.errors import GroupingError
from fairbus.keyneg import MIN_GROUP_SIZE as MIN_GROUP

if TYPE_CHECKING:
    from fairbus.wire.messages import GroupSpec

BASIC = "basic"
FOCUS = "focus"
REFERENCE = "reference"
GROUP_KINDS = (BASIC, FOCUS, REFERENCE)


@dataclass(frozen=True)
class Group:
    """One group: ``members`` ascending; ``focus`` is the key user of a focus group."""

    gid: int
    kind: str
    members: tuple[int, ...]
    focus: int | None = None


@dataclass(frozen=True)
class Grouping:
    """The output of Algorithm 2: G_b, G_k and, per user, G_a^i and G_p^i."""

    groups: tuple[Group, ...]
    key_users: frozenset[int]
    key_repeats: int
    basic_groupings: int

    @property
    def users(self) -> tuple[int, ...]:
        return tuple(sorted({u for g in self.groups for u in g.members}))

    @property
    def basic(self) -> tuple[Group, ...]:
        """G_b."""
        return tuple(g for g in self.groups if g.kind == BASIC)

    @property
    def focus(self) -> tuple[Group, ...]:
        """G_k."""
        return tuple(g for g in self.groups if g.kind == FOCUS)

    def active(self, user: int) -> tuple[Group, ...]:
        """G_a^i: the basic groups of ``user`` and the focus groups built around it."""
        return tuple(
            g
            for g in self.groups
            if (g.kind == BASIC and user in g.members) or (g.kind == FOCUS and g.focus == user)
        )

    def passive(self, user: int) -> tuple[Group, ...]:
        """G_p^i: focus groups that ``user`` joins as one of the two general users."""
        return tuple(g for g in self.focus if user in g.members and g.focus != user)

    def group(self, gid: int) -> Group:
        for g in self.groups:
            if g.gid == gid:
                return g
        raise GroupingError(f"no group {gid} in this grouping")


# --- the exposure check -----------------------------------------------------------------


def exposed_users(groups: Iterable[Sequence[int]]) -> list[int]:
    """Users whose model is determined by the sums of ``groups`` (exact, over the rationals).

    e_u is in the row space of the incidence matrix iff the reduced row echelon form
    has the row e_u. Exact Fraction arithmetic: this is a privacy check, and the
    matrices (tens of groups by tens of users) are small.
    """
    rows = [sorted(set(g)) for g in groups]
    users = sorted({u for g in rows for u in g})
    column = {u: k for k, u in enumerate(users)}
    matrix = []
    for g in rows:
        row = [Fraction(0)] * len(users)
        for u in g:
            row[column[u]] = Fraction(1)
        matrix.append(row)
    rref = _rref(matrix)
    exposed = []
    for row in rref:
        nonzero = [k for k, v in enumerate(row) if v != 0]
        if len(nonzero) == 1:
            exposed.append(users[nonzero[0]])
    return sorted(exposed)


def _rref(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    rows = [r[:] for r in matrix]
    if not rows:
        return []
    width = len(rows[0])
    pivot_row = 0
    for col in range(width):
        pivot = next((r for r in range(pivot_row, len(rows)) if rows[r][col] != 0), None)
        if pivot is None:
            continue
        rows[pivot_row], rows[pivot] = rows[pivot], rows[pivot_row]
        lead = rows[pivot_row][col]
        rows[pivot_row] = [v / lead for v in rows[pivot_row]]
        for r in range(len(rows)):
            if r != pivot_row and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[pivot_row], strict=True)]
        pivot_row += 1
        if pivot_row == len(rows):
            break
    return rows[:pivot_row]


def _probably_exposed(member_lists: Sequence[Sequence[int]]) -> bool:
    """Fast float screen: diag of the projection onto the row space is 1 for exposed users.

    Only ever used to *reject* quickly; a grouping it passes is confirmed exactly.
    """
    users = sorted({u for g in member_lists for u in g})
    column = {u: k for k, u in enumerate(users)}
    matrix = np.zeros((len(member_lists), len(users)))
    for r, g in enumerate(member_lists):
        matrix[r, [column[u] for u in g]] = 1.0
    _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    basis = vt[singular > 1e-9 * max(1.0, float(singular.max(initial=0.0)))]
    return bool((np.einsum("ij,ij->j", basis, basis) > 1 - 1e-6).any())


def check_grouping(
    grouping: Grouping | Sequence[Sequence[int]],
    prior_groups: Iterable[Sequence[int]] = (),
) -> None:
    """Refuse (raise :class:`GroupingError`) a grouping that has a group smaller than 3 or,
    together with ``prior_groups`` of the same round, determines some user's model."""
    member_lists = (
        [g.members for g in grouping.groups]
        if isinstance(grouping, Grouping)
        else [tuple(g) for g in grouping]
    )
    for members in member_lists:
        if len(set(members)) < MIN_GROUP:
            raise GroupingError(f"group {sorted(members)} has fewer than {MIN_GROUP} members")
    exposed = exposed_users([*prior_groups, *member_lists])
    if exposed:
        raise GroupingError(
            f"the group sums of this round would determine the model of user(s) {exposed}"
        )


# --- Algorithm 2 ----------------------------------------------------------------------------


def partition_sizes(n: int) -> list[int]:
    """Sizes of one basic grouping of n users: n // 3 groups of 3, the remainder spread."""
    if n < MIN_GROUP:
        raise GroupingError(f"need at least {MIN_GROUP} users to form a group, have {n}")
    count = n // MIN_GROUP
    sizes = [MIN_GROUP] * count
    for k in range(n - MIN_GROUP * count):
        sizes[k % count] += 1
    return sizes


def _sample(
    users: list[int],
    key_users: list[int],
    basic_groupings: int,
    key_repeats: int,
    rng: np.random.Generator,
    partners: list[int],
    references: int,
) -> list[Group]:
    groups: list[Group] = []
    seen: set[tuple[int, ...]] = set()
    sizes = partition_sizes(len(users))
    allow_duplicates = len(users) < 2 * MIN_GROUP
    for _ in range(basic_groupings):  # lines 2-8
        for _retry in range(50):
            order = [users[k] for k in rng.permutation(len(users))]
            start, part = 0, []
            for size in sizes:
                part.append(tuple(sorted(order[start : start + size])))
                start += size
            if allow_duplicates or not seen.intersection(part):
                break
        for members in part:
            seen.add(members)
            groups.append(Group(len(groups), BASIC, members))
    general = [u for u in users if u not in key_users]
    trusted_general = [u for u in partners if u in general]
    # too few trusted general users for a reference group: trusted key users too
    preferred = trusted_general if len(trusted_general) >= MIN_GROUP else list(partners)
    for key in key_users:  # lines 9-16
        pool = _focus_pool(key, users, general, trusted_general, partners)
        chosen: set[tuple[int, ...]] = set()
        for _ in range(key_repeats):
            # A repeat of the same members would be the same model: no new evidence.
            for _retry in range(20):
                picks = rng.choice(len(pool), size=MIN_GROUP - 1, replace=False)
                members = tuple(sorted([key, *(pool[int(k)] for k in picks)]))
                if members not in chosen:
                    chosen.add(members)
                    groups.append(Group(len(groups), FOCUS, members, focus=key))
                    break
    taken = {g.members for g in groups}
    for _ in range(references if len(preferred) >= MIN_GROUP else 0):
        picks = rng.choice(len(preferred), size=MIN_GROUP, replace=False)
        members = tuple(sorted(preferred[int(k)] for k in picks))
        if members not in taken:
            taken.add(members)
            groups.append(Group(len(groups), REFERENCE, members))
    return groups


def _focus_pool(
    key: int,
    users: list[int],
    general: list[int],
    trusted_general: list[int],
    partners: list[int],
) -> list[int]:
    """Whom a focus group of ``key`` draws its two others from, first that has two:
    trusted general users (line 12), trusted users, general users, anyone."""
    need = MIN_GROUP - 1
    for pool in (trusted_general, [u for u in partners if u != key], general):
        if len(pool) >= need:
            return pool
    return [u for u in users if u != key]


def make_grouping(
    users: Iterable[int],
    key_users: Iterable[int] = (),
    *,
    basic_groupings: int = 2,
    key_repeats: int = 2,
    seed: int | Sequence[int] = 0,
    prior_groups: Sequence[Sequence[int]] = (),
    partners: Iterable[int] = (),
    references: int = 0,
    tries: int = 200,
) -> Grouping:
    """Algorithm 2 with the exposure check; deterministic for a given ``seed``.

    ``prior_groups`` are the groups of earlier attempts of this round whose sums the
    provider may hold. Focus partners are drawn from ``partners`` (the general users the
    provider trusts most) when at least two of them take part, else from all general
    users; ``references`` reference groups of three of them are added where there are
    at least three partners. When no sample of ``tries`` passes the check, focus
    repeats are reduced, down to one, then reference groups, then basic groupings; focus
    groups (the groups that say most about a key user) go last. A reference group is
    what tells a free-rider's focus groups from clean ones when every key user is an
    attacker.
    """
    active = sorted(set(users))
    keys = sorted(set(key_users) & set(active))
    if basic_groupings < 1 or key_repeats < 0:
        raise GroupingError("need basic_groupings >= 1 and key_repeats >= 0")
    partition_sizes(len(active))
    preferred = sorted(set(partners) & set(active))
    rng = np.random.default_rng(seed)  # grouping is public: no CSPRNG needed
    basics_down = range(basic_groupings, 0, -1)
    kin_down = range(key_repeats, 0, -1)
    shapes = [(b, k, r) for b in basics_down for r in range(references, 0, -1) for k in kin_down]
    shapes += [(b, k, 0) for b in basics_down for k in kin_down]
    shapes += [(b, 0, r) for b in basics_down for r in range(references, -1, -1)]
    for basics, kin, ref in shapes:
        for _ in range(tries):
            groups = _sample(active, keys, basics, kin, rng, preferred, ref)
            if _probably_exposed([*prior_groups, *(g.members for g in groups)]):
                continue
            try:
                check_grouping([g.members for g in groups], prior_groups)
            except GroupingError:
                continue
            return Grouping(tuple(groups), frozenset(keys), kin, basics)
    raise GroupingError(
        f"no grouping of users {active} with key users {keys} keeps every model hidden, "
        f"even with one basic grouping and no focus groups ({len(prior_groups)} earlier "
        "groups this round)"
    )


def announced_group_problems(groups: Sequence[GroupSpec], users: Collection[int]) -> list[str]:
    """What is wrong with the groups of an announcement, each problem in words (empty when
    none): group ids distinct; every member one of ``users`` (the roster's users: no
    unknown id, no provider, ledger node or admin), members strictly ascending (sorted,
    none twice), at least three of them, the Shamir threshold equal to the group size
    (Alg. 3 as written: a lower threshold lets fewer than all members unmask one), and
    kind and focus user agreeing (a basic or reference group has none; a focus group has
    one, among its members). The ledger and every user apply this same check."""
    problems: list[str] = []
    gids = [g.gid for g in groups]
    if len(set(gids)) != len(gids):
        problems.append(f"group ids repeat: {gids}")
    for g in groups:
        where = f"group {g.gid}"
        members = list(g.members)
        strangers = sorted(set(members) - set(users))
        if strangers:
            problems.append(f"{where} names {strangers}, not users of the roster")
        if len(set(members)) != len(members):
            problems.append(f"{where} names a member twice: {members}")
        elif members != sorted(members):
            problems.append(f"{where} lists its members out of order: {members}")
        if len(set(members)) < MIN_GROUP:
            problems.append(f"{where} has {len(set(members))} members, fewer than {MIN_GROUP}")
        if g.threshold != len(members):
            problems.append(
                f"{where} has Shamir threshold {g.threshold}; it must equal the group "
                f"size {len(members)}"
            )
        if g.kind == FOCUS:
            if g.focus is None or g.focus not in members:
                problems.append(f"focus {where} does not contain its key user ({g.focus})")
        elif g.focus is not None:
            problems.append(f"{g.kind} {where} names a focus user ({g.focus})")
    return problems
