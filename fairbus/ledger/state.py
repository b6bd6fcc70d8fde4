"""The ledger's validation state machine: pure, deterministic, shared by every store.

No I/O. :class:`LedgerState` is what the committed blocks say (each sender's chain head,
the roster, each round's grouping and evaluation, the key users and the excluded users,
the evidence Algorithm 6 carries between rounds). A :class:`Draft` admits transactions
for the next block on top of it, each one or refused with a :class:`RefusedError`
naming a :class:`RefusalReason`; committing the block folds the draft in. Followers and
``fairbus audit`` replay blocks through the very same admission.

The task's parameters (:class:`~fairbus.task.TaskParams`) come from the ledger itself:
the provider's ``task_start`` transaction records them, once and before any announcement;
nothing round-scoped is admitted before it, so every node and every auditor replaying the
blocks runs the contract with the same parameters, and no node configures its own.

The detection contract (the ledger issue; Algorithm 6 of the fairness paper): a decision
is admitted only if Algorithm 6, re-derived here from the round's recorded grouping and
evaluation with the recorded :class:`~fairbus.detection.DetectionParams`, names the same
key users and violators, scores and τ. The provider cannot exclude anyone on its own word.

A task whose task start records the mode ``seccl`` runs SecCL's consensus contract
instead (:mod:`fairbus.ledger.seccl`: the Borda election and the new global model
re-derived from the recorded evaluations and changes); each mode's round-scoped types
are refused in the other (``wrong_mode``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from nacl.exceptions import BadSignatureError

from fairbus.detection import DetectionParams, RoundContributions, detect
from fairbus.envelope import check_header_group
from fairbus.errors import (
    FairbusError,
    GroupingError,
    RoleError,
    SizeError,
    UnknownSenderError,
    WireError,
)
from fairbus.exposure import DEFAULT_COLLUSION
from fairbus.grouping import Group, Grouping, announced_group_problems, check_grouping
from fairbus.ledger.records import (
    GENESIS_HASH,
    LEDGER_TYPES,
    MAX_INLINE_PAYLOAD,
    Block,
    Transaction,
    check_links,
)
from fairbus.ledger.verify import EvaluationCheck, PayloadMissingError, RecordedRound
from fairbus.roster import Role, Roster
from fairbus.task import TaskParams
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    DEFAULT_KEYING,
    MAX_CLASS_CELLS,
    MESSAGE_TYPES,
    SECCL,
    Announce,
    Candidates,
    Decision,
    Evaluation,
    GroupSpec,
    Message,
    RosterChange,
    TaskStart,
    counted_by_class,
    decode_body,
)

if TYPE_CHECKING:
    from fairbus.ledger.seccl import SecclRecord


class RefusalReason(StrEnum):
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    WRONG_TASK = "wrong_task"
    UNKNOWN_SENDER = "unknown_sender"
    ROLE_NOT_ALLOWED = "role_not_allowed"
    TYPE_NOT_RECORDED = "type_not_recorded"
    BAD_SIGNATURE = "bad_signature"
    PAYLOAD_MISMATCH = "payload_mismatch"
    STALE_PREV = "stale_prev"
    OUT_OF_ORDER = "out_of_order"
    BAD_GROUPING = "bad_grouping"
    NOT_IN_GROUP = "not_in_group"
    EXCLUDED = "excluded"
    CONTRACT_VIOLATION = "contract_violation"
    MISSING_PAYLOAD = "missing_payload"
    """This node lacks a payload the transaction is re-derived from (a model-sized
    payload travels on the bus after its commit); the submitter may relay it and retry."""
    NOT_PARTICIPANT = "not_participant"
    """SecCL: a type (a) or (b) message from a user who is not a participant of the round
    (:mod:`fairbus.ledger.seccl`)."""
    SELF_EVALUATION = "self_evaluation"
    """SecCL: a type (b) message that evaluates its sender's own upload."""
    WRONG_MODE = "wrong_mode"
    """A transaction type of the other protocol than the task's recorded mode."""


def _detection(task: TaskParams | None) -> DetectionParams:
    """The task's detection parameters: its ``contribution_direction`` is what evaluations'
    contributions are measured along (the paper's, the median, before any task start)."""
    return task.detection if task is not None else DetectionParams()


class RefusedError(FairbusError):
    """A transaction the ledger will not apply, and why."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidBlockError(FairbusError):
    """A block that does not follow from the chain before it (an alarm on a follower)."""


@dataclass(frozen=True)
class Location:
    height: int
    index: int


@dataclass(frozen=True)
class RoundRecord:
    """What the ledger holds about a round's latest attempt."""

    attempt: int
    announce: Announce
    evaluation: Evaluation | None = None
    decided: bool = False
    uploads: frozenset[tuple[int, int]] = frozenset()
    """(group, sender) of every upload recorded for this attempt."""
    closed: bool = False
    """A dropout was recorded: the attempt takes no more uploads."""
    global_blob: bytes = b""
    """Payload SHA-256 of the global model recorded for the round (before its
    announcement): what the evaluation's contributions are measured from."""
    upload_blobs: tuple[tuple[tuple[int, int], bytes], ...] = ()
    """((group, sender), payload SHA-256) of every upload recorded for this attempt."""
    previous_global_blob: bytes = b""
    """Payload SHA-256 of the global model recorded for the round before (b"" in round
    1): the step between the two is what contributions are measured along."""

    def recorded(self) -> RecordedRound:
        """What :class:`~fairbus.ledger.verify.EvaluationCheck` re-derives numbers from."""
        return RecordedRound(
            self.announce, self.global_blob, dict(self.upload_blobs), self.previous_global_blob
        )

    def complete_groups(self) -> list[GroupSpec]:
        """The groups every member of which uploaded: the provider can decrypt these."""
        return [
            g for g in self.announce.groups if all((g.gid, m) in self.uploads for m in g.members)
        ]

    def known_groups(self) -> set[tuple[int, ...]]:
        """Every group whose sum the provider may hold once this attempt is over: its
        complete groups and the prior groups its announcement counted."""
        known = {tuple(sorted(g.members)) for g in self.complete_groups()}
        return known | {tuple(sorted(g)) for g in self.announce.prior_groups}

    def evaluated_groups(self) -> list[GroupSpec]:
        """What the evaluation may cover: every group (all of them), or after a dropout
        the complete ones (some of them: the provider finishes the round on those it
        holds when it cannot regroup)."""
        return self.complete_groups() if self.closed else list(self.announce.groups)


@dataclass
class LedgerState:
    """The committed state. Mutated only by :meth:`commit`."""

    roster: Roster
    _: KW_ONLY
    limits: WireLimits = DEFAULT_LIMITS
    evaluations: EvaluationCheck | None = None
    """Re-derives every evaluation from the recorded payloads (issue 13); a ledger node
    and ``fairbus audit`` always have one, and then a task start must name its test set.
    None only where the numbers were re-derived already by the ledger being read (the
    provider's recovery replays its ledger) and in tests of the protocol alone."""
    task: TaskParams | None = field(default=None, init=False)
    """The task's parameters, from its ``task_start`` transaction (None before it)."""
    test_set: bytes | None = field(default=None, init=False)
    """Payload SHA-256 of the task's ``test_set`` transaction (at most one, before the
    task start)."""
    global_blob: bytes = field(default=b"", init=False)
    """Payload SHA-256 of the latest ``global_model`` transaction."""
    height: int = -1
    head_hash: bytes = GENESIS_HASH
    heads: dict[int, bytes] = field(default_factory=dict)
    index: dict[bytes, Location] = field(default_factory=dict)
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    current_round: int = 0
    key_users: frozenset[int] = frozenset()
    excluded: frozenset[int] = frozenset()
    carried: dict[int, tuple[float, ...]] = field(default_factory=dict)
    history: tuple[RoundContributions, ...] = ()
    last_block: Block | None = None
    round_index: dict[int, set[bytes]] = field(default_factory=dict)
    """Round → hashes of the transactions scoped to it (for round queries)."""
    seccl_rounds: dict[int, SecclRecord] = field(default_factory=dict)
    """Round → what the ledger holds about it, in a ``seccl`` task
    (:mod:`fairbus.ledger.seccl`)."""
    blob_index: dict[bytes, frozenset[tuple[str, int]]] = field(default_factory=dict)
    """Payload SHA-256 of every recorded model-sized transaction (its payload is in the
    blob stores, not in a block) → the (type, sender) of each transaction that names it:
    whose blob it is, for the ledger service's ``blob`` query (a masked upload goes only
    to the provider, the ledger nodes and admins; a global model to everyone)."""

    def head(self, sender: int) -> bytes:
        return self.heads.get(sender, GENESIS_HASH)

    def draft(self, *, re_derive: bool = True) -> Draft:
        return Draft(self, re_derive=re_derive)

    def payloads_needed(self, txs: Iterable[Transaction]) -> set[bytes]:
        """The payload SHA-256s that admitting ``txs`` reads (a task start's test set,
        an evaluation's uploads and global model, a SecCL election's changes and global
        model): a ledger node takes model-sized payloads from the bus, so it waits for
        these before it admits the batch."""
        txs = list(txs)
        needed: set[bytes] = set()
        for message, record in self._re_derived(txs):
            if isinstance(message, TaskStart) and message.evaluation is not None:
                needed.add(message.evaluation.test_set_sha256)
            if isinstance(message, Evaluation) and record is not None:
                gids = {e.gid for e in message.accuracies}
                needed.add(record.global_blob)
                along_step = _detection(self.task).contribution_direction == "last_step"
                if along_step and record.previous_global_blob:
                    needed.add(record.previous_global_blob)
                needed |= {d for (gid, _), d in record.upload_blobs if gid in gids}
        return needed | self._seccl_payloads(txs)

    def _seccl_payloads(self, txs: Iterable[Transaction]) -> set[bytes]:
        """What admitting the SecCL candidates among ``txs`` reads (the round's global
        model and the candidates' changes: :mod:`fairbus.ledger.seccl`)."""
        from fairbus.ledger import seccl

        needed: set[bytes] = set()
        if self.evaluations is None:
            return needed
        for tx in txs:
            try:
                header = tx.envelope.header
                if header.type != "seccl_candidates" or header.round is None:
                    continue
                message = check_transaction(tx, self.roster, self.limits)
            except FairbusError:
                continue
            if isinstance(message, Candidates):
                record = self.seccl_rounds.get(header.round)
                needed |= seccl.payloads_needed(record, message)
        return needed

    def prepare_evaluations(self, txs: Iterable[Transaction]) -> None:
        """Re-derive the numbers of every evaluation among ``txs`` ahead of admission,
        and load the test set a task start names (seconds of work: a ledger node runs
        this off its event loop), so that admitting them finds the work done. Changes no
        state; any problem is left for admission to report."""
        check = self.evaluations
        if check is None:
            return
        spec = self.task.evaluation if self.task is not None else None
        for message, record in self._re_derived(txs):
            try:
                if isinstance(message, TaskStart) and message.evaluation is not None:
                    check.check_test_set(message.evaluation)
                if isinstance(message, Evaluation) and record is not None and spec is not None:
                    gids = [e.gid for e in message.accuracies]
                    if {g.gid for g in record.complete_groups()} >= set(gids):
                        check.numbers(spec, record.recorded(), gids, _detection(self.task))
            except FairbusError:
                continue

    def _re_derived(
        self, txs: Iterable[Transaction]
    ) -> Iterable[tuple[Message, RoundRecord | None]]:
        """The task starts and evaluations among ``txs`` that admission re-derives from
        payloads (none without :attr:`evaluations`), with their round's record; the rest,
        and what does not even pass :func:`check_transaction`, are left to admission."""
        if self.evaluations is None:
            return
        for tx in txs:
            try:
                header = tx.envelope.header
                if header.type not in ("evaluation", "task_start"):
                    continue
                message = check_transaction(tx, self.roster, self.limits)
            except FairbusError:
                continue
            if message is not None:
                record = self.rounds.get(header.round) if header.round is not None else None
                yield message, record

    def apply_block(self, block: Block, *, re_derive: bool = True) -> None:
        """Re-validate a committed block from the store and fold it in, or raise
        :class:`InvalidBlockError` (nothing applied). ``re_derive=False``: a follower
        applies the evaluations the writer re-derived without re-deriving their numbers
        (ledger nodes are crash-fault tolerant, not Byzantine; ``fairbus audit``
        re-derives everything)."""
        problem = check_links(block, self.last_block)
        if problem:
            raise InvalidBlockError(problem)
        draft = self.draft(re_derive=re_derive)
        for k, tx in enumerate(block.txs):
            if draft.location(tx.hash) is not None:
                raise InvalidBlockError(f"block {block.height}: transaction {k} is a duplicate")
            try:
                draft.admit(tx)
            except RefusedError as exc:
                raise InvalidBlockError(f"block {block.height}: transaction {k}: {exc}") from None
        self.commit(draft, block)

    def commit(self, draft: Draft, block: Block) -> None:
        """Fold ``draft`` (whose transactions are ``block``'s) into the state."""
        self.heads.update(draft.heads)
        for k, tx in enumerate(block.txs):
            self.index[tx.hash] = Location(block.height, k)
            header = tx.envelope.header
            if header.round is not None:
                self.round_index.setdefault(header.round, set()).add(tx.hash)
            if tx.payload is None:
                owners = self.blob_index.get(header.payload_sha256, frozenset())
                self.blob_index[header.payload_sha256] = owners | {(header.type, header.sender)}
        self.rounds.update(draft.rounds)
        self.seccl_rounds.update(draft.seccl_rounds)
        self.current_round = draft.current_round
        self.key_users = draft.key_users
        self.excluded = draft.excluded
        self.carried = draft.carried
        self.history = draft.history
        self.roster = draft.roster
        self.task = draft.task
        self.test_set = draft.test_set
        self.global_blob = draft.global_blob
        self.height = block.height
        self.head_hash = block.hash
        self.last_block = block


class Draft:
    """Transactions admitted for the next block, on top of a :class:`LedgerState`."""

    def __init__(self, state: LedgerState, *, re_derive: bool = True) -> None:
        self.state = state
        self.re_derive = re_derive
        self.txs: list[Transaction] = []
        self.heads: dict[int, bytes] = {}
        self.hashes: dict[bytes, int] = {}
        self.rounds: dict[int, RoundRecord] = {}
        self.seccl_rounds: dict[int, SecclRecord] = {}
        self.current_round = state.current_round
        self.key_users = state.key_users
        self.excluded = state.excluded
        self.carried = state.carried
        self.history = state.history
        self.roster = state.roster
        self.task = state.task
        self.test_set = state.test_set
        self.global_blob = state.global_blob

    def location(self, tx_hash: bytes) -> Location | None:
        """Where ``tx_hash`` is already: committed, or pending in this draft (height -1)."""
        if tx_hash in self.hashes:
            return Location(-1, self.hashes[tx_hash])
        return self.state.index.get(tx_hash)

    def head(self, sender: int) -> bytes:
        return self.heads.get(sender, self.state.head(sender))

    def round(self, number: int) -> RoundRecord | None:
        return self.rounds.get(number, self.state.rounds.get(number))

    def seccl_round(self, number: int) -> SecclRecord | None:
        return self.seccl_rounds.get(number, self.state.seccl_rounds.get(number))

    def admit(self, tx: Transaction) -> Message | None:
        """Check ``tx`` against everything before it and add it to the draft, or raise
        :class:`RefusedError` and change nothing. Returns the decoded body (None when
        the payload lives in the blob store)."""
        message = self._verify(tx)
        header = tx.envelope.header
        if header.prev != self.head(header.sender):
            raise RefusedError(
                RefusalReason.STALE_PREV,
                f"participant {header.sender}'s transaction has prev "
                f"{header.prev.hex()[:16]}, its chain head is "
                f"{self.head(header.sender).hex()[:16]} (a fork, a replay or a lost link)",
            )
        self._apply_rules(tx, message)
        self.heads[header.sender] = tx.hash
        self.hashes[tx.hash] = len(self.txs)
        self.txs.append(tx)
        return message

    # --- checks --------------------------------------------------------------------------------

    def _verify(self, tx: Transaction) -> Message | None:
        return check_transaction(tx, self.roster, self.state.limits)

    def _apply_rules(self, tx: Transaction, message: Message | None) -> None:
        header = tx.envelope.header
        kind = header.type
        if kind == "roster_change":
            self._roster_change(_body(message, RosterChange))
            return
        if kind == "attestation":
            return
        if kind == "task_start":
            self._task_start(_body(message, TaskStart))
            return
        if kind == "test_set":
            self._test_set(header.payload_sha256)
            return
        if header.round is None or header.attempt is None:
            raise RefusedError(RefusalReason.MALFORMED, f"a {kind!r} names no round and attempt")
        if self.task is None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"{kind!r} for round {header.round} before the task started (the provider's "
                "task_start records the task's parameters first)",
            )
        if kind == "global_model":
            self.global_blob = header.payload_sha256
            return
        from fairbus.ledger import seccl

        if self.task.mode == SECCL:
            seccl.admit(self, header, message)
            return
        if kind in seccl.SECCL_TYPES:
            raise RefusedError(
                RefusalReason.WRONG_MODE,
                f"a {kind!r} in a {self.task.mode!r} task (its mode is recorded)",
            )
        r, a = header.round, header.attempt
        if kind == "announce":
            self._announce(r, a, _body(message, Announce))
            return
        record = self.round(r)
        if record is not None and record.decided:
            # A decided round is over: no more uploads, dropouts, evaluations or decisions
            # (and no new attempt, :meth:`_announce`), so its group sums stay what the
            # exposure check and the decision saw.
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER, f"{kind!r} for round {r}, which is already decided"
            )
        if record is None or record.attempt != a:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"{kind!r} for round {r} attempt {a}, which has not been announced "
                "(or a later attempt has)",
            )
        if kind == "upload":
            if header.group is None:
                raise RefusedError(RefusalReason.MALFORMED, "an upload names no group")
            self._upload(r, header.sender, header.group, header.payload_sha256, record)
        elif kind == "evaluation":
            self._evaluation(r, record, _body(message, Evaluation))
        elif kind == "decision":
            self._decision(r, record, _body(message, Decision))
        elif kind == "dropout":
            if record.evaluation is not None:
                raise RefusedError(
                    RefusalReason.OUT_OF_ORDER, f"a dropout after round {r}'s evaluation"
                )
            self.rounds[r] = replace(record, closed=True)

    def _task_start(self, message: TaskStart) -> None:
        if self.task is not None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                "the task has started already: its parameters are recorded once",
            )
        if self.current_round or self.state.rounds or self.rounds:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER, "a task start after the first announcement"
            )
        try:
            task = TaskParams.from_message(message)
        except FairbusError as exc:
            raise RefusedError(RefusalReason.MALFORMED, str(exc)) from None
        check = self.state.evaluations
        if check is not None:
            spec = task.evaluation
            if spec is None:
                raise RefusedError(
                    RefusalReason.CONTRACT_VIOLATION,
                    "the task start names no test set: this ledger re-derives every "
                    "evaluation (issue 13), so the task must commit one first",
                )
            if spec.test_set_sha256 != self.test_set:
                raise RefusedError(
                    RefusalReason.CONTRACT_VIOLATION,
                    f"the task start names test set {spec.test_set_sha256.hex()[:16]}, the "
                    "ledger recorded "
                    + (self.test_set.hex()[:16] if self.test_set is not None else "none"),
                )
            try:
                if self.re_derive:
                    check.check_test_set(spec)
            except PayloadMissingError as exc:
                raise RefusedError(RefusalReason.MISSING_PAYLOAD, str(exc)) from None
            except FairbusError as exc:
                raise RefusedError(RefusalReason.CONTRACT_VIOLATION, str(exc)) from None
        self.task = task

    def _test_set(self, digest: bytes) -> None:
        if self.task is not None or self.test_set is not None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                "a test set is recorded once, before the task start",
            )
        self.test_set = digest

    def _roster_change(self, message: RosterChange) -> None:
        try:
            roster = Roster.from_toml(message.roster_toml, source="roster_change")
        except FairbusError as exc:
            raise RefusedError(RefusalReason.MALFORMED, str(exc)) from None
        if roster.task != self.roster.task:
            raise RefusedError(
                RefusalReason.WRONG_TASK, f"a roster change may not move to task {roster.task!r}"
            )
        if not roster.with_role(Role.ADMIN):
            raise RefusedError(RefusalReason.MALFORMED, "a roster change must keep an admin")
        self.roster = roster

    def _announce(self, r: int, a: int, message: Announce) -> None:
        last = self.round(r)
        if last is not None and last.decided:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"announcement of round {r} attempt {a}: round {r} is already decided",
            )
        if r < self.current_round or (last is not None and a <= last.attempt):
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"announcement of round {r} attempt {a} comes after round "
                f"{self.current_round}" + (f" attempt {last.attempt}" if last is not None else ""),
            )
        shape = announced_group_problems(message.groups, self.roster.with_role(Role.USER))
        if shape:
            # Checked first: the exposure check below assumes groups of distinct users.
            raise RefusedError(RefusalReason.BAD_GROUPING, "; ".join(shape))
        grouping = grouping_of(message)
        users = set(grouping.users)
        problems = []
        c = self.task.collusion if self.task is not None else DEFAULT_COLLUSION
        if message.collusion != c:
            problems.append(f"it names collusion bound {message.collusion}, the task's is {c}")
        keying = self.task.keying if self.task is not None else DEFAULT_KEYING
        if message.keying != keying:
            problems.append(f"it names keying {message.keying!r}, the task's is {keying!r}")
        # Every group whose sum the provider may hold must be in the exposure check of
        # the new grouping: those of earlier attempts of this round (issue 12, item 2),
        # and those of earlier rounds that started from the same global model, whose
        # users may train the same models again (item 5).
        known = last.known_groups() if last is not None else self._same_model(r, message)
        missing = sorted(known - {tuple(sorted(g)) for g in message.prior_groups})
        if missing:
            problems.append(f"prior_groups omit groups whose sums are known: {missing}")
        if len({g.gid for g in grouping.groups}) != len(grouping.groups):
            problems.append("group ids repeat")
        if users & self.excluded:
            problems.append(f"excluded users {sorted(users & self.excluded)} are grouped")
        if set(message.excluded) != set(self.excluded):
            problems.append(
                f"it names excluded users {sorted(message.excluded)}, the ledger has "
                f"{sorted(self.excluded)}"
            )
        if set(message.key_users) != set(self.key_users) & users:
            problems.append(
                f"key users {sorted(message.key_users)}, the last decision leaves "
                f"{sorted(set(self.key_users) & users)}"
            )
        for g in grouping.groups:
            if g.kind == "focus" and (g.focus not in g.members or g.focus not in self.key_users):
                problems.append(f"focus group {g.gid} is not built around a key user")
        if not problems:
            try:
                check_grouping(grouping, message.prior_groups, c)
            except GroupingError as exc:
                problems.append(str(exc))
        if problems:
            raise RefusedError(RefusalReason.BAD_GROUPING, "; ".join(problems))
        self.current_round = r
        before = self.round(r - 1)
        self.rounds[r] = RoundRecord(
            a,
            message,
            global_blob=self.global_blob,
            previous_global_blob=before.global_blob if before is not None else b"",
        )

    def _same_model(self, r: int, message: Announce) -> set[tuple[int, ...]]:
        """The known groups of every earlier round announced with the same global model
        (users check that the model they train is the announced one)."""
        known: set[tuple[int, ...]] = set()
        for number in sorted({*self.state.rounds, *self.rounds}):
            record = self.round(number)
            same = record is not None and record.announce.model_sha256 == message.model_sha256
            if number < r and record is not None and same:
                known |= record.known_groups()
        return known

    def _upload(self, r: int, sender: int, gid: int, digest: bytes, record: RoundRecord) -> None:
        if sender in self.excluded:
            raise RefusedError(RefusalReason.EXCLUDED, f"participant {sender} is excluded")
        if record.evaluation is not None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"an upload to round {r} attempt {record.attempt} after its evaluation",
            )
        if record.closed:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"round {r} attempt {record.attempt} was closed by a dropout",
            )
        if not any(g.gid == gid and sender in g.members for g in record.announce.groups):
            raise RefusedError(
                RefusalReason.NOT_IN_GROUP,
                f"participant {sender} is not in group {gid} of round {r} attempt {record.attempt}",
            )
        if (gid, sender) in record.uploads:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER, f"participant {sender} already uploaded to group {gid}"
            )
        self.rounds[r] = replace(
            record,
            uploads=record.uploads | {(gid, sender)},
            upload_blobs=(*record.upload_blobs, ((gid, sender), digest)),
        )

    def _evaluation(self, r: int, record: RoundRecord, message: Evaluation) -> None:
        if record.evaluation is not None:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER, f"round {r} attempt {record.attempt} has an evaluation"
            )
        announced = {g.gid for g in record.evaluated_groups()}
        evaluated = [e.gid for e in message.accuracies]
        # A closed attempt is evaluated on complete groups only: a dropped user's recorded
        # upload may never have reached the provider.
        covered = set(evaluated) <= announced if record.closed else set(evaluated) == announced
        if not evaluated or not covered or len(set(evaluated)) != len(evaluated):
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"evaluation of groups {sorted(evaluated)}, round {r} has groups "
                f"{sorted(announced)}",
            )
        # Issue 13: a group's model exists only once every member's upload is recorded
        # (their sum is the group sum); an accuracy for any other group is made up.
        complete = {g.gid for g in record.complete_groups()}
        made_up = sorted(set(evaluated) - complete)
        if made_up:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"evaluation of groups {made_up} of round {r} attempt {record.attempt}, "
                "whose members' uploads are not all recorded",
            )
        try:
            message.class_counts()
        except FairbusError as exc:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION, f"round {r}: the class counts: {exc}"
            ) from None
        self._check_numbers(r, record, message)
        self.rounds[r] = replace(record, evaluation=message)

    def _check_numbers(self, r: int, record: RoundRecord, message: Evaluation) -> None:
        """Issue 13: every accuracy, contribution, rank and class count is the one the
        recorded uploads, the recorded global model and the committed test set give, bit
        for bit; none may be left out."""
        check = self.state.evaluations
        spec = self.task.evaluation if self.task is not None else None
        if check is None or spec is None or not self.re_derive:
            return
        gids = [e.gid for e in message.accuracies]
        try:
            want = check.numbers(spec, record.recorded(), gids, _detection(self.task))
            samples = check.class_samples(spec)
        except PayloadMissingError as exc:
            raise RefusedError(
                RefusalReason.MISSING_PAYLOAD,
                f"round {r}: the evaluation cannot be re-derived here yet: {exc}",
            ) from None
        except FairbusError as exc:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"round {r}: the evaluation cannot be re-derived: {exc}",
            ) from None
        # Detection reads the class counts (class_lead): a provider that leaves them out
        # would choose whom they protect, so where the ledger re-derives they are required
        # (but for an evaluation too large to carry them, which must not).
        counted = counted_by_class(len(gids), len(samples))
        if message.class_samples != (samples if counted else None):
            said = "nothing" if message.class_samples is None else list(message.class_samples)
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"round {r}: the committed test set has {list(samples)} samples per class "
                f"(counted by class for {MAX_CLASS_CELLS} groups × classes at most); the "
                f"evaluation of {len(gids)} groups says {said}",
            )
        for e in message.accuracies:
            accuracy, contribution, rank, right, called = want[e.gid]
            if e.accuracy != accuracy or e.contribution != contribution or e.rank != rank:
                raise RefusedError(
                    RefusalReason.CONTRACT_VIOLATION,
                    f"round {r}: group {e.gid} has accuracy {accuracy!r}, contribution "
                    f"{contribution!r} and rank {rank!r} on the recorded uploads and the "
                    f"committed test set; the evaluation says {e.accuracy!r}, "
                    f"{e.contribution!r} and {e.rank!r}",
                )
            if counted and (e.class_right, e.class_called) != (right, called):
                raise RefusedError(
                    RefusalReason.CONTRACT_VIOLATION,
                    f"round {r}: group {e.gid} classifies {list(right)} right and calls "
                    f"{list(called)} by class on the committed test set; the evaluation says "
                    f"{e.class_right} and {e.class_called}",
                )

    def _decision(self, r: int, record: RoundRecord, message: Decision) -> None:
        if record.evaluation is None or record.decided:
            raise RefusedError(
                RefusalReason.OUT_OF_ORDER,
                f"decision of round {r} "
                + ("before its evaluation" if record.evaluation is None else "made twice"),
            )
        accuracies = {e.gid: e.accuracy for e in record.evaluation.accuracies}
        contributions = {
            e.gid: e.contribution
            for e in record.evaluation.accuracies
            if e.contribution is not None
        }
        evaluated = {e.gid for e in record.evaluation.accuracies}
        if self.task is None:  # unreachable: nothing round-scoped precedes task_start
            raise RefusedError(RefusalReason.OUT_OF_ORDER, "a decision before the task started")
        try:
            result = detect(
                grouping_of(record.announce, evaluated),
                accuracies,
                self.task.detection,
                contributions or None,
                self.carried,
                self.history,
                record.evaluation.class_counts() or None,
            )
        except FairbusError as exc:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION, f"Algorithm 6 cannot run on round {r}: {exc}"
            ) from None
        want_keys = tuple(sorted(result.new_key_users))
        want_violators = tuple(sorted(result.violators))
        want_scores = tuple(
            (a.user, a.score, a.conf_lo, a.conf_up) for a in result.assessments.values()
        )
        got_scores = tuple((s.user, s.score, s.conf_lo, s.conf_up) for s in message.scores)
        if (message.key_users, message.violators) != (want_keys, want_violators):
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"round {r}: the decision names key users {list(message.key_users)} and "
                f"violators {list(message.violators)}; Algorithm 6 gives "
                f"{list(want_keys)} and {list(want_violators)}",
            )
        if message.tau != result.tau or got_scores != want_scores:
            raise RefusedError(
                RefusalReason.CONTRACT_VIOLATION,
                f"round {r}: τ or the scores differ from Algorithm 6's",
            )
        self.rounds[r] = replace(record, decided=True)
        self.key_users = result.new_key_users
        self.excluded = self.excluded | result.violators
        self.carried = dict(result.evidence)
        self.history = result.history


def check_transaction(
    tx: Transaction, roster: Roster, limits: WireLimits = DEFAULT_LIMITS
) -> Message | None:
    """Everything about ``tx`` that needs no ledger state: header, recorded type, task,
    sender and role, signature, payload placement, size and hash, and the body's schema.
    Raises :class:`RefusedError`; returns the decoded body (None for a blob payload)."""
    try:
        header = tx.envelope.header
    except WireError as exc:
        raise RefusedError(_wire_reason(exc), str(exc)) from None
    if header.type not in LEDGER_TYPES:
        raise RefusedError(
            RefusalReason.TYPE_NOT_RECORDED, f"{header.type!r} is not a ledger transaction"
        )
    if header.task != roster.task:
        raise RefusedError(
            RefusalReason.WRONG_TASK,
            f"transaction is for task {header.task!r}, this ledger is {roster.task!r}",
        )
    try:
        check_header_group(header)
    except WireError as exc:
        raise RefusedError(RefusalReason.MALFORMED, str(exc)) from None
    cls = MESSAGE_TYPES[header.type]
    try:
        member = roster.member(header.sender, roles=cls.SENDERS)
    except UnknownSenderError as exc:
        raise RefusedError(RefusalReason.UNKNOWN_SENDER, str(exc)) from None
    except RoleError as exc:
        raise RefusedError(RefusalReason.ROLE_NOT_ALLOWED, str(exc)) from None
    try:
        member.identity.verify_key.verify(tx.header_bytes, tx.signature)
    except BadSignatureError:
        raise RefusedError(
            RefusalReason.BAD_SIGNATURE,
            f"signature does not verify for participant {header.sender}",
        ) from None
    if tx.payload is None:
        if not getattr(cls, "MODEL_SIZED", False):
            raise RefusedError(
                RefusalReason.MALFORMED, f"a {header.type!r} transaction carries its payload"
            )
        return None
    if getattr(cls, "MODEL_SIZED", False):
        raise RefusedError(
            RefusalReason.TOO_LARGE,
            f"{header.type!r} payloads go to the blob store, not into a block",
        )
    if len(tx.payload) > MAX_INLINE_PAYLOAD:
        raise RefusedError(
            RefusalReason.TOO_LARGE,
            f"a {header.type!r} body of {len(tx.payload)} bytes exceeds {MAX_INLINE_PAYLOAD}",
        )
    if hashlib.sha256(tx.payload).digest() != header.payload_sha256:
        raise RefusedError(
            RefusalReason.PAYLOAD_MISMATCH, "payload does not match the signed SHA-256"
        )
    try:
        return decode_body(header.type, tx.payload, limits)
    except WireError as exc:
        raise RefusedError(_wire_reason(exc), str(exc)) from None


_M = TypeVar("_M", bound=Message)


def _body(message: Message | None, cls: type[_M]) -> _M:
    """The decoded body as the type its header names (``check_transaction`` decoded it
    by that type; anything else is refused, never asserted)."""
    if not isinstance(message, cls):
        raise RefusedError(RefusalReason.MALFORMED, f"the body is not a {cls.TYPE!r}")
    return message


def _wire_reason(exc: WireError) -> RefusalReason:
    return RefusalReason.TOO_LARGE if isinstance(exc, SizeError) else RefusalReason.MALFORMED


def grouping_of(announce: Announce, only: set[int] | None = None) -> Grouping:
    """The :class:`Grouping` an announcement describes (``only`` those group ids)."""
    groups = tuple(_group(s) for s in announce.groups if only is None or s.gid in only)
    basics = sum(1 for g in groups if g.kind == "basic")
    return Grouping(groups, frozenset(announce.key_users), 0, basics)


def _group(spec: GroupSpec) -> Group:
    return Group(spec.gid, spec.kind, tuple(spec.members), spec.focus)


def replay(
    roster: Roster, blocks: Iterable[Block], limits: WireLimits = DEFAULT_LIMITS
) -> LedgerState:
    """Apply ``blocks`` from genesis; raises :class:`InvalidBlockError` on the first bad one."""
    state = LedgerState(roster, limits=limits)
    for block in blocks:
        state.apply_block(block)
    return state
