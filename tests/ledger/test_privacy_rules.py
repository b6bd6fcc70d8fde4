"""The ledger's side of issue 12 (items 3 and 4 of its "Must show"): an announcement that
names anyone but active users, repeats or unsorts members, makes a group of two, lowers
the Shamir threshold below the group size or gets kinds and focus users wrong is refused
as ``bad_grouping``; nothing more is admitted for a round once it is decided
(``out_of_order``). Each refusal is typed and changes nothing: height, heads, rounds.

The pure state machine, no store: provider 0, users 1..7, ledger node 8, admin 9
(``tests/conftest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fairbus import envelope
from fairbus.detection import DetectionParams, detect
from fairbus.identity import Identity
from fairbus.ledger.records import Block, Transaction
from fairbus.ledger.state import LedgerState, RefusalReason, RefusedError, grouping_of
from fairbus.roster import Roster
from fairbus.task import TaskParams
from fairbus.wire.messages import (
    DEFAULT_KEYING,
    Announce,
    Decision,
    Dropout,
    Evaluation,
    GlobalModel,
    GroupAccuracy,
    GroupSpec,
    MaskedUpload,
    Message,
    UserScore,
)
from tests.conftest import TASK

PARAMS = TaskParams(DetectionParams())
PROVIDER, LEDGER, ADMIN = 0, 8, 9
HONEST = (GroupSpec(0, "basic", (1, 2, 3), None, 3), GroupSpec(1, "basic", (4, 5, 6), None, 3))


@dataclass
class Chain:
    """A ledger state and the participants' identities: admit one envelope per block."""

    state: LedgerState
    ids: dict[int, Identity]

    def sign(self, who: int, message: Message, round: int | None = None, attempt: int = 0) -> bytes:
        scope = {"round": round, "attempt": attempt} if message.SCOPED else {}
        prev = self.state.head(who)
        return envelope.sign(self.ids[who], TASK, message, prev=prev, **scope).to_bytes()

    def admit(self, data: bytes) -> None:
        draft = self.state.draft()
        draft.admit(Transaction.from_envelope(envelope.parse(data)))
        block = Block.build(self.state.height + 1, self.state.head_hash, 0.0, draft.txs)
        self.state.commit(draft, block)

    def snapshot(self) -> tuple[object, ...]:
        s = self.state
        return (s.height, s.head_hash, dict(s.heads), dict(s.rounds), s.current_round,
                s.key_users, s.excluded)  # fmt: skip

    def refused(self, data: bytes, reason: RefusalReason, *words: str) -> RefusedError:
        """Admit ``data``, expecting a refusal for ``reason`` whose detail names ``words``;
        check that it changed nothing."""
        before = self.snapshot()
        with pytest.raises(RefusedError) as caught:
            self.admit(data)
        assert caught.value.reason is reason, caught.value
        for word in words:
            assert word in caught.value.detail, caught.value.detail
        assert self.snapshot() == before
        return caught.value


def announce(
    groups: tuple[GroupSpec, ...],
    key_users: tuple[int, ...] = (),
    *,
    model: bytes = bytes(32),
    prior: tuple[tuple[int, ...], ...] = (),
    collusion: int = 1,
    keying: str = DEFAULT_KEYING,
) -> Announce:
    return Announce(model, 2, 16, groups, key_users, (), prior, 1.0, 1.0, collusion, keying)


@pytest.fixture
def chain(identities: dict[int, Identity], roster: Roster) -> Chain:
    """The task started and round 1's global model recorded: ready for its announcement."""
    c = Chain(LedgerState(roster), identities)
    c.admit(c.sign(PROVIDER, PARAMS.to_message()))
    c.admit(c.sign(PROVIDER, GlobalModel(2, bytes(8)), round=1))
    return c


def test_an_honest_announcement_is_admitted(chain: Chain) -> None:
    chain.admit(chain.sign(PROVIDER, announce(HONEST), round=1))
    assert chain.state.current_round == 1 and chain.state.rounds[1].attempt == 0


@pytest.mark.parametrize(
    ("who", "members"),
    [
        ("an id not in the roster", (1, 2, 999)),
        ("the provider", (0, 1, 2)),
        ("a ledger node", (1, 2, LEDGER)),
        ("an admin", (1, 2, ADMIN)),
    ],
)
def test_members_that_are_not_users_are_refused(
    chain: Chain, who: str, members: tuple[int, ...]
) -> None:
    groups = (GroupSpec(0, "basic", members, None, 3), GroupSpec(1, "basic", (4, 5, 6), None, 3))
    stranger = next(u for u in members if u not in range(1, 8))
    chain.refused(
        chain.sign(PROVIDER, announce(groups), round=1),
        RefusalReason.BAD_GROUPING,
        f"[{stranger}]",
        "not users of the roster",
    )
    # the provider's chain did not move: the honest announcement links where it would have
    chain.admit(chain.sign(PROVIDER, announce(HONEST), round=1))


def test_a_member_twice_is_refused(chain: Chain) -> None:
    # The announcement's schema already refuses a repeated id (ids are distinct), before
    # the grouping rules; a repeat never reaches the exposure check.
    groups = (
        GroupSpec(0, "basic", (1, 1, 2, 3), None, 4),
        GroupSpec(1, "basic", (4, 5, 6), None, 3),
    )
    chain.refused(
        chain.sign(PROVIDER, announce(groups), round=1), RefusalReason.MALFORMED, "distinct"
    )


def test_unsorted_members_are_refused(chain: Chain) -> None:
    groups = (GroupSpec(0, "basic", (2, 1, 3), None, 3), GroupSpec(1, "basic", (4, 5, 6), None, 3))
    chain.refused(
        chain.sign(PROVIDER, announce(groups), round=1),
        RefusalReason.BAD_GROUPING,
        "group 0 lists its members out of order",
    )


def test_a_group_of_two_is_refused(chain: Chain) -> None:
    groups = (GroupSpec(0, "basic", (1, 2), None, 2), GroupSpec(1, "basic", (4, 5, 6), None, 3))
    chain.refused(
        chain.sign(PROVIDER, announce(groups), round=1),
        RefusalReason.BAD_GROUPING,
        "group 0 has 2 members, fewer than 3",
    )


@pytest.mark.parametrize("threshold", [1, 2, 4])
def test_a_threshold_other_than_the_group_size_is_refused(chain: Chain, threshold: int) -> None:
    # t = 1: each share is the dealer's random vector, so any group mate unmasks it;
    # t = 2: two members together do; t = 4 > 3 members: no key can ever be derived.
    groups = (GroupSpec(0, "basic", (1, 2, 3), None, threshold), HONEST[1])
    chain.refused(
        chain.sign(PROVIDER, announce(groups), round=1),
        RefusalReason.BAD_GROUPING,
        f"group 0 has Shamir threshold {threshold}; it must equal the group size 3",
    )


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (GroupSpec(2, "focus", (4, 5, 6), 1, 3), "focus group 2 does not contain its key user (1)"),
        (GroupSpec(2, "focus", (4, 5, 6), None, 3), "focus group 2 does not contain its key user"),
        (GroupSpec(2, "basic", (1, 4, 7), 1, 3), "basic group 2 names a focus user (1)"),
        (GroupSpec(2, "reference", (1, 4, 7), 4, 3), "reference group 2 names a focus user (4)"),
    ],
)
def test_kinds_and_focus_users_must_agree(chain: Chain, spec: GroupSpec, words: str) -> None:
    chain.refused(
        chain.sign(PROVIDER, announce((*HONEST, spec)), round=1),
        RefusalReason.BAD_GROUPING,
        words,
    )


# --- after the decision -------------------------------------------------------------------------


def decide_round_one(chain: Chain) -> Decision:
    """Announce round 1, record every upload, the evaluation and the decision (Alg. 6
    as the ledger re-derives it)."""
    grouping = announce(HONEST)
    chain.admit(chain.sign(PROVIDER, grouping, round=1))
    for g in HONEST:
        for user in g.members:
            chain.admit(chain.sign(user, MaskedUpload(g.gid, 2, bytes(8)), round=1))
    accuracies = {0: 0.9, 1: 0.8}
    evaluation = Evaluation(
        tuple(GroupAccuracy(gid, a, None, None) for gid, a in accuracies.items())
    )
    chain.admit(chain.sign(PROVIDER, evaluation, round=1))
    result = detect(grouping_of(grouping), accuracies, PARAMS.detection)
    decision = Decision(
        result.tau,
        tuple(
            UserScore(a.user, a.score, a.conf_lo, a.conf_up) for a in result.assessments.values()
        ),
        tuple(sorted(result.new_key_users)),
        tuple(sorted(result.violators)),
    )
    chain.admit(chain.sign(PROVIDER, decision, round=1))
    assert chain.state.rounds[1].decided
    return decision


def test_nothing_is_admitted_for_a_decided_round(chain: Chain) -> None:
    decision = decide_round_one(chain)
    evaluation = chain.state.rounds[1].evaluation
    assert evaluation is not None
    regrouped = (
        GroupSpec(0, "basic", (1, 2, 4), None, 3),
        GroupSpec(1, "basic", (3, 5, 6), None, 3),
    )
    cases: list[tuple[str, bytes]] = [
        ("a new attempt", chain.sign(PROVIDER, announce(regrouped), round=1, attempt=1)),
        ("a second evaluation", chain.sign(PROVIDER, evaluation, round=1)),
        ("an evaluation of a later attempt", chain.sign(PROVIDER, evaluation, round=1, attempt=1)),
        ("a second decision", chain.sign(PROVIDER, decision, round=1)),
        ("a dropout", chain.sign(PROVIDER, Dropout((1,), (0,)), round=1)),
        ("an upload", chain.sign(7, MaskedUpload(0, 2, bytes(8)), round=1)),
    ]
    for what, data in cases:
        refusal = chain.refused(data, RefusalReason.OUT_OF_ORDER, "round 1")
        assert "already decided" in refusal.detail, (what, refusal.detail)
    # the next round goes on as usual
    chain.admit(chain.sign(PROVIDER, GlobalModel(2, bytes(8)), round=2))
    keys = tuple(sorted(chain.state.key_users))
    chain.admit(chain.sign(PROVIDER, announce(HONEST, keys, model=b"\x02" * 32), round=2))
    assert chain.state.current_round == 2


def test_an_upload_after_the_evaluation_is_refused(chain: Chain) -> None:
    groups = (*HONEST, GroupSpec(2, "basic", (1, 4, 7), None, 3))
    chain.admit(chain.sign(PROVIDER, announce(groups), round=1))
    for g in groups:
        for user in g.members:
            chain.admit(chain.sign(user, MaskedUpload(g.gid, 2, bytes(8)), round=1))
    evaluation = Evaluation(tuple(GroupAccuracy(g.gid, 0.9, None, None) for g in groups))
    chain.admit(chain.sign(PROVIDER, evaluation, round=1))
    chain.refused(
        chain.sign(7, MaskedUpload(2, 2, bytes(8)), round=1),
        RefusalReason.OUT_OF_ORDER,
        "after its evaluation",
    )


@pytest.mark.parametrize(
    ("missing", "named"),
    [({(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6)}, "[0, 1]"), ({(1, 6)}, "[1]")],
    ids=["no upload at all", "one member's missing"],
)
def test_an_evaluation_of_a_group_without_all_its_uploads_is_refused(
    chain: Chain, missing: set[tuple[int, int]], named: str
) -> None:
    """Issue 13: the provider evaluated groups that received no upload at all (or not
    every member's) and made up their accuracies: refused, nothing recorded."""
    chain.admit(chain.sign(PROVIDER, announce(HONEST), round=1))
    for g in HONEST:
        for user in g.members:
            if (g.gid, user) not in missing:
                chain.admit(chain.sign(user, MaskedUpload(g.gid, 2, bytes(8)), round=1))
    evaluation = Evaluation(tuple(GroupAccuracy(g.gid, 0.9, None, None) for g in HONEST))
    chain.refused(
        chain.sign(PROVIDER, evaluation, round=1),
        RefusalReason.CONTRACT_VIOLATION,
        f"groups {named}",
        "uploads are not all recorded",
    )
    assert chain.state.rounds[1].evaluation is None


def basic(gid: int, members: tuple[int, ...]) -> GroupSpec:
    return GroupSpec(gid, "basic", members, None, len(members))


@pytest.mark.parametrize(
    ("what", "groups", "exposed"),
    [
        # {1,2,3} − {1,2,4} = x3 − x4: whoever knows one of the two reads the other
        ("two groups that share two members", ((1, 2, 3), (1, 2, 4), (5, 6, 7)), "{3, 4}"),
        # the free-rider 7's model is the public global model: it exposes its mate 6
        ("a free-rider's known model", ((1, 2, 3), (4, 5, 6), (4, 5, 7)), "{6, 7}"),
        # every model is determined by the four sums, no model known
        ("the 4-user design", ((1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4)), "{1}, {2}, {3}, {4}"),
    ],
)
def test_an_exposing_grouping_is_refused(
    chain: Chain, what: str, groups: tuple[tuple[int, ...], ...], exposed: str
) -> None:
    specs = tuple(basic(k, g) for k, g in enumerate(groups))
    chain.refused(
        chain.sign(PROVIDER, announce(specs), round=1),
        RefusalReason.BAD_GROUPING,
        "with the models of 1 other user(s) known",
        exposed,
    )


def test_the_announced_collusion_bound_must_be_the_tasks(chain: Chain) -> None:
    chain.refused(
        chain.sign(PROVIDER, announce(HONEST, collusion=0), round=1),
        RefusalReason.BAD_GROUPING,
        "collusion bound 0, the task's is 1",
    )


def test_the_announced_keying_must_be_the_tasks(
    identities: dict[int, Identity], roster: Roster
) -> None:
    """A task started with one keying: an announcement naming the other is refused (a
    user would make its keys one way and its group mates the other: no group sum)."""
    chain = Chain(LedgerState(roster), identities)
    chain.admit(chain.sign(PROVIDER, TaskParams(keying="shamir").to_message()))
    chain.admit(chain.sign(PROVIDER, GlobalModel(2, bytes(8)), round=1))
    chain.refused(
        chain.sign(PROVIDER, announce(HONEST, keying="pairwise"), round=1),
        RefusalReason.BAD_GROUPING,
        "keying 'pairwise', the task's is 'shamir'",
    )
    chain.admit(chain.sign(PROVIDER, announce(HONEST, keying="shamir"), round=1))


def test_a_task_with_c2_needs_groups_of_four(
    identities: dict[int, Identity], roster: Roster
) -> None:
    c2 = Chain(LedgerState(roster), identities)
    c2.admit(c2.sign(PROVIDER, TaskParams(DetectionParams(), collusion=2).to_message()))
    c2.admit(c2.sign(PROVIDER, GlobalModel(2, bytes(8)), round=1))
    c2.refused(
        c2.sign(PROVIDER, announce(HONEST, collusion=2), round=1),
        RefusalReason.BAD_GROUPING,
        "fewer than 4 members",
    )
    c2.admit(c2.sign(PROVIDER, announce((basic(0, (1, 2, 3, 4, 5, 6, 7)),), collusion=2), round=1))


def test_a_round_from_the_same_global_model_counts_the_earlier_sums(chain: Chain) -> None:
    """Issue 12, item 5: users who train again from the same global model may reproduce
    the same models, so round 1's sums count in round 2's check."""
    decide_round_one(chain)
    chain.admit(chain.sign(PROVIDER, GlobalModel(2, bytes(8)), round=2))
    keys = tuple(sorted(chain.state.key_users))
    mixed = (basic(0, (1, 2, 4)), basic(1, (3, 5, 6)))
    # the same model (bytes(32)) without round 1's groups: refused
    chain.refused(
        chain.sign(PROVIDER, announce(mixed, keys), round=2),
        RefusalReason.BAD_GROUPING,
        "prior_groups omit groups whose sums are known: [(1, 2, 3), (4, 5, 6)]",
    )
    # with them: {1,2,3} and {1,2,4} share two members
    chain.refused(
        chain.sign(PROVIDER, announce(mixed, keys, prior=((1, 2, 3), (4, 5, 6))), round=2),
        RefusalReason.BAD_GROUPING,
        "{3, 4}",
    )
    # a new model: round 1's sums say nothing about round 2's models
    chain.admit(chain.sign(PROVIDER, announce(mixed, keys, model=b"\x02" * 32), round=2))
