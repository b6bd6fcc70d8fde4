"""Algorithm 2 of the fairness paper (user grouping by user type) and the exposure check.

Basic groupings (``basic_groupings`` of them, lines 2-8) partition all users at
random into groups of three (groups of 3-5 when the count is not divisible by 3);
every member marks a basic group *active*. Focus groups (lines 9-16) put each key
user with two general users, ``key_repeats`` (KIN) times; the key user marks them
active, the two general users *passive*. Not in the paper: *reference* groups of three
trusted general users, active for no one, show what a clean group achieves this round
(:func:`fairbus.detection.group_contributions`).

The privacy invariant (docs/architecture.md, "Trust and privacy"; issue 12): the group
sums the provider can decrypt (every attempt of the round, and earlier rounds that started
from the same global model), together with the models of any c users (the task's
collusion bound: a member knows its own model, a free-rider's is the public global
model), must not determine any other user's model (:mod:`fairbus.exposure`). Groups have
max(3, c + 2) members. :func:`make_grouping` builds a grouping one group at a time and
admits a group only if the invariant still holds; users and the ledger run
:func:`check_grouping` with the task's c on every announcement and refuse one that fails.

At scale (issue 16, not in the paper): from 2 × :data:`BLOCK` users on, the users are
dealt into blocks of :data:`BLOCK` or a few more and Algorithm 2 runs in each block, so
every connected component of the grouping is one block; the exact check runs per
component (:func:`fairbus.exposure.components`), so grouping and check grow linearly
with the users (about 1 s for 1,000 users, 200 of them key users, under c = 1:
``fairbus bench scale``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

from fairbus.errors import GroupingError
from fairbus.exposure import (
    DEFAULT_COLLUSION,
    ExposureScreen,
    check_exposure,
    components,
    exposing_sets,
)
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


def group_size(c: int = DEFAULT_COLLUSION) -> int:
    """The size of a basic, focus or reference group under collusion bound ``c``: three,
    or c + 2 where that is more (a group of c + 1 is one circuit on its own: c members
    who pool their models read the last one from the sum)."""
    return max(MIN_GROUP, c + 2)


def check_grouping(
    grouping: Grouping | Sequence[Sequence[int]],
    prior_groups: Iterable[Sequence[int]] = (),
    c: int = DEFAULT_COLLUSION,
) -> None:
    """Refuse (raise :class:`GroupingError`) a grouping that has a group smaller than
    :func:`group_size` or whose sums, together with ``prior_groups`` (the groups of
    earlier attempts of the round, and of earlier rounds from the same global model) and
    the models of any ``c`` users, determine some other user's model
    (:func:`fairbus.exposure.check_exposure`, exact)."""
    member_lists = (
        [g.members for g in grouping.groups]
        if isinstance(grouping, Grouping)
        else [tuple(g) for g in grouping]
    )
    smallest = group_size(c)
    for members in member_lists:
        if len(set(members)) < smallest:
            raise GroupingError(
                f"group {sorted(members)} has fewer than {smallest} members (collusion bound {c})"
            )
    check_exposure(member_lists, c, prior_groups=prior_groups)


# --- Algorithm 2 ----------------------------------------------------------------------------


def partition_sizes(n: int, size: int = MIN_GROUP, count: int | None = None) -> list[int]:
    """Sizes of one basic grouping of n users: ``count`` groups (default n // size, the
    most there can be) of ``size`` or more, the remainder spread over them."""
    if n < size:
        raise GroupingError(f"need at least {size} users to form a group, have {n}")
    count = n // size if count is None else max(1, min(count, n // size))
    sizes = [size] * count
    for k in range(n - size * count):
        sizes[k % count] += 1
    return sizes


SAMPLES = 32
"""Candidate member sets drawn for one group before the search gives that group up."""

CANDIDATES = 4
"""Whole groupings built per call; the one with the most focus groups is kept (at 9 users
the first basic grouping decides whether a key user has room for one focus group or
two)."""

BLOCK_CANDIDATES = 1
"""Groupings built per block when :func:`make_grouping` groups in blocks (at most
``candidates``): at 100 users and 20% key users (two blocks of 50), four per block gave
3.22 focus groups per key user under c = 1 against 3.19 for one, 3.50 under c = 2 for
both, at about three times the time."""


@dataclass(frozen=True)
class _Saved:
    """A :class:`_Builder`'s state before a basic grouping is tried (undone if it fails)."""

    screen: ExposureScreen
    groups: int
    taken: set[tuple[int, ...]]
    mates: dict[int, set[int]]
    faces: set[tuple[int, ...]]


class _Builder:
    """Algorithm 2 a group at a time, each group admitted only if the groups so far
    (with the prior ones) still expose no one under c (:class:`ExposureScreen`)."""

    def __init__(
        self,
        users: list[int],
        c: int,
        prior: Sequence[Sequence[int]],
        rng: np.random.Generator,
        first: list[int],
        screen: ExposureScreen | None = None,
    ) -> None:
        universe = sorted({*users, *(u for g in prior for u in g)})
        self.screen = screen.copy() if screen is not None else ExposureScreen(universe, c, prior)
        """A copy of ``screen`` where given (a screen of exactly the prior groups, made once
        per :func:`make_grouping` call: its copies share their verdicts, so the builders
        of one call do not search twice for the same group on the same groups)."""
        self.users = users
        self.size = group_size(c)
        self.rng = rng
        self.groups: list[Group] = []
        self.taken: set[tuple[int, ...]] = set()
        self.first = first
        """The group sizes of the first basic grouping."""
        self.mates: dict[int, set[int]] = {u: set() for u in universe}
        """Who already shares a group with whom (prior groups included)."""
        self.faces: set[tuple[int, ...]] = set()
        """Every group's member sets with one member left out."""
        self.c = c
        for g in prior:
            self._meet(tuple(sorted(g)))

    def _meet(self, members: tuple[int, ...]) -> None:
        for u in members:
            self.mates[u].update(members)
            self.mates[u].discard(u)
        self.faces.update(combinations(members, len(members) - 1))

    def _add(self, kind: str, members: tuple[int, ...], focus: int | None = None) -> bool:
        if members in self.taken:
            return False
        # Two groups of the same size that differ in one member each give the difference
        # of two models: refused under c >= 1 without asking the screen.
        if self.c >= 1 and any(f in self.faces for f in combinations(members, len(members) - 1)):
            return False
        if not self.screen.try_add(members):
            return False
        self.taken.add(members)
        self._meet(members)
        self.groups.append(Group(len(self.groups), kind, members, focus))
        return True

    def _strangers(
        self, pool: Sequence[int], count: int, among: Collection[int]
    ) -> tuple[int, ...]:
        """``count`` users of ``pool`` drawn one by one, preferring users who share no
        group yet with those drawn (or with ``among``): under c ≥ 1 two groups of three
        that share two members expose both others, so such draws are tried first."""
        chosen: list[int] = []
        left = list(pool)
        for _ in range(count):
            met = set(among).union(*(self.mates[u] for u in chosen))
            fresh = [u for u in left if u not in met]
            source = fresh or left
            pick = source[int(self.rng.integers(len(source)))]
            chosen.append(pick)
            left.remove(pick)
        return tuple(sorted(chosen))

    def _candidates(
        self, pool: Sequence[int], count: int, among: Collection[int] = ()
    ) -> Iterator[tuple[int, ...]]:
        """Member sets of ``count`` from ``pool`` to try, in random order: all of them
        where they are few (a small pool has few that fit, and sampling misses them),
        else :data:`SAMPLES` draws of :meth:`_strangers`."""
        if math.comb(len(pool), count) <= SAMPLES:
            every = list(combinations(sorted(pool), count))
            yield from (every[int(k)] for k in self.rng.permutation(len(every)))
            return
        for _ in range(SAMPLES):
            yield self._strangers(pool, count, among)

    def partition(self, tries: int, sizes: list[int] | None = None) -> bool:
        """Lines 2-8: one basic grouping, every user in one group (of ``sizes``, by
        default those of the first); the groups are drawn one by one from the users not
        yet placed. All or nothing."""
        sizes = sizes or self.first
        if self.groups and self.screen.dimension - (len(sizes) - 1) < self.c + 1:
            return False  # a further partition mostly adds rank len(sizes) − 1: no room
        for _ in range(tries):
            saved = self._save()
            left = list(self.users)
            for size in sizes:
                if not any(self._take(left, members) for members in self._candidates(left, size)):
                    break
            else:
                return True
            self._restore(saved)
        return False

    def _save(self) -> _Saved:
        mates = {u: set(m) for u, m in self.mates.items()}
        return _Saved(self.screen.copy(), len(self.groups), set(self.taken), mates, set(self.faces))

    def _restore(self, saved: _Saved) -> None:
        self.screen, self.taken, self.mates, self.faces = (
            saved.screen, saved.taken, saved.mates, saved.faces
        )  # fmt: skip
        del self.groups[saved.groups :]

    def _take(self, left: list[int], members: tuple[int, ...]) -> bool:
        if not self._add(BASIC, members):
            return False
        for u in members:
            left.remove(u)
        return True

    def focus(self, key: int, pool: list[int]) -> bool:
        """Lines 10-15: one focus group of ``key`` and size − 1 users of ``pool``."""
        if len(pool) < self.size - 1 or self.screen.dimension <= self.c + 1:
            return False  # the rank is at its bound: every new group would expose
        others_pool = [u for u in pool if u != key]
        for others in self._candidates(others_pool, self.size - 1, {key, *self.mates[key]}):
            if self._add(FOCUS, tuple(sorted((key, *others))), focus=key):
                return True
        return False

    def reference(self, pool: list[int]) -> bool:
        """A reference group of ``size`` users of ``pool`` (not in the paper)."""
        if len(pool) < self.size or self.screen.dimension <= self.c + 1:
            return False
        return any(self._add(REFERENCE, m) for m in self._candidates(pool, self.size))


BLOCK = 45
"""Users per block (issue 16: grouping at scale). From 2 × BLOCK users on,
:func:`make_grouping` deals the users into blocks of BLOCK to 2 × BLOCK − 1 and groups each
block on its own, so that every connected component of the grouping is one block and
both the grouping and the exposure check (:func:`fairbus.exposure.components`) cost about
a constant per block. A component of b users holds groups of rank at most b − c − 1, so a
larger block leaves more room for focus groups, and the check of a block costs more.
Measured (``fairbus bench scale --block B``, 1,000 users, 200 key users, 3 groupings):
focus groups per key user under c = 1 / c = 2 were 1.56 / 1.12 with blocks of 9,
2.79 / 2.80 with 18, 3.02 / 3.33 with 30, 3.13 / 3.46 with 45 and 3.20 / 3.56 with 60
(one block of 100 users: 3.25 / 3.60); grouping and check took 0.8 / 9.5 s, 1.6 / 5.9 s,
1.4 / 3.8 s, 1.2 / 1.9 s and 1.1 / 2.5 s; the check alone (what every user and the
ledger run) 0.03 / 0.16 s with blocks of 9 up to 0.06 / 0.31 s with 60."""


def make_grouping(
    users: Iterable[int],
    key_users: Iterable[int] = (),
    *,
    c: int = DEFAULT_COLLUSION,
    basic_groupings: int = 2,
    key_repeats: int = 2,
    seed: int | Sequence[int] = 0,
    prior_groups: Sequence[Sequence[int]] = (),
    partners: Iterable[int] = (),
    references: int = 0,
    tries: int = 20,
    candidates: int = CANDIDATES,
    key_order: Sequence[int] = (),
    block: int = BLOCK,
) -> Grouping:
    """Algorithm 2 under the exposure check with collusion bound ``c``; deterministic for
    a given ``seed``.

    Built one group at a time, each admitted only while every model stays hidden from
    whoever holds the sums and any c models (:class:`fairbus.exposure.ExposureScreen`;
    the result is confirmed exactly). In order of what detection needs most: one basic
    grouping (lines 2-8; without it there is no round), then focus groups one per key
    user in turn, up to ``key_repeats`` each (lines 9-16), then further basic groupings up
    to ``basic_groupings``, each whole or not at all, then up to ``references`` reference
    groups of trusted general users. ``prior_groups`` are the groups whose
    sums the provider may hold already (earlier attempts of this round, earlier rounds
    from the same global model). ``key_order`` says which key users come first when
    room for focus groups is short (the provider's most suspected first); the others
    follow in a random order. Focus partners come from ``partners`` (the users the
    provider trusts most, general users first) where there are enough of them. Of
    ``candidates`` groupings built so, the one with the most focus groups is kept.

    Two groups of three may share at most one member under c ≥ 1, and the incidence matrix's rank
    stays at most n − c − 1, so room is scarce: at 9 users two basic groupings leave room
    for about one more group. Raises :class:`GroupingError` when not even one basic
    grouping passes.

    Not in the paper (issue 16): with 2 × ``block`` users or more, the users are dealt
    into blocks (:data:`BLOCK`; key users, trusted general users and the others each
    spread evenly, from a permutation drawn from ``seed``), blocks that prior groups link
    are merged, and each block is grouped as above on its own; every group stays inside
    its block. A basic grouping is then the union of the blocks' (it covers every user),
    and only as many as every block fits are kept. The grouping lists the first basic
    grouping, then the focus groups (first of every key user in ``key_order``, then the
    second, …), then the further basic groupings, then the reference groups; the exact
    check of the whole (per component, :func:`fairbus.exposure.exposing_sets`) is the
    final word.
    """
    active = sorted(set(users))
    keys = sorted(set(key_users) & set(active))
    if basic_groupings < 1 or key_repeats < 0 or references < 0 or block < 1:
        raise GroupingError(
            "need basic_groupings >= 1, key_repeats >= 0, references >= 0 and block >= 1"
        )
    rng = np.random.default_rng(seed)  # grouping is public: no CSPRNG needed
    first = [k for k in dict.fromkeys(key_order) if k in set(keys)]
    rest = [k for k in keys if k not in set(first)]
    order = first + [rest[int(k)] for k in rng.permutation(len(rest))]
    trusted = sorted(set(partners))
    blocks = _blocks(active, keys, trusted, prior_groups, block, rng)
    settings = _Settings(c, tries, candidates)
    if len(blocks) == 1:
        policy = _Policy(order, key_repeats, references, basic_groupings, trusted)
        build, achieved, basics = _build_block(active, prior_groups, policy, settings, rng)
        groups = _confirmed(build.groups, len(build.first), active, c, prior_groups)
        return Grouping(tuple(groups), frozenset(keys), max(achieved.values(), default=0), basics)
    settings = _Settings(c, tries, min(candidates, BLOCK_CANDIDATES))
    built = []
    for members, prior in blocks:
        inside = set(members)
        policy = _Policy([k for k in order if k in inside], key_repeats, 0, basic_groupings,
                         [u for u in trusted if u in inside])  # fmt: skip
        built.append((policy, prior, *_build_block(members, prior, policy, settings, rng)))
    _add_references([(policy, build) for policy, _, build, _, _ in built], references)
    return _assemble(built, order, keys, active, c, prior_groups)


@dataclass(frozen=True)
class _Settings:
    """The parameters of :func:`make_grouping` every block is built under."""

    c: int
    tries: int
    candidates: int


def _blocks(
    active: list[int],
    keys: list[int],
    partners: list[int],
    prior: Sequence[Sequence[int]],
    block: int,
    rng: np.random.Generator,
) -> list[tuple[list[int], list[tuple[int, ...]]]]:
    """The users dealt into ``len(active) // block`` blocks (one below 2 × ``block``,
    drawing nothing from ``rng``), each with the prior groups inside it.

    The check and the grouping of a block must see every group that touches it, so the
    users linked by prior groups (a connected component of them) go to one block, the
    largest such sets first, each to the block with the fewest users. Then the other
    users: key users, trusted general users and the other general users, each in a
    random order, each to the block with the fewest users (with no prior groups: dealt in
    turn, so every block gets its share of each). A block left with fewer than ``block``
    users (large prior components) is merged into the next smallest."""
    priors = [tuple(sorted({int(u) for u in g})) for g in prior]
    count = len(active) // block
    if count < 2:
        return [(active, priors)]
    is_active = set(active)
    linked: set[int] = set()
    units: list[tuple[list[int], list[tuple[int, ...]]]] = []
    for part in components(priors):
        linked.update(part.users)
        members = [u for u in part.users if u in is_active]
        if members:
            units.append((members, list(part.groups)))
    shuffled = [units[int(k)] for k in rng.permutation(len(units))]
    shuffled.sort(key=lambda unit: -len(unit[0]))  # stable: ties stay in random order
    bins: list[tuple[list[int], list[tuple[int, ...]]]] = [([], []) for _ in range(count)]

    def smallest() -> tuple[list[int], list[tuple[int, ...]]]:
        return min(bins, key=lambda b: len(b[0]))  # the first of the smallest

    for members, groups in shuffled:
        target = smallest()
        target[0].extend(members)
        target[1].extend(groups)
    free = [u for u in active if u not in linked]
    general = [u for u in free if u not in set(keys)]
    trusted = [u for u in general if u in set(partners)]
    others = [u for u in general if u not in set(partners)]
    for stratum in ([u for u in free if u in set(keys)], trusted, others):
        for k in rng.permutation(len(stratum)):
            smallest()[0].append(stratum[int(k)])
    while len(bins) > 1 and len(smallest()[0]) < block:
        low = smallest()
        bins.remove(low)
        target = smallest()
        target[0].extend(low[0])
        target[1].extend(low[1])
    return [(sorted(users), groups) for users, groups in bins]


def _build_block(
    active: list[int],
    prior_groups: Sequence[Sequence[int]],
    policy: _Policy,
    settings: _Settings,
    rng: np.random.Generator,
) -> tuple[_Builder, dict[int, int], int]:
    """Algorithm 2 for one block of users (all of them below 2 × :data:`BLOCK`): of
    ``candidates`` builders per size of the first basic grouping, the best; its focus
    groups per key user and its basic groupings."""
    c, tries = settings.c, settings.tries
    keys = policy.keys
    best: tuple[tuple[int, ...], _Builder, dict[int, int], int] | None = None
    most = len(partition_sizes(len(active), group_size(c)))
    universe = sorted({*active, *(u for g in prior_groups for u in g)})
    screen = ExposureScreen(universe, c, prior_groups)
    for count in (most, most - 1) if keys and most > 1 else (most,):
        # One group fewer in the first basic grouping frees rank for focus groups: at 6
        # users two groups of three leave room for none (a focus group of three shares
        # two members with one of them), one group of six for one.
        for _ in range(settings.candidates):
            sizes = partition_sizes(len(active), group_size(c), count)
            build = _Builder(active, c, prior_groups, rng, sizes, screen)
            if not build.partition(tries):
                continue
            achieved, basics = policy.fill(build, tries)
            served = tuple(achieved[k] for k in policy.keys)
            # Focus groups for someone first, then as many basic groups as fit, then
            # the most focus groups, most suspected key users first. (Ranking the most
            # focus groups first, so a coarser basic grouping whenever it frees room,
            # caught more attackers at 2+2 but excluded an honest user at 0+0: README.)
            rank = (min(sum(served), 1), count, sum(served), *served, len(build.groups))
            if best is None or rank > best[0]:
                best = (rank, build, achieved, basics)
        if best is not None and best[0][0] == 1:
            break
    if best is None:
        raise GroupingError(
            f"no grouping of users {active} keeps every model hidden under collusion bound "
            f"{c}, not even one basic grouping ({len(prior_groups)} earlier groups count)"
        )
    _, build, achieved, basics = best
    return build, achieved, basics


def _add_references(blocks: Sequence[tuple[_Policy, _Builder]], references: int) -> None:
    """Up to ``references`` reference groups over all blocks, one per block in turn."""
    placed = 0
    open_blocks = list(blocks)
    while placed < references and open_blocks:
        for entry in list(open_blocks):
            if placed == references:
                break
            policy, build = entry
            if build.reference(policy.reference_pool(build)):
                placed += 1
            else:
                open_blocks.remove(entry)


def _assemble(
    built: Sequence[tuple[_Policy, list[tuple[int, ...]], _Builder, dict[int, int], int]],
    order: list[int],
    keys: list[int],
    active: list[int],
    c: int,
    prior_groups: Sequence[Sequence[int]],
) -> Grouping:
    """The blocks' groups, each block's confirmed exactly, as one grouping in the order
    :func:`make_grouping` gives; the exact check of the whole decides."""
    confirmed = [
        (len(build.first), _confirmed(build.groups, len(build.first), build.users, c, prior))
        for _, prior, build, _, _ in built
    ]
    # whole basic groupings each block kept: its first and every further one complete
    basics = min(
        1 + sum(g.kind == BASIC for g in kept[width:]) // width for width, kept in confirmed
    )
    first: list[Group] = []
    focus: list[tuple[int, int, Group]] = []
    later: list[tuple[int, Group]] = []
    reference: list[Group] = []
    position = {k: i for i, k in enumerate(order)}
    achieved: dict[int, int] = {}
    for width, kept in confirmed:
        seen: dict[int, int] = {}
        later_count = 0
        for index, g in enumerate(kept):
            if index < width:
                first.append(g)
            elif g.kind == FOCUS and g.focus is not None:
                seen[g.focus] = seen.get(g.focus, 0) + 1
                focus.append((seen[g.focus], position[g.focus], g))
            elif g.kind == BASIC:
                partition = 1 + later_count // width
                later_count += 1
                if partition < basics:
                    later.append((partition, g))
            else:
                reference.append(g)
        achieved.update(seen)
    focus.sort(key=lambda item: item[:2])
    later.sort(key=lambda item: item[0])
    ordered = [*first, *(g for *_, g in focus), *(g for _, g in later), *reference]
    groups = tuple(replace(g, gid=gid) for gid, g in enumerate(ordered))
    universe = sorted({*active, *(u for g in prior_groups for u in g)})
    found = exposing_sets([*prior_groups, *(g.members for g in groups)], universe, c)
    if found:
        raise GroupingError(f"the grouping of users {active} failed the exact exposure check")
    return Grouping(groups, frozenset(keys), max(achieved.values(), default=0), basics)


@dataclass(frozen=True)
class _Policy:
    """What :func:`make_grouping` adds after the first basic grouping, in order."""

    keys: list[int]
    """In the order their focus groups are built, one each in turn."""
    key_repeats: int
    references: int
    basic_groupings: int
    partners: list[int]

    def fill(self, build: _Builder, tries: int) -> tuple[dict[int, int], int]:
        """Focus groups one per key user in turn (lines 9-16), further basic groupings,
        then reference groups; the focus groups per key user and the basic groupings."""
        active = build.users
        preferred = [u for u in self.partners if u in set(active)]
        general = [u for u in active if u not in self.keys]
        trusted_general = [u for u in preferred if u in general]
        pools = {
            key: _focus_pool(key, active, general, trusted_general, preferred, build.size)
            for key in self.keys
        }
        achieved = dict.fromkeys(self.keys, 0)
        open_keys = list(self.keys)
        for _ in range(self.key_repeats):
            for key in list(open_keys):
                if build.focus(key, pools[key]):
                    achieved[key] += 1
                else:
                    open_keys.remove(key)
        basics = 1
        while basics < self.basic_groupings and build.partition(max(1, tries // 4)):
            basics += 1
        reference_pool = self.reference_pool(build)
        for _ in range(self.references):
            if not build.reference(reference_pool):
                break
        return achieved, basics

    def reference_pool(self, build: _Builder) -> list[int]:
        """Whom reference groups draw from: the trusted general users of ``build``'s
        users, or where they are too few for a group, the trusted users (key users too)."""
        inside = set(build.users)
        preferred = [u for u in self.partners if u in inside]
        trusted_general = [u for u in preferred if u not in set(self.keys)]
        return trusted_general if len(trusted_general) >= build.size else preferred


def _confirmed(
    groups: list[Group], first: int, users: list[int], c: int, prior: Sequence[Sequence[int]]
) -> list[Group]:
    """The screen works modulo a prime; confirm exactly. Should the exact check find a
    set the screen missed (about one chance in 2**31), drop the last groups until it
    passes; the first basic grouping is never dropped alone."""
    kept = list(groups)
    universe = sorted({*users, *(u for g in prior for u in g)})
    while kept and exposing_sets([*prior, *(g.members for g in kept)], universe, c):
        kept.pop()
    if len(kept) < first:
        raise GroupingError(f"no grouping of users {users} passed the exact exposure check")
    return kept


def _focus_pool(
    key: int,
    users: list[int],
    general: list[int],
    trusted_general: list[int],
    partners: list[int],
    size: int,
) -> list[int]:
    """Whom a focus group of ``key`` draws its others from, first that has enough:
    trusted general users (line 12), trusted users, general users, anyone."""
    need = size - 1
    for pool in (trusted_general, [u for u in partners if u != key], general):
        if len(pool) >= need:
            return pool
    return [u for u in users if u != key]


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
