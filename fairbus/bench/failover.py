"""``fairbus bench failover``: how long training pauses when the provider dies.

Two whole local deployments (:class:`fairbus.runtime.local.LocalTask`: Mosquitto, a
ledger, 9 user processes training on digits): one with a hot standby (etcd election:
three etcd members and three ledger nodes), one with a single provider restarted after
a fixed delay, as systemd's ``Restart=always`` with ``RestartSec`` does. Each is killed
(``kill -9``) ``kills`` times, each time a moment into a round. The pause is from the kill
to the moment the next provider has rebuilt its state from the ledger and goes on (its
``resuming task`` log line; its first transaction follows at once). With a standby, the
killed process comes back as the next standby, so every kill finds one waiting.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fairbus.runtime.local import STANDBY, LocalTask

RESUMED = "resuming task"
ELECTED = "elected the active provider"
WAITING = "waiting for its lease"
TIMEOUT = 180.0


@dataclass
class FailoverResult:
    mode: str
    pauses_s: list[float] = field(default_factory=list)
    restart_delay_s: float = 0.0
    rounds: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.pauses_s)

    @property
    def worst_s(self) -> float:
        return max(self.pauses_s)


def _count(task: LocalTask, text: str) -> int:
    return sum(
        p.read_text(errors="replace").count(text) for p in task.root.glob("participant-*.log")
    )


def _wait(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"failover bench: no {what} within {timeout:.0f} s")
        time.sleep(0.02)


def measure(
    workdir: Path,
    mode: str,
    *,
    kills: int = 5,
    restart_delay: float = 1.0,
    progress: Callable[[str], None] = lambda line: None,
) -> FailoverResult:
    """``mode``: ``standby`` or ``restart``."""
    standby = mode == "standby"
    result = FailoverResult(mode, restart_delay_s=0.0 if standby else restart_delay)
    # Rounds enough never to run out: a restarted standby loads while rounds go on.
    with LocalTask(workdir / mode, 9, 20 * kills, {}, broker="mosquitto",
                   store="etcd" if standby else "sqlite", standby=standby,
                   training={"local_epochs": 20}) as task:  # fmt: skip
        active, spare = 0, STANDBY
        if standby:
            task.start_standby()  # both load at once; whichever is elected first plays
            _wait(lambda: _count(task, ELECTED) > 0, "first election")
            if ELECTED not in (task.root / "participant-0.log").read_text():
                active, spare = STANDBY, 0
        task.wait_for_round(1, TIMEOUT)
        for k in range(kills):
            done = len(task.rounds_done())
            _wait(lambda: len(task.rounds_done()) > done, "round")  # noqa: B023
            if standby:
                _wait(lambda: _count(task, WAITING) > k, "standby waiting")  # noqa: B023
            time.sleep(0.3)  # into the next round
            resumed = _count(task, RESUMED)
            killed = time.monotonic()
            task.kill(active)
            if standby:
                task.start_standby(active)  # the killed one comes back as the next spare
                active, spare = spare, active
            else:
                time.sleep(restart_delay)
                task.start_provider()
            _wait(lambda: _count(task, RESUMED) > resumed, "takeover")  # noqa: B023
            result.pauses_s.append(time.monotonic() - killed)
            progress(f"{mode}: kill {k + 1}/{kills}: paused {result.pauses_s[-1]:.2f} s")
        done = len(task.rounds_done())
        _wait(lambda: len(task.rounds_done()) > done, "round after the last kill")
        result.rounds = len(task.rounds_done())
    return result
