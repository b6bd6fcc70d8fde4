"""``fairbus provider``: the provider machine
(:class:`fairbus.protocol.provider.ProviderMachine`) driven over the bus.

Each round: every ledger transaction the machine emits (global model, announcement,
dropout, evaluation, decision) is committed first (model-sized ones as header only;
the ledger nodes keep the payload from the bus) and then broadcast with its receipt.
Uploads are taken only with a valid ledger receipt. Presence drives dropouts and
rejoins; a timer drives the phase deadlines. One :class:`RoundRecord` per round goes to
``<state>/provider/rounds.jsonl``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from fairbus_ledger_service.client import LedgerClient

from fairbus import topics
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.identity import Identity, load_broker_password
from fairbus.ledger.recorded import Recorded, header_only, open_recorded
from fairbus.ledger.records import LEDGER_TYPES, Transaction, is_model_sized
from fairbus.protocol.events import (
    AttemptClosed,
    CloseAttempt,
    Dropped,
    Evaluate,
    Evaluated,
    Event,
    Joined,
    Output,
    Received,
    Refused,
    RoundDone,
    RoundFailed,
    Send,
    Tick,
)
from fairbus.protocol.provider import ProviderMachine
from fairbus.roster import Role, Roster
from fairbus.rounds import RoundRecord, record_round
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import OFFLINE, ONLINE, BusConnection

if TYPE_CHECKING:
    from fairbus.training.local import Evaluator

log = logging.getLogger("fairbus.provider")

TICK = 0.25
CLOSE_TIMEOUT = 30.0
"""Seconds to wait for a ledger node that shows a recorded dropout."""
NO_USERS_RETRY = 2.0
"""Seconds to wait for users before trying a round again when too few are online."""


class ProviderError(FairbusError):
    pass


class ProviderRuntime:
    def __init__(
        self,
        config: RuntimeConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.roster = Roster.load(config.roster)
        self.pid = self.roster.provider
        self.identity = Identity.load(config.keys, self.pid)
        self.task = self.roster.task
        self.users = self.roster.with_role(Role.USER)
        self.on_round = on_round
        self.out_dir = config.state / "provider"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.records: list[RoundRecord] = []
        self.online: set[int] = set()
        self._inbox: asyncio.Queue[Event] = asyncio.Queue()
        self._round_over = asyncio.Event()
        self._record: RoundRecord | None = None
        self._evaluator: Evaluator | None = None
        self.bus = BusConnection(
            *config.broker,
            task=self.task,
            role="provider",
            pid=self.pid,
            password=load_broker_password(config.keys, self.pid),
            subscriptions=[],
            on_message=self._on_message,
        )
        self.ledger = LedgerClient(
            self.bus, self.identity, self.roster, "provider", timeout=config.ledger_timeout
        )
        self.bus.subscriptions = [topics.uploads(self.task), topics.user_presences(self.task),
                           *self.ledger.topics]  # fmt: skip
        self.machine: ProviderMachine | None = None
        self._last_dropout = b""
        self._plain: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

    # --- bus ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, data: bytes) -> None:
        if not self.config.provider.secure and topic.endswith("/upload"):
            sender = topics.sender_of(topic)
            if sender is not None and sender[1] in self.users:
                self._plain.put_nowait((sender[1], data))
            return
        if "/ledger/" in topic:
            self.ledger.dispatch(data)
            return
        sender = topics.sender_of(topic)
        if sender is None or sender[0] != "user" or sender[1] not in self.users:
            return
        user = sender[1]
        if topic.endswith("/presence"):
            if data == ONLINE and user not in self.online:
                self.online.add(user)
                self._inbox.put_nowait(Joined(user))
            elif data == OFFLINE and user in self.online:
                self.online.discard(user)
                self._inbox.put_nowait(Dropped(user))
        elif topic.endswith("/upload"):
            try:
                env, _ = open_recorded(data, self.roster)
            except FairbusError as exc:
                log.warning("upload on user %d's topic without a valid receipt: %s", user, exc)
                return
            self._inbox.put_nowait(Received("upload", env))

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> list[RoundRecord]:
        """Play ``rounds`` rounds and return their records."""
        from fairbus.training.models import initial_params

        t = self.config.training
        self._evaluator = await asyncio.to_thread(self._build_evaluator)
        connection = asyncio.create_task(self.bus.run())
        ticker = asyncio.create_task(self._tick())
        try:
            await self.bus.connected.wait()
            head = await self._ledger_head()
            if head != GENESIS:
                raise ProviderError(
                    f"the ledger already holds provider {self.pid}'s transactions for task "
                    f"{self.task!r}; resuming a task is not supported: start a new task "
                    "(a new roster task name) or a fresh ledger"
                )
            self.machine = ProviderMachine(
                self.identity,
                self.roster,
                initial_params(t.model_name, t.seed),
                self.config.provider_config(),
            )
            self.machine.online = set()
            await self._wait_for_users()
            while len(self.records) < self.config.provider.rounds:
                if self.config.provider.secure:
                    await self._play_round()
                else:
                    await self._play_plain_round()
            return self.records
        finally:
            await self.bus.leave()
            ticker.cancel()
            connection.cancel()

    async def _ledger_head(self) -> bytes:
        answer = await self.ledger.query("head", sender=self.pid)
        return answer.records[0] if answer.ok and answer.records else GENESIS

    async def _wait_for_users(self) -> None:
        assert self.machine is not None
        want = self.config.provider.min_users or len(self.users)
        deadline = time.monotonic() + self.config.provider.join_timeout
        log.info("waiting for %d of %d users (at most %.0f s)", want, len(self.users),
                 self.config.provider.join_timeout)  # fmt: skip
        while time.monotonic() < deadline:
            await self._drain()
            if len(self.machine.online) >= want:
                break
            await asyncio.sleep(0.1)
        await self._drain()
        log.info("users online: %s", sorted(self.machine.online))

    async def _drain(self) -> None:
        """Hand the machine every queued presence change (between rounds)."""
        assert self.machine is not None
        while not self._inbox.empty():
            event = self._inbox.get_nowait()
            if isinstance(event, Joined):
                await self._resync_chain(event.user)
            await self._carry_out(self.machine.handle(event))

    async def _play_round(self) -> None:
        assert self.machine is not None
        machine = self.machine
        await self._drain()
        # A user dropped for missing a deadline while still connected gets another chance.
        for user in sorted(self.online - machine.online - machine.excluded):
            await self._resync_chain(user)
            machine.handle(Joined(user))
        record = RoundRecord.empty(machine.round + 1)
        self._record = record
        self._round_over.clear()
        start = time.perf_counter()
        await self._carry_out(machine.start_round(time.time()))
        record.timings_s["announce"] = time.perf_counter() - start
        while not self._round_over.is_set():
            event = await self._inbox.get()
            if isinstance(event, Joined):
                await self._resync_chain(event.user)
            t0 = time.perf_counter()
            outputs = machine.handle(event)
            if isinstance(event, Received):
                record.timings_s["aggregation"] += time.perf_counter() - t0
            await self._carry_out(outputs)
        record.timings_s["round"] = time.perf_counter() - start
        if record.failed is None:
            self._write(record)
        else:
            log.warning("round %d failed: %s; waiting for users", record.round, record.failed)
            await asyncio.sleep(NO_USERS_RETRY)

    async def _play_plain_round(self) -> None:
        """The benchmark's baseline, plain FedAvg over the same bus: the global model out,
        every online user's trained model back in the clear, their mean. No grouping,
        masking, signatures or ledger."""
        assert self.machine is not None and self._evaluator is not None
        machine = self.machine
        await self._drain()
        machine.round += 1
        r = machine.round
        record = RoundRecord.empty(r, attempts=1)
        self._record = record
        users = sorted(machine.online)
        start = time.perf_counter()
        payload = r.to_bytes(8, "little") + machine.global_params.astype("<f4").tobytes()
        await self.bus.publish(topics.provider_message(self.task, self.pid, "plain_model"), payload)
        record.bytes["plain_model"] = len(payload)
        got: dict[int, np.ndarray] = {}
        deadline = time.monotonic() + self.config.provider.phase_timeout
        while len(got) < len(users) and time.monotonic() < deadline:
            try:
                user, data = await asyncio.wait_for(self._plain.get(), TICK)
            except TimeoutError:
                continue
            if int.from_bytes(data[:8], "little") != r or len(data) != len(payload):
                continue
            got[user] = np.frombuffer(data[8:], dtype="<f4").astype(np.float32)
        t0 = time.perf_counter()
        if got:
            machine.global_params = np.mean(list(got.values()), axis=0).astype(np.float32)
        record.timings_s["aggregation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        record.global_accuracy = await asyncio.to_thread(
            self._evaluator.accuracy, machine.global_params
        )
        record.timings_s["evaluation"] = time.perf_counter() - t0
        record.timings_s["round"] = time.perf_counter() - start
        record.bytes = dict(record.bytes)
        self.records.append(record)
        self._write(record)
        log.info("plain round %d: accuracy %.3f from %d users", r, record.global_accuracy,
                 len(got))  # fmt: skip

    def _write(self, record: RoundRecord) -> None:
        with (self.out_dir / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(record.to_json()) + "\n")

    async def _resync_chain(self, user: int) -> None:
        """A returning user's chain continues from the ledger's head for it: an upload it
        committed just before it died may never have reached the provider."""
        assert self.machine is not None
        try:
            answer = await self.ledger.query("head", sender=user)
        except FairbusError as exc:
            log.warning("no ledger head for returning user %d: %s", user, exc)
            return
        if answer.ok and answer.records:
            self.machine.resync_chain(user, answer.records[0])

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._inbox.put_nowait(Tick(time.time()))

    async def _carry_out(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                await self._broadcast(out)
            elif isinstance(out, Evaluate):
                await self._evaluate(out)
            elif isinstance(out, CloseAttempt):
                await self._close_attempt(out)
            elif isinstance(out, RoundDone):
                self._done(out)
            elif isinstance(out, RoundFailed):
                assert self._record is not None
                self._record.failed = out.reason
                self._round_over.set()
            elif isinstance(out, Refused):
                log.warning("refused: %s: %s", out.reason, out.detail)
                if self._record is not None:
                    self._record.refusals.append(f"{out.reason}: {out.detail}")

    async def _broadcast(self, out: Send) -> None:
        """Commit on the ledger, then publish with the receipt."""
        assert self._record is not None
        if out.kind not in LEDGER_TYPES:
            raise ProviderError(f"the provider machine sent an unrecorded {out.kind!r}")
        start = time.perf_counter()
        submission = header_only(out.data) if is_model_sized(out.kind) else out.data
        committed, receipt = await self.ledger.submit_for_receipt(submission)
        if out.kind == "dropout":
            self._last_dropout = committed.tx_hash
        self._record.ledger_height = committed.height
        self._record.timings_s["ledger"] = (
            self._record.timings_s.get("ledger", 0.0) + time.perf_counter() - start
        )
        payload = Recorded(out.data, receipt).to_bytes()
        await self.bus.publish(topics.provider_message(self.task, self.pid, out.kind), payload)
        self._record.bytes[out.kind] = self._record.bytes.get(out.kind, 0) + len(payload)
        if out.kind == "announce":
            assert self.machine is not None
            self._record.prior_groups = [list(g) for g in self.machine.prior_groups]
        if out.kind == "dropout":
            log.info("round %d: users dropped out; attempt %d closed", self._record.round,
                     self.machine.attempt if self.machine else -1)  # fmt: skip

    async def _close_attempt(self, effect: CloseAttempt) -> None:
        """Tell the machine which uploads the ledger recorded for the closed attempt. The
        round's records are asked for until they include the dropout (a node that has
        not caught up yet would answer with an older view); after it the ledger takes no
        more uploads for the attempt, so the answer is final."""
        assert self.machine is not None
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            answer = await self.ledger.query("round", round=effect.round)
            txs = [Transaction.from_bytes(record) for record in answer.records]
            if any(tx.hash == self._last_dropout for tx in txs):
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"no ledger node shows round {effect.round}'s dropout")
            await asyncio.sleep(0.05)
        uploads = frozenset(
            (tx.envelope.header.group, tx.envelope.header.sender)
            for tx in txs
            if tx.envelope.header.type == "upload"
            and tx.envelope.header.attempt == effect.attempt
            and tx.envelope.header.group is not None
        )
        closed = AttemptClosed(effect.round, effect.attempt, uploads)
        await self._carry_out(self.machine.handle(closed))

    async def _evaluate(self, effect: Evaluate) -> None:
        assert self._evaluator is not None and self.machine is not None and self._record
        start = time.perf_counter()
        accuracy = await asyncio.to_thread(self._evaluator.accuracy, effect.params)
        self._record.timings_s["evaluation"] += time.perf_counter() - start
        start = time.perf_counter()
        outputs = self.machine.handle(Evaluated(effect.round, effect.attempt, effect.gid, accuracy))
        self._record.timings_s["detection"] += time.perf_counter() - start
        await self._carry_out(outputs)

    def _done(self, done: RoundDone) -> None:
        assert self._record is not None and self._evaluator is not None
        record = self._record
        record_round(record, done)
        record.global_accuracy = self._evaluator.accuracy(done.global_params)
        record.bytes = dict(record.bytes)
        self.records.append(record)
        np.save(self.out_dir / "global_model.npy", done.global_params)
        log.info("round %d: accuracy %.3f, key users %s, violators %s, excluded %s",
                 record.round, record.global_accuracy, record.key_users, record.violators,
                 record.excluded)  # fmt: skip
        self._round_over.set()
        if self.on_round is not None:
            self.on_round(record)

    def _build_evaluator(self) -> Evaluator:
        from fairbus.training.data import load_dataset
        from fairbus.training.local import Evaluator

        t = self.config.training
        if t.threads:
            import torch

            torch.set_num_threads(t.threads)
        _, test = load_dataset(t.dataset, t.data_dir, seed=t.seed)
        return Evaluator(t.model_name, test)
