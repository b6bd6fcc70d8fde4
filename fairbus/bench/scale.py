"""``fairbus bench scale``: the provider's grouping and the exact exposure check at scale
(issue 16, item 1).

For n users, a share of them key users and a collusion bound c, build groupings with the
provider's grouping (:func:`fairbus.grouping.make_grouping` under that c, with the
provider's defaults: up to two basic groupings, up to six focus groups per key user, two
reference groups, the non-key users as trusted partners; one seed per repeat) and run the
exact check on each (:func:`fairbus.grouping.check_grouping`, what every user and the
ledger run on an announcement). The time is that of both together; the targets are
≤ 0.5 s at 100 users and ≤ 10 s at 1,000 users with up to 20% key users under c = 1.
Beside it: groups per round, focus groups per key user, basic groupings, and the number
and the largest of the grouping's connected components (from 2 × :data:`BLOCK` users on,
one per block; :func:`fairbus.exposure.components`).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fairbus.exposure import clear_check_cache, components
from fairbus.grouping import BLOCK, check_grouping, make_grouping
from fairbus.roster import Role
from fairbus.wire.messages import MESSAGE_TYPES, PAIRWISE, SHAMIR, SHARE_KINDS

USERS: tuple[int, ...] = (9, 30, 100, 300, 1_000)
KEY_SHARES: tuple[float, ...] = (0.0, 0.2)
BOUNDS: tuple[int, ...] = (1, 2)
REPEATS = 5
TARGETS_S: dict[int, float] = {100: 0.5, 1_000: 10.0}
"""Issue 16's targets for grouping plus check, by users (key users up to 20%, c = 1)."""


@dataclass(frozen=True)
class GroupingParams:
    """The provider's grouping policy (:class:`fairbus.protocol.provider.ProviderConfig`)."""

    basic_groupings: int = 2
    key_repeats: int = 6
    references: int = 2
    block: int = BLOCK


@dataclass(frozen=True)
class Sample:
    """One grouping and its check."""

    make_s: float
    check_s: float
    groups: int
    focus_per_key: float | None
    basic_groupings: int
    components: int
    largest_component: int

    @property
    def total_s(self) -> float:
        return self.make_s + self.check_s


@dataclass(frozen=True)
class Row:
    """One table row: a number of users and key users under one collusion bound."""

    users: int
    key_users: int
    c: int
    repeats: int
    total_s_median: float
    total_s_max: float
    check_s_median: float
    groups_mean: float
    focus_per_key_mean: float | None
    basic_groupings_mean: float
    components_mean: float
    largest_component: int
    target_s: float | None

    @property
    def meets_target(self) -> bool | None:
        return None if self.target_s is None else self.total_s_max <= self.target_s


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    repeats: int = REPEATS
    params: GroupingParams = field(default_factory=GroupingParams)
    elapsed_s: float = 0.0


def key_count(users: int, share: float) -> int:
    """Key users for a share: rounded half up (9 users: 20% → 2)."""
    return math.floor(users * share + 0.5)


def _draw_order(*numbers: int) -> bytes:
    """A seeded, reproducible order of the users (who is a key user in a sample): not a
    secret, and the same on every machine."""
    return hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()


def draw(users: int, key_users: int, c: int, sample: int, params: GroupingParams) -> Sample:
    """One grouping under ``c`` from the provider's grouping, then the exact check."""
    everyone = list(range(1, users + 1))
    keys = sorted(
        sorted(everyone, key=lambda u: _draw_order(users, key_users, sample, u))[:key_users]
    )
    clear_check_cache()  # time the work, not what an earlier sample left behind
    start = time.perf_counter()
    grouping = make_grouping(
        everyone,
        keys,
        c=c,
        basic_groupings=params.basic_groupings,
        key_repeats=params.key_repeats,
        seed=(users, key_users, sample),
        partners=[u for u in everyone if u not in set(keys)],
        references=params.references,
        block=params.block,
    )
    clear_check_cache()  # as a user does: it has not checked these components yet
    made = time.perf_counter()
    check_grouping(grouping, c=c)  # raises GroupingError if anyone were exposed
    checked = time.perf_counter()
    parts = components([g.members for g in grouping.groups])
    return Sample(
        make_s=made - start,
        check_s=checked - made,
        groups=len(grouping.groups),
        focus_per_key=len(grouping.focus) / key_users if key_users else None,
        basic_groupings=grouping.basic_groupings,
        components=len(parts),
        largest_component=max(len(p.users) for p in parts),
    )


def summarize(users: int, key_users: int, c: int, samples: Sequence[Sample]) -> Row:
    """The row of one setting (at least one sample)."""
    focus = [s.focus_per_key for s in samples if s.focus_per_key is not None]
    target = TARGETS_S.get(users) if c == 1 and key_users <= key_count(users, 0.2) else None
    return Row(
        users=users,
        key_users=key_users,
        c=c,
        repeats=len(samples),
        total_s_median=statistics.median(s.total_s for s in samples),
        total_s_max=max(s.total_s for s in samples),
        check_s_median=statistics.median(s.check_s for s in samples),
        groups_mean=statistics.fmean(s.groups for s in samples),
        focus_per_key_mean=statistics.fmean(focus) if focus else None,
        basic_groupings_mean=statistics.fmean(s.basic_groupings for s in samples),
        components_mean=statistics.fmean(s.components for s in samples),
        largest_component=max(s.largest_component for s in samples),
        target_s=target,
    )


def run(
    users: Sequence[int] = USERS,
    shares: Sequence[float] = KEY_SHARES,
    bounds: Sequence[int] = BOUNDS,
    repeats: int = REPEATS,
    params: GroupingParams | None = None,
    progress: Callable[[int, int, int, int], None] = lambda users, keys, c, done: None,
) -> Report:
    """Every (users, key share, c) in turn, ``repeats`` groupings each."""
    params = params or GroupingParams()
    report = Report(repeats=repeats, params=params)
    start = time.monotonic()
    make_grouping(range(1, 10), [1], seed=0)  # warm up (imports, caches) before timing
    for n in users:
        for share in shares:
            k = key_count(n, share)
            for c in bounds:
                samples = []
                for sample in range(repeats):
                    progress(n, k, c, sample)
                    samples.append(draw(n, k, c, sample, params))
                report.rows.append(summarize(n, k, c, samples))
    report.elapsed_s = time.monotonic() - start
    return report


# --- simulated rounds ----------------------------------------------------------------------

KEYINGS_SIMULATED: tuple[str, ...] = (SHAMIR, PAIRWISE)
SIM_ROUNDS = 2
USER_SENT: frozenset[str] = frozenset(
    {
        *SHARE_KINDS,
        *(kind for kind, cls in MESSAGE_TYPES.items() if set(cls.SENDERS) == {Role.USER}),
    }
)
"""The message kinds only users send (uploads and, under Alg. 3, the sealed shares): what
a user's bytes are."""


@dataclass(frozen=True)
class SimRow:
    """Means over the rounds of one simulation (digits, its small model, every user
    honest): what a round costs the provider, the ledger and each user at ``users``."""

    users: int
    keying: str
    rounds: int
    workers: int
    groups: float
    grouping_s: float
    training_s: float
    evaluation_s: float
    detection_s: float
    ledger_s: float
    round_s: float
    bytes_per_user: float
    plain_bytes_per_user: int
    accuracy: float
    failed: int

    @property
    def bytes_ratio(self) -> float:
        """Bytes a user sends per round against plain FedAvg's one float32 model."""
        return self.bytes_per_user / self.plain_bytes_per_user


def simulate(users: int, keying: str, rounds: int = SIM_ROUNDS, seed: int = 0) -> SimRow:
    """``rounds`` rounds of ``users`` honest digits users under ``keying``, trained on
    every core from :data:`~fairbus.training.config.AUTO_WORKERS_FROM` users on."""
    from fairbus.protocol.provider import ProviderConfig
    from fairbus.simulator import Simulation, SimulationConfig
    from fairbus.training.config import default_workers
    from fairbus.training.models import build_model, count_parameters

    workers = default_workers(users)
    config = SimulationConfig(
        users=users,
        rounds=rounds,
        seed=seed,
        provider=ProviderConfig(keying=keying),
        workers=workers,
    )
    records = Simulation(config).run()

    def mean(phase: str) -> float:
        return statistics.fmean(r.timings_s.get(phase, 0.0) for r in records)

    sent = statistics.fmean(sum(n for k, n in r.bytes.items() if k in USER_SENT) for r in records)
    return SimRow(
        users=users,
        keying=keying,
        rounds=rounds,
        workers=workers,
        groups=statistics.fmean(len(r.groups) for r in records),
        grouping_s=mean("grouping"),
        training_s=mean("training"),
        evaluation_s=mean("evaluation"),
        detection_s=mean("detection"),
        ledger_s=mean("ledger"),
        round_s=mean("round"),
        bytes_per_user=sent / users,
        plain_bytes_per_user=4 * count_parameters(build_model(config.model_name)),
        accuracy=records[-1].global_accuracy,
        failed=sum(r.failed is not None for r in records),
    )


def run_simulations(
    users: Sequence[int] = USERS,
    keyings: Sequence[str] = KEYINGS_SIMULATED,
    rounds: int = SIM_ROUNDS,
    progress: Callable[[int, str], None] = lambda users, keying: None,
) -> list[SimRow]:
    """:func:`simulate` for every user count and keying, in turn."""
    rows = []
    for n in users:
        for keying in keyings:
            progress(n, keying)
            rows.append(simulate(n, keying, rounds))
    return rows
