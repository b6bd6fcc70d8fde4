"""The compact keying (:mod:`fairbus.pairwise`, issue 16 item 2): masks from pairwise
X25519 agreements that sum to zero in the group, bound to their context, and hidden
from every coalition short of all the other members."""

from __future__ import annotations

import numpy as np
import pytest

from fairbus import field, masking
from fairbus.csprng import expand_field
from fairbus.errors import ShamirError
from fairbus.field import FixedPointCodec
from fairbus.identity import Identity
from fairbus.keyneg import keys_sum_to_zero
from fairbus.pairwise import MaskContext, PairwiseKeys, keys_in_process
from fairbus.roster import Member, Role, Roster

TASK = "pairwise-test"


@pytest.fixture(scope="module")
def people() -> tuple[dict[int, Identity], Roster]:
    ids = {u: Identity.generate(u) for u in range(0, 8)}
    roster = Roster(
        TASK,
        [Member(ids[0].public, Role.PROVIDER)]
        + [Member(ids[u].public, Role.USER) for u in range(1, 8)],
    )
    return ids, roster


def _context(members: tuple[int, ...], **changes: object) -> MaskContext:
    fields: dict[str, object] = {"task": TASK, "round": 3, "attempt": 1, "group": 2}
    return MaskContext(members=members, **{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("members", [(1, 2, 3), (2, 4, 5, 7), (1, 2, 3, 4, 5, 6, 7)])
def test_a_groups_keys_sum_to_zero_and_its_uploads_to_the_group_sum(
    people: tuple[dict[int, Identity], Roster], members: tuple[int, ...]
) -> None:
    ids, roster = people
    length = 1000
    keys = keys_in_process([ids[u] for u in members], roster, _context(members), length)
    assert keys_sum_to_zero(list(keys.values()))
    assert all(k.any() for k in keys.values())  # every mask is a real mask
    codec = FixedPointCodec(16)
    steps = np.arange(length, dtype=np.float32)
    models = {u: np.sin(steps * (0.1 * u)).astype(np.float32) for u in members}
    uploads = [masking.mask_model(models[u], keys[u], codec, len(members)) for u in members]
    mean = masking.aggregate_decrypt(uploads, codec).mean
    np.testing.assert_allclose(mean, np.mean(list(models.values()), axis=0), atol=1e-4)


def test_both_ends_of_a_pair_derive_the_same_seed(
    people: tuple[dict[int, Identity], Roster],
) -> None:
    ids, roster = people
    context = _context((2, 5, 6))
    a, b = PairwiseKeys(ids[2], roster), PairwiseKeys(ids[5], roster)
    assert a.pair_seed(5, context) == b.pair_seed(2, context)
    assert a.pair_seed(5, context) != a.pair_seed(6, context)


@pytest.mark.parametrize(
    "change",
    [{"task": "other"}, {"round": 4}, {"attempt": 2}, {"group": 3}, {"members": (2, 5, 7)}],
)
def test_a_seed_is_bound_to_its_task_round_attempt_group_and_members(
    people: tuple[dict[int, Identity], Roster], change: dict[str, object]
) -> None:
    ids, roster = people
    keys = PairwiseKeys(ids[2], roster)
    context = _context((2, 5, 6))
    moved = _context(**{"members": (2, 5, 6), **change})  # type: ignore[arg-type]
    assert keys.pair_seed(5, context) != keys.pair_seed(5, moved)


def test_a_mask_is_hidden_from_a_coalition_short_of_all_other_members(
    people: tuple[dict[int, Identity], Roster],
) -> None:
    """Members 2 and 3 of {1, 2, 3, 4} pool everything they can derive: the streams they
    share with member 1. Member 1's key minus those is the stream of its pair with 4,
    which no one but 1 and 4 can compute, so it is not zero and not theirs."""
    ids, roster = people
    members = (1, 2, 3, 4)
    context = _context(members)
    length = 256
    key1 = PairwiseKeys(ids[1], roster).group_key(context, length)
    known = field.sub(
        field.neg(expand_field(PairwiseKeys(ids[2], roster).pair_seed(1, context), length)),
        expand_field(PairwiseKeys(ids[3], roster).pair_seed(1, context), length),
    )
    left = field.add(key1, known)  # what the coalition cannot remove
    stream14 = expand_field(PairwiseKeys(ids[4], roster).pair_seed(1, context), length)
    assert np.array_equal(left, stream14) and left.any()


def test_a_non_member_or_an_unsorted_group_is_refused(
    people: tuple[dict[int, Identity], Roster],
) -> None:
    ids, roster = people
    keys = PairwiseKeys(ids[1], roster)
    with pytest.raises(ShamirError, match="cannot key"):
        keys.group_key(_context((2, 3, 4)), 8)
    with pytest.raises(ShamirError, match="cannot key"):
        keys.group_key(_context((3, 1, 2)), 8)
    with pytest.raises(ShamirError, match="itself"):
        keys.agreement(1)
