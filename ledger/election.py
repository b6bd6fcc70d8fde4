"""Who writes: one ledger node at a time, elected through an etcd lease.

The writer key ``/fairbus/<task>/ledger/writer`` is created only if absent, bound to a
lease the writer keeps alive. When the writer dies the lease lapses (``ttl`` seconds) and
the key goes with it; the next node to create it writes. Every append also compares the
writer key with the writer's own value (the fence), so a writer that lost its lease
without noticing cannot commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

from ledger.stores import EtcdStore

log = logging.getLogger("fairbus.ledger")


class EtcdElection:
    def __init__(self, store: EtcdStore, node_id: int, ttl: int = 2) -> None:
        self.store = store
        self.ttl = ttl
        self.value = f"{node_id}:{os.urandom(8).hex()}".encode()
        self.lease_id: int | None = None

    async def campaign_once(self) -> bool:
        """Try to become the writer; True if this node holds the writer key now."""
        client, tx = self.store.client, self.store.client.transactions
        lease = await client.lease(self.ttl)
        key = self.store.writer_key
        ok, _ = await client.transaction(
            compare=[tx.version(key) == 0],
            success=[tx.put(key, self.value, lease=lease)],
            failure=[],
        )
        if ok:
            self.lease_id = lease.id
            return True
        with contextlib.suppress(Exception):
            await client.revoke_lease(lease.id)
        return False

    async def keep_alive(self) -> None:
        """Refresh the lease until it cannot be refreshed; then return (leadership lost)."""
        assert self.lease_id is not None
        while True:
            await asyncio.sleep(self.ttl / 4)
            try:
                async with asyncio.timeout(self.ttl / 2):
                    reply = await self.store.client.refresh_lease(self.lease_id)
                if reply is None or reply.TTL <= 0:
                    return
            except Exception as exc:  # any failure: give the writer role up
                log.warning("writer lease refresh failed: %s", exc)
                return

    async def resign(self) -> None:
        if self.lease_id is not None:
            with contextlib.suppress(Exception):
                await self.store.client.revoke_lease(self.lease_id)
            self.lease_id = None


async def lead_when_elected(
    election: EtcdElection,
    on_elected: Callable[[], Awaitable[None]],
    on_deposed: Callable[[], Awaitable[None]],
    poll: float = 0.2,
) -> None:
    """Campaign forever; call ``on_elected`` on winning and ``on_deposed`` on losing."""
    while True:
        try:
            won = await election.campaign_once()
        except Exception as exc:  # etcd unreachable for now
            log.warning("writer election: %s", exc)
            won = False
        if not won:
            await asyncio.sleep(poll)
            continue
        await on_elected()
        await election.keep_alive()
        await on_deposed()
