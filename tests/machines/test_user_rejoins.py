"""A user that missed some or all of a round's deliveries (lost by the broker, or sent
while its process was stopped) sits out that round only: the provider's deadline drops
it, and in the next round it is grouped again and uploads.

(The SIGSTOP test of tests/e2e/test_presence_and_restarts.py once saw a user sit out
every later round; the cause was in the bus connection — tests/runtime/test_connection.py
— not here. These pin down that the machine itself never waits for what it missed.)"""

from __future__ import annotations

import pytest

from fairbus.protocol.events import PROVIDER, Commit, Event, Joined, Received, StartRound, Tick
from fairbus.protocol.provider import ProviderConfig
from fairbus.protocol.user import UserPhase
from tests.support_machines import Driver, Target, make_task, of_type

ME = 5
TIMEOUT = 30.0


@pytest.mark.parametrize(
    "missed",
    [
        ("global_model",),
        ("announce",),
        ("share", "summed_share"),
        ("dropout", "decision"),
        None,  # everything, as while stopped
    ],
    ids=["global model", "announcement", "shares", "dropout and decision", "everything"],
)
@pytest.mark.parametrize("late", [False, True], ids=["lost", "delivered late"])
def test_a_user_that_missed_a_round_takes_part_in_the_next(
    missed: tuple[str, ...] | None, late: bool
) -> None:
    """Round 2's deliveries to user 5 that ``missed`` names are held back; round 2 ends
    by the deadline without it (or, when it missed only the round's end, with it). They
    are then lost, or handed in late (before round 3, as a stopped process reads its
    socket when it continues). Round 3 groups it again and it uploads to every group it
    is in."""
    task = make_task(9, config=ProviderConfig(keying="shamir", phase_timeout=TIMEOUT))
    stopped = False

    def hold(target: Target, event: Event) -> bool:
        if target != ME or not stopped:
            return False
        return missed is None or (isinstance(event, Received) and event.kind in missed)

    driver = Driver(task, hold=hold)
    driver.play_round(0.0)
    stopped = True
    start = len(driver.log)
    driver.handle(PROVIDER, StartRound(100.0))
    driver.pump()
    driver.handle(PROVIDER, Tick(100.0 + TIMEOUT + 1))  # the deadline
    driver.pump()
    two = driver.round_done(start)
    uploaded = any(c.kind == "upload" for c in of_type(driver.outputs(ME, start), Commit))
    assert two.round == 2 and (ME in two.dropped) is not uploaded
    assert uploaded is (missed == ("dropout", "decision"))  # only the end of it was missed
    stopped = False
    if late:
        driver.release()
    driver.held.clear()

    # The runtime feeds Joined for a user still online that a deadline dropped.
    driver.handle(PROVIDER, Joined(ME))
    since = len(driver.log)
    three = driver.play_round(200.0)
    assert three.round == 3 and not three.dropped
    mine = [g.gid for g in three.groups if ME in g.members]
    uploads = [c for c in of_type(driver.outputs(ME, since), Commit) if c.kind == "upload"]
    assert mine and sorted(c.envelope.header.group or 0 for c in uploads) == sorted(mine)
    assert task.users[ME].round == 3 and task.users[ME].phase is UserPhase.IDLE
