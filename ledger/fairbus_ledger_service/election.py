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

from fairbus_ledger_service.stores import EtcdStore

log = logging.getLogger("fairbus.ledger")


def provider_key(task: str) -> bytes:
    """The key the active provider of ``task`` holds (a hot standby waits for it)."""
    return f"/fairbus/{task}/provider/active".encode()


class EtcdElection:
    def __init__(
        self, store: EtcdStore, node_id: int, ttl: int = 2, key: bytes | None = None
    ) -> None:
        """``key``: what is held (default the ledger writer's key)."""
        self.store = store
        self.ttl = ttl
        self.key = store.writer_key if key is None else key
        self.value = f"{node_id}:{os.urandom(8).hex()}".encode()
        self.lease_id: int | None = None

    async def campaign_once(self) -> bool:
        """Try to hold the key; True if this node holds it now."""
        client, tx = self.store.client, self.store.client.transactions
        lease = await client.lease(self.ttl)
        key = self.key
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
        """Refresh the lease until it cannot be refreshed; then return (leadership lost).
        A failed refresh moves to another etcd member and tries once more."""
        assert self.lease_id is not None
        failures = 0
        while failures < 2:
            await asyncio.sleep(self.ttl / 4)
            client = self.store.client
            try:
                async with asyncio.timeout(self.ttl / 2):
                    reply = await client.refresh_lease(self.lease_id)
            except Exception as exc:
                log.warning("writer lease refresh failed: %r", exc)
                failures += 1
                with contextlib.suppress(Exception):
                    await self.store.rotate(client)
                continue
            if reply is None or reply.TTL <= 0:
                return
            failures = 0

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
        client = election.store.client
        try:
            won = await election.campaign_once()
        except Exception as exc:  # this etcd member is unreachable: try another
            log.warning("writer election: %s", exc)
            with contextlib.suppress(Exception):
                await election.store.rotate(client)
            won = False
        if not won:
            await asyncio.sleep(poll)
            continue
        await on_elected()
        await election.keep_alive()
        await on_deposed()
