"""The active provider and its hot standbys (issue 14, item 2; not in the paper).

Every provider process of a task configured with ``[provider] etcd`` campaigns for the
key ``/fairbus/<task>/provider/active`` (:func:`fairbus_ledger_service.election.
provider_key`), bound to an etcd lease of ``lease_ttl`` seconds that the holder keeps
alive, as the ledger writer does. The one that holds it connects to the broker (the
provider's login: two sessions with one client id would throw each other off), rebuilds
its state from the ledger and plays; the others wait, their data and model already
loaded. When the active one dies its lease lapses and a standby takes over.

Fencing is the ledger's: every provider transaction must name the provider's chain head
as ``prev``, so of two processes that both believe they are active only one can extend
the chain; the other's next transaction is refused (``stale_prev``) and it rebuilds from
the ledger, where it finds the other's work. A holder that loses its lease (etcd
unreachable, or the process was stopped past the TTL) stops playing at once and exits
with an error, for its service manager to restart it as a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fairbus.errors import FairbusError
from fairbus_ledger_service.election import EtcdElection, provider_key
from fairbus_ledger_service.stores import EtcdStore

log = logging.getLogger("fairbus.provider")
T = TypeVar("T")
POLL = 0.2
"""Seconds between a standby's tries for the key."""


class DeposedError(FairbusError):
    """The active provider lost its lease: another may be active now."""


async def when_elected(
    endpoints: tuple[tuple[str, int], ...],
    task: str,
    pid: int,
    ttl: int,
    work: Callable[[], Coroutine[Any, Any, T]],
) -> T:
    """Wait to hold the task's provider key, then run ``work`` while holding it; raises
    :class:`DeposedError` (``work`` cancelled) if the lease is lost first."""
    store = await EtcdStore.connect(list(endpoints), task)
    election = EtcdElection(store, pid, ttl, key=provider_key(task))
    try:
        await _campaign(election)
        log.info("elected the active provider of task %r (etcd lease of %d s)", task, ttl)
        playing = asyncio.ensure_future(work())
        holding = asyncio.ensure_future(election.keep_alive())
        try:
            await asyncio.wait({playing, holding}, return_when=asyncio.FIRST_COMPLETED)
            if not playing.done():
                playing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await playing
                raise DeposedError(
                    "the provider lost its etcd lease; stopping so that only one is active"
                )
            return playing.result()
        finally:
            holding.cancel()
            await election.resign()
    finally:
        await store.close()


async def _campaign(election: EtcdElection) -> None:
    waiting = False
    while True:
        try:
            if await election.campaign_once():
                return
        except Exception as exc:  # this etcd member is unreachable: try another
            log.warning("provider election: %s", exc)
            with contextlib.suppress(Exception):
                await election.store.rotate(election.store.client)
        if not waiting:
            log.info("standby: another provider is active; waiting for its lease to lapse")
            waiting = True
        await asyncio.sleep(POLL)
