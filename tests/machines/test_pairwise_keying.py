"""The provider and user machines with the compact keying (issue 16, item 2): nothing
but uploads leaves a user, and every round gives what Alg. 3 gives, bit for bit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fairbus import envelope
from fairbus.protocol.events import PROVIDER, Received, Refused, StartRound
from fairbus.protocol.provider import ProviderConfig
from fairbus.sealed import SealContext, seal_share
from fairbus.shamir import Share
from fairbus.wire.messages import Announce
from tests.support_machines import Driver, kinds, make_task, of_type

SHAMIR = ProviderConfig(seed=5, keying="shamir")
PAIRWISE = replace(SHAMIR, keying="pairwise")


def test_rounds_with_pairwise_keys_give_the_same_models_as_alg_3() -> None:
    """Three rounds of 9 users, once per keying from the same seed: the same groupings
    and global models bit for bit (the masks differ, their group sums cancel), no share
    sent with pairwise keys, and every announcement names its keying."""
    runs = {}
    for config in (SHAMIR, PAIRWISE):
        driver = Driver(make_task(9, config=config))
        runs[config.keying] = (driver, [driver.play_round(float(r)) for r in range(3)])
    (alg3, done3), (pair, done_pair) = runs["shamir"], runs["pairwise"]
    for a, b in zip(done3, done_pair, strict=True):
        assert [g.members for g in a.groups] == [g.members for g in b.groups]
        assert np.array_equal(a.global_params, b.global_params)
    sent = [k for k in kinds(pair.outputs()) if k.startswith("Send:")]
    assert sent == [] and "Send:share" in kinds(alg3.outputs())
    for driver, keying in ((alg3, "shamir"), (pair, "pairwise")):
        for c in driver.commits("announce"):
            message = envelope.verify(c.envelope, driver.task.roster).message
            assert isinstance(message, Announce) and message.keying == keying
    assert pair.refusals() == [] and alg3.refusals() == []


def test_a_share_for_a_pairwise_keyed_group_is_refused() -> None:
    """A group mate sends a (validly sealed) share for a group keyed pairwise: refused,
    and the user's upload still comes, from its own key."""
    driver = Driver(make_task(6, config=PAIRWISE))
    driver.hold = lambda target, event: target == PROVIDER  # the round stays open
    driver.handle(PROVIDER, StartRound(0.0))
    driver.pump()
    task = driver.task
    announce = next(
        m
        for c in driver.commits("announce")
        if isinstance(m := envelope.verify(c.envelope, task.roster).message, Announce)
    )
    group = announce.groups[0]
    sender, target = group.members[0], group.members[1]
    context = SealContext(task.roster.task, 1, 0, group.gid)
    share = Share(2, np.zeros(task.provider.d, dtype=np.uint32))
    data = seal_share(task.identities[sender], task.roster, target, context, "share", share)
    out = task.users[target].handle(Received("share", data))
    (refused,) = of_type(out, Refused)
    assert kinds(out) == ["Refused"] and "pairwise" in refused.detail
    assert target in {u for _, u in task.ledger.uploads(1, 0)}  # its own upload stands
