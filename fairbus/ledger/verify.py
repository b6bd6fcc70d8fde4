"""The ledger re-derives a round's evaluation from what it recorded (issue 13, item 1).

Nothing in a decision rests on the provider's word: before a ledger node admits an
evaluation it recomputes, for every evaluated group,

* the group's model: the sum of its members' recorded masked uploads is the group sum
  (the masks cancel; no key is needed), decoded and divided by the group size exactly
  as Alg. 5 does (:func:`fairbus.masking.aggregate_decrypt`);
* its contribution (:func:`fairbus.detection.group_contributions`) from those models and
  the round's recorded global model (with the task's ``contribution_direction``
  "last_step", along the step from the previous round's recorded global model; with
  ``rank_below``, near chance, over the basic groups that rank the true class no worse
  than the recorded global model, whose rank it evaluates too);
* its accuracy and the true class's mean rank on the task's committed test set with
  :class:`~fairbus.evaluation.ExactEvaluator`, in exact fixed-point arithmetic (every
  group of the evaluation in one batched pass, :meth:`~fairbus.evaluation.ExactEvaluator.
  scores`),

and admits the evaluation only if the provider's numbers are these, bit for bit. Each
step is deterministic on every machine (integer field sums, correctly rounded IEEE
operations, exactly rounded sums, exact integer inference), so no tolerance is needed:
a follower or an auditor re-deriving the block gets the same numbers as the writer.

I/O is the caller's: the payloads come from a :data:`BlobSource` (a ledger node's blob
store, the exported blobs ``fairbus audit`` reads, the in-process ledger's memory).
The work (seconds for the paper's MNIST CNN) is done by :meth:`EvaluationCheck.prepare`,
which a ledger node runs off its event loop before it admits the transaction; admission
then finds the numbers ready.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt

from fairbus import masking
from fairbus.detection import DetectionParams, contributions_along, needs_anchor
from fairbus.errors import FairbusError
from fairbus.field import FixedPointCodec
from fairbus.training.layout import feature_values
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    Announce,
    CommittedTestSet,
    EvaluationSpec,
    GlobalModel,
    MaskedUpload,
    decode_body,
)

if TYPE_CHECKING:
    from fairbus.evaluation import ExactEvaluator

_M = TypeVar("_M", GlobalModel, MaskedUpload, CommittedTestSet)

BlobSource = Callable[[bytes], "bytes | None"]
"""Payload SHA-256 → the payload, or None if this holder does not have it."""

CACHED = 8


class VerificationError(FairbusError):
    """The recorded payloads cannot give an evaluation (missing, altered or malformed)."""


class PayloadMissingError(VerificationError):
    """This holder lacks a payload the evaluation is re-derived from (it may come yet)."""


@dataclass(frozen=True)
class RecordedRound:
    """What the ledger holds about an attempt that an evaluation is re-derived from."""

    announce: Announce
    global_blob: bytes
    """Payload SHA-256 of the round's ``global_model`` transaction."""
    uploads: Mapping[tuple[int, int], bytes]
    """(group, member) → payload SHA-256 of its recorded masked upload."""
    previous_global_blob: bytes = b""
    """Payload SHA-256 of the previous round's recorded global model (b"" in round 1)."""


GroupNumbers = dict[int, tuple[float, float, float, tuple[int, ...], tuple[int, ...]]]
"""Group id → (accuracy, contribution, mean rank, right by class, called by class), as
the evaluation must state them."""


def round_updates(
    means: Mapping[int, npt.NDArray[np.float32]], global_params: npt.NDArray[np.floating]
) -> dict[int, npt.NDArray[np.float64]]:
    """Each group model minus the round's global model as recorded (float32), in float64:
    the input of :func:`~fairbus.detection.group_contributions`, for the provider and the
    ledger alike."""
    published = np.asarray(global_params).astype("<f4").astype(np.float64)
    return {gid: mean.astype(np.float64) - published for gid, mean in means.items()}


def last_step(
    global_params: npt.NDArray[np.floating], previous_params: npt.NDArray[np.floating] | None
) -> npt.NDArray[np.float64] | None:
    """The global model's step into this round, M_r − M_{r−1}, both as recorded (float32),
    in float64: what :func:`~fairbus.detection.group_contributions` projects on with the
    task's ``contribution_direction`` "last_step", for the provider and the ledger alike;
    None for round 1 (no earlier model)."""
    if previous_params is None:
        return None
    published = np.asarray(global_params).astype("<f4").astype(np.float64)
    before = np.asarray(previous_params).astype("<f4").astype(np.float64)
    if before.shape != published.shape:
        raise VerificationError(
            f"the previous round's global model has {before.size} values, this round's "
            f"{published.size}"
        )
    return published - before


class EvaluationCheck:
    """Re-derives evaluations for one ledger holder; keeps the last few results so the
    work a ledger node does off its event loop (``LedgerState.prepare_evaluations``) is
    not repeated at admission."""

    def __init__(self, blobs: BlobSource, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self.blobs = blobs
        self.limits = limits
        self._evaluators: dict[tuple[str, bytes], ExactEvaluator] = {}
        self._results: OrderedDict[tuple[object, ...], GroupNumbers] = OrderedDict()
        self._lock = threading.Lock()
        """:meth:`prepare` runs on a worker thread, admission on the event loop."""

    def numbers(
        self,
        spec: EvaluationSpec,
        recorded: RecordedRound,
        gids: Sequence[int],
        detection: DetectionParams,
    ) -> GroupNumbers:
        """The accuracy, contribution and rank of each group of ``gids`` (every member's upload
        recorded), contributions measured along the task's ``contribution_direction``
        (``detection``: the recorded parameters); raises :class:`VerificationError`."""
        key = (detection, *_key(spec, recorded, gids))
        with self._lock:
            cached = self._results.get(key)
            if cached is not None:
                return cached
            result = self._compute(spec, recorded, sorted(gids), detection)
            self._results[key] = result
            while len(self._results) > CACHED:
                self._results.popitem(last=False)
            return result

    def class_samples(self, spec: EvaluationSpec) -> tuple[int, ...]:
        """The committed test set's samples per class; raises :class:`VerificationError`."""
        with self._lock:
            return self._evaluator(spec).test_set.class_samples

    def check_test_set(self, spec: EvaluationSpec) -> None:
        """That the model is one the exact evaluation can run and the committed test set
        decodes and fits it; raises :class:`VerificationError`."""
        with self._lock:
            self._evaluator(spec)

    # --- the work ------------------------------------------------------------------------

    def _compute(
        self,
        spec: EvaluationSpec,
        recorded: RecordedRound,
        gids: list[int],
        detection: DetectionParams,
    ) -> GroupNumbers:
        from fairbus.protocol.user import model_digest

        announce = recorded.announce
        misfit = "the round's global model does not fit its announcement"
        global_params = self._global_params(recorded.global_blob, misfit)
        if global_params.size != announce.model_params:
            raise VerificationError(misfit)
        if model_digest(global_params) != announce.model_sha256:
            raise VerificationError("the recorded global model is not the announced one")
        step = None
        if detection.contribution_direction == "last_step" and recorded.previous_global_blob:
            malformed = "the previous round's global model is malformed"
            before = self._global_params(recorded.previous_global_blob, malformed)
            step = last_step(global_params, before)
        codec = FixedPointCodec(announce.frac_bits)
        members = {g.gid: g.members for g in announce.groups}
        means: dict[int, npt.NDArray[np.float32]] = {}
        for gid in gids:
            vectors = []
            for member in members[gid]:
                digest = recorded.uploads.get((gid, member))
                if digest is None:
                    raise VerificationError(f"no recorded upload of {member} to group {gid}")
                upload = self._decoded(digest, "upload", MaskedUpload)
                if upload.length != announce.model_params:
                    raise VerificationError(f"the upload of {member} to group {gid} has "
                                            f"{upload.length} values")  # fmt: skip
                vectors.append(upload.vector())
            try:
                means[gid] = masking.aggregate_decrypt(vectors, codec).mean
            except FairbusError as exc:
                raise VerificationError(f"group {gid}: {exc}") from None
        basic = [g.gid for g in announce.groups if g.gid in means and g.kind == "basic"]
        # Every group of the evaluation in one batched pass (issue 16, item 3): the same
        # counts as one pass per group, bit for bit (ExactEvaluator says why).
        scores = self._evaluator(spec).scores([means[gid] for gid in gids])
        accuracies = {gid: score.accuracy for gid, score in zip(gids, scores, strict=True)}
        try:
            updates = round_updates(means, global_params)
            ranks = {gid: score.mean_rank for gid, score in zip(gids, scores, strict=True)}
            anchor = None
            if needs_anchor(detection, basic, accuracies):
                anchor = self._evaluator(spec).scores([global_params])[0].mean_rank
            contributions = contributions_along(
                detection, updates, basic, accuracies, step, ranks, anchor,
                feature_values(spec.model),
            )  # fmt: skip
        except FairbusError as exc:
            raise VerificationError(str(exc)) from None
        return {
            gid: (
                score.accuracy,
                contributions[gid],
                score.mean_rank,
                score.class_right,
                score.class_called,
            )
            for gid, score in zip(gids, scores, strict=True)
        }

    def _global_params(self, digest: bytes, malformed: str) -> npt.NDArray[np.float32]:
        """A recorded global model's parameters; raises :class:`VerificationError`
        (``malformed`` where its data is not its length in float32 values)."""
        model = self._decoded(digest, "global_model", GlobalModel)
        if len(model.data) != 4 * model.length:
            raise VerificationError(malformed)
        return np.frombuffer(model.data, dtype="<f4").astype(np.float32)

    def _evaluator(self, spec: EvaluationSpec) -> ExactEvaluator:
        from fairbus.evaluation import ExactEvaluator, QuantizedTestSet

        key = (spec.model, spec.test_set_sha256)
        known = self._evaluators.get(key)
        if known is not None:
            return known
        message = self._decoded(spec.test_set_sha256, "test_set", CommittedTestSet)
        try:
            evaluator = ExactEvaluator(spec.model, QuantizedTestSet.from_message(message))
        except FairbusError as exc:
            raise VerificationError(f"the task's test set or model: {exc}") from None
        self._evaluators = {key: evaluator}  # one task per ledger
        return evaluator

    def _decoded(self, digest: bytes, kind: str, cls: type[_M]) -> _M:
        data = self.blobs(digest)
        if data is None:
            raise PayloadMissingError(f"no blob {digest.hex()[:16]} (the {kind} payload) here")
        if hashlib.sha256(data).digest() != digest:
            raise VerificationError(f"the {kind} payload {digest.hex()[:16]} is altered")
        try:
            message = decode_body(kind, data, self.limits)
        except FairbusError as exc:
            raise VerificationError(f"the {kind} payload {digest.hex()[:16]}: {exc}") from None
        if not isinstance(message, cls):
            raise VerificationError(f"the payload {digest.hex()[:16]} is not a {kind}")
        return message


def _key(spec: EvaluationSpec, recorded: RecordedRound, gids: Sequence[int]) -> tuple[object, ...]:
    uploads = tuple(sorted(recorded.uploads.items()))
    before = recorded.previous_global_blob
    return (spec, recorded.global_blob, before, recorded.announce, uploads, tuple(sorted(gids)))
