"""Where committed blocks live: SQLite on one machine, etcd (Raft) for a replicated ledger.

Both stores keep the same block bytes under the same rule: a block is appended only if
it extends the current head (compare-and-swap), so two writers can never both commit a
block at one height. Neither store validates transactions; the state machine of
:mod:`fairbus.ledger.state` does, on the writer before the append and on every reader after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from fairbus.errors import FairbusError
from fairbus.ledger.records import GENESIS_HASH, Block
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS

if TYPE_CHECKING:
    import aetcd

log = logging.getLogger("fairbus.ledger")
T = TypeVar("T")
OP_TIMEOUT = 5.0
"""Seconds any one etcd call may take before the store moves to another member."""


class StoreError(FairbusError):
    """The store is unreachable or holds something it should not."""


class BlockStore(Protocol):
    async def head(self) -> tuple[int, bytes]:
        """(height, hash) of the last block; (-1, GENESIS_HASH) when empty."""
        ...

    async def read(self, start: int, stop: int | None = None) -> list[bytes]:
        """Blocks ``start`` .. ``stop`` - 1 (to the head when ``stop`` is None), in order."""
        ...

    async def append(self, block: Block, fence: bytes | None = None) -> bool:
        """Append ``block`` if its ``prev_hash`` is the head's hash; False if it is not."""
        ...

    async def close(self) -> None: ...


# --- SQLite ---------------------------------------------------------------------------------


class SqliteStore:
    """One file, WAL journal, ``synchronous=FULL``: a commit is on disk when it returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS blocks "
            "(height INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL)"
        )

    async def head(self) -> tuple[int, bytes]:
        row = self._db.execute(
            "SELECT height, hash FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
        return (-1, GENESIS_HASH) if row is None else (int(row[0]), bytes(row[1]))

    async def read(self, start: int, stop: int | None = None) -> list[bytes]:
        end = stop if stop is not None else 2**62
        rows = self._db.execute(
            "SELECT height, data FROM blocks WHERE height >= ? AND height < ? ORDER BY height",
            (start, end),
        ).fetchall()
        for k, (height, _) in enumerate(rows):
            if height != start + k:
                raise StoreError(f"block {start + k} is missing from {self.path}")
        return [bytes(data) for _, data in rows]

    async def append(self, block: Block, fence: bytes | None = None) -> bool:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            height, head = await self.head()
            if block.height != height + 1 or block.prev_hash != head:
                db.execute("ROLLBACK")
                return False
            db.execute(
                "INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)",
                (block.height, block.hash, block.to_bytes()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return True

    def overwrite(self, height: int, data: bytes) -> None:
        """Replace a block's bytes in place; for tests of ``fairbus ledger verify``."""
        self._db.execute("UPDATE blocks SET data = ? WHERE height = ?", (data, height))

    async def close(self) -> None:
        self._db.close()


# --- etcd -----------------------------------------------------------------------------------


def etcd_keys(task: str) -> tuple[bytes, bytes, bytes]:
    """(head key, block key prefix, writer key) of a task's ledger in etcd."""
    root = f"/fairbus/{task}/ledger/".encode()
    return root + b"head", root + b"block/", root + b"writer"


def block_key(prefix: bytes, height: int) -> bytes:
    return prefix + f"{height:016d}".encode()


class EtcdStore:
    """Blocks under ``/fairbus/<task>/ledger/block/<height>``; the head under ``…/head``.

    ``append`` is one etcd transaction: if the head key still names the block before
    (and, with a ``fence``, the writer key still holds this writer's value), put the
    block and move the head. etcd acknowledges only what a majority has on disk.
    """

    def __init__(
        self,
        client: aetcd.Client,
        task: str,
        endpoints: list[tuple[str, int]] | None = None,
        current: int = 0,
    ) -> None:
        self.client = client
        self.task = task
        self.head_key, self.prefix, self.writer_key = etcd_keys(task)
        self.endpoints = list(endpoints or [])
        self._current = current
        self._rotating = asyncio.Lock()
        self._retired: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls, endpoints: list[tuple[str, int]], task: str, first: int = 0
    ) -> EtcdStore:
        """Connect to the first member that answers, starting at ``first`` (nodes start at
        different members so that one member's death does not cut them all off)."""
        client, index = await _connect_any(endpoints, first)
        return cls(client, task, endpoints, index)

    async def rotate(self, failed: aetcd.Client | None = None) -> None:
        """After a failed call: connect to the next member that answers (the caller
        retries). Nothing is lost: etcd acknowledges only what a majority committed.
        The old connection is closed later, so that calls still on it fail by their own
        timeout instead of hanging on a closed channel."""
        if not self.endpoints:
            return
        async with self._rotating:
            if failed is not None and failed is not self.client:
                return  # another caller has already moved on
            old = self.client
            self.client, self._current = await _connect_any(self.endpoints, self._current + 1)
            log.warning("etcd: now connected to %s:%d", *self.endpoints[self._current])
            self._retired.add(asyncio.create_task(_close_later(old, 2 * OP_TIMEOUT)))

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        client = self.client
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                return await op()
        except Exception:
            with contextlib.suppress(StoreError):
                await self.rotate(client)
            raise

    async def head(self) -> tuple[int, bytes]:
        got = await self._call(lambda: self.client.get(self.head_key))
        if got is None:
            return -1, GENESIS_HASH
        return _unpack_head(got.value)

    async def read(self, start: int, stop: int | None = None) -> list[bytes]:
        if stop is None:
            stop = (await self.head())[0] + 1
        out: list[bytes] = []
        # Three blocks per request: a block stays under 1 MiB, a gRPC reply under 4 MiB.
        for first in range(start, stop, 3):
            last = min(stop, first + 3)
            low, high = block_key(self.prefix, first), block_key(self.prefix, last)
            got = await self._call(lambda: self.client.get_range(low, high))  # noqa: B023
            values = [kv.value for kv in got]
            if len(values) != last - first:
                raise StoreError(f"blocks {first}..{last - 1} are incomplete in etcd")
            out.extend(values)
        return out

    async def append(self, block: Block, fence: bytes | None = None) -> bool:
        tx = self.client.transactions
        if block.height == 0:
            compare = [tx.version(self.head_key) == 0]
        else:
            compare = [tx.value(self.head_key) == _pack_head(block.height - 1, block.prev_hash)]
        if fence is not None:
            compare.append(tx.value(self.writer_key) == fence)
        success = [
            tx.put(block_key(self.prefix, block.height), block.to_bytes()),
            tx.put(self.head_key, _pack_head(block.height, block.hash)),
        ]
        ok, _ = await self._call(
            lambda: self.client.transaction(compare=compare, success=success, failure=[])
        )
        return bool(ok)

    async def close(self) -> None:
        await self.client.close()


async def _close_later(client: aetcd.Client, delay: float) -> None:
    await asyncio.sleep(delay)
    with contextlib.suppress(Exception):
        await client.close()


async def _connect_any(endpoints: list[tuple[str, int]], first: int) -> tuple[aetcd.Client, int]:
    import aetcd

    last: Exception | None = None
    for k in range(len(endpoints)):
        index = (first + k) % len(endpoints)
        host, port = endpoints[index]
        client = aetcd.Client(host=host, port=port, timeout=OP_TIMEOUT)
        try:
            await client.connect()
            await client.status()
            return client, index
        except Exception as exc:  # try the next member
            last = exc
            with contextlib.suppress(Exception):
                await client.close()
    raise StoreError(f"no etcd member of {endpoints} answers: {last}")


def _pack_head(height: int, block_hash: bytes) -> bytes:
    return codec.pack({"height": height, "hash": block_hash})


def _unpack_head(value: bytes) -> tuple[int, bytes]:
    obj = codec.unpack(value, DEFAULT_LIMITS)
    if not isinstance(obj, dict) or set(obj) != {"height", "hash"}:
        raise StoreError("the head key in etcd is not a ledger head")
    height, block_hash = obj["height"], obj["hash"]
    if not isinstance(height, int) or not isinstance(block_hash, bytes) or len(block_hash) != 32:
        raise StoreError("the head key in etcd is not a ledger head")
    return height, block_hash
