"""Decoders are bounded in work, not only in bytes (issue 12, item 4): the worst 16 MiB
payloads — millions of tiny maps or arrays, nesting as deep as the bytes allow, array
headers that claim more than they hold — are refused in milliseconds and a few MB,
with a :class:`SizeError` and nothing from msgpack; and the largest legitimate message
of every type still decodes (``fairbus.wire.limits.WireLimits``, ``codec.scan``)."""

from __future__ import annotations

import contextlib
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fairbus import envelope
from fairbus.aggregation import PlainModel
from fairbus.envelope import GENESIS
from fairbus.errors import DecodeError, SchemaError, SizeError, WireError
from fairbus.identity import Identity
from fairbus.ledger.records import GENESIS_HASH, MAX_BLOCK_TXS, Block, Transaction
from fairbus.task import TaskParams
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS, WireLimits
from fairbus.wire.messages import (
    MAX_CLASS_CELLS,
    MAX_CLASSES,
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
    Message,
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
    ShareBody,
    SparseUpdate,
    UserScore,
    decode_body,
)
from tests.conftest import TASK

MiB = 1024 * 1024
SIZE = 16 * MiB
PAPER_PARAMS = 582_026
"""The paper's MNIST CNN (2.3 MB as float32)."""
TIME_BOUND = 1.0
"""Seconds: generous (a loaded CI machine); the payloads below take milliseconds."""
MEMORY_BOUND = 64 * MiB
"""Peak bytes allocated while refusing one (before the bounds: up to a GiB)."""


def _array(n: int) -> bytes:
    return b"\xdc" + struct.pack(">H", n) if n < 65_536 else b"\xdd" + struct.pack(">I", n)


def _fill(item: bytes, copies: int = 65_535, items: int = 1) -> bytes:
    """An array of arrays of ``copies`` copies of ``item`` (``items`` msgpack items),
    about 16 MiB in all."""
    inner = _array(copies * items) + item * copies
    count = SIZE // len(inner)
    return _array(count) + inner * count


WORST: dict[str, Callable[[], bytes]] = {
    # The payload: millions of {"": nil} maps (4.6 s and 1.1 GB before).
    "tiny maps": lambda: _fill(b"\x81\xa0\xc0"),
    "empty arrays": lambda: _fill(b"\x90"),
    "small ints": lambda: _fill(b"\x01"),
    "uint8s": lambda: _fill(b"\xcc\x01"),
    "mixed scalars": lambda: _fill(b"\x01\xcc\x01", copies=65_534 // 2, items=2),
    "floats": lambda: _fill(b"\xcb" + bytes(8)),
    # Nesting as deep as the bytes allow (msgpack's own limit is 1,024 levels).
    "deep arrays": lambda: b"\x91" * (SIZE - 1) + b"\xc0",
    "deep maps": lambda: b"\x81\xa0" * (SIZE // 2 - 1) + b"\xc0",
    # Each level 65,534 small ints then the next level: nothing completes until the end.
    "open levels": lambda: (_array(65_535) + b"\x01" * 65_534) * (SIZE // 65_538) + b"\xc0",
    # 3 KB of array headers claiming 65,535 items each: msgpack allocates each list whole.
    "claims": lambda: _array(65_535) * 1_000,
}


@pytest.mark.parametrize("name", list(WORST))
def test_the_worst_payloads_are_refused_in_milliseconds_and_a_few_mb(name: str) -> None:
    data = WORST[name]()
    assert len(data) <= SIZE + 16
    for decode in (
        lambda: envelope.parse(data),  # what the ledger writer does with a submission
        lambda: codec.unpack(data, DEFAULT_LIMITS, max_bytes=SIZE + 16),
    ):
        start = time.perf_counter()
        with pytest.raises(SizeError):
            decode()
        assert time.perf_counter() - start < TIME_BOUND, name
        tracemalloc.start()
        try:
            with pytest.raises(SizeError):
                decode()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BOUND, (name, peak)


def test_the_largest_structure_the_limits_allow_decodes_quickly() -> None:
    """What passes the bounds is what msgpack then builds: at most ``max_containers``
    maps (here 14,000 of four floats each) and ``max_items`` items."""
    one = b"\x84" + b"".join(bytes([0xA1, c]) + b"\xcb" + bytes(8) for c in b"abcd")
    data = _array(14_000) + one * 14_000
    start = time.perf_counter()
    decoded = codec.unpack(data, DEFAULT_LIMITS)
    assert time.perf_counter() - start < TIME_BOUND
    assert len(decoded) == 14_000 and decoded[0] == {k: 0.0 for k in "abcd"}
    del decoded
    tracemalloc.start()
    try:
        codec.unpack(data, DEFAULT_LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND


def test_each_bound_is_named_and_configurable() -> None:
    nested = codec.pack([[[[[1]]]]])
    assert codec.unpack(nested, WireLimits(max_depth=5)) == [[[[[1]]]]]
    with pytest.raises(SizeError, match="nested deeper than 4"):
        codec.unpack(nested, WireLimits(max_depth=4))
    maps = codec.pack([{"a": 1}] * 10)
    with pytest.raises(SizeError, match="more than 10 arrays and maps"):
        codec.unpack(maps, WireLimits(max_containers=10))
    assert len(codec.unpack(maps, WireLimits(max_containers=11))) == 10
    items = codec.pack([1] * 100)
    with pytest.raises(SizeError, match="more than 99 items"):
        codec.unpack(items, WireLimits(max_items=99))
    with pytest.raises(SizeError, match="an array of 100 items exceeds 99"):
        codec.unpack(items, WireLimits(max_array_len=99))
    with pytest.raises(SizeError, match="ext types"):
        codec.unpack(b"\xd4\x01\x00", DEFAULT_LIMITS)


def test_msgpacks_own_nesting_limit_is_a_size_error() -> None:
    # With the walk's depth bound lifted past msgpack's C stack (1,024 levels), msgpack's
    # StackError still comes out as a SizeError, not as a msgpack exception.
    deep = b"\x91" * 2_000 + b"\xc0"
    with pytest.raises(SizeError, match="msgpack decoder"):
        codec.unpack(deep, WireLimits(max_depth=5_000))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x92\x01", "truncated"),
        (b"\xc5\x00\x10abc", "truncated"),
        (b"\xdc\x00", "truncated"),
        (b"\x01\x02", "trailing"),
        (b"\x91\xc1", "0xc1"),
    ],
)
def test_truncated_trailing_and_invalid_bytes_are_decode_errors(data: bytes, words: str) -> None:
    with pytest.raises(DecodeError, match=words):
        codec.unpack(data, DEFAULT_LIMITS)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=300)
    | st.text(max_size=300)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=60,
)


@given(_VALUES)
def test_the_walk_agrees_with_msgpack_on_every_encoding(value: Any) -> None:
    """Every msgpack type and width the packer writes (fixint to uint64, str8 to str16,
    bin8 to bin16, fixarray and fixmap, nesting) passes the walk and decodes whole."""
    limits = WireLimits(max_depth=64)
    assert codec.unpack(codec.pack(value), limits) == codec.canonical(value)


def test_wide_containers_round_trip() -> None:
    limits = DEFAULT_LIMITS
    longest = [0] * limits.max_array_len  # array32
    assert codec.unpack(codec.pack(longest), limits) == longest
    wide = {f"k{k}": k for k in range(limits.max_map_len)}  # map16
    assert codec.unpack(codec.pack(wide), limits) == wide
    text = "é" * 2_000  # str16, 4,000 bytes (strings are bounded by max_str_len)
    assert codec.unpack(codec.pack({"t": text}), limits) == {"t": text}


# --- the largest legitimate message of every type -------------------------------------------


def _largest_announce() -> Announce:
    n = DEFAULT_LIMITS.max_groups
    groups = tuple(
        GroupSpec(gid, "basic", (1 + gid % 120, 2 + gid % 120, 3 + gid % 120), None, 3)
        for gid in range(n)
    )
    prior = tuple(g.members for g in groups)
    return Announce(bytes(32), PAPER_PARAMS, 16, groups, (1, 2, 3), (4, 5), prior, 1.0, 2.0, 1)


def _largest_decision() -> Decision:
    scores = tuple(UserScore(u, 0.5, 0.25, 0.75) for u in range(4_000))
    return Decision(0.9, scores, tuple(range(100)), tuple(range(100, 200)))


LARGEST: dict[str, Callable[[], Message]] = {
    "presence": lambda: Presence("offline", "provider"),
    "announce": _largest_announce,
    "global_model": lambda: GlobalModel(PAPER_PARAMS, bytes(4 * PAPER_PARAMS)),
    "upload": lambda: MaskedUpload(7, PAPER_PARAMS, bytes(4 * PAPER_PARAMS)),
    "evaluation": lambda: Evaluation(
        tuple(GroupAccuracy(g, 0.5, -0.25, 2.5) for g in range(DEFAULT_LIMITS.max_groups))
    ),
    "decision": _largest_decision,
    "dropout": lambda: Dropout(
        tuple(range(DEFAULT_LIMITS.max_array_len)), tuple(range(DEFAULT_LIMITS.max_groups))
    ),
    "task_start": lambda: TaskParams(evaluation=EvaluationSpec("m" * 64, bytes(32))).to_message(),
    # SecCL (issue 15): 2,000 participants (an evaluation stays under the ledger's 64 KiB
    # inline payload) and every change of the paper's CNN shared (θ = 1)
    "seccl_announce": lambda: SecclAnnounce(
        bytes(32), PAPER_PARAMS, tuple(range(1, 2001)), 1.0, 1.0, 2000
    ),
    "seccl_update": lambda: SparseUpdate(
        PAPER_PARAMS, bytes(4 * PAPER_PARAMS), bytes(4 * PAPER_PARAMS)
    ),
    "seccl_evaluation": lambda: PeerEvaluation(
        tuple(PeerScore(u, 0.123456789) for u in range(1, 2001))
    ),
    "seccl_close": lambda: SecclClose("evaluations", tuple(range(1, 2001))),
    "seccl_candidates": lambda: Candidates(
        tuple(range(1, 401)), tuple(BordaTotal(u, 2**31) for u in range(1, 2001)), bytes(32)
    ),
    # MNIST's 10,000 test images, quantized to 16 bits (issue 13)
    "test_set": lambda: CommittedTestSet((1, 28, 28), 10, bytes(2 * 784 * 10_000), bytes(10_000)),
    "receipt": lambda: Receipt(
        2**40, bytes(32), tuple(ReceiptEntry(bytes(32), k) for k in range(MAX_BLOCK_TXS))
    ),
    "block": lambda: BlockHeader(2**40, bytes(32), bytes(32), MAX_BLOCK_TXS, 1e9),
    "query": lambda: Query(2**62, "round", None, None, 2**31),
    "query_response": lambda: QueryResponse(
        1, True, "", tuple(bytes(32) for _ in range(DEFAULT_LIMITS.max_array_len))
    ),
    "refusal": lambda: Refusal(bytes(32), "x" * 64, "y" * DEFAULT_LIMITS.max_str_len),
    # The codec bounds every string by max_str_len (4,096), below the schema's 200,000.
    "roster_change": lambda: RosterChange("#" * DEFAULT_LIMITS.max_str_len),
    "attestation": lambda: Attestation("a" * 64, bytes(32), bytes(4096)),
}


def test_every_message_type_has_its_largest_case() -> None:
    assert set(LARGEST) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("kind", sorted(LARGEST))
def test_the_largest_legitimate_message_of_each_type_decodes(kind: str) -> None:
    message = LARGEST[kind]()
    payload = message.payload()
    cls = MESSAGE_TYPES[kind]
    bound = DEFAULT_LIMITS.max_model_bytes if cls.MODEL_SIZED else DEFAULT_LIMITS.max_small_payload
    assert len(payload) <= bound
    start = time.perf_counter()
    assert decode_body(kind, payload, DEFAULT_LIMITS) == message
    assert time.perf_counter() - start < TIME_BOUND


def test_a_model_sized_envelope_and_share_decode() -> None:
    provider = Identity.generate(0)
    model = np.arange(PAPER_PARAMS, dtype="<f4").tobytes()
    signed = envelope.sign(
        provider, TASK, GlobalModel(PAPER_PARAMS, model), prev=GENESIS, round=1, attempt=0
    )
    assert envelope.parse(signed.to_bytes()).payload == signed.payload
    body = ShareBody(TASK, 1, 0, 3, 1, 2, "share", 2, PAPER_PARAMS, model)
    assert ShareBody.from_wire(codec.unpack(codec.pack(body.to_wire()), DEFAULT_LIMITS), "",
                               DEFAULT_LIMITS) == body  # fmt: skip
    plain = PlainModel(1, 3, PAPER_PARAMS, model)
    assert PlainModel.from_bytes(plain.to_bytes()) == plain


@pytest.mark.parametrize("classes", [2, 10, MAX_CLASSES])
def test_the_largest_evaluation_counted_by_class_decodes(classes: int) -> None:
    """As many groups × classes as an evaluation may count, every count 3 bytes."""
    count = (2**16 - 1,) * classes
    groups = min(DEFAULT_LIMITS.max_groups, MAX_CLASS_CELLS // classes)
    message = Evaluation(
        tuple(GroupAccuracy(g, 0.5, -0.25, 2.5, count, count) for g in range(groups)), count
    )
    payload = message.payload()
    assert len(payload) <= DEFAULT_LIMITS.max_small_payload
    start = time.perf_counter()
    assert decode_body("evaluation", payload, DEFAULT_LIMITS) == message
    assert time.perf_counter() - start < 1.0
    if groups * classes == MAX_CLASS_CELLS:
        one_more = (*message.accuracies, GroupAccuracy(groups, 0.5, None, None, count, count))
        with pytest.raises(SchemaError, match="groups × classes"):
            Evaluation(one_more, count)


def test_the_largest_block_decodes() -> None:
    user = Identity.generate(3)
    tx = Transaction.from_envelope(
        envelope.sign(user, TASK, Attestation("x" * 64, bytes(32), bytes(64)), prev=GENESIS)
    )
    block = Block.build(7, GENESIS_HASH, 1.0, [tx] * MAX_BLOCK_TXS)
    data = block.to_bytes()
    start = time.perf_counter()
    again = Block.from_bytes(data)
    assert time.perf_counter() - start < 5 * TIME_BOUND  # 4,096 headers parsed and checked
    assert again.hash == block.hash and len(again.txs) == MAX_BLOCK_TXS


def test_garbage_never_escapes_as_anything_but_a_wire_error() -> None:
    rng = np.random.default_rng(12)
    for _ in range(300):
        data = rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        with contextlib.suppress(WireError):
            codec.unpack(data, DEFAULT_LIMITS)
