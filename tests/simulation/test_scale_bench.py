"""``fairbus bench scale``'s simulated rounds: bytes per user by keying, phases timed."""

from __future__ import annotations

from fairbus.bench import scale


def test_a_simulated_round_counts_what_users_send_in_each_keying() -> None:
    pairwise = scale.simulate(9, "pairwise", rounds=1)
    shamir = scale.simulate(9, "shamir", rounds=1)
    for row in (pairwise, shamir):
        assert row.failed == 0
        assert row.groups >= 6
        assert row.round_s >= row.training_s > 0
        assert row.evaluation_s > 0 and row.grouping_s > 0
    # Pairwise keys: a user sends one upload (a model as field elements, plus its
    # envelope) per group it is in, and nothing else.
    per_user_groups = 3 * pairwise.groups / 9
    assert per_user_groups <= pairwise.bytes_ratio < 1.05 * per_user_groups
    # Alg. 3 adds a model-length share vector to every group mate, twice.
    assert shamir.bytes_ratio > 4 * pairwise.bytes_ratio
