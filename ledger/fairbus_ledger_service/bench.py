"""``fairbus bench ledger``: the replicated ledger under load, through its MQTT front.

On this machine: Mosquitto, 3 etcd members and 3 ledger node processes
(:class:`~ledger.deployment.LocalLedger`). Transactions are ~1 KB signed attestations
from many senders, each sender's chain in order; they are signed before the clock
starts. Three measurements:

* latency: an open-loop stream at ``rate`` tx/s; submit → receipt p50/p99;
* throughput: every sender keeps ``window`` transactions in flight; committed tx/s;
* failover: the open-loop stream, the writer killed with SIGKILL; the longest stretch
  without any receipt after the kill, and afterwards every transaction committed exactly
  once (un-acknowledged ones are submitted again after 0.5 s, as the client does).

The bench reads receipts without checking their signatures (the client library does);
that work would compete with the ledger for the two cores.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from fairbus import envelope, topics
from fairbus.envelope import GENESIS
from fairbus.ledger.records import Block
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import Attestation, Receipt, decode_body
from fairbus_broker.mqtt import mqtt_client
from fairbus_ledger_service.deployment import LocalLedger

TASK = "ledger-bench"
NOTE_BYTES = 900  # the envelope is then ~1.2 KB: a "1 KB transaction"


@dataclass
class Stream:
    """Pre-signed chains, one per sender, and what happened to each transaction."""

    chains: dict[int, list[tuple[bytes, bytes]]]  # sender -> [(tx hash, envelope bytes)]
    sent: dict[bytes, float] = field(default_factory=dict)
    acked: dict[bytes, float] = field(default_factory=dict)
    receipt_at: list[float] = field(default_factory=list)


def presign(ledger: LocalLedger, per_sender: int, offset: dict[int, bytes]) -> Stream:
    chains: dict[int, list[tuple[bytes, bytes]]] = {}
    for user in ledger.users:
        identity = ledger.identities[user]
        prev = offset.get(user, GENESIS)
        chain = []
        for k in range(per_sender):
            body = Attestation(f"bench/{k}", bytes(32), os.urandom(NOTE_BYTES))
            signed = envelope.sign(identity, TASK, body, prev=prev)
            chain.append((signed.hash, signed.to_bytes()))
            prev = signed.hash
        chains[user] = chain
        offset[user] = prev
    return Stream(chains)


async def receipts(mqtt: aiomqtt.Client, streams: list[Stream]) -> None:
    await mqtt.subscribe(topics.ledger_receipt(TASK, "+", "+"), qos=topics.QOS)
    async for message in mqtt.messages:
        now = time.perf_counter()
        if not isinstance(message.payload, bytes | bytearray):
            continue
        env = envelope.parse(bytes(message.payload))
        if env.header.type != "receipt":
            continue
        body = decode_body("receipt", env.payload, DEFAULT_LIMITS)
        assert isinstance(body, Receipt)
        for entry in body.entries:
            for s in streams:
                if entry.tx_hash in s.sent and entry.tx_hash not in s.acked:
                    s.acked[entry.tx_hash] = now
                    s.receipt_at.append(now)


async def open_loop(
    mqtt: aiomqtt.Client,
    stream: Stream,
    rate: float,
    on_tick: Callable[[float], None] | None = None,
) -> None:
    """Send the chains round-robin at ``rate`` tx/s."""
    longest = max(map(len, stream.chains.values()))
    order = [(user, chain[k]) for k in range(longest)
             for user, chain in stream.chains.items() if k < len(chain)]  # fmt: skip
    start = time.perf_counter()
    for n, (sender, (tx_hash, data)) in enumerate(order):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        stream.sent[tx_hash] = time.perf_counter()
        await mqtt.publish(topics.ledger_submit(TASK, "user", sender), data, qos=topics.QOS)
        if on_tick is not None:
            on_tick(time.perf_counter() - start)


async def windowed(mqtt: aiomqtt.Client, stream: Stream, window: int, seconds: float) -> None:
    """Each sender keeps ``window`` transactions in flight for ``seconds``."""
    stop = time.perf_counter() + seconds

    async def sender(user: int, chain: list[tuple[bytes, bytes]]) -> None:
        next_k = oldest = 0
        while time.perf_counter() < stop and next_k < len(chain):
            while oldest < next_k and chain[oldest][0] in stream.acked:
                oldest += 1
            if next_k - oldest >= window:
                await asyncio.sleep(0.001)
                continue
            tx_hash, data = chain[next_k]
            stream.sent[tx_hash] = time.perf_counter()
            await mqtt.publish(topics.ledger_submit(TASK, "user", user), data, qos=topics.QOS)
            next_k += 1

    await asyncio.gather(*(sender(u, c) for u, c in stream.chains.items()))


async def resubmit(mqtt: aiomqtt.Client, stream: Stream, older_than: float) -> int:
    """As the client does: submit again, in chain order, every transaction that has
    waited ``older_than`` s for its receipt. Returns how many."""
    now, count = time.perf_counter(), 0
    for user, chain in stream.chains.items():
        for tx_hash, data in chain:
            sent = stream.sent.get(tx_hash)
            if sent is None:
                break
            if tx_hash not in stream.acked and now - sent > older_than:
                await mqtt.publish(topics.ledger_submit(TASK, "user", user), data, qos=topics.QOS)
                count += 1
    return count


async def retry_unacked(mqtt: aiomqtt.Client, stream: Stream, after: float = 0.5) -> None:
    """Resubmit what has waited ``after`` s, every ``after`` s, until cancelled."""
    while True:
        await asyncio.sleep(after)
        await resubmit(mqtt, stream, after)


async def resubmit_unacked(mqtt: aiomqtt.Client, stream: Stream, rounds: int = 20) -> None:
    """Resubmit whatever has no receipt, once a second, until everything has one."""
    for _ in range(rounds):
        if not await resubmit(mqtt, stream, 0.0):
            return
        await asyncio.sleep(1.0)


def _last_acked(chain: list[tuple[bytes, bytes]], stream: Stream, before: bytes) -> bytes:
    acked = [h for h, _ in chain if h in stream.acked]
    if len(acked) != sum(1 for h, _ in chain if h in stream.sent):
        raise RuntimeError("throughput run left transactions without a receipt")
    return acked[-1] if acked else before


def latencies_ms(stream: Stream) -> list[float]:
    return sorted((stream.acked[h] - t) * 1000 for h, t in stream.sent.items() if h in stream.acked)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class LedgerBenchResult:
    latency_rate: float
    latency_sent: int
    latency_acked: int
    p50_ms: float
    p99_ms: float
    throughput_tx_s: float
    throughput_p50_ms: float
    throughput_p99_ms: float
    throughput_unanswered: int
    """Transactions of the throughput run without a receipt 2 s after it (submitted again)."""
    failover_gap_s: float
    failover_sent: int
    failover_lost: int
    duplicates: int
    blocks: int
    transactions: int


async def run(
    root: Path,
    *,
    rate: float = 500,
    seconds: float = 10,
    senders: int = 48,
    window: int = 16,
    progress: Callable[[str], None] = lambda _: None,
) -> LedgerBenchResult:
    users = tuple(range(1, senders + 1))
    with LocalLedger(root, TASK, users=users) as ledger:
        progress("starting Mosquitto, 3 etcd members and 3 ledger nodes")
        await ledger.wait_for_writer()
        await asyncio.sleep(2.0)  # let the followers subscribe
        heads: dict[int, bytes] = {}
        per = int(rate * seconds / senders) + 1
        latency = presign(ledger, per, heads)
        throughput = presign(ledger, 1200, heads)
        streams = [latency, throughput]
        async with (
            mqtt_client("127.0.0.1", ledger.broker_port, "bench-receipts") as rx,
            mqtt_client("127.0.0.1", ledger.broker_port, "bench-submit") as tx,
        ):
            reader = asyncio.create_task(receipts(rx, streams))
            await asyncio.sleep(0.5)
            progress(f"latency: {rate:.0f} tx/s for {seconds:.0f} s")
            await open_loop(tx, latency, rate)
            await asyncio.sleep(1.0)
            progress(f"throughput: {senders} senders x {window} in flight for {seconds:.0f} s")
            t0 = time.perf_counter()
            await windowed(tx, throughput, window, seconds)
            elapsed = time.perf_counter() - t0
            committed = sum(1 for t in throughput.receipt_at if t <= t0 + elapsed)
            await asyncio.sleep(2.0)
            late = sum(1 for h in throughput.sent if h not in throughput.acked)
            await resubmit_unacked(tx, throughput)
            # The failover chains go on from what the throughput run committed.
            heads = {
                u: _last_acked(c, throughput, latency.chains[u][-1][0])
                for u, c in throughput.chains.items()
            }
            failover = presign(ledger, per, heads)
            streams.append(failover)
            progress("failover: the writer killed with SIGKILL mid-stream")
            writer = await ledger.wait_for_writer()
            killed: list[float] = []

            def kill_once(t: float) -> None:
                if not killed and t >= seconds / 3:
                    ledger.kill_node(writer)
                    killed.append(time.perf_counter())

            retrier = asyncio.create_task(retry_unacked(tx, failover))
            await open_loop(tx, failover, rate, kill_once)
            await asyncio.sleep(2.0)
            retrier.cancel()
            await resubmit_unacked(tx, failover)
            reader.cancel()
        raw = await ledger.blocks()
    blocks = [Block.from_bytes(b) for b in raw]
    hashes = [t.hash for b in blocks for t in b.txs]
    times = sorted(failover.receipt_at)
    # the longest stretch without a receipt that ends after the kill: the failover pause
    pauses = [b - a for a, b in itertools.pairwise(times) if killed and b > killed[0]]
    lat = latencies_ms(latency)
    thr = latencies_ms(throughput)
    return LedgerBenchResult(
        latency_rate=rate,
        latency_sent=len(latency.sent),
        latency_acked=len(latency.acked),
        p50_ms=statistics.median(lat) if lat else float("nan"),
        p99_ms=pct(lat, 0.99),
        throughput_tx_s=committed / elapsed,
        throughput_p50_ms=statistics.median(thr) if thr else float("nan"),
        throughput_p99_ms=pct(thr, 0.99),
        throughput_unanswered=late,
        failover_gap_s=max(pauses) if pauses else float("nan"),
        failover_sent=len(failover.sent),
        failover_lost=sum(1 for h in failover.sent if h not in set(hashes)),
        duplicates=len(hashes) - len(set(hashes)),
        blocks=len(blocks),
        transactions=len(hashes),
    )
