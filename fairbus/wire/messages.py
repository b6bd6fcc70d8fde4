"""One class per message type (docs/architecture.md, "Wire"), each with a strict schema.

Signed messages travel as the payload of a :class:`fairbus.envelope.SignedEnvelope`
whose header names the type; sealed shares travel inside a
:class:`fairbus.sealed.SealedEnvelope`. ``SCOPED`` types carry round and attempt in
the envelope header; ``MODEL_SIZED`` types may be as large as ``max_model_bytes``,
the others at most ``max_small_payload``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from fairbus.detection import LAYERS, ClassCounts
from fairbus.errors import DetectionError, SchemaError, SecclError
from fairbus.field import FieldVector, P
from fairbus.grouping import GROUP_KINDS
from fairbus.roster import Role
from fairbus.seccl.sparse import SparseChange
from fairbus.training.config import MAX_LOCAL_STEPS, MAX_PROXIMAL_MU
from fairbus.wire import codec
from fairbus.wire.limits import WireLimits
from fairbus.wire.schema import (
    Bin,
    Bool,
    Float,
    Int,
    List,
    Optional,
    Spec,
    Str,
    Struct,
    WireStruct,
    ids,
    names,
)

HASH = Bin(exact=32)
MAX_ATTEMPT = 1023
MAX_COLLUSION = 16
"""The largest collusion bound c a task may name (groups of c + 2 members and more)."""
MAX_CLASSES = 256
"""The most classes a task's test set may hold (one byte per label)."""
MAX_CLASS_CELLS = 16_384
"""The most groups × classes an evaluation counts by class (1,638 groups of a ten-class
task): what keeps its largest form within ``max_small_payload``."""


def counted_by_class(groups: int, classes: int) -> bool:
    """Whether the evaluation of ``groups`` group models on a test set of ``classes``
    classes counts their predictions by class: within :data:`MAX_CLASS_CELLS` it must
    (a ledger that re-derives it refuses it otherwise), beyond it it cannot, and
    detection reads no class counts that round (``class_lead`` keeps no one)."""
    return groups * classes <= MAX_CLASS_CELLS


SHAMIR = "shamir"
"""Alg. 3 of the fairness paper: every member deals Shamir shares of a random vector."""
PAIRWISE = "pairwise"
"""Issue 16: masks from pairwise X25519 agreements (:mod:`fairbus.pairwise`); no shares."""
KEYINGS = (SHAMIR, PAIRWISE)
"""How a task's group keys are made; recorded at task start, named by each announcement."""
DEFAULT_KEYING = SHAMIR
"""A task's keying unless its configuration says otherwise. Alg. 3 for now (README,
"Keying"): pairwise keys give the same privacy for a fifth of the bytes and of the
computation, but users then upload without waiting for their group mates, so a dropout
leaves more complete groups to count, and at 9 users under c = 1 a simulated dropout
mid-round then found no safe regrouping; until that is settled, they are opt-in."""


FAIRNESS = "fairness"
"""The fairness paper's protocol: grouping, masking, Alg. 6 (the provider machine)."""
SECCL = "seccl"
"""SecCL's protocol: top-θ changes, peer F-scores, the Borda election
(:mod:`fairbus.seccl`, :mod:`fairbus.ledger.seccl`)."""
MODES = (FAIRNESS, SECCL)
"""What a task runs; recorded at task start, so the ledger runs that protocol's contract."""
DEFAULT_MODE = FAIRNESS


class Message(WireStruct):
    TYPE: ClassVar[str]
    SCOPED: ClassVar[bool] = False
    MODEL_SIZED: ClassVar[bool] = False
    RECORDED: ClassVar[bool] = False
    """Recorded on the ledger: every message of this type extends its sender's hash chain
    there (the one place that says which kinds go on the ledger)."""
    SENDERS: ClassVar[frozenset[Role]]

    def payload(self) -> bytes:
        return codec.pack(self.to_wire())


MESSAGE_TYPES: dict[str, type[Message]] = {}


M = TypeVar("M", bound=Message)


def message(cls: type[M]) -> type[M]:
    MESSAGE_TYPES[cls.TYPE] = cls
    return cls


def decode_body(type_name: str, payload: bytes, limits: WireLimits) -> Message:
    """Decode the payload of a message of ``type_name`` strictly."""
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise SchemaError(f"unknown message type {type_name!r}")
    if cls.MODEL_SIZED:
        bound = limits.max_model_bytes + 4096
        return cls.from_wire(codec.unpack(payload, limits, max_bytes=bound), "", limits)
    return _decode_small(type_name, bytes(payload), limits)


@functools.lru_cache(maxsize=128)
def _decode_small(type_name: str, payload: bytes, limits: WireLimits) -> Message:
    """A small payload decoded (at most ``max_small_payload`` bytes), kept: decoding is a
    pure function and messages are frozen, and one process may run many machines that
    each decode the same broadcast (the simulator's users: an announcement of 1,000
    users is read 1,000 times). Model-sized payloads are not kept."""
    raw = codec.unpack(payload, limits, max_bytes=limits.max_small_payload)
    return MESSAGE_TYPES[type_name].from_wire(raw, "", limits)


# --- field vectors as bytes ---------------------------------------------------------------


def vector_to_bytes(vector: FieldVector) -> bytes:
    return vector.astype("<u4", copy=False).tobytes()


def vector_from_bytes(data: bytes, length: int, *, what: str = "vector") -> FieldVector:
    """Little-endian uint32 field elements; refuses a wrong length or an element ≥ p."""
    if len(data) != 4 * length:
        raise SchemaError(f"{what}: {len(data)} bytes for {length} elements (need {4 * length})")
    vector = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    bad = np.flatnonzero(vector >= np.uint32(P))
    if bad.size:
        i = int(bad[0])
        raise SchemaError(f"{what}[{i}] = {int(vector[i])} is not a field element")
    return vector


# --- structures used inside messages -----------------------------------------------------


@dataclass(frozen=True)
class GroupSpec(WireStruct):
    """One group of a round's grouping (Alg. 2): basic, focus (with its key user) or
    reference, and its Shamir threshold."""

    gid: int
    kind: str
    members: tuple[int, ...]
    focus: int | None
    threshold: int
    FIELDS: ClassVar[dict[str, Spec]] = {
        "gid": Int(0, 2**20),
        "kind": names(GROUP_KINDS),
        "members": ids("max_group_members"),
        "focus": Optional(Int()),
        "threshold": Int(1, 64),
    }


@dataclass(frozen=True)
class GroupAccuracy(WireStruct):
    """acc(m_g), and the group's contribution where detection uses it
    (:func:`fairbus.detection.group_contributions`): what Alg. 6 is re-derived from; and
    the true class's mean rank (:attr:`fairbus.evaluation.ExactScore.mean_rank`), which
    the aggregation reads where accuracy is at chance; and its predictions by class
    (:attr:`~fairbus.evaluation.ExactScore.class_right`, ``class_called``), which
    detection reads with ``class_lead``."""

    gid: int
    accuracy: float
    contribution: float | None
    rank: float | None
    class_right: tuple[int, ...] | None = None
    class_called: tuple[int, ...] | None = None
    FIELDS: ClassVar[dict[str, Spec]] = {
        "gid": Int(0, 2**20),
        "accuracy": Float(0.0, 1.0),
        "contribution": Optional(Float()),
        "rank": Optional(Float(0.0, float(MAX_CLASSES))),
        "class_right": Optional(List(Int(), max_len=MAX_CLASSES)),
        "class_called": Optional(List(Int(), max_len=MAX_CLASSES)),
    }


@dataclass(frozen=True)
class UserScore(WireStruct):
    """Alg. 6 output for one user: score_i and, for key users, the 95% interval."""

    user: int
    score: float
    conf_lo: float | None
    conf_up: float | None
    FIELDS: ClassVar[dict[str, Spec]] = {
        "user": Int(),
        "score": Float(0.0, 1.0),
        "conf_lo": Optional(Float()),
        "conf_up": Optional(Float()),
    }


# --- participants -------------------------------------------------------------------------


@message
@dataclass(frozen=True)
class Presence(Message):
    """Retained ``online`` at connect; the Last Will says ``offline``."""

    status: str
    role: str
    TYPE: ClassVar[str] = "presence"
    SENDERS: ClassVar[frozenset[Role]] = frozenset(Role)
    FIELDS: ClassVar[dict[str, Spec]] = {
        "status": names(("online", "offline")),
        "role": names(tuple(r.value for r in Role)),
    }


@message
@dataclass(frozen=True)
class Announce(Message):
    """Round r, attempt a: the global model's hash, the grouping and the deadlines.

    ``prior_groups`` are the member lists of groups whose sums the provider may hold:
    those of earlier attempts of this round and of earlier rounds that started from the
    same global model. ``collusion`` is the task's collusion bound c (recorded at task
    start): users and the ledger run the exposure check with it. ``keying`` is the task's
    (:data:`KEYINGS`), also recorded at task start: how the members make their keys.
    """

    model_sha256: bytes
    model_params: int
    frac_bits: int
    groups: tuple[GroupSpec, ...]
    key_users: tuple[int, ...]
    excluded: tuple[int, ...]
    prior_groups: tuple[tuple[int, ...], ...]
    negotiate_deadline: float
    upload_deadline: float
    collusion: int
    keying: str = DEFAULT_KEYING
    TYPE: ClassVar[str] = "announce"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "model_sha256": HASH,
        "model_params": Int(1, 2**31),
        "frac_bits": Int(0, 24),
        "groups": List(Struct(GroupSpec), limit="max_groups"),
        "key_users": ids(),
        "excluded": ids(),
        "prior_groups": List(ids("max_group_members"), limit="max_groups"),
        "negotiate_deadline": Float(0.0),
        "upload_deadline": Float(0.0),
        "collusion": Int(0, MAX_COLLUSION),
        "keying": names(KEYINGS),
    }


@message
@dataclass(frozen=True)
class GlobalModel(Message):
    """The global model for a round, float32 little-endian; its hash is in the announcement."""

    length: int
    data: bytes
    TYPE: ClassVar[str] = "global_model"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    MODEL_SIZED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {"length": Int(1, 2**31), "data": Bin()}


@message
@dataclass(frozen=True)
class MaskedUpload(Message):
    """Alg. 4 output for one group: encode(m_i) + sk_gi (mod p), uint32 little-endian."""

    group: int
    length: int
    data: bytes
    TYPE: ClassVar[str] = "upload"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    MODEL_SIZED: ClassVar[bool] = True
    HEADER_GROUP: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.USER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "group": Int(0, 2**20),
        "length": Int(1, 2**31),
        "data": Bin(),
    }

    def vector(self) -> FieldVector:
        return vector_from_bytes(self.data, self.length, what="upload")


@message
@dataclass(frozen=True)
class Evaluation(Message):
    """The accuracy of every decrypted group model of the round (input of Alg. 6), and
    where the groups' predictions are counted by class, the test set's samples per
    class (:attr:`fairbus.evaluation.QuantizedTestSet.class_samples`)."""

    accuracies: tuple[GroupAccuracy, ...]
    class_samples: tuple[int, ...] | None = None
    TYPE: ClassVar[str] = "evaluation"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "accuracies": List(Struct(GroupAccuracy), limit="max_groups"),
        "class_samples": Optional(List(Int(), max_len=MAX_CLASSES)),
    }

    def __post_init__(self) -> None:
        classes = len(self.class_samples or ())
        if classes and not counted_by_class(len(self.accuracies), classes):
            raise SchemaError(
                f"an evaluation counts at most {MAX_CLASS_CELLS} groups × classes by class, "
                f"got {len(self.accuracies)} × {classes}"
            )

    def class_counts(self) -> dict[int, ClassCounts]:
        """Each group's :class:`~fairbus.detection.ClassCounts` (none without
        ``class_samples``); raises :class:`~fairbus.errors.DetectionError` where some
        group is counted by class and another not, or its counts do not add up."""
        samples = self.class_samples
        counts: dict[int, ClassCounts] = {}
        for e in self.accuracies:
            right, called = e.class_right, e.class_called
            if samples is None or right is None or called is None:
                if (right, called) != (None, None) or samples is not None:
                    raise DetectionError(
                        f"group {e.gid}: every group or none is counted by class, with the "
                        "test set's samples per class"
                    )
                continue
            counts[e.gid] = ClassCounts(samples, right, called)
        return counts


@message
@dataclass(frozen=True)
class Decision(Message):
    """Alg. 6 output: τ, scores, the new key users and the potential violators."""

    tau: float
    scores: tuple[UserScore, ...]
    key_users: tuple[int, ...]
    violators: tuple[int, ...]
    TYPE: ClassVar[str] = "decision"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "tau": Float(0.0, 1.0),
        "scores": List(Struct(UserScore)),
        "key_users": ids(),
        "violators": ids(),
    }


@message
@dataclass(frozen=True)
class Dropout(Message):
    """The provider's notice that users dropped and which groups are void this attempt."""

    users: tuple[int, ...]
    voided_groups: tuple[int, ...]
    TYPE: ClassVar[str] = "dropout"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "users": ids(),
        "voided_groups": List(Int(0, 2**20), limit="max_groups", unique=True),
    }


MAX_POLICY_ROUNDS = 2**16
"""Bound on the whole-number fields of a detection policy (rounds, group scores)."""


@dataclass(frozen=True)
class DetectionPolicy(WireStruct):
    """Algorithm 6's parameters as the ledger records them: the fields of
    :class:`fairbus.detection.DetectionParams`, one for one (:mod:`fairbus.task` converts
    and checks them as a whole)."""

    bound_score: float
    bound_conf: float
    confidence: float
    tolerance: float
    contribution_tolerance: float | None
    min_evidence: int
    carry_evidence: bool
    key_evidence_only: bool
    evidence_window: int | None
    key_score: float | None
    relative_tolerance: float | None
    weight_floor: float | None
    level_rounds: int | None
    noise_widening: float | None
    noise_ceiling: float | None
    suspect_weight: float | None
    weight_veto: float | None
    widening_cap: float | None
    plateau_gain: float | None
    rank_below: float | None
    convict_below: float | None
    veto_without_departed: bool
    trusted_weight: float | None
    believed_noise: float | None
    contribution_direction: str
    contribution_layers: str
    class_lead: float | None
    FIELDS: ClassVar[dict[str, Spec]] = {
        "bound_score": Float(0.0, 1.0),
        "bound_conf": Float(0.0, 1.0),
        "confidence": Float(0.0, 1.0),
        "tolerance": Float(0.0, 1.0),
        "contribution_tolerance": Optional(Float(0.0, 1.0)),
        "min_evidence": Int(2, MAX_POLICY_ROUNDS),
        "carry_evidence": Bool(),
        "key_evidence_only": Bool(),
        "evidence_window": Optional(Int(1, MAX_POLICY_ROUNDS)),
        "key_score": Optional(Float(0.0, 1.0)),
        "relative_tolerance": Optional(Float(0.0, 1.0)),
        "weight_floor": Optional(Float(0.0, 1.0)),
        "level_rounds": Optional(Int(1, MAX_POLICY_ROUNDS)),
        "noise_widening": Optional(Float(0.0, 10.0)),
        "noise_ceiling": Optional(Float(0.0, 10.0)),
        "suspect_weight": Optional(Float(0.0, 1.0)),
        "weight_veto": Optional(Float(0.0, 1.0)),
        "widening_cap": Optional(Float(0.0, 10.0)),
        "plateau_gain": Optional(Float(0.0, 1.0)),
        "rank_below": Optional(Float(0.0, 1.0)),
        "convict_below": Optional(Float(0.0, 1.0)),
        "veto_without_departed": Bool(),
        "trusted_weight": Optional(Float(0.0, 1.0)),
        "believed_noise": Optional(Float(0.0, 10.0)),
        "contribution_direction": Str(max_len=16),
        "contribution_layers": names(LAYERS),
        "class_lead": Optional(Float(0.0, 1.0)),
    }


@dataclass(frozen=True)
class EvaluationSpec(WireStruct):
    """What every evaluation of the task is re-derived with (issue 13): the model's
    architecture (a name of :data:`fairbus.training.models.MODELS`) and the SHA-256 of
    the payload of the task's ``test_set`` transaction, recorded before the task start."""

    model: str
    test_set_sha256: bytes
    FIELDS: ClassVar[dict[str, Spec]] = {"model": Str(max_len=64), "test_set_sha256": HASH}


@message
@dataclass(frozen=True)
class CommittedTestSet(Message):
    """The task's test set, as :mod:`fairbus.evaluation` reads it: inputs quantized to
    unsigned 16-bit little-endian (N × C × H × W) and one byte per label. The provider
    records it before the task start; the ledger nodes keep it in their blob stores and
    re-derive every accuracy on it."""

    shape: tuple[int, ...]
    classes: int
    inputs: bytes
    labels: bytes
    TYPE: ClassVar[str] = "test_set"
    RECORDED: ClassVar[bool] = True
    MODEL_SIZED: ClassVar[bool] = True
    SUBMITTED_WHOLE: ClassVar[bool] = True
    """Submitted with its payload (other model-sized types go as their header, the nodes
    taking the payload from the bus): the writer reads it to admit the task start that
    follows at once."""
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "shape": List(Int(1, 4096), max_len=3),
        "classes": Int(2, MAX_CLASSES),
        "inputs": Bin(),
        "labels": Bin(),
    }

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise SchemaError(f"test set shape {self.shape}: expected (channels, height, width)")

    def class_samples(self) -> tuple[int, ...]:
        """How many test samples each class has (labels past ``classes`` not counted:
        :meth:`fairbus.evaluation.QuantizedTestSet.from_message` refuses them)."""
        labels = np.frombuffer(self.labels, dtype=np.uint8)
        return tuple(int(v) for v in np.bincount(labels, minlength=self.classes)[: self.classes])


# --- SecCL (../shared/papers/002_095742f01fca1438.txt) ------------------------------------


@dataclass(frozen=True)
class PeerScore(WireStruct):
    """One evaluation value of a type (b) message: the macro F-score of ``user``'s
    upload on the evaluator's private validation data."""

    user: int
    value: float
    FIELDS: ClassVar[dict[str, Spec]] = {"user": Int(), "value": Float(0.0, 1.0)}


@dataclass(frozen=True)
class BordaTotal(WireStruct):
    """A participant's total Borda points in a round's election."""

    user: int
    points: int
    FIELDS: ClassVar[dict[str, Spec]] = {"user": Int(), "points": Int(0, 2**40)}


@message
@dataclass(frozen=True)
class SecclAnnounce(Message):
    """SecCL round r: the global model's hash and size (the model itself is the round's
    ``global_model`` transaction), the round's participants (ascending), the task's θ
    and λ, and M, the number of candidates the election picks
    (:func:`fairbus.seccl.candidate_count` of λ and the participants)."""

    model_sha256: bytes
    model_params: int
    participants: tuple[int, ...]
    theta: float
    candidate_share: float
    candidates: int
    TYPE: ClassVar[str] = "seccl_announce"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "model_sha256": HASH,
        "model_params": Int(1, 2**31),
        "participants": ids(),
        "theta": Float(0.0, 1.0),
        "candidate_share": Float(0.0, 1.0),
        "candidates": Int(1, 2**20),
    }


@message
@dataclass(frozen=True)
class SparseUpdate(Message):
    """SecCL's type (a) message: a participant's shared parameter changes, ``indices``
    strictly ascending (uint32 little-endian) and their ``values`` (float32
    little-endian, finite), for a model of ``length`` parameters."""

    length: int
    indices: bytes
    values: bytes
    TYPE: ClassVar[str] = "seccl_update"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    MODEL_SIZED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.USER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "length": Int(1, 2**31),
        "indices": Bin(),
        "values": Bin(),
    }

    @classmethod
    def of(cls, change: SparseChange) -> SparseUpdate:
        return cls(
            change.length,
            change.indices.astype("<u4").tobytes(),
            change.values.astype("<f4").tobytes(),
        )

    def change(self) -> SparseChange:
        """The change, strictly: a :class:`~fairbus.errors.SchemaError` for anything
        :class:`~fairbus.seccl.SparseChange` refuses or bytes of the wrong length."""
        if len(self.indices) % 4 or len(self.values) != len(self.indices):
            raise SchemaError(
                f"seccl_update: {len(self.indices)} index bytes, {len(self.values)} value bytes"
            )
        indices = np.frombuffer(self.indices, dtype="<u4").astype(np.int64)
        values = np.frombuffer(self.values, dtype="<f4").astype(np.float32)
        try:
            return SparseChange(self.length, indices, values)
        except SecclError as exc:
            raise SchemaError(f"seccl_update: {exc}") from None


@message
@dataclass(frozen=True)
class PeerEvaluation(Message):
    """SecCL's type (b) message: the evaluator's F-score of every other participant's
    recorded upload of the round (Eval_{p2→p1} in the paper's Fig. 3), by user."""

    scores: tuple[PeerScore, ...]
    TYPE: ClassVar[str] = "seccl_evaluation"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.USER})
    FIELDS: ClassVar[dict[str, Spec]] = {"scores": List(Struct(PeerScore))}

    def values(self) -> dict[int, float]:
        return {s.user: s.value for s in self.scores}


SECCL_PHASES = ("uploads", "evaluations")
"""What a :class:`SecclClose` closes: the type (a) or the type (b) messages of a round."""


@message
@dataclass(frozen=True)
class SecclClose(Message):
    """The server closes a phase of a SecCL round at its deadline (not in the paper,
    whose round waits until "all participants have successfully uploaded"): ``phase``
    ``uploads`` keeps the type (a) messages of ``users`` (recorded ones, ascending, at
    least two) and takes no more; ``evaluations`` keeps the type (b) messages of
    ``users`` (recorded ones) for the election and takes no more
    (:mod:`fairbus.ledger.seccl`)."""

    phase: str
    users: tuple[int, ...]
    TYPE: ClassVar[str] = "seccl_close"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {"phase": names(SECCL_PHASES), "users": ids()}


@message
@dataclass(frozen=True)
class Candidates(Message):
    """The consensus contract's result for a round: the candidates in rank order, every
    uploader's Borda total (ascending ids), and the hash (as announcements name models)
    of the new global model the candidates' changes give
    (:func:`fairbus.seccl.aggregate`). The ledger re-derives all three."""

    candidates: tuple[int, ...]
    totals: tuple[BordaTotal, ...]
    model_sha256: bytes
    TYPE: ClassVar[str] = "seccl_candidates"
    RECORDED: ClassVar[bool] = True
    SCOPED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "candidates": ids(),
        "totals": List(Struct(BordaTotal)),
        "model_sha256": HASH,
    }


@message
@dataclass(frozen=True)
class TaskStart(Message):
    """The task's consensus-critical parameters (:class:`fairbus.task.TaskParams`): the
    provider's first transaction, before its first global model. The ledger admits it
    once, before any announcement, and runs its contract with these; nothing round-scoped
    is admitted before it. ``mode`` says which protocol's contract (:data:`MODES`);
    ``theta`` and ``candidate_share`` are SecCL's θ and λ, set exactly when the mode is
    ``seccl``."""

    detection: DetectionPolicy
    collusion: int
    keying: str = DEFAULT_KEYING
    evaluation: EvaluationSpec | None = None
    local_steps: int | None = None
    mode: str = DEFAULT_MODE
    theta: float | None = None
    candidate_share: float | None = None
    absent_class_scale: float | None = None
    proximal_mu: float | None = None
    TYPE: ClassVar[str] = "task_start"
    RECORDED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "detection": Struct(DetectionPolicy),
        "collusion": Int(0, MAX_COLLUSION),
        "keying": names(KEYINGS),
        "evaluation": Optional(Struct(EvaluationSpec)),
        "local_steps": Optional(Int(1, MAX_LOCAL_STEPS)),
        "mode": names(MODES),
        "theta": Optional(Float(0.0, 1.0)),
        "candidate_share": Optional(Float(0.0, 1.0)),
        "absent_class_scale": Optional(Float(0.0, 1.0)),
        "proximal_mu": Optional(Float(0.0, MAX_PROXIMAL_MU)),
    }


# --- ledger ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiptEntry(WireStruct):
    """One committed transaction: its hash and its index in the block."""

    tx_hash: bytes
    index: int
    FIELDS: ClassVar[dict[str, Spec]] = {"tx_hash": HASH, "index": Int(0, 2**20)}


@message
@dataclass(frozen=True)
class Receipt(Message):
    """Sent by a ledger node only after the block is committed: where each of one
    submitter's transactions in that block is (one signed receipt per submitter and block)."""

    height: int
    block_hash: bytes
    entries: tuple[ReceiptEntry, ...]
    TYPE: ClassVar[str] = "receipt"
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.LEDGER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "height": Int(0, 2**63 - 1),
        "block_hash": HASH,
        "entries": List(Struct(ReceiptEntry), limit="max_array_len"),
    }


@message
@dataclass(frozen=True)
class BlockHeader(Message):
    height: int
    prev_hash: bytes
    tx_root: bytes
    n_tx: int
    timestamp: float
    TYPE: ClassVar[str] = "block"
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.LEDGER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "height": Int(0, 2**63 - 1),
        "prev_hash": HASH,
        "tx_root": HASH,
        "n_tx": Int(0, 2**20),
        "timestamp": Float(0.0),
    }


QUERY_KEYS: dict[str, str | None] = {
    "tx": "tx_hash",
    "head": "sender",
    "round": "round",
    "blob": "tx_hash",
    "height": None,
}
"""The field each kind of query sets (a blob is asked for by its SHA-256 in ``tx_hash``;
``height``, the ledger's last block, sets none)."""


@message
@dataclass(frozen=True)
class Query(Message):
    """A request to the ledger: a transaction by hash, a sender's head, a round's records,
    a blob (a model-sized payload) by its SHA-256 (in ``tx_hash``), or the height and
    hash of its last block (``height``)."""

    qid: int
    kind: str
    tx_hash: bytes | None
    sender: int | None
    round: int | None
    TYPE: ClassVar[str] = "query"
    SENDERS: ClassVar[frozenset[Role]] = frozenset(Role)
    FIELDS: ClassVar[dict[str, Spec]] = {
        "qid": Int(0, 2**63 - 1),
        "kind": names(tuple(QUERY_KEYS)),
        "tx_hash": Optional(HASH),
        "sender": Optional(Int()),
        "round": Optional(Int()),
    }

    def __post_init__(self) -> None:
        needed = QUERY_KEYS[self.kind]
        for name in ("tx_hash", "sender", "round"):
            if (getattr(self, name) is None) == (name == needed):
                raise SchemaError(
                    f"a {self.kind!r} query sets {needed!r} and nothing else"
                    if needed
                    else f"a {self.kind!r} query sets no key"
                )


@message
@dataclass(frozen=True)
class QueryResponse(Message):
    qid: int
    ok: bool
    error: str
    records: tuple[bytes, ...]
    TYPE: ClassVar[str] = "query_response"
    MODEL_SIZED: ClassVar[bool] = True  # a blob answer carries a model-sized payload
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.LEDGER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "qid": Int(0, 2**63 - 1),
        "ok": Bool(),
        "error": Str(),
        "records": List(Bin(max_len=64 * 1024)),
    }


@message
@dataclass(frozen=True)
class Refusal(Message):
    """Why an envelope was not applied (the hash of the refused envelope and a typed reason)."""

    ref: bytes
    reason: str
    detail: str
    TYPE: ClassVar[str] = "refusal"
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.LEDGER, Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {"ref": HASH, "reason": Str(max_len=64), "detail": Str()}


@message
@dataclass(frozen=True)
class RosterChange(Message):
    roster_toml: str
    TYPE: ClassVar[str] = "roster_change"
    RECORDED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.ADMIN})
    FIELDS: ClassVar[dict[str, Spec]] = {"roster_toml": Str(max_len=200_000)}


@message
@dataclass(frozen=True)
class Attestation(Message):
    """A participant's signed statement, recorded so it cannot deny it later: that it saw
    ``digest`` as ``about`` (e.g. the global model of a round it received, so a provider
    that sends different users different models is caught), with an optional note."""

    about: str
    digest: bytes
    note: bytes
    TYPE: ClassVar[str] = "attestation"
    RECORDED: ClassVar[bool] = True
    SENDERS: ClassVar[frozenset[Role]] = frozenset({Role.USER, Role.PROVIDER})
    FIELDS: ClassVar[dict[str, Spec]] = {
        "about": Str(max_len=64),
        "digest": HASH,
        "note": Bin(max_len=4096),
    }


# --- inside sealed direct envelopes ---------------------------------------------------------


SHARE_KINDS = ("share", "summed_share")
SEAL_BINDING_FIELDS: dict[str, Spec] = {
    "task": Str(max_len=64),
    "round": Int(),
    "attempt": Int(0, MAX_ATTEMPT),
    "group": Int(0, 2**20),
    "sender": Int(),
    "recipient": Int(),
    "kind": names(SHARE_KINDS),
}
"""What a sealed share is bound to; carried both outside (for routing) and inside the box."""


def seal_binding(obj: WireStruct) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in SEAL_BINDING_FIELDS}


@dataclass(frozen=True)
class ShareBody(WireStruct):
    """A Shamir share (Alg. 3 line 4) or summed share (line 8), with its context bound in."""

    task: str
    round: int
    attempt: int
    group: int
    sender: int
    recipient: int
    kind: str
    x: int
    length: int
    values: bytes
    FIELDS: ClassVar[dict[str, Spec]] = {
        **SEAL_BINDING_FIELDS,
        "x": Int(1, 64),
        "length": Int(1, 2**31),
        "values": Bin(),
    }
