"""SecCL's consensus contract (CSC) on the ledger: what a ``seccl`` task's transactions
must satisfy (SecCL, "Consensus among Participants" and "Message Interaction Protocol";
the paper runs it as a Solidity contract on the trusted bulletin board).

:class:`~fairbus.ledger.state.Draft` dispatches here every round-scoped transaction of a
task whose recorded mode is ``seccl`` (``global_model`` excepted, which it records as
for any task). Per round, in order:

- ``seccl_announce`` (provider): a round after the last, attempt 0, after a global
  model is recorded; its participants are distinct users of the roster, ascending, at
  least two; θ and λ are the task's, and M is :func:`~fairbus.seccl.candidate_count` of
  λ and the participants; its model hash is the one the last decided round's
  ``seccl_candidates`` named (the new global model), or, if that round was never
  decided, the same as that round's.
- ``seccl_update`` (type (a), a participant): one per participant of the round, before
  the round's first evaluation (an evaluation covers every recorded upload, so uploads
  close with it) and before a ``seccl_close`` of its uploads. Its payload is
  model-sized, in the blob stores; the header's SHA-256 binds it.
- ``seccl_close`` (provider; a phase deadline, not in the paper): ``uploads`` — before
  any evaluation, once — keeps the recorded uploads of the users it names (two or more,
  each recorded; a recorded upload it leaves out, one that arrived as the deadline
  passed, takes no part in the round) and takes no more; ``evaluations`` — once — keeps
  the recorded evaluations of the users it names (one or more, each recorded) for the
  election and takes no more. Anything else is ``contract_violation`` or
  ``out_of_order``.
- ``seccl_evaluation`` (type (b), a participant): one per participant; refused from a
  user who is not a participant of the round (``not_participant``), naming its sender
  (``self_evaluation``), from one whose own upload is not in the round, and unless it
  evaluates exactly the round's other uploads (``contract_violation``).
- ``seccl_candidates`` (provider): once, after every uploader has evaluated or the
  evaluations were closed; the candidates (in rank order) and every Borda total must
  be those :func:`~fairbus.seccl.elect` re-derives from the kept evaluations, and the new
  global model's hash the one :func:`~fairbus.seccl.aggregate` gives on the round's
  recorded global model and the candidates' recorded changes (read from the blobs, as
  evaluations of the fairness mode are: ``missing_payload`` where this holder lacks
  one; skipped, like those, by a holder without blobs or a follower that does not
  re-derive). Each refused with ``contract_violation``; nothing is applied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt

from fairbus.errors import FairbusError
from fairbus.ledger.state import RefusalReason, RefusedError
from fairbus.ledger.verify import BlobSource
from fairbus.roster import Role
from fairbus.seccl import aggregate, candidate_count, elect
from fairbus.seccl.sparse import SparseChange, shared_count
from fairbus.wire.messages import (
    Candidates,
    GlobalModel,
    Message,
    PeerEvaluation,
    SecclAnnounce,
    SecclClose,
    SparseUpdate,
    decode_body,
)

if TYPE_CHECKING:
    from fairbus.envelope import Header
    from fairbus.ledger.state import Draft
    from fairbus.seccl.election import Election
    from fairbus.task import TaskParams

SECCL_TYPES = frozenset(
    {"seccl_announce", "seccl_update", "seccl_close", "seccl_evaluation", "seccl_candidates"}
)
"""The round-scoped transaction types of a ``seccl`` task (besides ``global_model``)."""
FAIRNESS_TYPES = frozenset({"announce", "upload", "evaluation", "decision", "dropout"})
"""The round-scoped types of a ``fairness`` task: refused in a ``seccl`` one."""


@dataclass(frozen=True)
class SecclRecord:
    """What the ledger holds about one SecCL round."""

    announce: SecclAnnounce
    global_blob: bytes
    """Payload SHA-256 of the global model recorded before the round's announcement."""
    uploads: tuple[tuple[int, bytes], ...] = ()
    """(participant, payload SHA-256) of every recorded type (a) message, in order."""
    evaluations: tuple[tuple[int, PeerEvaluation], ...] = ()
    """(evaluator, its type (b) message) in order."""
    candidates: Candidates | None = None
    """The recorded election result: the round is decided."""
    kept_uploads: tuple[int, ...] | None = None
    """The uploaders a recorded ``seccl_close`` of the uploads kept (None: not closed)."""
    kept_evaluations: tuple[int, ...] | None = None
    """The evaluators a recorded ``seccl_close`` of the evaluations kept."""

    @property
    def uploaders(self) -> frozenset[int]:
        """The participants whose recorded type (a) messages are in the round."""
        if self.kept_uploads is not None:
            return frozenset(self.kept_uploads)
        return frozenset(user for user, _ in self.uploads)

    @property
    def evaluators(self) -> frozenset[int]:
        """The participants whose recorded type (b) messages count in the election."""
        if self.kept_evaluations is not None:
            return frozenset(self.kept_evaluations)
        return frozenset(user for user, _ in self.evaluations)

    def election(self) -> Election:
        """The Borda election on the kept evaluations (raises
        :class:`~fairbus.errors.SecclError` on inputs the contract refused already)."""
        kept = self.evaluators
        values = {user: m.values() for user, m in self.evaluations if user in kept}
        return elect(values, self.uploaders, self.announce.candidates)


def model_sha256(params: npt.NDArray[np.float32]) -> bytes:
    """The hash announcements name for a model: SHA-256 of its float32 little-endian
    bytes (:func:`fairbus.protocol.user.model_digest`, which the ledger cannot import)."""
    return hashlib.sha256(np.asarray(params).astype("<f4", copy=False).tobytes()).digest()


def admit(draft: Draft, header: Header, message: Message | None) -> None:
    """The contract for one round-scoped transaction of a ``seccl`` task (the task and the
    round and attempt in the header are known to be there); raises
    :class:`~fairbus.ledger.state.RefusedError` and changes nothing, or records it."""
    kind = header.type
    r, a = header.round, header.attempt
    task = draft.task
    if r is None or a is None or task is None:  # checked by the caller
        raise RefusedError(RefusalReason.MALFORMED, f"a {kind!r} names no round")
    if kind in FAIRNESS_TYPES:
        raise RefusedError(
            RefusalReason.WRONG_MODE, f"a {kind!r} in a seccl task (its mode is recorded)"
        )
    if kind not in SECCL_TYPES:
        raise RefusedError(RefusalReason.MALFORMED, f"a {kind!r} has no rule in a seccl task")
    if a != 0:
        raise RefusedError(RefusalReason.OUT_OF_ORDER, f"a seccl round has one attempt, not {a}")
    if kind == "seccl_announce":
        _announce(draft, task, r, _body(message, SecclAnnounce))
        return
    record = draft.seccl_round(r)
    if record is None:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER, f"{kind!r} for round {r}, which has not been announced"
        )
    if record.candidates is not None:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER, f"{kind!r} for round {r}, which is already decided"
        )
    if kind == "seccl_update":
        _update(draft, r, header.sender, header.payload_sha256, record)
    elif kind == "seccl_close":
        _close(draft, r, _body(message, SecclClose), record)
    elif kind == "seccl_evaluation":
        _evaluation(draft, r, header.sender, _body(message, PeerEvaluation), record)
    else:
        _candidates(draft, task, r, _body(message, Candidates), record)


def _announce(draft: Draft, task: TaskParams, r: int, message: SecclAnnounce) -> None:
    if r <= draft.current_round:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER,
            f"announcement of round {r} comes after round {draft.current_round}",
        )
    if not draft.global_blob:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER, f"announcement of round {r} before any global model"
        )
    participants = message.participants
    users = draft.roster.with_role(Role.USER)
    problems = []
    if list(participants) != sorted(set(participants)) or len(participants) < 2:
        problems.append(f"participants {list(participants)} are not 2 or more, ascending")
    strangers = sorted(set(participants) - set(users))
    if strangers:
        problems.append(f"participants {strangers} are not users of the roster")
    if (message.theta, message.candidate_share) != (task.theta, task.candidate_share):
        problems.append(
            f"it names θ {message.theta} and λ {message.candidate_share}, the task's are "
            f"{task.theta} and {task.candidate_share}"
        )
    elif participants:
        share = message.candidate_share
        want = candidate_count(share, len(participants))
        if message.candidates != want:
            problems.append(f"it elects {message.candidates} candidates, λ·N gives {want}")
    previous = _latest(draft, r)
    if previous is not None:
        decided = previous.candidates
        model = decided.model_sha256 if decided is not None else previous.announce.model_sha256
        if message.model_sha256 != model:
            problems.append(
                f"its global model {message.model_sha256.hex()[:16]} is not the "
                + ("one the last election gave" if decided is not None else "last round's")
                + f" ({model.hex()[:16]})"
            )
    if problems:
        raise RefusedError(RefusalReason.CONTRACT_VIOLATION, "; ".join(problems))
    draft.current_round = r
    draft.seccl_rounds[r] = SecclRecord(message, draft.global_blob)


def _latest(draft: Draft, before: int) -> SecclRecord | None:
    rounds = [n for n in {*draft.state.seccl_rounds, *draft.seccl_rounds} if n < before]
    return draft.seccl_round(max(rounds)) if rounds else None


def _participant(record: SecclRecord, r: int, sender: int, what: str) -> None:
    if sender not in record.announce.participants:
        raise RefusedError(
            RefusalReason.NOT_PARTICIPANT,
            f"{what} from user {sender}, who is not a participant of round {r}",
        )


def _update(draft: Draft, r: int, sender: int, digest: bytes, record: SecclRecord) -> None:
    _participant(record, r, sender, "a type (a) message")
    if record.evaluations or record.kept_uploads is not None:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER,
            f"an upload to round {r} after "
            + ("its first evaluation" if record.evaluations else "its deadline")
            + " (uploads are closed)",
        )
    if sender in record.uploaders:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER, f"participant {sender} already uploaded to round {r}"
        )
    draft.seccl_rounds[r] = replace(record, uploads=(*record.uploads, (sender, digest)))


def _evaluation(
    draft: Draft, r: int, sender: int, message: PeerEvaluation, record: SecclRecord
) -> None:
    _participant(record, r, sender, "an evaluation")
    targets = [s.user for s in message.scores]
    if sender in targets:
        raise RefusedError(
            RefusalReason.SELF_EVALUATION, f"participant {sender} evaluates its own upload"
        )
    if record.kept_evaluations is not None or sender in {u for u, _ in record.evaluations}:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER,
            f"participant {sender} evaluates round {r}, which it already evaluated or "
            "whose evaluations are closed",
        )
    if sender not in record.uploaders:
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"participant {sender} evaluates round {r}, in which it has no upload (a "
            "participant evaluates the others once its own change is in the round)",
        )
    others = record.uploaders - {sender}
    if len(set(targets)) != len(targets) or set(targets) != others or not others:
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"participant {sender} evaluates {sorted(targets)}; the other recorded uploads of "
            f"round {r} are {sorted(others)}",
        )
    draft.seccl_rounds[r] = replace(record, evaluations=(*record.evaluations, (sender, message)))


def _close(draft: Draft, r: int, message: SecclClose, record: SecclRecord) -> None:
    """A phase deadline: keep what the close names (each recorded) and take no more."""
    users = list(message.users)
    if message.phase == "uploads":
        if record.evaluations or record.kept_uploads is not None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"the uploads of round {r} are closed already (an evaluation or a close)",
            )
        recorded = {u for u, _ in record.uploads}
        least, what = 2, "uploads"
    else:
        if record.kept_evaluations is not None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER, f"the evaluations of round {r} are closed already"
            )
        recorded = {u for u, _ in record.evaluations}
        least, what = 1, "evaluations"
    strangers = sorted(set(users) - recorded)
    if users != sorted(set(users)) or len(users) < least or strangers:
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"round {r}: a close of the {what} keeps {users}; it keeps {least} or more "
            f"recorded {what}, ascending" + (f" ({strangers} recorded none)" if strangers else ""),
        )
    kept = tuple(users)
    if message.phase == "uploads":
        draft.seccl_rounds[r] = replace(record, kept_uploads=kept)
    else:
        draft.seccl_rounds[r] = replace(record, kept_evaluations=kept)


def _candidates(
    draft: Draft, task: TaskParams, r: int, message: Candidates, record: SecclRecord
) -> None:
    waiting = sorted(record.uploaders - record.evaluators)
    if record.kept_evaluations is not None:
        waiting = []  # closed at the deadline: the kept evaluations elect
    if not record.uploads or waiting or not record.evaluators:
        raise RefusedError(
            RefusalReason.OUT_OF_ORDER,
            f"the candidates of round {r} before "
            + (f"the evaluations of {waiting}" if waiting else "any upload and evaluation"),
        )
    try:
        election = record.election()
    except FairbusError as exc:  # unreachable: the evaluations were admitted by the rules
        raise RefusedError(RefusalReason.CONTRACT_VIOLATION, str(exc)) from None
    totals = tuple((t.user, t.points) for t in message.totals)
    want_totals = tuple(sorted(election.totals.items()))
    if message.candidates != election.candidates or totals != want_totals:
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"round {r}: the candidates are {list(message.candidates)} with totals "
            f"{dict(totals)}; the Borda election on the recorded evaluations gives "
            f"{list(election.candidates)} with {dict(want_totals)}",
        )
    _check_model(draft, task, r, message, record)
    draft.seccl_rounds[r] = replace(record, candidates=message)


def _check_model(
    draft: Draft, task: TaskParams, r: int, message: Candidates, record: SecclRecord
) -> None:
    """The new global model's hash is the one the candidates' recorded changes give."""
    check = draft.state.evaluations
    if check is None or not draft.re_derive:
        return
    blobs = dict(record.uploads)
    try:
        model = _decoded(check.blobs, record.global_blob, GlobalModel, draft)
        params = np.frombuffer(model.data, dtype="<f4").astype(np.float32)
        if params.size != model.length or model.length != record.announce.model_params:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"round {r}: the recorded global model does not fit its announcement",
            )
        if model_sha256(params) != record.announce.model_sha256:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"round {r}: the recorded global model is not the announced one",
            )
        changes: dict[int, SparseChange] = {}
        k = shared_count(task.theta or 0.0, params.size)
        for user in message.candidates:
            change = _decoded(check.blobs, blobs[user], SparseUpdate, draft).change()
            if change.length != params.size or change.count != k:
                raise RefusedError(
                    RefusalReason.CONTRACT_VIOLATION,
                    f"round {r}: candidate {user} shares {change.count} of {change.length} "
                    f"parameters; θ gives {k} of {params.size}",
                )
            changes[user] = change
        want = model_sha256(aggregate(params, changes))
    except FairbusError as exc:
        if isinstance(exc, RefusedError):
            raise
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"round {r}: the new global model cannot be re-derived: {exc}",
        ) from None
    if message.model_sha256 != want:
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"round {r}: the new global model {message.model_sha256.hex()[:16]} does not follow "
            f"from the candidates' recorded changes ({want.hex()[:16]})",
        )


_P = TypeVar("_P", GlobalModel, SparseUpdate)
_M = TypeVar("_M", bound=Message)


def _decoded(blobs: BlobSource, digest: bytes, cls: type[_P], draft: Draft) -> _P:
    data = blobs(digest)
    if data is None:
        raise RefusedError(
            RefusalReason.MISSING_PAYLOAD,
            f"no blob {digest.hex()[:16]} (a {cls.TYPE} payload) here yet",
        )
    if not isinstance(data, bytes) or hashlib.sha256(data).digest() != digest:
        raise RefusedError(
            RefusalReason.CONTRACT_VIOLATION,
            f"the {cls.TYPE} payload {digest.hex()[:16]} is altered",
        )
    body = decode_body(cls.TYPE, data, draft.state.limits)
    if not isinstance(body, cls):
        raise RefusedError(RefusalReason.MALFORMED, f"the payload is not a {cls.TYPE!r}")
    return body


def _body(message: Message | None, cls: type[_M]) -> _M:
    if not isinstance(message, cls):
        raise RefusedError(RefusalReason.MALFORMED, f"the body is not a {cls.TYPE!r}")
    return message


def payloads_needed(record: SecclRecord | None, message: Candidates) -> set[bytes]:
    """The payloads admitting ``message`` (a round's candidates) reads: the round's
    global model and the candidates' changes."""
    if record is None:
        return set()
    blobs = dict(record.uploads)
    return {record.global_blob} | {blobs[u] for u in message.candidates if u in blobs}
