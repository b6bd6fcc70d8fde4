"""A real protocol run, recorded as the envelopes a ledger receives, for the ledger tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fairbus import envelope
from fairbus.envelope import GENESIS, SignedEnvelope
from fairbus.identity import Identity
from fairbus.ledger.records import Block, Transaction
from fairbus.ledger.state import LedgerState, RefusedError
from fairbus.roster import Member, Role, Roster
from fairbus.simulator import DropoutPlan, Simulation, SimulationConfig
from fairbus.task import TaskParams
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.local import TrainConfig
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import CommittedTestSet, EvaluationSpec, decode_body

ADMIN_ID = 200
LEDGER_ID = 101


@dataclass
class RecordedRun:
    roster: Roster
    task: TaskParams
    """What the run's task start recorded."""
    identities: dict[int, Identity]
    envelopes: list[bytes]
    """Every envelope a ledger records, in the order the participants sent them (the
    provider's test set and task start first)."""


def record_run(
    rounds: int = 3,
    dropouts: tuple[DropoutPlan, ...] = (),
    *,
    seed: int = 5,
    attacks: dict[int, Attack] | None = None,
    train: TrainConfig | None = None,
) -> RecordedRun:
    """Nine users on digits (by default one poisoner, one free-rider, and short local
    training). The envelopes are what the simulation's own ledger committed, model-sized
    payloads put back from its blobs."""
    config = SimulationConfig(
        users=9,
        rounds=rounds,
        seed=seed,
        train=train or TrainConfig(local_epochs=2),
        attacks=attacks
        if attacks is not None
        else {2: Attack(Behaviour.POISONER), 7: Attack(Behaviour.FREE_RIDER)},
        dropouts=dropouts,
    )
    blocks: list[Block] = []
    blobs: dict[bytes, bytes] = {}
    sim = Simulation(config, on_block=blocks.append, on_blob=blobs.__setitem__)
    sim.run()
    envelopes = []
    for block in blocks:
        for tx in block.txs:
            payload = tx.payload
            if payload is None:
                payload = blobs[tx.envelope.header.payload_sha256]
            envelopes.append(envelope.from_parts(tx.header_bytes, payload, tx.signature).to_bytes())
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
    return RecordedRun(roster, sim.provider.config.task, identities, envelopes)


def with_task(run: RecordedRun, task: TaskParams) -> list[bytes]:
    """The run's envelopes with the provider's task start recording ``task`` instead, and
    every later envelope of the provider's chain signed again to link to it (what a
    provider that lies about its parameters, or changes them, would record)."""
    provider = run.identities[run.roster.provider]
    prev = GENESIS
    out = []
    for data in run.envelopes:
        env = envelope.parse(data)
        header = env.header
        if header.sender != provider.participant_id:
            out.append(data)
            continue
        message = (
            task.to_message()
            if header.type == "task_start"
            else decode_body(header.type, env.payload, DEFAULT_LIMITS)
        )
        scoped = {"round": header.round, "attempt": header.attempt} if message.SCOPED else {}
        signed = envelope.sign(provider, header.task, message, prev=prev, **scoped)
        prev = signed.hash
        out.append(signed.to_bytes())
    return out


def admit_all(
    roster: Roster, envelopes: list[bytes]
) -> tuple[LedgerState, list[tuple[int, RefusedError]]]:
    """Commit ``envelopes`` one block each into a fresh :class:`LedgerState` (the pure
    state machine, no store); returns the state and the (index, refusal) of every one
    refused (a refused envelope changes nothing)."""
    state = LedgerState(roster)
    refused = []
    for k, data in enumerate(envelopes):
        draft = state.draft()
        try:
            draft.admit(Transaction.from_envelope(envelope.parse(data)))
        except RefusedError as exc:
            refused.append((k, exc))
            continue
        state.commit(draft, Block.build(state.height + 1, state.head_hash, 0.0, draft.txs))
    return state, refused


def task_opening(provider: Identity, task: str) -> tuple[SignedEnvelope, SignedEnvelope]:
    """A provider's first two links as a ledger node requires them (issue 13): a test set
    (two blank digits images) and the task start naming it, for the digits CNN."""
    test_set = CommittedTestSet((1, 8, 8), 10, bytes(2 * 64 * 2), bytes(2))
    recorded = envelope.sign(provider, task, test_set, prev=GENESIS)
    spec = EvaluationSpec("digits_cnn", hashlib.sha256(test_set.payload()).digest())
    start = envelope.sign(provider, task, TaskParams(evaluation=spec).to_message(),
                          prev=recorded.hash)  # fmt: skip
    return recorded, start
