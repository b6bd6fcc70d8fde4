"""A real protocol run, recorded as the envelopes a ledger receives, for the ledger tests."""

from __future__ import annotations

from dataclasses import dataclass

from fairbus.detection import DetectionParams
from fairbus.identity import Identity
from fairbus.ledger.records import LEDGER_TYPES
from fairbus.protocol.events import Send
from fairbus.roster import Member, Role, Roster
from fairbus.simulator import DropoutPlan, Simulation, SimulationConfig
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.local import TrainConfig

ADMIN_ID = 200
LEDGER_ID = 101


@dataclass
class RecordedRun:
    roster: Roster
    params: DetectionParams
    identities: dict[int, Identity]
    envelopes: list[bytes]
    """Every envelope a ledger records, in the order the participants sent them."""


def record_run(rounds: int = 3, dropouts: tuple[DropoutPlan, ...] = ()) -> RecordedRun:
    """Nine users on digits (one poisoner, one free-rider), short local training."""
    config = SimulationConfig(
        users=9,
        rounds=rounds,
        seed=5,
        train=TrainConfig(local_epochs=2),
        attacks={2: Attack(Behaviour.POISONER), 7: Attack(Behaviour.FREE_RIDER)},
        dropouts=dropouts,
    )
    sim = Simulation(config)
    envelopes: list[bytes] = []
    dispatch = sim._dispatch

    def recording(source: int | str, outputs: list[object]) -> None:
        for out in outputs:
            if isinstance(out, Send) and out.kind in LEDGER_TYPES:
                envelopes.append(out.data)
        dispatch(source, outputs)  # type: ignore[arg-type]

    sim._dispatch = recording  # type: ignore[method-assign,assignment]
    sim.run()
    admin, ledger = Identity.generate(ADMIN_ID), Identity.generate(LEDGER_ID)
    identities = {0: sim.provider.identity, **sim.identities, ADMIN_ID: admin}
    identities[LEDGER_ID] = ledger
    roster = Roster(
        sim.roster.task,
        [
            *sim.roster.values(),
            Member(admin.public, Role.ADMIN),
            Member(ledger.public, Role.LEDGER),
        ],
    )
    return RecordedRun(roster, config.provider.detection, identities, envelopes)
