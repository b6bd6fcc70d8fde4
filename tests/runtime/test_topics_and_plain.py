"""Topics are built and parsed in one module (:mod:`fairbus.topics`), and plain FedAvg is
an aggregation policy (:class:`fairbus.aggregation.PlainFedAvg`) that the same machines
and the same runtime loop play: the provider machine sends the global model in the
clear, the user machines answer with theirs, the next global model is their mean."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fairbus import topics
from fairbus.aggregation import PLAIN_MODEL, PlainFedAvg, PlainModel
from fairbus.errors import SchemaError, WireError
from fairbus.identity import Identity
from fairbus.protocol.events import (
    PROVIDER,
    USERS,
    Commit,
    Dropped,
    Received,
    Refused,
    RoundDone,
    Send,
    StartRound,
    Tick,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine
from fairbus.protocol.user import UserMachine
from fairbus.roster import Roster
from fairbus.runtime.user import PROVIDER_KINDS
from fairbus.wire import codec
from fairbus.wire.messages import MESSAGE_TYPES

T = "test-task"
USER_IDS = range(1, 8)


# --- topics -----------------------------------------------------------------------------------


def test_every_topic_the_runtime_builds_parses_back() -> None:
    Topic = topics.Topic
    cases = {
        topics.presence(T, "user", 3): Topic("user", 3, "presence"),
        topics.provider_message(T, 0, "announce"): Topic("provider", 0, "announce"),
        topics.upload(T, 5): Topic("user", 5, "upload"),
        topics.message(T, "user", 5, "attestation"): Topic("user", 5, "attestation"),
        topics.direct(T, 5, 3, "summed_share"): Topic("user", 5, "summed_share", 3),
        topics.ledger_submit(T, "user", 4): Topic("user", 4, "submit", to_ledger=True),
        topics.ledger_query(T, "admin", 9): Topic("admin", 9, "query", to_ledger=True),
        topics.ledger_receipt(T, 101, 4): Topic("ledger", 101, "receipt", 4),
        topics.ledger_response(T, 8, 0): Topic("ledger", 8, "response", 0),
        topics.ledger_block(T, 8): Topic("ledger", 8, "block"),
        topics.relayed_payload(T, 0): Topic("provider", 0, "payload", to_ledger=True),
    }
    for topic, expected in cases.items():
        assert topics.parse(T, topic) == expected, topic
        assert topics.sender_of(topic) == (expected.role, expected.sender)
    assert topics.parse(T, topics.ledger_block(T, 8)).from_ledger  # type: ignore[union-attr]
    assert not Topic("user", 3, "upload").from_ledger


@pytest.mark.parametrize(
    "topic",
    [
        "fairbus/other-task/user/3/upload",  # another task
        "elsewhere/test-task/user/3/upload",
        "fairbus/test-task/user/3",  # too short
        "fairbus/test-task/robot/3/upload",  # no such role
        "fairbus/test-task/user/x/upload",  # not an id
        "fairbus/test-task/user/-3/upload",
        "fairbus/test-task/user/３/upload",  # a non-ASCII digit
        "fairbus/test-task/user/+/upload",  # a filter, not a topic
        "fairbus/test-task/user/3/to/x/share",
        "fairbus/test-task/provider/0/to/3/share",  # only users send shares
        "fairbus/test-task/user/3/to/4",
        "fairbus/test-task/user/3/ledger/delete",
        "fairbus/test-task/user/3/ledger/payload",  # only the provider relays payloads
        "fairbus/test-task/user/3/a/b/c/d",
        "fairbus/test-task/user/3//upload",
        "fairbus/test-task/ledger/8/receipt/x",
        "fairbus/test-task/ledger/8/receipt",
        "fairbus/test-task/ledger/8/upload",
    ],
)
def test_anything_else_is_not_a_topic(topic: str) -> None:
    assert topics.parse(T, topic) is None


def test_the_kinds_a_user_takes_from_the_provider_come_from_the_message_types() -> None:
    recorded = {name for name, cls in MESSAGE_TYPES.items() if cls.RECORDED}
    assert {"global_model", "announce", "dropout", "evaluation", "decision"} <= PROVIDER_KINDS
    assert PROVIDER_KINDS - {PLAIN_MODEL} <= recorded
    assert "upload" not in PROVIDER_KINDS and "receipt" not in PROVIDER_KINDS


# --- plain FedAvg -------------------------------------------------------------------------------


def _plain_provider(identities: dict[int, Identity], roster: Roster) -> ProviderMachine:
    config = replace(ProviderConfig(phase_timeout=10.0), strategy=PlainFedAvg())
    return ProviderMachine(identities[0], roster, np.zeros(4, np.float32), config)


def test_a_plain_round_is_fedavg_through_the_same_machines(
    identities: dict[int, Identity], roster: Roster
) -> None:
    provider = _plain_provider(identities, roster)
    users = {u: UserMachine(identities[u], roster, secure=False) for u in USER_IDS}
    (offer,) = provider.handle(StartRound(0.0))
    assert isinstance(offer, Send) and offer.to == USERS and offer.kind == PLAIN_MODEL
    models = {u: np.full(4, float(u), np.float32) for u in USER_IDS}
    done: list[RoundDone] = []
    for u, machine in users.items():
        (train,) = machine.handle(Received(PLAIN_MODEL, offer.data))
        assert isinstance(train, Train) and train.round == 1
        assert np.array_equal(train.global_params, np.zeros(4, np.float32))
        (answer,) = machine.handle(Trained(1, models[u]))
        assert isinstance(answer, Send) and answer.to == PROVIDER and answer.kind == "upload"
        out = provider.handle(Received("upload", answer.data))
        assert not any(isinstance(o, Commit | Refused) for o in out)
        done += [o for o in out if isinstance(o, RoundDone)]
    (result,) = done
    assert result.round == 1 and result.attempts == 1 and result.groups == []
    assert not result.dropped and not result.violators and result.tau is None
    assert np.allclose(result.global_params, np.mean(list(models.values()), axis=0))
    # round 2 starts from the mean; a repeated round-1 offer changes nothing
    (offer2,) = provider.handle(StartRound(1.0))
    assert PlainModel.from_bytes(offer2.data).round == 2  # type: ignore[union-attr]
    assert users[1].handle(Received(PLAIN_MODEL, offer.data)) == []


def test_a_plain_round_ends_at_the_deadline_or_when_the_rest_dropped(
    identities: dict[int, Identity], roster: Roster
) -> None:
    provider = _plain_provider(identities, roster)
    provider.handle(StartRound(0.0))
    for u in (1, 2, 3):
        answer = PlainModel.of(1, u, np.full(4, 3.0, np.float32)).to_bytes()
        assert provider.handle(Received("upload", answer)) == []
    assert provider.handle(Dropped(4)) == []
    assert provider.handle(Tick(5.0)) == []
    (done,) = provider.handle(Tick(11.0))
    assert isinstance(done, RoundDone)
    assert done.dropped == frozenset({4, 5, 6, 7})
    assert np.allclose(done.global_params, 3.0)
    assert provider.online == {1, 2, 3}  # the late ones come back through Joined
    # round 2: the last awaited user drops, the round ends on what arrived
    provider.handle(StartRound(12.0))
    for u in (1, 2):
        answer = PlainModel.of(2, u, np.full(4, 1.0, np.float32)).to_bytes()
        provider.handle(Received("upload", answer))
    (done,) = provider.handle(Dropped(3))
    assert isinstance(done, RoundDone) and np.allclose(done.global_params, 1.0)


def test_plain_answers_that_do_not_fit_are_refused(
    identities: dict[int, Identity], roster: Roster
) -> None:
    provider = _plain_provider(identities, roster)
    provider.handle(StartRound(0.0))

    def refused(data: bytes) -> str:
        (out,) = provider.handle(Received("upload", data))
        assert isinstance(out, Refused), out
        return out.reason

    ones = np.ones(4, np.float32)
    assert refused(PlainModel.of(2, 1, ones).to_bytes()) == "StaleUpload"
    assert refused(PlainModel.of(1, 8, ones).to_bytes()) == "UnexpectedUpload"  # not a user
    assert refused(PlainModel.of(1, 1, np.ones(5, np.float32)).to_bytes()) == "GroupingError"
    assert refused(PlainModel(1, 1, 4, b"\x00" * 12).to_bytes()) == "SchemaError"
    assert refused(PlainModel.of(1, 1, np.full(4, np.nan, np.float32)).to_bytes()) == (
        "SchemaError"
    )
    assert refused(b"\xc1") == "DecodeError"
    assert refused(codec.pack({"round": 1})) == "SchemaError"
    provider.handle(Received("upload", PlainModel.of(1, 1, ones).to_bytes()))
    assert refused(PlainModel.of(1, 1, ones).to_bytes()) == "UnexpectedUpload"  # twice
    with pytest.raises(WireError):
        PlainModel.from_bytes(codec.pack({"round": 0, "sender": 1, "length": 1, "data": b""}))
    assert issubclass(SchemaError, WireError)


def test_a_user_of_a_secure_task_never_sends_its_model_in_the_clear(
    identities: dict[int, Identity], roster: Roster
) -> None:
    offer = PlainModel.of(1, 0, np.zeros(4, np.float32)).to_bytes()
    secure = UserMachine(identities[1], roster)
    (out,) = secure.handle(Received(PLAIN_MODEL, offer))
    assert isinstance(out, Refused) and out.reason == "NotPlain"
    plain = UserMachine(identities[1], roster, secure=False)
    forged = PlainModel.of(1, 2, np.zeros(4, np.float32)).to_bytes()  # not the provider
    (out,) = plain.handle(Received(PLAIN_MODEL, forged))
    assert isinstance(out, Refused)
    assert plain.handle(Received("announce", b"anything")) == []  # takes part in nothing else
