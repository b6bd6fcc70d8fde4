"""The events the machines take and the outputs they return.

Drivers (the simulator, the networked runtime) only feed these events in and carry these
outputs out; they never write into a machine (``docs/architecture.md``, "State machines").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from fairbus.envelope import SignedEnvelope
from fairbus.field import FieldVector
from fairbus.wire.messages import SHARE_KINDS

PROVIDER: Literal["provider"] = "provider"
USERS: Literal["users"] = "users"
Address: TypeAlias = int | Literal["provider", "users"]
"""A user id, the provider, or every online user (a broadcast)."""

SEALED_KINDS = frozenset(SHARE_KINDS)


# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRound:
    """The provider's driver: start the next round now (Alg. 1, line 4)."""

    now: float


@dataclass(frozen=True)
class ChainHead:
    """The ledger's chain head for ``participant``: the provider continues a returning
    user's chain from it; a user resumes its own chain from it (after a restart, or when
    the ledger did not record an upload it signed)."""

    participant: int
    head: bytes


@dataclass(frozen=True, eq=False)
class Received:
    """Bytes that arrived for this machine; ``kind`` is the message type the topic names.
    Ledger transactions arrive as :class:`~fairbus.ledger.recorded.Recorded` bytes (the
    envelope with its receipt), sealed shares as sealed envelopes; the machine parses and
    verifies them once."""

    kind: str
    data: bytes


@dataclass(frozen=True, eq=False)
class Trained:
    """The driver finished a :class:`Train` effect: the model this user will upload."""

    round: int
    params: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Evaluated:
    """The driver finished an :class:`Evaluate` effect."""

    round: int
    attempt: int
    gid: int
    accuracy: float
    rank: float | None = None
    """The true class's mean rank (:attr:`~fairbus.evaluation.ExactScore.mean_rank`);
    None where the driver does not evaluate exactly (then no rank is recorded, and a
    ledger that re-derives the evaluation refuses it)."""
    class_right: tuple[int, ...] | None = None
    """Per class, its test samples the model classifies right
    (:attr:`~fairbus.evaluation.ExactScore.class_right`); None as for ``rank``."""
    class_called: tuple[int, ...] | None = None
    """Per class, the test samples the model calls it
    (:attr:`~fairbus.evaluation.ExactScore.class_called`); None as for ``rank``."""


@dataclass(frozen=True)
class Dropped:
    """A user went offline (Last Will, presence) or missed a deadline. The provider
    refuses one for an id that is not a user of the roster (``Refused("NotAUser")``)."""

    user: int


@dataclass(frozen=True)
class Joined:
    """A user came (back) online; it takes part from the next round on. The provider
    refuses one for an id that is not a user of the roster (``Refused("NotAUser")``)."""

    user: int


@dataclass(frozen=True)
class AttemptClosed:
    """The driver's answer to :class:`CloseAttempt`: every (group, user) upload recorded
    for the closed attempt (from the ledger, which takes no more once the dropout is
    recorded)."""

    round: int
    attempt: int
    uploads: frozenset[tuple[int, int]]


@dataclass(frozen=True)
class Tick:
    """The time now (seconds); lets a machine act on its deadlines."""

    now: float


Event: TypeAlias = (
    StartRound
    | ChainHead
    | Received
    | Trained
    | Evaluated
    | Dropped
    | Joined
    | AttemptClosed
    | Tick
)


# --- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Send:
    """Bytes for ``to`` that do not go on the ledger: a sealed share, or under
    :class:`~fairbus.aggregation.PlainFedAvg` a model in the clear."""

    to: Address
    kind: str
    data: bytes


@dataclass(frozen=True, eq=False)
class Commit:
    """A ledger transaction: commit ``envelope`` on the ledger (a model-sized one as its
    header; the ledger nodes keep the payload from the bus), then send it to ``to`` with
    the receipt, as :class:`~fairbus.ledger.recorded.Recorded` bytes."""

    to: Address
    envelope: SignedEnvelope

    @property
    def kind(self) -> str:
        return self.envelope.header.type


@dataclass(frozen=True, eq=False)
class Train:
    """Train the local model for ``round`` from ``global_params``; answer with Trained."""

    round: int
    global_params: npt.NDArray[np.float32]


GLOBAL_MODEL = -1
"""The ``gid`` of an :class:`Evaluate` of the round's global model: its true class's
mean rank anchors ``rank_below`` (:func:`fairbus.detection.ranked_basic`)."""


@dataclass(frozen=True, eq=False)
class Evaluate:
    """Evaluate a decrypted group model (or, with ``gid`` :data:`GLOBAL_MODEL`, the
    round's global model); answer with Evaluated."""

    round: int
    attempt: int
    gid: int
    params: npt.NDArray[np.float32]


@dataclass(frozen=True)
class CloseAttempt:
    """A dropout (already sent) closed the attempt: find out which uploads for it were
    recorded and answer with :class:`AttemptClosed`. The groups all of whose members
    uploaded are decryptable; they enter the exposure check of the regrouping."""

    round: int
    attempt: int


@dataclass(frozen=True)
class Refused:
    """Something received was not acted on and changed nothing; ``reason`` is the
    error's class name (a :class:`~fairbus.errors.FairbusError`), or one of the machines'
    own: ``RoundInProgress``, ``StaleUpload``, ``UnexpectedUpload``, ``NotPlain``,
    ``NotAUser`` (presence of a non-user), ``EarlyShareRefused`` (an early share beyond
    the user's bounds)."""

    reason: str
    detail: str


@dataclass(frozen=True, eq=False)
class GroupOutcome:
    gid: int
    kind: str
    members: tuple[int, ...]
    focus: int | None
    accuracy: float
    field_sum: FieldVector
    mean: npt.NDArray[np.float32]
    contribution: float | None = None
    """The group's update along the round's direction (:func:`~fairbus.detection.
    group_contributions`); None where the round measured none (plain FedAvg)."""
    scored: bool | None = None
    """score_g of Alg. 6, line 11; None in an undefended run."""


@dataclass(frozen=True, eq=False)
class RoundDone:
    """The provider finished a round: everything a log line or a plot needs."""

    round: int
    attempts: int
    groups: list[GroupOutcome]
    tau: float | None
    assessments: dict[int, Any]
    key_users: frozenset[int]
    violators: frozenset[int]
    excluded: frozenset[int]
    dropped: frozenset[int]
    global_params: npt.NDArray[np.float32]
    level: float | None = None
    """What a clean group contributed this round (:attr:`~fairbus.detection.
    DetectionResult.level`); None where detection did not measure it."""
    weights: dict[int, float] = field(default_factory=dict)
    """Each user's weight θ in the contribution fit over the rounds up to this one
    (:func:`~fairbus.detection.fit_contributions`); empty where there is none."""


@dataclass(frozen=True)
class RoundFailed:
    round: int
    reason: str


@dataclass(frozen=True)
class Excluded:
    """The user learned from a decision that it is excluded for good."""

    round: int


Output: TypeAlias = (
    Send | Commit | Train | Evaluate | CloseAttempt | Refused | RoundDone | RoundFailed | Excluded
)


# --- SecCL (fairbus.protocol.seccl_provider, seccl_user) -----------------------------------


@dataclass(frozen=True, eq=False)
class EvaluatePeers:
    """A SecCL participant's effect: evaluate each of ``models`` (user → the round's
    global model with that user's recorded changes applied) on this participant's own
    validation data with the macro F-score; answer with :class:`PeersEvaluated`. A model
    is None where the user's recorded payload was malformed (its value is then 0)."""

    round: int
    models: dict[int, npt.NDArray[np.float32] | None]


@dataclass(frozen=True)
class PeersEvaluated:
    """The driver finished :class:`EvaluatePeers`: user → evaluation value in [0, 1]."""

    round: int
    scores: dict[int, float]


@dataclass(frozen=True, eq=False)
class SecclRoundDone:
    """The SecCL server finished a round: the election's result and the new model."""

    round: int
    participants: tuple[int, ...]
    candidates: tuple[int, ...]
    totals: dict[int, int]
    global_params: npt.NDArray[np.float32]


SecclEvent: TypeAlias = (
    StartRound | ChainHead | Received | Trained | PeersEvaluated | Dropped | Joined | Tick
)
"""What the SecCL machines take."""
SecclOutput: TypeAlias = Commit | Train | EvaluatePeers | Refused | RoundFailed | SecclRoundDone
"""What the SecCL machines return."""
