"""``fairbus user --id N`` for a task whose mode is ``seccl``: a SecCL participant
(:class:`fairbus.protocol.seccl_user.SecclUserMachine`) driven over the bus.

SecCL ("Message Interaction Protocol", the paper's Fig. 3): the driver hands the
machine, unparsed, the server's recorded broadcasts (global model, announcement, a
deadline's close, the election's candidates on ``…/provider/<id>/<type>``) and the other
participants' recorded type (a) messages (``…/user/+/seccl_update``, on the bulletin
board for every participant); the machine checks each receipt (the paper's Tx-ID) and
signature before acting. It carries out what comes back: :class:`Train` runs the local
training in a worker thread; :class:`EvaluatePeers` evaluates each other participant's
change applied to the global model on this participant's own validation data (the
macro F-score, SecCL's "Experimental Evaluation") in a worker thread; a
:class:`Commit` (its type (a) or type (b) message) is committed on the ledger (a change
as its header only; the ledger nodes keep the payload from the bus) and then published
with its receipt on ``…/user/<me>/<type>``. When the ledger does not record one, the
machine is given the ledger's head for this user (:class:`ChainHead`).

The data: the user's share of the training set (fixed in its state folder, as for the
fairness user, :func:`fairbus.runtime.user.own_share`), of which it keeps 20% (a
seeded permutation, :func:`fairbus.seccl_simulation.validation_split`, the simulator's)
as its private validation data and trains on the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fairbus import topics
from fairbus.protocol.events import (
    ChainHead,
    Commit,
    EvaluatePeers,
    PeersEvaluated,
    Received,
    Refused,
    SecclEvent,
    SecclOutput,
    Train,
    Trained,
)
from fairbus.protocol.seccl_user import SecclUserMachine
from fairbus.roster import Role
from fairbus.runtime.config import RuntimeConfig
from fairbus.runtime.participant import UserParticipant, route_from_ledger
from fairbus.runtime.state import state_io
from fairbus.runtime.user import own_share
from fairbus.seccl import macro_f_score
from fairbus.seccl_simulation import VALIDATION_SHARE, validation_split
from fairbus.training.attacks import Attack
from fairbus.training.config import attack_seed, trainer_seed

if TYPE_CHECKING:
    from fairbus.training.local import Evaluator, Trainer

log = logging.getLogger("fairbus.user")

SERVER_KINDS = frozenset({"global_model", "seccl_announce", "seccl_close", "seccl_candidates"})
"""What a participant takes from the server's topics (each with its receipt)."""


class SecclUserRuntime(UserParticipant):
    """A SecCL participant on the bus; :meth:`run` takes part until cancelled."""

    def __init__(self, config: RuntimeConfig, user_id: int, attack: Attack | None = None) -> None:
        super().__init__(config, user_id, attack)
        self._inbox: asyncio.Queue[SecclEvent] = asyncio.Queue()
        self._work: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        """One training or evaluation at a time: they share torch's threads."""
        self._trainer: Trainer | None = None
        self._validator: Evaluator | None = None
        self.bus.subscriptions = [topics.provider_messages(self.task),
                                  topics.seccl_changes(self.task), *self.ledger.topics]  # fmt: skip
        self.machine = SecclUserMachine(self.identity, self.roster)
        self._timings: dict[str, float] = {}

    # --- bus ---------------------------------------------------------------------------------

    def _on_message(self, topic: str, data: bytes) -> None:
        """Route by topic; the bytes go to the machine (or the ledger client) unparsed."""
        parsed = route_from_ledger(self.task, self.ledger, topic, data)
        if parsed is None:
            return
        if parsed.recipient is not None:
            return
        from_server = parsed.role == Role.PROVIDER.value and parsed.kind in SERVER_KINDS
        change = parsed.role == Role.USER.value and parsed.kind == "seccl_update"
        if (from_server or change) and parsed.sender != self.me:
            self._inbox.put_nowait(Received(parsed.kind, data))

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled, or refused by the broker
        (:class:`~fairbus.runtime.connection.BrokerLoginError`)."""
        await asyncio.to_thread(self._load_data)
        try:
            await self.bus.serve(self._take_part())
        finally:
            for task in self._work:
                task.cancel()

    async def _take_part(self) -> None:
        await self.bus.connected.wait()
        await self._resume_chain()
        log.info("user %d: ready for SecCL (%s)", self.me, self.config.training.dataset)
        while True:
            await self._carry_out(self.machine.handle(await self._inbox.get()))

    async def _resume_chain(self) -> None:
        """Continue from the ledger's head for this user (:meth:`_chain_head`)."""
        await self._carry_out(self.machine.handle(ChainHead(self.me, await self._chain_head())))

    async def _carry_out(self, outputs: list[SecclOutput]) -> None:
        for out in outputs:
            if isinstance(out, Commit):
                await self._commit(out)
            elif isinstance(out, Train | EvaluatePeers):
                task = asyncio.create_task(self._effect(out))
                self._work.add(task)
                task.add_done_callback(self._work.discard)
            elif isinstance(out, Refused):
                log.warning("user %d refused a message: %s: %s", self.me, out.reason, out.detail)
                self.metrics.refused(out.reason)

    async def _effect(self, effect: Train | EvaluatePeers) -> None:
        """Train or evaluate in a worker thread, answer the machine through the inbox."""
        async with self._lock:
            start = time.perf_counter()
            try:
                if isinstance(effect, Train):
                    answer: SecclEvent = Trained(
                        effect.round, await asyncio.to_thread(self._train, effect)
                    )
                    phase = "training"
                else:
                    scores = await asyncio.to_thread(self._evaluate, effect)
                    answer, phase = PeersEvaluated(effect.round, scores), "evaluation"
            except Exception:
                log.exception("user %d: %s for round %d failed", self.me,
                              type(effect).__name__, effect.round)  # fmt: skip
                return
        seconds = time.perf_counter() - start
        self._timings[f"{phase}_s"] = seconds
        self.metrics.phase(phase, seconds)
        self._inbox.put_nowait(answer)

    def _train(self, effect: Train) -> npt.NDArray[np.float32]:
        assert self._trainer is not None
        seed = attack_seed(self.config.training.seed, self.me, effect.round)
        return self.attack.local_model(effect.global_params, self._trainer, seed=seed)

    def _evaluate(self, effect: EvaluatePeers) -> dict[int, float]:
        """Each other participant's change, applied to the global model, scored on this
        participant's own validation data with the macro F-score; 0 for a malformed
        change or a model that diverged."""
        validator = self._validator
        assert validator is not None
        scores: dict[int, float] = {}
        for other, params in effect.models.items():
            if params is None or not np.isfinite(params).all():
                scores[other] = 0.0
            else:
                scores[other] = macro_f_score(validator.labels, validator.predict(params))
        return scores

    async def _commit(self, out: Commit) -> None:
        """Commit on the ledger, then publish with the receipt."""
        seconds = await self._commit_and_publish(out, self.machine.round)
        if seconds is None:
            return
        self._timings[f"{out.kind}_ledger_s"] = seconds
        self._write_stats()

    def _write_stats(self) -> None:
        """``stats.json``: bytes sent per message kind, and the round's timings."""
        stats = {"round": self.machine.round, "bytes": self.bus.sent_bytes,
                 "timings": dict(self._timings)}  # fmt: skip
        path = self.state.directory / "stats.json"
        with state_io("write", path):
            path.write_text(json.dumps(stats))

    # --- data ------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        """The user's share of the training set, 20% of it kept as its private
        validation data (SecCL's F-scores), the rest to train on."""
        from fairbus.training.local import Evaluator, Trainer

        t = self.config.training
        train, indices = own_share(self.config, self.roster, self.me, self.state)
        fit, held = validation_split(len(indices), VALIDATION_SHARE, t.seed, self.me)
        users = self.roster.with_role(Role.USER)
        self._trainer = Trainer(
            t.model_name,
            train.subset(indices[fit]),
            t.train.for_task(len(train), len(users)),
            seed=trainer_seed(t.seed, self.me),
        )
        self._validator = Evaluator(t.model_name, train.subset(indices[held]))
