"""``fairbus walkthrough``: one group of three users, one round, step by step.

It drives the real machines — three :class:`~fairbus.protocol.user.UserMachine`\\ s and
the :class:`~fairbus.protocol.provider.ProviderMachine` — through the ledger's own
validation state machine (:class:`~fairbus.ledger.inprocess.InProcessLedger`), exactly as
``fairbus simulate`` and the networked runtime drive them (``docs/architecture.md``, "The
one path"): every ledger transaction a machine emits is committed and handed on with the
ledger node's signed receipt, every sealed share goes to its one recipient, and the
machines' effects (train a model, evaluate one) are carried out here and answered with
events. Nothing is written into a machine. The walkthrough only reads what passes
through it — the outputs and the events — to show each step: the sealed shares
(Alg. 3), the masked, signed, hash-chained uploads (Alg. 4), the exact recovery of the
group mean (Alg. 5), and that one upload alone decodes to a model at chance accuracy.

The models are real: each user trains a small classifier on its third of
scikit-learn's digits. The identities are written to disk (0600) and loaded back, as a
deployment's are.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fairbus import field as gf
from fairbus.envelope import GENESIS
from fairbus.errors import FairbusError
from fairbus.field import FieldVector, FixedPointCodec, sum_vectors
from fairbus.identity import Identity
from fairbus.keyneg import keys_sum_to_zero
from fairbus.ledger.inprocess import InProcessLedger
from fairbus.ledger.recorded import open_recorded
from fairbus.ledger.state import replay
from fairbus.protocol.events import (
    USERS,
    Commit,
    Evaluate,
    Evaluated,
    Output,
    Received,
    Refused,
    RoundDone,
    Send,
    StartRound,
    Train,
    Trained,
)
from fairbus.protocol.provider import ProviderConfig, ProviderMachine
from fairbus.protocol.user import UserMachine
from fairbus.roster import Member, Role, Roster
from fairbus.sealed import SealContext, SealedOuter, open_share
from fairbus.training.models import flatten_params, load_params
from fairbus.wire import codec
from fairbus.wire.limits import DEFAULT_LIMITS
from fairbus.wire.messages import Announce, Decision, MaskedUpload

TASK = "walkthrough"
PROVIDER_ID = 0
LEDGER_ID = 9
USER_IDS = (1, 2, 3)
CONFIG = ProviderConfig(basic_groupings=1, reference_groups=0)
"""One basic grouping of three users: one group."""

Model = npt.NDArray[np.float32]


@dataclass
class WalkthroughReport:
    """What the walkthrough measured; the CLI renders it."""

    params: int = 0
    user_accuracy: dict[int, float] = field(default_factory=dict)
    mean_accuracy: float = 0.0
    exact_field_sum: bool = False
    max_mean_error: float = 0.0
    keys_sum_to_zero: bool = False
    single_upload_accuracy: float = 0.0
    bytes_sealed: int = 0
    bytes_uploaded: int = 0
    ledger_blocks: int = 0
    ledger_replays: bool = False
    """The ledger's blocks re-validate from genesis (as ``fairbus audit`` does)."""
    seconds: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


# --- the users' data and models (the effects the machines ask for) ---------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class _Digits:
    """scikit-learn's digits: a test set, and a third of the training set per user."""

    def __init__(self, seed: int) -> None:
        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target)
        x_train, self.x_test, y_train, self.y_test = train_test_split(
            x, y, test_size=0.25, random_state=seed, stratify=y
        )
        torch.manual_seed(seed)
        self.initial = flatten_params(_model())
        order = np.random.default_rng(seed).permutation(len(x_train))
        self.parts = {
            u: (x_train[idx], y_train[idx])
            for u, idx in zip(USER_IDS, np.array_split(order, len(USER_IDS)), strict=True)
        }

    def train(self, user: int, start: Model) -> Model:
        """The :class:`Train` effect: local SGD from the global model on the user's part."""
        model = _model()
        load_params(model, start)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xs, ys = self.parts[user]
        for _epoch in range(30):
            for k in range(0, len(xs), 64):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xs[k : k + 64]), ys[k : k + 64])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        return flatten_params(model)

    def accuracy(self, flat: npt.NDArray[np.floating]) -> float:
        """The :class:`Evaluate` effect: test accuracy of a flat parameter vector."""
        model = _model()
        load_params(model, np.asarray(flat, dtype=np.float32))
        with torch.no_grad():
            return float((model(self.x_test).argmax(1) == self.y_test).float().mean())


# --- the walkthrough ------------------------------------------------------------------------


def _checked(outputs: list[Output], who: str) -> list[Output]:
    """The outputs, or a loud stop if a machine refused something (a bug here)."""
    refused = [o for o in outputs if isinstance(o, Refused)]
    if refused:
        raise FairbusError(f"{who} refused: {refused[0].reason}: {refused[0].detail}")
    return outputs


def _short(digest: bytes) -> str:
    return digest.hex()[:12] + "…"


def run(seed: int = 0, *, say: Callable[[str], None] = lambda _: None) -> WalkthroughReport:
    report = WalkthroughReport()

    def step(text: str) -> None:
        report.log.append(text)
        say(text)

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="fairbus-walkthrough-") as tmp:
        keydir = Path(tmp) / "keys"
        everyone = (PROVIDER_ID, LEDGER_ID, *USER_IDS)
        for pid in everyone:
            Identity.generate(pid).save(keydir)
        ids = {pid: Identity.load(keydir, pid) for pid in everyone}
        roster = Roster(
            TASK,
            [
                Member(ids[PROVIDER_ID].public, Role.PROVIDER, "provider"),
                Member(ids[LEDGER_ID].public, Role.LEDGER, "ledger node"),
            ]
            + [Member(ids[u].public, Role.USER, f"user {u}") for u in USER_IDS],
        )
        (Path(tmp) / "roster.toml").write_text(roster.to_toml())
        step(
            f"identities of provider {PROVIDER_ID}, ledger node {LEDGER_ID} and users "
            f"{', '.join(map(str, USER_IDS))} written to disk (0600) and loaded; roster built"
        )
        data = _Digits(seed)
        report.params = d = int(data.initial.size)
        ledger = InProcessLedger(roster, ids[LEDGER_ID], re_derive=False)  # its own MLP
        provider = ProviderMachine(ids[PROVIDER_ID], roster, data.initial, CONFIG)
        users = {u: UserMachine(ids[u], roster) for u in USER_IDS}

        def commit(out: Commit) -> bytes:
            """Commit on the ledger (its validation state machine admits it or raises);
            what goes on is the envelope with the ledger node's signed receipt."""
            with timed("ledger commits"):
                return ledger.commit(out.envelope)

        # --- 1. the provider starts the round: three ledger transactions ---------------------
        start = _checked(provider.handle(StartRound(time.time())), "the provider")
        broadcasts = [(o.kind, commit(o)) for o in start if isinstance(o, Commit)]
        assert all(isinstance(o, Commit) and o.to == USERS for o in start)
        announce = open_recorded(broadcasts[-1][1], roster).message
        assert isinstance(announce, Announce) and len(announce.groups) == 1
        group = announce.groups[0]
        codec = FixedPointCodec(announce.frac_bits)
        step(
            f"round 1: the provider's {', '.join(kind for kind, _ in broadcasts)} are "
            f"committed on the ledger (blocks 0-{ledger.height}) and reach every user with the "
            f"ledger node's signed receipt; the global model has {d:,} parameters "
            f"(sha256 {_short(announce.model_sha256)}), the grouping is one group "
            f"{group.members}, Shamir threshold {group.threshold}"
        )

        # --- 2. the users check it and deal sealed shares (Alg. 3, lines 2-4) ----------------
        trains: dict[int, Train] = {}
        shares: list[Send] = []
        with timed("key negotiation (3 users)"):
            for u, machine in users.items():
                for kind, recorded in broadcasts:
                    for out in _checked(machine.handle(Received(kind, recorded)), f"user {u}"):
                        if isinstance(out, Train):
                            trains[u] = out
                        elif isinstance(out, Send):
                            shares.append(out)
        report.bytes_sealed += sum(len(s.data) for s in shares)
        sample = shares[0]
        assert isinstance(sample.to, int)
        bystander = next(u for u in USER_IDS if u not in (sample.to, _sender(sample)))
        context = SealContext(TASK, 1, 0, group.gid)
        try:
            open_share(sample.data, ids[bystander], roster, context)
            sealed = False
        except FairbusError:
            sealed = True
        step(
            "each user checked the receipts and the grouping (no user's model follows from "
            "the group sums), was asked to train, and dealt Shamir shares of a fresh random "
            f"vector, each sealed for one other member (Alg. 3, lines 2-4): {len(shares)} "
            f"sealed shares, {report.bytes_sealed:,} bytes; user {bystander} "
            f"{'cannot' if sealed else 'CAN (a bug)'} open the share user {_sender(sample)} "
            f"sealed for user {sample.to}"
        )

        # --- 3. the Train effects: each user trains on its own third ------------------------
        models: dict[int, Model] = {}
        with timed("local training (3 users)"):
            for u, train in trains.items():
                models[u] = data.train(u, train.global_params)
        for u in USER_IDS:
            report.user_accuracy[u] = data.accuracy(models[u])
        step(
            "each user trained on its own third of the digits (test accuracy "
            + ", ".join(f"{report.user_accuracy[u]:.3f}" for u in USER_IDS)
            + "); the models never leave the users"
        )

        # --- 4. shares in, summed shares out, until each derives its key (lines 7-12) -------
        inbox, summed = shares, 0
        with timed("key negotiation (3 users)"):
            while inbox:
                sent: list[Send] = []
                for share in inbox:
                    assert isinstance(share.to, int)
                    outputs = _checked(
                        users[share.to].handle(Received(share.kind, share.data)),
                        f"user {share.to}",
                    )
                    sent += [o for o in outputs if isinstance(o, Send)]
                summed += len(sent)
                report.bytes_sealed += sum(len(s.data) for s in sent)
                inbox = sent
        step(
            f"each user added the shares it received and sent the sum, sealed, to the others "
            f"(lines 7-8: {summed} more sealed shares), reconstructed the group's sum s_g "
            f"from them and derived its key sk_gi = rand_gi − s_g / {len(group.members)} "
            "(lines 11-12)"
        )

        # --- 5. the Trained events: masked, signed, chained uploads (Alg. 4) ------------------
        uploads: dict[int, tuple[Commit, bytes]] = {}
        before = ledger.height
        with timed("masking + signing (3 users)"):
            for u in USER_IDS:
                outputs = _checked(users[u].handle(Trained(1, models[u])), f"user {u}")
                (upload,) = [o for o in outputs if isinstance(o, Commit)]
                uploads[u] = (upload, commit(upload))
        report.bytes_uploaded = sum(len(recorded) for _, recorded in uploads.values())
        masked: dict[int, FieldVector] = {}
        for u, (_, recorded) in uploads.items():
            body = open_recorded(recorded, roster).message
            assert isinstance(body, MaskedUpload)
            masked[u] = body.vector()
        # Only the walkthrough knows the plaintext models: it can recover each key as
        # upload − encoding, and show that the keys cancel (Eq. 1).
        encodings = {u: codec.encode(models[u], summands=len(USER_IDS)) for u in USER_IDS}
        keys = [gf.sub(masked[u], encodings[u]) for u in USER_IDS]
        report.keys_sum_to_zero = keys_sum_to_zero(keys)
        prev = uploads[USER_IDS[0]][0].envelope.header.prev
        step(
            "each user masked its model with its key (Alg. 4, in GF(2^31 − 1)), signed the "
            "upload (Ed25519) with the hash of its previous transaction as its chain link "
            f"(prev = {'genesis: this is its first' if prev == GENESIS else _short(prev)}) and "
            "committed it; the ledger recorded header, signature and link — the payload's "
            f"SHA-256, not the payload (blocks {before + 1}-{ledger.height}). The keys, "
            "recovered here as upload − encoding (only the walkthrough knows the models), "
            f"cancel: Σ sk_gi ≡ 0 (mod p): {'yes' if report.keys_sum_to_zero else 'NO'}"
        )
        alone = codec.decode_mean(masked[USER_IDS[0]], 1)
        report.single_upload_accuracy = data.accuracy(alone)
        step(
            f"user {USER_IDS[0]}'s masked upload alone, decoded as a model: test accuracy "
            f"{report.single_upload_accuracy:.3f} (chance is 0.1): noise to whoever sees it"
        )

        # --- 6. the provider: receipts, signatures, chain links, then Alg. 5 ----------------
        evaluate: list[Evaluate] = []
        with timed("verify + unmask (provider)"):
            for u in USER_IDS:
                _, recorded = uploads[u]
                outputs = _checked(provider.handle(Received("upload", recorded)), "the provider")
                evaluate += [o for o in outputs if isinstance(o, Evaluate)]
        (effect,) = evaluate
        true_mean = np.mean([models[u].astype(np.float64) for u in USER_IDS], axis=0)
        report.max_mean_error = float(np.abs(effect.params - true_mean).max())
        report.mean_accuracy = data.accuracy(effect.params)
        step(
            "the provider checked each upload's receipt, signature and chain link, and "
            "summed the group's uploads (Alg. 5): the keys cancel, and the mean of the three "
            f"models comes out (sha256 {_short(hashlib.sha256(effect.params.tobytes()).digest())}"
            f", within {report.max_mean_error:.1e} of the true mean, test accuracy "
            f"{report.mean_accuracy:.3f})"
        )

        # --- 7. the Evaluate effect; evaluation and decision (Alg. 6) on the ledger ---------
        outputs = _checked(
            provider.handle(
                Evaluated(effect.round, effect.attempt, effect.gid, report.mean_accuracy)
            ),
            "the provider",
        )
        recorded_after = [(o.kind, commit(o)) for o in outputs if isinstance(o, Commit)]
        (done,) = [o for o in outputs if isinstance(o, RoundDone)]
        (outcome,) = done.groups
        plain_sum = sum_vectors([encodings[u] for u in USER_IDS])
        report.exact_field_sum = bool(np.array_equal(outcome.field_sum, plain_sum))
        step(
            "decrypted field sum == Σ of the users' plaintext encodings, bit for bit: "
            + ("yes" if report.exact_field_sum else "NO")
        )
        for u, machine in users.items():
            for kind, recorded in recorded_after:
                _checked(machine.handle(Received(kind, recorded)), f"user {u}")
        decision = open_recorded(recorded_after[-1][1], roster).message
        assert isinstance(decision, Decision)
        step(
            f"the provider's {' and '.join(k for k, _ in recorded_after)} are committed: the "
            f"ledger re-derived the decision by Alg. 6 (τ = {decision.tau:.3f}, violators: "
            f"{list(decision.violators) or 'none'}) before taking it"
        )

        # --- 8. the ledger, as an auditor sees it ----------------------------------------------
        report.ledger_blocks = len(ledger.blocks)
        try:
            replayed = replay(roster, ledger.blocks)
            report.ledger_replays = replayed.head_hash == ledger.state.head_hash
        except FairbusError:
            report.ledger_replays = False
        step(
            f"the ledger's {report.ledger_blocks} blocks replay from genesis through the same "
            "validation (every signature, chain link and the decision re-checked): "
            + ("OK" if report.ledger_replays else "FAILED")
        )
    return report


def _sender(share: Send) -> int:
    """Who sealed ``share`` (named in clear on the outside, for routing)."""
    return SealedOuter.from_wire(
        codec.unpack(share.data, DEFAULT_LIMITS), "sealed", DEFAULT_LIMITS
    ).sender
