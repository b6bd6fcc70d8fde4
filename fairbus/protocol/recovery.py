"""What a restarted provider reads back from the ledger (issue 14, item 1).

Not in the paper. The ledger holds every transaction of the task; the provider's state
between rounds is a function of them: the round and attempt (the last announcement),
the excluded users, the key users and Alg. 6's evidence (the decisions, which the
ledger re-derives), each user's chain head, the groups each global model's rounds
revealed, and the global model itself (the last round's recorded :class:`GlobalModel`,
advanced by the last decided round's aggregate). The group models of a round are the
sums of its recorded masked uploads (the masks cancel within a group), so no key is
needed to re-derive them; their blobs are checked against the hashes the ledger holds.

The driver does the I/O: it reads the task start and every round's transactions
(:class:`LedgerHistory`), asks :func:`blobs_needed` which payloads to fetch, and
hands them to :meth:`fairbus.protocol.provider.ProviderMachine.restore`. This module
only replays and decodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fairbus import masking
from fairbus.errors import OperatorError
from fairbus.field import FixedPointCodec
from fairbus.ledger.records import Transaction
from fairbus.ledger.state import Draft, LedgerState, RefusedError, RoundRecord
from fairbus.roster import Roster
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import GlobalModel, MaskedUpload, decode_body


class RecoveryError(OperatorError):
    """The ledger's record cannot be resumed from (it fails its own rules, a blob is
    missing or altered, or the task is not this provider's)."""


@dataclass(frozen=True)
class LedgerHistory:
    """The task as the ledger holds it: the task start, then each round's transactions
    in ledger order (rounds 1, 2, ... with no gaps)."""

    task_start: Transaction
    rounds: tuple[tuple[Transaction, ...], ...]
    opening: tuple[Transaction, ...] = ()
    """The provider's links before its task start, oldest first: the test set it
    recorded (issue 13)."""

    @classmethod
    def of(cls, txs: Iterable[Transaction]) -> LedgerHistory:
        """From the task's transactions in ledger order (others' roster changes and
        attestations are not the provider's state and are left out)."""
        start: Transaction | None = None
        opening: list[Transaction] = []
        rounds: dict[int, list[Transaction]] = {}
        for tx in txs:
            header = tx.envelope.header
            if header.type == "task_start" and start is None:
                start = tx
            elif header.type == "test_set" and start is None:
                opening.append(tx)
            elif header.round is not None:
                rounds.setdefault(header.round, []).append(tx)
        if start is None:
            raise RecoveryError("the ledger holds no task start")
        if sorted(rounds) != list(range(1, len(rounds) + 1)):
            raise RecoveryError(f"the ledger's rounds {sorted(rounds)} have gaps")
        return cls(start, tuple(tuple(rounds[r]) for r in sorted(rounds)), tuple(opening))


@dataclass(frozen=True)
class Replayed:
    """The ledger's rules applied to a :class:`LedgerHistory` from genesis."""

    draft: Draft
    history: LedgerHistory

    def round(self, number: int) -> RoundRecord | None:
        return self.draft.round(number)

    @property
    def decided_rounds(self) -> int:
        """How many rounds the ledger shows decided."""
        records = (self.round(r) for r in range(1, len(self.history.rounds) + 1))
        return sum(1 for record in records if record is not None and record.decided)

    @property
    def last_round(self) -> int:
        """The last round with an announcement (0 before any)."""
        announced = [r for r in range(1, len(self.history.rounds) + 1) if self.round(r)]
        return max(announced, default=0)

    def global_model_tx(self, number: int, provider: int) -> Transaction:
        """Round ``number``'s recorded global model (the last one, should there be two)."""
        txs = [
            tx
            for tx in self.history.rounds[number - 1]
            if tx.envelope.header.type == "global_model" and tx.envelope.header.sender == provider
        ]
        if not txs:
            raise RecoveryError(f"round {number} has no recorded global model")
        return txs[-1]

    def upload_txs(self, number: int, record: RoundRecord) -> dict[tuple[int, int], Transaction]:
        """(group, sender) → the upload recorded for round ``number``'s latest attempt."""
        out: dict[tuple[int, int], Transaction] = {}
        for tx in self.history.rounds[number - 1]:
            header = tx.envelope.header
            if header.type == "upload" and header.attempt == record.attempt:
                if header.group is None:  # the ledger's rules refuse one; not this record
                    raise RecoveryError(f"round {number}: an upload names no group")
                out[header.group, header.sender] = tx
        return out


def replay(roster: Roster, history: LedgerHistory, limits: WireLimits = DEFAULT_LIMITS) -> Replayed:
    """Apply the ledger's rules (:class:`~fairbus.ledger.state.Draft`) to ``history``;
    :class:`RecoveryError` if any transaction breaks them."""
    draft = LedgerState(roster, limits=limits).draft()
    rounds = (tx for round_txs in history.rounds for tx in round_txs)
    txs = [*history.opening, history.task_start, *rounds]
    for k, tx in enumerate(txs):
        try:
            draft.admit(tx)
        except RefusedError as exc:
            raise RecoveryError(f"the ledger's transaction {k} fails its rules: {exc}") from None
    return Replayed(draft, history)


def blobs_needed(replayed: Replayed, provider: int) -> list[bytes]:
    """The payload hashes a restore needs: the last two rounds' global models (the step
    between them is what contributions are measured along) and the uploads recorded for
    the last one's latest attempt (all of them if the round is under way: the complete
    groups among them need not be lost; only the evaluated ones otherwise)."""
    last = replayed.last_round
    if last == 0:
        return []
    record = _record(replayed, last)
    rounds = [last - 1, last] if last > 1 and replayed.round(last - 1) is not None else [last]
    needed = [
        replayed.global_model_tx(number, provider).envelope.header.payload_sha256
        for number in rounds
    ]
    uploads = replayed.upload_txs(last, record)
    if record.evaluation is not None:
        evaluated = {e.gid for e in record.evaluation.accuracies}
        uploads = {key: tx for key, tx in uploads.items() if key[0] in evaluated}
    return needed + [tx.envelope.header.payload_sha256 for tx in uploads.values()]


def recorded_uploads(
    replayed: Replayed,
    number: int,
    blobs: Mapping[bytes, bytes],
    limits: WireLimits = DEFAULT_LIMITS,
) -> dict[tuple[int, int], MaskedUpload]:
    """(group, sender) → the masked upload recorded for round ``number``'s latest
    attempt, from its checked blob."""
    record = _record(replayed, number)
    return {
        key: _upload(_blob(blobs, tx), limits)
        for key, tx in replayed.upload_txs(number, record).items()
    }


def _record(replayed: Replayed, number: int) -> RoundRecord:
    record = replayed.round(number)
    if record is None:
        raise RecoveryError(f"the ledger holds no announcement of round {number}")
    return record


def _upload(data: bytes, limits: WireLimits) -> MaskedUpload:
    message = decode_body("upload", data, limits)
    if not isinstance(message, MaskedUpload):
        raise RecoveryError("an upload's blob does not hold a masked upload")
    return message


def _blob(blobs: Mapping[bytes, bytes], tx: Transaction) -> bytes:
    digest = tx.envelope.header.payload_sha256
    data = blobs.get(digest)
    if data is None or hashlib.sha256(data).digest() != digest:
        raise RecoveryError(f"blob {digest.hex()[:16]} is missing or does not match its hash")
    return data


def global_model(
    replayed: Replayed,
    number: int,
    provider: int,
    blobs: Mapping[bytes, bytes],
    limits: WireLimits = DEFAULT_LIMITS,
) -> npt.NDArray[np.float32]:
    """Round ``number``'s global model from its blob, checked against the announced hash."""
    tx = replayed.global_model_tx(number, provider)
    message = decode_body("global_model", _blob(blobs, tx), limits)
    if not isinstance(message, GlobalModel) or len(message.data) != 4 * message.length:
        raise RecoveryError(f"round {number}'s global model blob is malformed")
    return np.frombuffer(message.data, dtype="<f4").astype(np.float32)


def group_aggregates(
    replayed: Replayed,
    number: int,
    gids: Sequence[int],
    blobs: Mapping[bytes, bytes],
    codec: FixedPointCodec,
    limits: WireLimits = DEFAULT_LIMITS,
) -> dict[int, masking.GroupAggregate]:
    """Alg. 5, line 1, from the recorded uploads of round ``number``'s latest attempt:
    each group's sum of masked uploads, decoded."""
    record = _record(replayed, number)
    uploads = replayed.upload_txs(number, record)
    specs = {g.gid: g for g in record.announce.groups}
    out: dict[int, masking.GroupAggregate] = {}
    for gid in gids:
        vectors = []
        for member in specs[gid].members:
            tx = uploads.get((gid, member))
            if tx is None:
                raise RecoveryError(f"round {number}: no recorded upload of {member} to {gid}")
            vectors.append(_upload(_blob(blobs, tx), limits).vector())
        out[gid] = masking.aggregate_decrypt(vectors, codec)
    return out
