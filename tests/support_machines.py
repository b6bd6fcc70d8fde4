"""Support for the machines' own tests (``tests/machines``): events in, outputs out.

A small task — provider 0, a ledger node, users 1..N — whose models are tiny hand-made
float32 vectors (no training), an :class:`~fairbus.ledger.inprocess.InProcessLedger`
(the validation state machine the ledger nodes run, so every transaction an honest
machine emits must be admitted), and :class:`Driver`, which carries the machines'
outputs by hand the way the simulator and the runtime do — commit on the ledger, then
deliver with the receipt — with no transport. A test can hold back any delivery
(:attr:`Driver.hold`) and hand it in itself, forged or not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from fairbus import envelope
from fairbus.envelope import SignedEnvelope
from fairbus.identity import Identity
from fairbus.ledger.inprocess import InProcessLedger
from fairbus.ledger.recorded import Recorded, sign_receipt
from fairbus.protocol.events import (
    PROVIDER,
    USERS,
    Address,
    AttemptClosed,
    CloseAttempt,
    Commit,
    Evaluate,
    Evaluated,
    Event,
    Output,
    Received,
    Refused,
    RoundDone,
    Send,
    StartRound,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine
from fairbus.protocol.user import UserMachine
from fairbus.roster import Member, Role, Roster
from fairbus.wire.messages import Message, ReceiptEntry

TASK = "machines"
D = 10
"""Parameters of the hand-made models."""
PROVIDER_ID = 0
LEDGER_ID = 90
"""The ledger node's id (users are 1..N)."""

Target = int | str
"""A user id or :data:`~fairbus.protocol.events.PROVIDER`."""
Model = npt.NDArray[np.float32]
T = TypeVar("T")


def initial_model(d: int = D) -> Model:
    return np.linspace(-0.5, 0.5, d, dtype=np.float32)


def delta(user: int, round: int, d: int = D) -> Model:
    """What ``user`` adds to the global model in ``round``: distinct per user and
    round, with both signs, small enough for any group's fixed-point sum."""
    k = np.arange(d, dtype=np.float64)
    return (0.01 * user * (1 + k) / d - 0.003 * round * (-1) ** k).astype(np.float32)


def trained(user: int, effect: Train) -> Model:
    """The model ``user`` 'trains' for a :class:`Train` effect (global model + delta)."""
    return (effect.global_params + delta(user, effect.round, effect.global_params.size)).astype(
        np.float32
    )


@dataclass
class Task:
    roster: Roster
    provider_identity: Identity
    node: Identity
    identities: dict[int, Identity]
    ledger: InProcessLedger
    provider: ProviderMachine
    users: dict[int, UserMachine]

    def restart_user(self, user: int) -> UserMachine:
        """A fresh machine for ``user`` (its keys kept, its chain head forgotten)."""
        self.users[user] = UserMachine(self.identities[user], self.roster)
        return self.users[user]


def make_task(
    users: int = 6,
    *,
    config: ProviderConfig | None = None,
    online: Iterable[int] | None = None,
    d: int = D,
) -> Task:
    provider = Identity.generate(PROVIDER_ID)
    node = Identity.generate(LEDGER_ID)
    identities = {u: Identity.generate(u) for u in range(1, users + 1)}
    roster = Roster(
        TASK,
        [Member(provider.public, Role.PROVIDER), Member(node.public, Role.LEDGER)]
        + [Member(i.public, Role.USER) for i in identities.values()],
    )
    return Task(
        roster,
        provider,
        node,
        identities,
        InProcessLedger(roster, node, clock=lambda: 0.0, re_derive=False),  # toy models
        ProviderMachine(
            provider, roster, initial_model(d), config or ProviderConfig(), online=online
        ),
        {u: UserMachine(i, roster) for u, i in identities.items()},
    )


def receipted(env: SignedEnvelope, signer: Identity, task: str = TASK, height: int = 0) -> bytes:
    """``env`` with a receipt that ``signer`` signs directly, naming ``env`` (no ledger
    admitted it): what a ledger node that skipped validation, or an impostor, would send."""
    receipt = sign_receipt(signer, task, height, bytes(32), [ReceiptEntry(env.hash, 0)])
    return Recorded(env, receipt).to_bytes()


def from_provider(task: Task, message: Message, *, round: int = 1, attempt: int = 0) -> bytes:
    """``message`` signed by the provider and receipted directly by the ledger node (no
    ledger admitted it): what a user receives when the provider sends something the
    ledger would refuse and a node records it anyway. Users do not follow the provider's
    chain, so ``prev`` is arbitrary."""
    scoped = {"round": round, "attempt": attempt} if message.SCOPED else {}
    env = envelope.sign(task.provider_identity, TASK, message, prev=bytes(32), **scoped)
    return receipted(env, task.node)


FORGERIES = {
    "no receipt": "SchemaError",
    "another transaction's receipt": "ReceiptError",
    "payload changed under its receipt": "SignatureError",
    "receipt signed by the provider": "ReceiptError",
    "receipt signed by a user": "ReceiptError",
    "receipt signed by an impostor of the ledger node": "ReceiptError",
}
"""How :func:`forge` breaks a recorded message → the error a machine must refuse it with."""


def forge(how: str, real: bytes, other: bytes, task: Task) -> bytes:
    """The Recorded bytes ``real`` broken as ``how`` says (a key of :data:`FORGERIES`);
    ``other`` is another recorded message, whose receipt names another transaction."""
    recorded = Recorded.from_bytes(real)
    env = recorded.envelope
    if how == "no receipt":
        return env.to_bytes()
    if how == "another transaction's receipt":
        return Recorded(env, Recorded.from_bytes(other).receipt).to_bytes()
    if how == "payload changed under its receipt":
        payload = env.payload[:-1] + bytes([env.payload[-1] ^ 1])
        changed = SignedEnvelope(env.header, env.header_bytes, payload, env.signature)
        return Recorded(changed, recorded.receipt).to_bytes()
    signer = {
        "receipt signed by the provider": task.provider_identity,
        "receipt signed by a user": task.identities.get(env.header.sender, task.identities[1]),
        "receipt signed by an impostor of the ledger node": Identity.generate(LEDGER_ID),
    }[how]
    return receipted(env, signer)


def of_type(outputs: Iterable[object], cls: type[T]) -> list[T]:
    return [o for o in outputs if isinstance(o, cls)]


def count(outputs: Iterable[object], *classes: type) -> int:
    """How many of ``outputs`` are of any of ``classes``."""
    return sum(isinstance(o, classes) for o in outputs)


def kinds(outputs: Iterable[Output]) -> list[str]:
    """``Commit:announce``, ``Send:share``, ``Train``, …: a readable trace of outputs."""
    return [
        f"{type(o).__name__}:{o.kind}" if isinstance(o, Commit | Send) else type(o).__name__
        for o in outputs
    ]


@dataclass
class Driver:
    """Carries outputs by hand, first in first out, as a real driver does:

    * :class:`Commit` — committed on the ledger at once (a refusal raises
      :class:`~fairbus.ledger.state.RefusedError`: an honest machine's transaction must be
      admitted), then queued to its addressees as Recorded bytes;
    * :class:`Send` — queued to its addressee;
    * :class:`Train` — answered with :class:`Trained` (:func:`trained`);
    * :class:`Evaluate` — answered with :class:`Evaluated` (``accuracy``, ``rank``);
    * :class:`CloseAttempt` — answered, once everything queued is delivered, with what the
      ledger recorded for the attempt (the ledger takes no more uploads for it).

    Deliveries to users not in :attr:`online` are dropped; deliveries for which
    :attr:`hold` answers True go to :attr:`held` instead, for the test to hand in."""

    task: Task
    accuracy: Callable[[Evaluate], float] = lambda e: 0.9
    rank: Callable[[Evaluate], float | None] = lambda e: None
    hold: Callable[[Target, Event], bool] = lambda target, event: False
    online: set[int] = field(default_factory=set)
    queue: deque[tuple[Target, Event]] = field(default_factory=deque)
    held: list[tuple[Target, Event]] = field(default_factory=list)
    log: list[tuple[Target, Output]] = field(default_factory=list)
    models: dict[tuple[int, int], Model] = field(default_factory=dict)
    """(user, round) → the model the user trained."""
    _closing: list[CloseAttempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.online:
            self.online = set(self.task.users)

    # --- feeding events ----------------------------------------------------------------------

    def handle(self, target: Target, event: Event) -> list[Output]:
        """Hand ``event`` to a machine and carry what it returns."""
        if target == PROVIDER:
            outputs = self.task.provider.handle(event)
        else:
            assert isinstance(target, int)
            outputs = self.task.users[target].handle(event)
        self.carry(target, outputs)
        return outputs

    def carry(self, source: Target, outputs: list[Output]) -> None:
        for out in outputs:
            self.log.append((source, out))
            if isinstance(out, Commit):
                data = self.task.ledger.commit(out.envelope)
                for target in self._addressees(out.to):
                    self.queue.append((target, Received(out.kind, data)))
            elif isinstance(out, Send):
                for target in self._addressees(out.to):
                    self.queue.append((target, Received(out.kind, out.data)))
            elif isinstance(out, Train):
                assert isinstance(source, int)
                model = trained(source, out)
                self.models[source, out.round] = model
                self.queue.append((source, Trained(out.round, model)))
            elif isinstance(out, Evaluate):
                evaluated = Evaluated(
                    out.round, out.attempt, out.gid, self.accuracy(out), self.rank(out)
                )
                self.queue.append((PROVIDER, evaluated))
            elif isinstance(out, CloseAttempt):
                self._closing.append(out)

    def _addressees(self, to: Address) -> list[Target]:
        return sorted(self.task.users) if to == USERS else [to]

    def pump(self) -> None:
        """Deliver until nothing is left to deliver or answer."""
        while self.queue or self._closing:
            while self.queue:
                target, event = self.queue.popleft()
                if isinstance(target, int) and target not in self.online:
                    continue
                if self.hold(target, event):
                    self.held.append((target, event))
                    continue
                self.handle(target, event)
            if self._closing:
                close = self._closing.pop(0)
                uploads = self.task.ledger.uploads(close.round, close.attempt)
                self.handle(PROVIDER, AttemptClosed(close.round, close.attempt, uploads))

    def release(self, which: Callable[[Target, Event], bool] = lambda t, e: True) -> None:
        """Hand in the held deliveries ``which`` picks, in order (:attr:`hold` is not asked
        again about them), then pump."""
        picked = [(t, e) for t, e in self.held if which(t, e)]
        self.held = [(t, e) for t, e in self.held if not which(t, e)]
        for target, event in picked:
            if not isinstance(target, int) or target in self.online:
                self.handle(target, event)
        self.pump()

    def play_round(self, now: float = 0.0) -> RoundDone:
        """Start a round and deliver everything; the round's :class:`RoundDone`."""
        start = len(self.log)
        self.handle(PROVIDER, StartRound(now))
        self.pump()
        return self.round_done(start)

    # --- reading the log -----------------------------------------------------------------------

    def outputs(self, source: Target | None = None, since: int = 0) -> list[Output]:
        return [o for s, o in self.log[since:] if source is None or s == source]

    def round_done(self, since: int = 0) -> RoundDone:
        done = of_type(self.outputs(PROVIDER, since), RoundDone)
        assert len(done) == 1, f"no single RoundDone: {kinds(self.outputs(since=since))}"
        return done[0]

    def refusals(self) -> list[tuple[Target, Refused]]:
        return [(s, o) for s, o in self.log if isinstance(o, Refused)]

    def commits(self, kind: str, source: Target | None = None) -> list[Commit]:
        return [c for c in of_type(self.outputs(source), Commit) if c.kind == kind]
