"""``fairbus user --id N``: the user machine (:class:`fairbus.protocol.user.UserMachine`)
driven over the bus.

The driver routes what arrives by topic (:mod:`fairbus.topics`) and hands the bytes to
the machine unparsed: the provider's broadcasts (each a ledger transaction with its
receipt, which the machine checks before acting on it, so a user acts only on the
announcement the ledger holds) and the sealed shares of its group mates on
``…/user/+/to/<me>/+``. It carries out what comes back: training runs in a worker thread
while keys are negotiated; a :class:`Send` (a sealed share, or under plain FedAvg the
model in the clear) is published; a :class:`Commit` (an upload) is committed on the
ledger (header only) and then published with its receipt. When the ledger does not
record an upload, the machine is given the ledger's head for this user
(:class:`ChainHead`). The chain head and the data partition persist in the user's state
folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fairbus import topics
from fairbus.aggregation import PLAIN_MODEL
from fairbus.errors import FairbusError
from fairbus.protocol.events import (
    PROVIDER,
    SEALED_KINDS,
    ChainHead,
    Commit,
    Event,
    Excluded,
    Output,
    Received,
    Refused,
    Send,
    Train,
    Trained,
)
from fairbus.protocol.user import UserMachine
from fairbus.roster import Role, Roster
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.connection import Presence
from fairbus.runtime.participant import UserParticipant, route_from_ledger
from fairbus.runtime.state import state_io
from fairbus.runtime.user_state import UserState
from fairbus.training.attacks import Attack
from fairbus.training.config import attack_seed, trainer_seed
from fairbus.wire.messages import MESSAGE_TYPES

if TYPE_CHECKING:
    from fairbus.training.data import Dataset
    from fairbus.training.local import Trainer

log = logging.getLogger("fairbus.user")

PROVIDER_KINDS = frozenset(
    name for name, cls in MESSAGE_TYPES.items() if cls.RECORDED and Role.PROVIDER in cls.SENDERS
) | {PLAIN_MODEL}
"""What a user takes from the provider's topics: every ledger transaction a provider may
send (each with its receipt), and the global model in the clear under plain FedAvg."""
ROUND_STARTS = frozenset({"global_model", PLAIN_MODEL})
"""The broadcasts that open a round (a user's per-round timings and bytes start there)."""
EXCLUDED_EXIT = 3
"""Exit status of a user process that was excluded for good (systemd must not restart it)."""


class UserExcludedError(FairbusError):
    """The ledger's decision named this user a violator; it takes no further part."""


class UserRuntime(UserParticipant):
    """A fairness user on the bus; :meth:`run` takes part until excluded or cancelled."""

    def __init__(
        self,
        config: RuntimeConfig,
        user_id: int,
        attack: Attack | None = None,
        *,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        super().__init__(config, user_id, attack)
        self.on_event = on_event
        self._inbox: asyncio.Queue[Event] = asyncio.Queue()
        self._training: set[asyncio.Task[None]] = set()
        self._trainer: Trainer | None = None
        self._train_lock = asyncio.Lock()
        self._latest_train = 0
        self.bus.subscriptions = [
            topics.provider_messages(self.task),
            topics.direct_inbox(self.task, user_id),
            *self.ledger.topics,
        ]
        # [provider] secure = false: the task runs plain FedAvg (the PlainFedAvg policy)
        self.machine = UserMachine(
            self.identity, self.roster, secure=config.provider.secure, collusion=config.collusion
        )
        self._provider_session: str | None = None
        self._round_log: dict[str, float] = {}
        self._bytes_before: dict[str, int] = {}

    # --- bus ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, data: bytes) -> None:
        """Route by topic; the bytes go to the machine (or the ledger client) unparsed."""
        parsed = route_from_ledger(self.task, self.ledger, topic, data)
        if parsed is None:
            return
        from_provider = parsed.role == Role.PROVIDER.value and parsed.recipient is None
        if from_provider and parsed.kind == "presence":
            self._on_provider_presence(Presence.parse(data))
            return
        share = parsed.role == Role.USER.value and parsed.recipient == self.me
        if (from_provider and parsed.kind in PROVIDER_KINDS) or (
            share and parsed.kind in SEALED_KINDS
        ):
            self._inbox.put_nowait(Received(parsed.kind, data))

    def _on_provider_presence(self, presence: Presence | None) -> None:
        """Say when the provider goes and comes back: the round waits for it (a restarted
        provider or a standby goes on from the ledger; nothing here needs to change)."""
        if presence is None:
            return
        if not presence.online:
            log.warning("user %d: the provider is offline; waiting for it (or its standby) "
                        "to come back", self.me)  # fmt: skip
        elif self._provider_session not in (None, presence.session):
            log.info("user %d: a provider is back (a new session): the round goes on from "
                     "the ledger", self.me)  # fmt: skip
        self._provider_session = presence.session if presence.online else self._provider_session

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until excluded (:class:`UserExcludedError`), cancelled, or refused by the broker
        (:class:`~fairbus.runtime.connection.BrokerLoginError`)."""
        trainer = await asyncio.to_thread(self._build_trainer)
        self._trainer = trainer
        try:
            await self.bus.serve(self._take_part(trainer))
        finally:
            for task in self._training:
                task.cancel()

    async def _take_part(self, trainer: Trainer) -> None:
        """Once on the bus: resume the chain, then feed the machine what arrives."""
        await self.bus.connected.wait()
        await self._resume_chain()
        log.info("user %d: ready (%s, %d samples)", self.me, self.config.training.dataset,
                 len(trainer.data))  # fmt: skip
        while True:
            event = await self._inbox.get()
            if isinstance(event, Received) and event.kind in ROUND_STARTS:
                self._round_log = {"announced": time.perf_counter()}
                self._bytes_before = dict(self.bus.sent_bytes)
            await self._carry_out(self.machine.handle(event))

    async def _resume_chain(self) -> None:
        """Continue from the ledger's head for this user (:meth:`_chain_head`)."""
        await self._carry_out(self.machine.handle(ChainHead(self.me, await self._chain_head())))

    async def _carry_out(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Commit):
                await self._upload(out)
            elif isinstance(out, Send):
                await self._send(out)
            elif isinstance(out, Train):
                task = asyncio.create_task(self._train(out))
                self._training.add(task)
                task.add_done_callback(self._training.discard)
            elif isinstance(out, Refused):
                log.warning("user %d refused a message: %s: %s", self.me, out.reason, out.detail)
                self.metrics.refused(out.reason)
            elif isinstance(out, Excluded):
                self._write_stats(out.round)
                raise UserExcludedError(f"user {self.me} was excluded in round {out.round}")

    async def _train(self, effect: Train) -> None:
        """One training at a time (they share the model); a round superseded while it
        waited is skipped. (A restarted user's persistent session may first deliver a
        round that is already over.)"""
        assert self._trainer is not None
        trainer = self._trainer
        self._latest_train = max(self._latest_train, effect.round)
        async with self._train_lock:
            if effect.round < self._latest_train:
                return
            start = time.perf_counter()
            try:
                params: npt.NDArray[np.float32] = await asyncio.to_thread(
                    self.attack.local_model,
                    effect.global_params,
                    trainer,
                    seed=attack_seed(self.config.training.seed, self.me, effect.round),
                )
            except Exception:
                log.exception("user %d: training for round %d failed", self.me, effect.round)
                return
        self._round_log["training_s"] = time.perf_counter() - start
        self.metrics.phase("training", self._round_log["training_s"])
        self._inbox.put_nowait(Trained(effect.round, params))

    async def _send(self, out: Send) -> None:
        """A sealed share to a group mate, or (plain FedAvg) the model to the provider."""
        if isinstance(out.to, int):
            await self.bus.publish(topics.direct(self.task, self.me, out.to, out.kind), out.data)
            return
        assert out.to == PROVIDER
        start = time.perf_counter()
        await self.bus.publish(topics.message(self.task, "user", self.me, out.kind), out.data)
        self._round_log["upload_s"] = (
            self._round_log.get("upload_s", 0.0) + time.perf_counter() - start
        )
        self._round_log["uploads"] = self._round_log.get("uploads", 0) + 1
        self.metrics.took_part(self.machine.round)
        self._write_stats(self.machine.round)

    async def _upload(self, out: Commit) -> None:
        """Commit on the ledger, then publish with the receipt (the provider takes an
        upload only with one)."""
        start = time.perf_counter()
        self._round_log.setdefault("first_upload", start)
        # Not committed (None): the next upload links to the ledger's head for this user.
        ledger_s = await self._commit_and_publish(out, self.machine.round)
        if ledger_s is None:
            return
        self._round_log["ledger_s"] = self._round_log.get("ledger_s", 0.0) + ledger_s
        self._round_log["upload_s"] = (
            self._round_log.get("upload_s", 0.0) + time.perf_counter() - start
        )
        self._round_log["uploads"] = self._round_log.get("uploads", 0) + 1
        self._write_stats(self.machine.round)

    def _write_stats(self, round_: int) -> None:
        """``stats.json``: bytes sent per message kind, and the current round's timings
        (what ``fairbus bench round`` reads)."""
        timings = dict(self._round_log)
        if "announced" in timings and "first_upload" in timings:
            timings["negotiation_s"] = timings["first_upload"] - timings["announced"]
        this_round = {
            kind: n - self._bytes_before.get(kind, 0) for kind, n in self.bus.sent_bytes.items()
        }
        stats = {"round": round_, "bytes": self.bus.sent_bytes, "round_bytes": this_round,
                 "timings": timings}  # fmt: skip
        path = self.state.directory / "stats.json"
        with state_io("write", path):
            path.write_text(json.dumps(stats))
        if self.on_event is not None:
            self.on_event("stats", stats)

    # --- data ------------------------------------------------------------------------------------

    def _build_trainer(self) -> Trainer:
        from fairbus.training.local import Trainer

        t = self.config.training
        train, indices = own_share(self.config, self.roster, self.me, self.state)
        users = self.roster.with_role(Role.USER)
        return Trainer(
            t.model_name,
            train.subset(indices),
            t.train.for_task(len(train), len(users)),
            seed=trainer_seed(t.seed, self.me),
        )


def own_share(
    config: RuntimeConfig, roster: Roster, me: int, state: UserState
) -> tuple[Dataset, npt.NDArray[np.int64]]:
    """The task's training set and the indices of user ``me``'s share of it: the
    configuration's split, fixed in the user's state folder at its first start (a
    restart trains on the same data). Sets torch's threads first (``[training]
    threads``). Shared by the fairness user and the SecCL participant."""
    from fairbus.training.data import load_dataset, partition

    t = config.training
    if t.threads:
        import torch

        torch.set_num_threads(t.threads)
    train, _ = load_dataset(t.dataset, t.data_dir, seed=t.seed)
    users = sorted(roster.with_role(Role.USER))
    describe: dict[str, object] = {
        "dataset": t.dataset, "partition": t.partition, "alpha": t.alpha, "seed": t.seed,
        "users": users, "samples": len(train),
    }  # fmt: skip
    indices = state.partition(describe)
    if indices is None:
        parts = partition(train, len(users), t.partition, t.alpha, t.seed)
        indices = parts[users.index(me)]
        state.save_partition(describe, indices)
    return train, indices
