"""Strict, bounded decoding: every bad input is a WireError, never a library exception."""

import contextlib
import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fairbus import envelope
from fairbus.envelope import GENESIS
from fairbus.errors import DecodeError, FairbusError, SchemaError, SizeError, WireError
from fairbus.identity import Identity
from fairbus.roster import Roster
from fairbus.seccl import SparseChange
from fairbus.task import TaskParams
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    MESSAGE_TYPES,
    Announce,
    Attestation,
    BlockHeader,
    BordaTotal,
    Candidates,
    CommittedTestSet,
    Decision,
    Dropout,
    Evaluation,
    EvaluationSpec,
    GlobalModel,
    GroupAccuracy,
    GroupSpec,
    MaskedUpload,
    PeerEvaluation,
    PeerScore,
    Presence,
    Query,
    QueryResponse,
    Receipt,
    ReceiptEntry,
    Refusal,
    RosterChange,
    SecclAnnounce,
    SecclClose,
    SparseUpdate,
    UserScore,
    decode_body,
    vector_from_bytes,
)
from tests.conftest import TASK

H = b"\x07" * 32
SAMPLES = [
    Presence("online", "user"),
    Announce(
        H,
        100,
        16,
        (GroupSpec(0, "basic", (1, 2, 3), None, 3),),
        (2,),
        (9,),
        ((1, 2, 4),),
        10.0,
        20.0,
        1,
    ),
    GlobalModel(2, b"\0" * 8),
    MaskedUpload(1, 2, b"\1" * 8),
    Evaluation((GroupAccuracy(0, 0.9, 1.5, 4.25), GroupAccuracy(1, 0.4, None, None))),
    Decision(0.5, (UserScore(1, 1.0, 0.8, 1.0), UserScore(2, 0.5, None, None)), (2,), (7,)),
    Dropout((4,), (1, 3)),
    Receipt(10, H, (ReceiptEntry(H, 0), ReceiptEntry(bytes(range(32)), 3))),
    BlockHeader(10, H, H, 5, 1.5e9),
    Query(1, "tx", H, None, None),
    QueryResponse(1, True, "", (b"abc",)),
    Refusal(H, "stale_prev", "prev does not match"),
    RosterChange("task = 'x'"),
    Attestation("global_model/round/3", bytes(32), b"received"),
    TaskParams().to_message(),
    TaskParams(evaluation=EvaluationSpec("digits_cnn", H)).to_message(),
    CommittedTestSet((1, 2, 2), 10, bytes(2 * 2 * 4), bytes(2)),
    TaskParams(mode="seccl", theta=0.1, candidate_share=0.2).to_message(),
    SecclAnnounce(H, 10, (1, 2, 3), 0.1, 0.2, 1),
    SparseUpdate.of(SparseChange(10, np.array([2, 7]), np.array([0.5, -1.0], dtype=np.float32))),
    PeerEvaluation((PeerScore(2, 0.75), PeerScore(3, 0.5))),
    Candidates((2,), (BordaTotal(2, 3), BordaTotal(3, 0)), H),
    SecclClose("uploads", (2, 3)),
]


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(message: object) -> None:
    assert decode_body(message.TYPE, message.payload(), DEFAULT_LIMITS) == message  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_every_truncation_is_a_wire_error(message: object) -> None:
    payload = message.payload()  # type: ignore[attr-defined]
    for cut in range(len(payload)):
        with pytest.raises(WireError):
            decode_body(message.TYPE, payload[:cut], DEFAULT_LIMITS)  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_missing_extra_and_mistyped_fields(message: object) -> None:
    wire = message.to_wire()  # type: ignore[attr-defined]
    kind = message.TYPE  # type: ignore[attr-defined]
    first = next(iter(wire))
    with pytest.raises(SchemaError, match="missing"):
        decode_body(kind, codec.pack({k: v for k, v in wire.items() if k != first}), DEFAULT_LIMITS)
    with pytest.raises(SchemaError, match="unknown fields"):
        decode_body(kind, codec.pack({**wire, "zzz": 1}), DEFAULT_LIMITS)
    for name, value in wire.items():
        wrong = "text" if not isinstance(value, str) else 12345
        with pytest.raises(SchemaError, match=name):
            decode_body(kind, codec.pack({**wire, name: wrong}), DEFAULT_LIMITS)


def test_specific_refusals() -> None:
    limits = DEFAULT_LIMITS
    with pytest.raises(SchemaError, match="unknown message type"):
        decode_body("nonsense", b"\x80", limits)
    with pytest.raises(DecodeError, match="trailing"):
        decode_body("presence", Presence("online", "user").payload() + b"\x00", limits)
    # True is not an int, an int is not a float, NaN is not a number we take
    up = MaskedUpload(1, 2, b"\1" * 8).to_wire()
    with pytest.raises(SchemaError, match="group"):
        decode_body("upload", codec.pack({**up, "group": True}), limits)
    ev = {"accuracies": [_group_accuracy(1, None)], "class_samples": None}
    with pytest.raises(SchemaError, match="accuracy"):
        decode_body("evaluation", codec.pack(ev), limits)
    ev = {"accuracies": [_group_accuracy(float("nan"), None)], "class_samples": None}
    with pytest.raises(SchemaError, match="accuracy"):
        decode_body("evaluation", codec.pack(ev), limits)
    ev = {"accuracies": [_group_accuracy(0.5, -0.5)], "class_samples": None}
    with pytest.raises(SchemaError, match="rank"):
        decode_body("evaluation", codec.pack(ev), limits)
    with pytest.raises(SchemaError, match="distinct"):
        decode_body("dropout", codec.pack({"users": [4, 4], "voided_groups": []}), limits)
    with pytest.raises(SchemaError, match="duplicate map key"):
        decode_body("presence", b"\x82\xa6status\xa6online\xa6status\xa6online", limits)
    with pytest.raises(SchemaError, match="sets 'tx_hash'"):
        decode_body(
            "query",
            codec.pack({"qid": 1, "kind": "tx", "tx_hash": None, "sender": 3, "round": None}),
            limits,
        )
    with pytest.raises(DecodeError):
        decode_body("presence", msgpack.packb({1: 2}), limits)  # non-string key
    with pytest.raises(SizeError):
        codec.unpack(msgpack.packb(msgpack.ExtType(1, b"x")), limits)
    with pytest.raises(SchemaError, match="not a field element"):
        vector_from_bytes(b"\xff\xff\xff\xff", 1)
    with pytest.raises(SchemaError, match="bytes for"):
        vector_from_bytes(b"\x00" * 7, 2)


def test_oversize_is_refused_by_configurable_limits(
    identities: dict[int, Identity], roster: Roster
) -> None:
    small = WireLimits(max_message_bytes=4096, max_model_bytes=1024, max_small_payload=512)
    big = MaskedUpload(0, 512, b"\0" * 2048)
    env = envelope.sign(identities[3], TASK, big, prev=GENESIS, round=1, attempt=0)
    with pytest.raises(SizeError):
        envelope.open_envelope(env.to_bytes(), roster, small)
    envelope.open_envelope(env.to_bytes(), roster)  # fine under the defaults
    with pytest.raises(SizeError, match="exceeds"):
        codec.unpack(b"\x00" * 5000, small)
    long_reason = Refusal(H, "x" * 65, "")
    with pytest.raises(SizeError, match="reason"):
        decode_body("refusal", long_reason.payload(), DEFAULT_LIMITS)
    many = Dropout(tuple(range(70_000)), ())
    with pytest.raises(SizeError):
        decode_body("dropout", many.payload(), DEFAULT_LIMITS)
    # a small-payload type may not smuggle a model-sized body
    large_roster = RosterChange("x" * 150_000)  # a roster of ~1,000 members fits
    assert decode_body("roster_change", large_roster.payload(), DEFAULT_LIMITS) == large_roster
    huge_roster = RosterChange("x" * 300_000)
    with pytest.raises(SizeError):
        decode_body("roster_change", huge_roster.payload(), DEFAULT_LIMITS)
    with pytest.raises(WireError):
        WireLimits(max_str_len=0)


@given(st.binary(max_size=2000))
def test_garbage_bytes_only_ever_raise_wire_errors(
    data: bytes,
) -> None:
    for kind in ("announce", "upload", "decision"):
        with contextlib.suppress(WireError):
            decode_body(kind, data, DEFAULT_LIMITS)
    with contextlib.suppress(WireError):
        envelope.parse(data)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_msgpack_values_only_ever_raise_wire_errors(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    for kind in MESSAGE_TYPES:
        with contextlib.suppress(WireError):
            decode_body(kind, data, DEFAULT_LIMITS)


def test_envelope_framing_refusals(identities: dict[int, Identity], roster: Roster) -> None:
    env = envelope.sign(identities[3], TASK, Presence("online", "user"), prev=GENESIS)
    with pytest.raises(SchemaError, match="exactly the keys"):
        envelope.parse(codec.pack({"h": env.header_bytes, "p": env.payload}))
    with pytest.raises(SchemaError, match="64"):
        envelope.parse(codec.pack({"h": env.header_bytes, "p": env.payload, "s": b"x"}))
    header = msgpack.unpackb(env.header_bytes)
    for field, value in [("v", 2), ("type", "bogus"), ("prev", b"short"), ("round", 3)]:
        bad = codec.pack({**header, field: value})
        with pytest.raises(SchemaError):
            envelope.parse(codec.pack({"h": bad, "p": env.payload, "s": env.signature}))
    assert isinstance(env, envelope.SignedEnvelope)
    assert issubclass(WireError, FairbusError)
    assert dataclasses.is_dataclass(env.header)


def test_a_sparse_update_decodes_to_a_checked_change() -> None:
    change = SparseChange(10, np.array([2, 7]), np.array([0.5, -1.0], dtype=np.float32))
    update = SparseUpdate.of(change)
    assert update.change().indices.tolist() == [2, 7]
    assert update.change().values.tolist() == [0.5, -1.0]
    unsorted = SparseUpdate(10, update.indices[4:] + update.indices[:4], update.values)
    beyond = SparseUpdate(5, update.indices, update.values)
    nan = SparseUpdate(10, update.indices, np.array([0.5, np.nan], dtype="<f4").tobytes())
    ragged = SparseUpdate(10, update.indices, update.values[:4])
    for bad in (unsorted, beyond, nan, ragged):
        with pytest.raises(SchemaError, match="seccl_update"):
            bad.change()


def _group_accuracy(accuracy: object, rank: object) -> dict[str, object]:
    """A group's evaluation as the wire carries it, not counted by class."""
    return {"gid": 0, "accuracy": accuracy, "contribution": None, "rank": rank,
            "class_right": None, "class_called": None}  # fmt: skip
