"""The exposure check with known models: a collusion bound c (issue 12, item 2).

The privacy invariant (docs/architecture.md, "Trust and privacy"): the group sums the
provider can decrypt must not determine any individual model. Today's check
(:func:`fairbus.grouping.exposed_users`) treats every model as unknown. But a member
always knows its own model and a free-rider's model is the public global model, so two
groups that share two members ({1,2,3} and {1,2,4} give x3 − x4) let anyone who knows x4
read x3. Issue 12 asks for the check *with the models of any c other users known*: c is
the task's collusion bound (default 1, 2 or more allowed).

The math
--------
Let A be the group incidence matrix (rows = groups, columns = users, 0/1), so the
provider learns A·x. A linear combination y·A·x of the sums is a vector v = yA of the row
space R(A); it involves exactly the models on supp(v). Knowing the models of c users K
determines the model of a user u ∉ K iff some v ∈ R(A) has v_u ≠ 0 and supp(v) ⊆ K ∪ {u}.
So a set of groups **exposes someone under c iff some non-zero v ∈ R(A) has at most
c + 1 users in its support** (c = 0: a unit vector e_u, today's check; c = 1: also
x_u − α·x_v).

R(A) is the orthogonal complement of the null space ker A. Let N (n × k) be a basis of
ker A, one row N_u per user. A vector supported on S lies in R(A) iff it is orthogonal to
every column of N, i.e. iff its restriction v_S satisfies N_Sᵀ v_S = 0; a non-zero one
exists iff the rows {N_u : u ∈ S} are linearly dependent. The minimal such S are the
*circuits* of the vector configuration {N_u} (the cocircuits of A's column matroid). So
the check asks for circuits of at most c + 1 rows of N, and :func:`exposing_sets` lists
exactly those: each circuit S reveals any one of its users to whoever knows the other
|S| − 1 models.

- **c = 0**: zero rows of N (u's column of A is not needed for the rank: e_u ∈ R(A)).
- **c = 1**: also pairs of parallel rows. Each non-zero row is brought to its primitive
  integer form (divided by the gcd of its entries, first non-zero entry positive); two
  rows are parallel iff these forms are equal, so one hash pass finds every pair.
- **c ≥ 2**: circuits of 3..c + 1 rows among the distinct directions (one row per
  parallel class; a circuit of three or more rows holds at most one row of a class, and
  any row of the class can stand in for it). A circuit S with smallest member a is
  {a} ∪ D where D is a circuit of the configuration *projected along a* (the rows after
  a, with their a-component eliminated and that coordinate dropped) and D is not itself a
  circuit; so the search recurses one size down per level and at the bottom is the c = 1
  hash pass. This runs modulo a 31-bit prime p in numpy. Reduction mod p can only lower a
  rank, so every true circuit is dependent mod p: the search misses none, and each circuit
  it reports is confirmed exactly (``fmpz_mat.rank`` over ℤ). If every reported circuit
  is confirmed, the list is exactly the rational one (a rational circuit contains a
  modular one, which, being rationally dependent, is all of it); if one is not, p was
  unlucky for this matrix and the next prime is tried; after four primes the same
  search runs in exact integer arithmetic.

Everything is exact: the null space is computed over ℤ by python-flint
(``fmpz_mat.nullspace``, fraction-free elimination in C), never in floats.

Connected components (issue 16: the check at scale)
---------------------------------------------------
Users are linked when they share a group; the check runs on each connected component on
its own (:func:`components`), which is exact. Ordered by component, A is block-diagonal,
so R(A) = ⊕ R(A_i), and every v ∈ R(A) is the sum of its restrictions v|U_i, each in
R(A_i) ⊆ R(A) with support inside supp(v): some non-zero v ∈ R(A) has at most c + 1
users in its support iff some R(A_i) holds one, and every circuit lies in one component.
A grouping built in blocks of a few dozen users (:func:`fairbus.grouping.make_grouping`)
is checked in O(n) null spaces of a few dozen columns each, not one of n.

Complexity (m groups, n users, rank r, k = n − r, R ≤ n distinct non-zero directions):
null space O(m·n·r) in C; c = 0 and c = 1: O(n·k) more (gcds and one hash per user);
c ≥ 2: O(R^c · k) modular operations (numpy, R^(c−1) projections of O(R·k) each, so
O(R²k) for c = 2 and O(R³k) for c = 3), plus one small exact rank per circuit found.
:class:`ExposureScreen` adds one group to an existing (modular) null-space basis in
O(n·k), for a grouping built a group at a time; for c ≤ 1 it looks for parallel rows
through two fixed random projections (O(n·k), no per-row normalisation), for c = 2 for
dependent triples through a fixed projection to three coordinates (O(n·k + n²), each
alarm settled exactly mod p: :func:`_no_circuit_of_three`), and it refuses
at once a group that would push the rank past n − c − 1 (any row space of dimension r
holds a vector on at most n − r + 1 users). Its verdicts are a screen, and the final set
of groups is confirmed by :func:`exposing_sets`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
from flint import fmpz_mat
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from fairbus.errors import GroupingError

DEFAULT_COLLUSION = 1
"""Issue 12: a member knows its own model, and a free-rider's model is public."""

PRIMES = (2_147_483_647, 2_147_483_629, 2_147_483_587, 2_147_483_579)
"""31-bit primes for the modular search (c ≥ 2): products of two residues fit in int64."""

Circuit: TypeAlias = tuple[int, ...]
_Matrix: TypeAlias = npt.NDArray[np.int64]


# --- the null space -----------------------------------------------------------------------


@dataclass(frozen=True)
class NullSpace:
    """An exact integer basis N of ker A, one row per user: ``rows[i]`` is the row of
    ``users[i]`` (k entries). Users are sorted; ``rank`` is the rank of A."""

    users: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...]
    dimension: int

    @property
    def rank(self) -> int:
        return len(self.users) - self.dimension


def _normalize(
    groups: Iterable[Iterable[int]], users: Iterable[int] | None
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    rows = [tuple(sorted({int(u) for u in g})) for g in groups]
    rows = [g for g in rows if g]
    members = {u for g in rows for u in g}
    if users is None:
        return tuple(sorted(members)), rows
    universe = tuple(sorted({int(u) for u in users}))
    outside = members - set(universe)
    if outside:
        raise GroupingError(f"groups name users {sorted(outside)} outside the given users")
    return universe, rows


def null_space(groups: Iterable[Iterable[int]], users: Iterable[int] | None = None) -> NullSpace:
    """The exact null space of the incidence matrix of ``groups`` (python-flint, over ℤ).

    ``users`` fixes the columns (default: everyone in a group). A user in no group has a
    zero column, so e_u is in the null space: its row is independent of all others and it
    is never exposed.
    """
    universe, rows = _normalize(groups, users)
    n = len(universe)
    if not rows:
        identity = tuple(tuple(int(i == j) for j in range(n)) for i in range(n))
        return NullSpace(universe, identity, n)
    column = {u: i for i, u in enumerate(universe)}
    flat = [0] * (len(rows) * n)
    for r, members in enumerate(rows):
        for u in members:
            flat[r * n + column[u]] = 1
    basis, dimension = fmpz_mat(len(rows), n, flat).nullspace()
    # the first `dimension` columns of `basis` span ker A: read only those, as rows
    columns = [[int(x) for x in line] for line in basis.transpose().tolist()[:dimension]]
    space = tuple(zip(*columns, strict=True)) if columns else ((),) * n
    return NullSpace(universe, tuple(space), int(dimension))


# --- the check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A connected component of a set of groups: its users (ascending) and its groups
    (each ascending, in their original order). Users linked by sharing a group, directly
    or through others, are in the same component."""

    users: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]


def components(
    groups: Iterable[Iterable[int]], users: Iterable[int] | None = None
) -> list[Component]:
    """The connected components of ``groups`` (``scipy.sparse.csgraph``, on the bipartite
    graph of users and groups), ordered by their smallest user. A user of ``users`` in no
    group is in none: nothing about it is revealed. Each group (and each user in a group)
    is in exactly one component, and the exposure check on ``groups`` is exactly the
    checks on the components (module docstring, "Connected components")."""
    universe, rows = _normalize(groups, users)
    return _components(universe, rows)


def _components(universe: tuple[int, ...], rows: list[tuple[int, ...]]) -> list[Component]:
    if not rows:
        return []
    column = {u: i for i, u in enumerate(universe)}
    n, m = len(universe), len(rows)
    user_index = [column[u] for members in rows for u in members]
    group_index = [n + r for r, members in enumerate(rows) for _ in members]
    graph = coo_array(
        (np.ones(len(user_index), dtype=np.int8), (user_index, group_index)), shape=(n + m, n + m)
    )
    _, labels = connected_components(graph, directed=False)
    by_label: dict[int, list[tuple[int, ...]]] = {}
    for r, members in enumerate(rows):
        by_label.setdefault(int(labels[n + r]), []).append(members)
    parts = [
        Component(tuple(sorted({u for g in member_rows for u in g})), tuple(member_rows))
        for member_rows in by_label.values()
    ]
    return sorted(parts, key=lambda part: part.users[0])


def exposing_sets(
    groups: Iterable[Iterable[int]],
    users: Iterable[int] | None = None,
    c: int = DEFAULT_COLLUSION,
) -> list[Circuit]:
    """Every minimal set of at most c + 1 users whose models the sums of ``groups``
    tie together (issue 12, item 2): whoever knows all but one of a set's models learns
    the last. Empty iff the groups expose no one under collusion bound ``c``.

    Each set is a sorted tuple of user ids; the list is sorted by size, then ids, and is
    the same for the same input. Checked per connected component (:func:`components`),
    which is exact; see the module docstring for the math.
    """
    _check_bound(c)
    found: list[Circuit] = []
    for part in components(groups, users):
        found.extend(_component_sets(part, c))
    return sorted(found, key=lambda s: (len(s), s))


def clear_check_cache() -> None:
    """Forget every component checked so far (a benchmark timing one user's check)."""
    _component_sets.cache_clear()


@functools.lru_cache(maxsize=256)
def _component_sets(part: Component, c: int) -> tuple[Circuit, ...]:
    """Every exposing set of one component: a pure function of immutable input, kept
    because one process may run many machines that check the same announcement (the
    simulator's users, a ledger node re-checking what the provider checked)."""
    return tuple(_search(null_space(part.groups, part.users), c, first_only=False))


def is_safe(
    groups: Iterable[Iterable[int]],
    c: int = DEFAULT_COLLUSION,
    users: Iterable[int] | None = None,
) -> bool:
    """True iff no user's model is determined by the sums of ``groups`` together with the
    models of any ``c`` other users. Per connected component; stops at the first
    exposing set."""
    _check_bound(c)
    return not any(
        _search(null_space(part.groups, part.users), c, first_only=True)
        for part in components(groups, users)
    )


def check_exposure(
    groups: Iterable[Iterable[int]],
    c: int = DEFAULT_COLLUSION,
    users: Iterable[int] | None = None,
    prior_groups: Iterable[Iterable[int]] = (),
) -> None:
    """Raise :class:`GroupingError` if ``prior_groups`` and ``groups`` together expose
    someone under collusion bound ``c``; the message names up to five exposing sets."""
    found = exposing_sets([*prior_groups, *groups], users, c)
    if found:
        shown = ", ".join("{" + ", ".join(map(str, s)) + "}" for s in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise GroupingError(
            f"with the models of {c} other user(s) known, the group sums of this round "
            f"would determine a model in each of {shown}{more}"
        )


def _check_bound(c: int) -> None:
    if isinstance(c, bool) or not isinstance(c, int) or c < 0:
        raise GroupingError(f"the collusion bound must be an integer >= 0, not {c!r}")


def _primitive(row: Sequence[int]) -> tuple[int, ...] | None:
    """The row divided by the gcd of its entries, first non-zero entry positive; None for
    a zero row. Two non-zero integer rows are parallel iff their primitive forms agree."""
    divisor = math.gcd(*row)
    if divisor == 0:
        return None
    if next(x for x in row if x) < 0:
        divisor = -divisor
    return tuple(x // divisor for x in row)


def _search(space: NullSpace, c: int, *, first_only: bool) -> list[Circuit]:
    _check_bound(c)
    found: list[tuple[int, ...]] = []
    classes: dict[tuple[int, ...], list[int]] = {}
    for index, row in enumerate(space.rows):
        key = _primitive(row)
        if key is None:
            found.append((index,))
        else:
            classes.setdefault(key, []).append(index)
    if c >= 1:
        for members in classes.values():
            found.extend(combinations(members, 2))
    if first_only and found:
        return [tuple(space.users[i] for i in found[0])]
    if c >= 2 and len(classes) >= 3:
        directions = list(classes)
        for circuit in _larger_circuits(directions, c + 1, first_only=first_only):
            for choice in product(*(classes[directions[j]] for j in circuit)):
                found.append(tuple(sorted(choice)))
            if first_only:
                break
    named = [tuple(space.users[i] for i in s) for s in found]
    return sorted(named, key=lambda s: (len(s), s))


def _larger_circuits(
    vectors: Sequence[tuple[int, ...]], max_size: int, *, first_only: bool
) -> list[Circuit]:
    """Circuits of 3..``max_size`` rows among pairwise non-parallel non-zero integer
    ``vectors``: modular search, each hit confirmed exactly (see the module docstring)."""
    for prime in PRIMES:
        rows = _ModP(np.array([[x % prime for x in v] for v in vectors], dtype=np.int64), prime)
        loops, classes = rows.classes()
        if loops or len(classes) < len(vectors):
            continue  # two directions coincide mod p: an unlucky prime for this matrix
        confirmed: list[Circuit] = []
        for circuit in _simple_circuits(rows, max_size):
            if not _dependent(vectors, circuit):
                break
            confirmed.append(circuit)
            if first_only:
                return confirmed
        else:
            return sorted(confirmed)
    return sorted(_simple_circuits(_Exact(list(vectors)), max_size))


def _dependent(vectors: Sequence[tuple[int, ...]], circuit: Circuit) -> bool:
    chosen = [list(vectors[i]) for i in circuit]
    return bool(fmpz_mat(chosen).rank() < len(circuit))


# --- circuits of a vector configuration -----------------------------------------------------


class _Rows(Protocol):
    """A configuration of row vectors over a field (ℚ exactly, or GF(p))."""

    def __len__(self) -> int: ...

    def classes(self) -> tuple[list[int], list[list[int]]]:
        """Zero rows, and the non-zero rows grouped into parallel classes (each
        ascending, classes in order of their first row)."""
        ...

    def take(self, indices: Sequence[int]) -> _Rows: ...

    def project_after(self, a: int) -> _Rows:
        """Rows a+1.. with their component along row a removed (row a is non-zero)."""
        ...


def _all_circuits(rows: _Rows, max_size: int) -> Iterator[Circuit]:
    """Every circuit (minimal dependent set of rows) of at most ``max_size`` rows."""
    loops, classes = rows.classes()
    for index in loops:
        yield (index,)
    if max_size < 2:
        return
    for members in classes:
        yield from combinations(members, 2)
    if max_size < 3 or len(classes) < 3:
        return
    representatives = [members[0] for members in classes]
    for circuit in _simple_circuits(rows.take(representatives), max_size):
        for choice in product(*(classes[j] for j in circuit)):
            yield tuple(sorted(choice))


def _simple_circuits(rows: _Rows, max_size: int) -> Iterator[Circuit]:
    """Circuits of 3..``max_size`` rows of a configuration with no zero and no parallel
    rows. The circuits whose smallest row is a are {a} ∪ D for the circuits D of the rows
    after a projected along a, except those D that are circuits themselves; going from the
    last a down, those are already known."""
    found: set[Circuit] = set()
    for a in range(len(rows) - 3, -1, -1):
        for sub in _all_circuits(rows.project_after(a), max_size - 1):
            if len(sub) < 2:
                continue  # a row parallel to row a: not in a simple configuration
            tail = tuple(a + 1 + i for i in sub)
            if len(tail) >= 3 and tail in found:
                continue
            circuit = (a, *tail)
            found.add(circuit)
            yield circuit


class _ModP:
    """Rows over GF(p), p < 2**31, as an int64 matrix of residues."""

    def __init__(self, matrix: _Matrix, prime: int) -> None:
        self.matrix = matrix
        self.prime = prime

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def classes(self) -> tuple[list[int], list[list[int]]]:
        nonzero = (self.matrix != 0).any(axis=1)
        loops = [int(i) for i in np.flatnonzero(~nonzero)]
        indices = [int(i) for i in np.flatnonzero(nonzero)]
        canonical = _scale_to_monic(self.matrix[nonzero], self.prime)
        classes: dict[bytes, list[int]] = {}
        for index, row in zip(indices, canonical, strict=True):
            classes.setdefault(row.tobytes(), []).append(index)
        return loops, list(classes.values())

    def take(self, indices: Sequence[int]) -> _ModP:
        return _ModP(self.matrix[list(indices)], self.prime)

    def project_after(self, a: int) -> _ModP:
        p = self.prime
        pivot_row = self.matrix[a]
        j = int(np.flatnonzero(pivot_row)[0])
        pivot_row = pivot_row * pow(int(pivot_row[j]), p - 2, p) % p
        rest = self.matrix[a + 1 :]
        projected = (rest - np.outer(rest[:, j], pivot_row) % p) % p
        return _ModP(np.delete(projected, j, axis=1), p)


def _scale_to_monic(matrix: _Matrix, prime: int) -> _Matrix:
    """Each (non-zero) row times the inverse of its first non-zero entry, mod p."""
    if matrix.shape[0] == 0:
        return matrix
    first = (matrix != 0).argmax(axis=1)
    inverse = _inverse_mod(matrix[np.arange(matrix.shape[0]), first], prime)
    return np.ascontiguousarray(matrix * inverse[:, None] % prime)


class _Exact:
    """Rows over ℚ as integer tuples (fraction-free projection, primitive forms)."""

    def __init__(self, rows: list[tuple[int, ...]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def classes(self) -> tuple[list[int], list[list[int]]]:
        loops: list[int] = []
        classes: dict[tuple[int, ...], list[int]] = {}
        for index, row in enumerate(self.rows):
            key = _primitive(row)
            if key is None:
                loops.append(index)
            else:
                classes.setdefault(key, []).append(index)
        return loops, list(classes.values())

    def take(self, indices: Sequence[int]) -> _Exact:
        return _Exact([self.rows[i] for i in indices])

    def project_after(self, a: int) -> _Exact:
        pivot_row = self.rows[a]
        j = next(i for i, x in enumerate(pivot_row) if x)
        lead = pivot_row[j]
        out = []
        for row in self.rows[a + 1 :]:
            mixed = [lead * x - row[j] * y for x, y in zip(row, pivot_row, strict=True)]
            del mixed[j]
            out.append(_primitive(mixed) or tuple(mixed))
        return _Exact(out)


# --- building a grouping a group at a time ------------------------------------------------


class ExposureScreen:
    """The check for a grouping built one group at a time (issue 16: fast grouping).

    Keeps a basis of the null space of the groups added so far modulo a 31-bit prime and
    updates it in O(n·k) per group: with w = a·N for the new group's row a, the new null
    space is {N·y : w·y = 0}; if w = 0 the group's sum is already determined by the
    others (nothing new is revealed, and nothing changes), else column j with w_j ≠ 0 is
    eliminated from the others and dropped. :meth:`admits` runs the modular circuit search
    on the would-be basis.

    Verdicts are remembered: whether a group may join depends only on the set of groups
    already there (the check is on their row space mod p, which neither the order they
    came in nor a repeated group changes), so a builder that undoes a failed attempt and
    draws the same group again (Algorithm 2's basic groupings are retried up to ``tries``
    times from the same state, and at 9 or 15 users about 40% of the groups tried repeat
    an earlier question) gets the earlier answer without a second search. Copies share
    the memory; the answer is the one the search gave, never a guess.

    It is a screen: mod p a rank can drop, so it may refuse a harmless group (rarely:
    about one chance in 2**31 per minor), and a modular null space can in principle miss a
    rational circuit. Whatever it accepts must be confirmed with :meth:`confirm` (the exact
    :func:`exposing_sets`) before it is used.
    """

    def __init__(
        self,
        users: Iterable[int],
        c: int = DEFAULT_COLLUSION,
        groups: Iterable[Iterable[int]] = (),
        prime: int = PRIMES[0],
    ) -> None:
        _check_bound(c)
        self.users = tuple(sorted({int(u) for u in users}))
        self.c = c
        self.prime = prime
        self.groups: list[tuple[int, ...]] = []
        self._column = {u: i for i, u in enumerate(self.users)}
        self._basis: _Matrix = np.eye(len(self.users), dtype=np.int64)
        self._state: frozenset[tuple[int, ...]] = frozenset()
        """The set of groups so far: what a verdict depends on."""
        self._verdicts: dict[tuple[frozenset[tuple[int, ...]], tuple[int, ...]], bool] = {}
        """Verdicts of :meth:`_safe` by (state, group), shared with copies."""
        for group in groups:
            self.add(group)

    def copy(self) -> ExposureScreen:
        """An independent screen with the same groups (to try a set of groups and undo)."""
        twin = ExposureScreen.__new__(ExposureScreen)
        twin.users, twin.c, twin.prime = self.users, self.c, self.prime
        twin.groups = list(self.groups)
        twin._column = self._column
        twin._basis = self._basis.copy()
        twin._state = self._state
        twin._verdicts = self._verdicts
        return twin

    @property
    def dimension(self) -> int:
        """k: the dimension of the (modular) null space, n minus the rank of the groups."""
        return int(self._basis.shape[1])

    def _with(self, group: Iterable[int]) -> tuple[tuple[int, ...], _Matrix]:
        members = tuple(sorted({int(u) for u in group}))
        outside = [u for u in members if u not in self._column]
        if outside:
            raise GroupingError(f"group names users {outside} outside the screen's users")
        basis, p = self._basis, self.prime
        if basis.shape[1] == 0 or not members:
            return members, basis
        weights = basis[[self._column[u] for u in members]].sum(axis=0) % p
        nonzero = np.flatnonzero(weights)
        if nonzero.size == 0:
            return members, basis
        j = int(nonzero[0])
        scale = weights * pow(int(weights[j]), p - 2, p) % p
        kept = np.delete(np.arange(basis.shape[1]), j)
        updated = basis[:, kept]  # a copy without column j
        touched = np.flatnonzero(scale[kept])  # only these columns change
        if touched.size:
            change = np.outer(basis[:, j], scale[kept][touched]) % p
            updated[:, touched] = (updated[:, touched] - change) % p
        return members, updated

    def admits(self, group: Iterable[int]) -> bool:
        """Would the groups so far plus ``group`` pass the (modular) check under c?"""
        members, known = self._known(group)
        if known is not None:
            return known
        _, basis = self._with(members)
        return self._judge(members, basis)

    def _known(self, group: Iterable[int]) -> tuple[tuple[int, ...], bool | None]:
        """The group's members, and the verdict already given on it here, if any."""
        members = tuple(sorted({int(u) for u in group}))
        return members, self._verdicts.get((self._state, members))

    def _judge(self, members: tuple[int, ...], basis: _Matrix) -> bool:
        verdict = self._safe(basis)
        self._verdicts[(self._state, members)] = verdict
        return verdict

    def _safe(self, basis: _Matrix) -> bool:
        # A row space of dimension r holds a vector with support n − r + 1 or less, so
        # a safe grouping keeps k = n − r ≥ c + 1: past that, no need to search.
        if basis.shape[1] < min(self.dimension, self.c + 1):
            return False
        return _safe_mod_p(basis, self.prime, self.c)

    def add(self, group: Iterable[int]) -> None:
        """Add ``group`` whatever it exposes."""
        members, self._basis = self._with(group)
        self.groups.append(members)
        self._state = self._state | {members}

    def try_add(self, group: Iterable[int]) -> bool:
        """Add ``group`` if the screen admits it; say whether it did."""
        members, known = self._known(group)
        if known is False:
            return False
        members, basis = self._with(members)
        if not (known or self._judge(members, basis)):
            return False
        self._basis = basis
        self.groups.append(members)
        self._state = self._state | {members}
        return True

    def confirm(self) -> list[Circuit]:
        """The exact :func:`exposing_sets` of the groups added so far."""
        return exposing_sets(self.groups, self.users, self.c)


def _fixed_weights(rows: int, columns: int) -> _Matrix:
    """Public, reproducible pseudo-random weights in [1, 2**16): SHA-256 of a counter
    (nothing secret depends on them, and every machine gets the same ones)."""
    size = 2 * rows * columns
    stream = b"".join(
        hashlib.sha256(b"fairbus exposure projection %d" % k).digest()
        for k in range(-(-size // 32))
    )
    words = np.frombuffer(stream[:size], dtype="<u2").astype(np.int64)
    return (words | 1).reshape(rows, columns)


_PROJECTION = _fixed_weights(3, 4096)
"""Fixed weights for :func:`_safe_mod_p`'s c ≤ 2 paths (the c ≤ 1 path reads the first
two rows, the c = 2 path all three)."""


def _safe_mod_p(basis: _Matrix, prime: int, c: int) -> bool:
    """No circuit of at most c + 1 rows of ``basis`` mod p: the same verdict as the general
    search :func:`_all_circuits`, by a quicker route for c ≤ 2."""
    if c <= 1 and basis.shape[1] <= _PROJECTION.shape[1]:
        return _no_loops_or_parallels(basis, prime, c)
    if c == 2 and 3 <= basis.shape[1] <= _PROJECTION.shape[1]:
        return _no_circuit_of_three(basis, prime)
    return _no_circuit(basis, prime, c)


def _no_circuit(basis: _Matrix, prime: int, c: int) -> bool:
    """The general search: no circuit of at most c + 1 rows of ``basis`` mod p."""
    return next(_all_circuits(_ModP(basis, prime), c + 1), None) is None


_FEW = 32
"""Up to this many residues, Python's ``pow`` inverts them faster than numpy."""


def _inverse_mod(values: _Matrix, prime: int) -> _Matrix:
    """Elementwise inverse of residues mod p, 0 for 0.

    A few are inverted one by one by Python's ``pow``. More at once by batch inversion
    (Montgomery's trick, as a binary tree so that numpy does each level in one go):
    multiply neighbours pairwise up to a single product, invert that one residue, and go
    back down, the inverse of each child being its parent's inverse times its sibling.
    That is O(m) products for m residues and one ``pow`` in place of m; each product of
    two residues is < 2**62 and fits in int64. Zeros are set aside (inverted as 1, then
    reported as 0) so that they do not zero the product.
    """
    flat = values.reshape(-1) % prime
    if flat.size <= _FEW:
        inverted = [pow(v, -1, prime) if v else 0 for v in flat.tolist()]
        return np.array(inverted, dtype=np.int64).reshape(values.shape)
    zero = flat == 0
    level = np.where(zero, 1, flat)
    levels: list[_Matrix] = []
    while level.size > 1:
        if level.size % 2:
            level = np.append(level, 1)
        levels.append(level)
        level = level[0::2] * level[1::2] % prime
    inverse = np.array([pow(int(level[0]), -1, prime)], dtype=np.int64)
    for below in reversed(levels):
        inverse = inverse[: below.size // 2]
        children = np.empty_like(below)
        children[0::2] = inverse * below[1::2] % prime
        children[1::2] = inverse * below[0::2] % prime
        inverse = children
    inverse = inverse[: flat.size]
    inverse[zero] = 0
    return inverse.reshape(values.shape)


def _no_circuit_of_three(basis: _Matrix, prime: int) -> bool:
    """c = 2 quickly: no zero row, no two parallel rows and no three dependent rows mod p,
    with the same verdict as :func:`_no_circuit` but O(n²) work on 3-vectors in place of
    n projections of the n × k basis (issue 16: the general search on every candidate
    group made a grouping of 100 users take seconds at c = 2).

    The rows are projected to three coordinates by fixed weights W (P = N·Wᵀ mod p). A
    linear map keeps every dependence, so rows that are dependent in N are dependent in
    P; the converse can fail (about one chance in p per set), so P only proposes and N
    decides. Degenerate P (a zero row, two parallel rows) is left to the general search.
    Otherwise every two rows a, b of P span a plane with normal P_a × P_b ≠ 0, and three
    rows a, b, x are dependent iff x lies in the plane of a and b, iff the pairs {a, b}
    and {a, x} have parallel normals. So the pairs are bucketed by their normal brought
    to monic form (first non-zero entry 1, packed into one int64), and the rows of every
    bucket of two or more pairs (P-coplanar) are searched exactly in N; a circuit found
    among some rows of N is a circuit of N, and a circuit of three rows of N lies in one
    bucket, so nothing is missed and nothing is invented.
    """
    p = prime
    if not basis.any(axis=1).all():
        return False  # a zero row: e_u is in the row space, u is exposed outright
    rows = basis.shape[0]
    if rows < 3:
        return _no_circuit(basis, p, 2)
    # entries < 2**31, weights < 2**16: each product < 2**47, sums of ≤ 4096 fit in int64
    projected = (basis @ _PROJECTION[:, : basis.shape[1]].T) % p
    if not projected.any(axis=1).all():
        return _no_circuit(basis, p, 2)
    first, second = _pairs(rows)
    a, b = projected[first], projected[second]
    # the cross product: each product < 2**62, a difference of two fits in int64
    normal = (
        np.stack(
            [
                a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1],
                a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0],
            ],
            axis=1,
        )
        % p
    )
    nonzero = normal != 0
    flat = ~nonzero.any(axis=1)
    if flat.any():  # rows parallel in P: parallel in N too, or else a rare false alarm
        if _any_parallel(basis, first[flat], second[flat], p):
            return False
        return _no_circuit(basis, p, 2)
    lead = nonzero.argmax(axis=1)
    inverse = _inverse_mod(normal[np.arange(len(lead)), lead], p)
    monic = normal * inverse[:, None] % p
    # a monic normal is (1, y, z), (0, 1, z) or (0, 0, 1): y·p + z < p², p² + z, p² + p
    # (p² < 2**62, so every key fits in int64 and the three forms never meet)
    keys = np.where(
        lead == 0,
        monic[:, 1] * p + monic[:, 2],
        np.where(lead == 1, p * p + monic[:, 2], p * p + p),
    )
    ordered = np.sort(keys)
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return True
    for value in np.unique(ordered[1:][same]):
        pairs = np.flatnonzero(keys == value)
        members = np.unique(np.concatenate([first[pairs], second[pairs]]))
        if not _no_circuit(basis[members], p, 2):
            return False
    return True


@functools.lru_cache(maxsize=64)
def _pairs(rows: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Every pair i < j of ``rows`` row indices, as two index vectors (read-only)."""
    first, second = np.triu_indices(rows, 1)
    first.setflags(write=False)
    second.setflags(write=False)
    return first, second


def _any_parallel(
    basis: _Matrix, first: npt.NDArray[np.intp], second: npt.NDArray[np.intp], prime: int
) -> bool:
    """Is some pair of non-zero rows (``first[i]``, ``second[i]``) of ``basis`` parallel
    mod p? Rows u, v are iff u_l·v − v_l·u = 0 for u's first non-zero coordinate l
    (products < 2**62, their difference fits in int64)."""
    u, v = basis[first], basis[second]
    lead = (u != 0).argmax(axis=1)
    picks = np.arange(len(lead))
    cross = (u[picks, lead][:, None] * v - v[picks, lead][:, None] * u) % prime
    return bool((~cross.any(axis=1)).any())


def _no_loops_or_parallels(basis: _Matrix, prime: int, c: int) -> bool:
    """c ≤ 1 quickly: no zero row and (c = 1) no two parallel rows mod p, seen through
    two fixed random projections of the rows. Parallel rows have parallel projections,
    so nothing is missed; two rows that are not parallel collide with chance about 1/p
    (a harmless group refused)."""
    if basis.shape[1] == 0:
        return bool(basis.shape[0] == 0)
    if not basis.any(axis=1).all():
        return False
    if c == 0:
        return True
    # entries < 2**31, weights < 2**16: each product < 2**47, sums of ≤ 4096 fit in int64
    weights = _PROJECTION[:, : basis.shape[1]]
    a = (basis @ weights[0]) % prime
    b = (basis @ weights[1]) % prime
    both_zero = (a == 0) & (b == 0)
    if both_zero.any():  # a non-zero row that both projections miss: look exactly
        return _no_circuit(basis, prime, c)
    infinite = b == 0
    inverse = _inverse_mod(np.where(infinite, 1, b), prime)
    slope = np.where(infinite, prime, a * inverse % prime)
    return len(np.unique(slope)) == len(slope)
