"""``fairbus bench privacy``: do the provider's groupings expose anyone when c models
are known?

Issue 12, item 2 and its must-show: for n users, a share of them key users and a
collusion bound c, draw groupings from the provider's grouping
(:func:`fairbus.grouping.make_grouping` under that c, with the provider's defaults: up to
two basic groupings, up to six focus groups per key user, two reference groups, the
non-key users as trusted partners; one seed per sample) and count how many expose
someone under c (:func:`fairbus.exposure.exposing_sets`, exact; the target is 0), the
focus groups per key user the grouping achieved, the time of the check (the full list
of exposing sets, and the yes/no :func:`fairbus.exposure.is_safe`), and the time
``make_grouping`` itself took.

Each setting runs in a child process under a share of a total time budget: the settings
still to run split what is left, a setting that finishes early leaves its time to the
others, and a setting out of time is stopped and reports the samples it finished
(possibly none). The report states the samples used per setting.
"""

from __future__ import annotations

import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

USERS: tuple[int, ...] = (9, 15, 30, 60, 100)
KEY_SHARES: tuple[float, ...] = (0.0, 0.2, 0.4)
BOUNDS: tuple[int, ...] = (1, 2)
SAMPLES = 1_000
BUDGET_S = 540.0
"""Total seconds for all settings (the bench should end within about ten minutes)."""


@dataclass(frozen=True)
class GroupingParams:
    """The provider's grouping policy (:class:`fairbus.protocol.provider.ProviderConfig`)."""

    basic_groupings: int = 2
    key_repeats: int = 6
    references: int = 2


@dataclass(frozen=True)
class Setting:
    users: int
    key_users: int


@dataclass(frozen=True)
class Check:
    """One grouping built under one c, and the exact check on it."""

    make_s: float
    groups: int
    basic_groupings: int
    focus_per_key: float | None
    sets: int
    exposed_users: int
    list_ms: float
    safe_ms: float


@dataclass(frozen=True)
class Sample:
    seed: int
    checks: dict[int, Check]


@dataclass(frozen=True)
class Row:
    """One table row: a setting under one collusion bound."""

    users: int
    key_users: int
    c: int
    samples: int
    stopped: str
    """'done' (all samples drawn) or 'budget' (stopped when its time share ran out)."""
    slice_s: float
    exposing: int
    exposed_share_mean: float | None
    focus_per_key_mean: float | None
    focus_per_key_min: float | None
    focus_per_key_max: float | None
    groups_mean: float | None
    basic_groupings_mean: float | None
    check_ms_median: float | None
    check_ms_p99: float | None
    safe_ms_median: float | None
    safe_ms_p99: float | None
    make_s_median: float | None
    make_s_max: float | None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    samples: int = SAMPLES
    budget_s: float = BUDGET_S
    params: GroupingParams = field(default_factory=GroupingParams)
    elapsed_s: float = 0.0


def key_count(users: int, share: float) -> int:
    """Key users for a share: rounded half up (9 users: 20% → 2, 40% → 4)."""
    return math.floor(users * share + 0.5)


def settings(users: Sequence[int], shares: Sequence[float]) -> list[Setting]:
    return [Setting(n, key_count(n, s)) for n in users for s in shares]


def draw(setting: Setting, sample: int, bounds: Sequence[int], params: GroupingParams) -> Sample:
    """One grouping per c from the provider's grouping, and the exact check on each."""
    from fairbus.exposure import exposing_sets, is_safe
    from fairbus.grouping import make_grouping

    n, k = setting.users, setting.key_users
    rng = np.random.default_rng((n, k, sample))
    users = list(range(1, n + 1))
    keys = sorted(int(u) for u in rng.choice(users, size=k, replace=False)) if k else []
    checks = {}
    for c in bounds:
        start = time.perf_counter()
        grouping = make_grouping(
            users,
            keys,
            c=c,
            basic_groupings=params.basic_groupings,
            key_repeats=params.key_repeats,
            seed=(n, k, sample),
            partners=[u for u in users if u not in keys],
            references=params.references,
        )
        make_s = time.perf_counter() - start
        groups = [g.members for g in grouping.groups]
        start = time.perf_counter()
        found = exposing_sets(groups, c=c)
        list_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        safe = is_safe(groups, c)
        safe_ms = (time.perf_counter() - start) * 1e3
        if safe != (not found):
            raise AssertionError(f"is_safe and exposing_sets disagree on {groups}, c = {c}")
        focus = len(grouping.focus) / k if k else None
        exposed = len({u for s in found for u in s})
        checks[c] = Check(
            make_s, len(groups), grouping.basic_groupings, focus, len(found), exposed,
            list_ms, safe_ms,
        )  # fmt: skip
    return Sample(sample, checks)


def _from_json(item: dict[str, Any]) -> Sample:
    checks = {int(c): Check(**check) for c, check in item.pop("checks").items()}
    return Sample(**item, checks=checks)


def collect(
    setting: Setting,
    bounds: tuple[int, ...],
    samples: int,
    params: GroupingParams,
    slice_s: float,
    progress: Callable[[int], None] = lambda done: None,
) -> tuple[list[Sample], bool]:
    """Samples of one setting drawn by a child process (``python -m
    fairbus.bench.privacy``, one JSON line per sample) within ``slice_s`` seconds; True
    if all were drawn. A child out of time is killed in the middle of its grouping."""
    spec = {"setting": asdict(setting), "bounds": bounds, "samples": samples}
    spec.update(params=asdict(params))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    deadline = time.monotonic() + slice_s
    lines: queue.Queue[str | None] = queue.Queue()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(
            [sys.executable, "-m", "fairbus.bench.privacy", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        stdout = child.stdout

        def read() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        got: list[Sample] = []
        finished = False
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    line = lines.get(timeout=min(0.5, left))
                except queue.Empty:
                    continue
                if line is None:
                    if child.wait() != 0:
                        errors.seek(0)
                        message = errors.read().decode(errors="replace")
                        raise RuntimeError(f"the worker for {setting} failed:\n{message}")
                    finished = True
                    break
                got.append(_from_json(json.loads(line)))
                progress(len(got))
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            reader.join(timeout=5)
            stdout.close()
    return got, finished


def _quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (p99 of fewer than 100 values is their maximum)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(
    setting: Setting, c: int, got: Sequence[Sample], finished: bool, slice_s: float
) -> Row:
    def stat(values: Sequence[float], how: Callable[[Sequence[float]], float]) -> float | None:
        return how(values) if values else None

    checks = [s.checks[c] for s in got]
    focus = [x.focus_per_key for x in checks if x.focus_per_key is not None]
    lists = [x.list_ms for x in checks]
    safes = [x.safe_ms for x in checks]
    makes = [x.make_s for x in checks]

    def p99(values: Sequence[float]) -> float:
        return _quantile(values, 0.99)

    return Row(
        users=setting.users,
        key_users=setting.key_users,
        c=c,
        samples=len(got),
        stopped="done" if finished else "budget",
        slice_s=slice_s,
        exposing=sum(1 for x in checks if x.sets),
        exposed_share_mean=stat(
            [x.exposed_users / setting.users for x in checks], statistics.fmean
        ),
        focus_per_key_mean=stat(focus, statistics.fmean),
        focus_per_key_min=stat(focus, min),
        focus_per_key_max=stat(focus, max),
        groups_mean=stat([float(x.groups) for x in checks], statistics.fmean),
        basic_groupings_mean=stat([float(x.basic_groupings) for x in checks], statistics.fmean),
        check_ms_median=stat(lists, statistics.median),
        check_ms_p99=stat(lists, p99),
        safe_ms_median=stat(safes, statistics.median),
        safe_ms_p99=stat(safes, p99),
        make_s_median=stat(makes, statistics.median),
        make_s_max=stat(makes, max),
    )


def run(
    users: Sequence[int] = USERS,
    shares: Sequence[float] = KEY_SHARES,
    bounds: Sequence[int] = BOUNDS,
    samples: int = SAMPLES,
    budget_s: float = BUDGET_S,
    params: GroupingParams | None = None,
    progress: Callable[[Setting, int, float], None] = lambda setting, done, slice_s: None,
) -> Report:
    """Every setting in turn, each under its share of what is left of ``budget_s``."""
    params = params or GroupingParams()
    todo = settings(users, shares)
    report = Report(samples=samples, budget_s=budget_s, params=params)
    start = time.monotonic()
    for index, setting in enumerate(todo):
        left = budget_s - (time.monotonic() - start)
        slice_s = max(1.0, left / (len(todo) - index))
        progress(setting, 0, slice_s)

        def tick(done: int, setting: Setting = setting, slice_s: float = slice_s) -> None:
            progress(setting, done, slice_s)

        got, finished = collect(setting, tuple(bounds), samples, params, slice_s, tick)
        report.rows.extend(summarize(setting, c, got, finished, slice_s) for c in bounds)
    report.elapsed_s = time.monotonic() - start
    return report


def _child(argv: Sequence[str]) -> None:
    """``python -m fairbus.bench.privacy SPEC``: draw the samples of one setting and
    print each as a JSON line (what :func:`collect` reads)."""
    from fairbus.exposure import exposing_sets

    spec = json.loads(argv[0])
    setting = Setting(**spec["setting"])
    params = GroupingParams(**spec["params"])
    exposing_sets([(1, 2, 3), (1, 2, 4), (3, 4, 5)], c=2)  # warm up before timing
    for sample in range(spec["samples"]):
        result = draw(setting, sample, spec["bounds"], params)
        print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
