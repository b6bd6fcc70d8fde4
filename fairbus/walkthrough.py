"""A walkthrough of one group: three users negotiate keys, mask, and the provider unmasks.

Everything runs in one process, but every byte a real deployment would send is
produced and checked for real: identities on disk (0600), a roster, Shamir shares
sealed per recipient (Alg. 3), masked uploads (Alg. 4) in signed, hash-chained
envelopes, and the provider's aggregate decryption (Alg. 5). The models are real:
each user trains a small classifier on its third of scikit-learn's digits.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fairbus import envelope, keyneg, masking
from fairbus.envelope import GENESIS, ChainTracker
from fairbus.field import FieldVector, FixedPointCodec, sum_vectors
from fairbus.identity import Identity
from fairbus.roster import Member, Role, Roster
from fairbus.sealed import ReplayGuard, SealContext, open_share, seal_share
from fairbus.shamir import Share
from fairbus.training.models import flatten_params, load_params
from fairbus.wire.messages import MaskedUpload, vector_to_bytes

TASK = "walkthrough"
PROVIDER_ID = 0
USER_IDS = (1, 2, 3)


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
    seconds: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _train_users(
    seed: int,
) -> tuple[dict[int, npt.NDArray[np.float32]], Callable[[npt.NDArray[np.float32]], float]]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    torch.manual_seed(seed)
    initial = flatten_params(_model())
    parts = np.array_split(np.random.default_rng(seed).permutation(len(x_train)), len(USER_IDS))
    models: dict[int, npt.NDArray[np.float32]] = {}
    for uid, idx in zip(USER_IDS, parts, strict=True):
        model = _model()
        load_params(model, initial)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xs, ys = x_train[idx], y_train[idx]
        for _epoch in range(30):
            for start in range(0, len(xs), 64):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(
                    model(xs[start : start + 64]), ys[start : start + 64]
                )
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        models[uid] = flatten_params(model)

    def evaluate(flat: npt.NDArray[np.float32]) -> float:
        model = _model()
        load_params(model, flat)
        return _accuracy(model, x_test, y_test)

    return models, evaluate


def run(seed: int = 0, *, say: Callable[[str], None] = lambda _: None) -> WalkthroughReport:
    report = WalkthroughReport()

    def step(text: str) -> None:
        report.log.append(text)
        say(text)

    with tempfile.TemporaryDirectory(prefix="fairbus-walkthrough-") as tmp:
        keydir = Path(tmp) / "keys"
        for pid in (PROVIDER_ID, *USER_IDS):
            Identity.generate(pid).save(keydir)
        ids = {pid: Identity.load(keydir, pid) for pid in (PROVIDER_ID, *USER_IDS)}
        roster = Roster(
            TASK,
            [Member(ids[PROVIDER_ID].public, Role.PROVIDER, "provider")]
            + [Member(ids[u].public, Role.USER, f"user {u}") for u in USER_IDS],
        )
        (Path(tmp) / "roster.toml").write_text(roster.to_toml())
        step(
            f"identities for provider {PROVIDER_ID} and users {USER_IDS} written (0600); "
            "roster loaded"
        )

        t0 = time.perf_counter()
        models, evaluate = _train_users(seed)
        report.seconds["local training"] = time.perf_counter() - t0
        d = len(models[USER_IDS[0]])
        report.params = d
        for u in USER_IDS:
            report.user_accuracy[u] = evaluate(models[u])
        step(f"each user trained on its own third of the digits: {d:,} parameters per model")

        codec = FixedPointCodec()
        keying = keyneg.GroupKeying.of(USER_IDS)
        ctx = SealContext(TASK, round=1, attempt=0, group=0)
        guard = {u: ReplayGuard() for u in USER_IDS}

        # Alg. 3 lines 1-5: every user deals shares of a fresh random vector, sealed per recipient.
        t0 = time.perf_counter()
        dealt = {u: keyneg.deal_shares(keying, d) for u in USER_IDS}
        inbox: dict[int, list[bytes]] = {u: [] for u in USER_IDS}
        for u in USER_IDS:
            for v in USER_IDS:
                sealed = seal_share(ids[u], roster, v, ctx, "share", dealt[u].shares[v])
                inbox[v].append(sealed)
                report.bytes_sealed += len(sealed) if u != v else 0

        def receive(me: int, kind: str) -> dict[int, Share]:
            got: dict[int, Share] = {}
            for data in inbox[me]:
                opened = open_share(data, ids[me], roster, ctx)
                guard[me].admit(opened)
                if opened.kind == kind:
                    got[opened.sender] = opened.share
            return got

        # Lines 6-9: each user adds what it received and sends the sum to the others.
        summed = {u: keyneg.sum_received(keying, u, receive(u, "share")) for u in USER_IDS}
        inbox = {u: [] for u in USER_IDS}
        for u in USER_IDS:
            for v in USER_IDS:
                sealed = seal_share(ids[u], roster, v, ctx, "summed_share", summed[u])
                inbox[v].append(sealed)
                report.bytes_sealed += len(sealed) if u != v else 0
        # Lines 10-13: reconstruct s_g and derive sk_gi.
        keys: dict[int, FieldVector] = {}
        for u in USER_IDS:
            group_sum = keyneg.recover_group_sum(keying, receive(u, "summed_share"))
            keys[u] = keyneg.derive_key(dealt[u].rand, group_sum, keying.size)
        report.seconds["key negotiation (3 users)"] = time.perf_counter() - t0
        report.keys_sum_to_zero = keyneg.keys_sum_to_zero(list(keys.values()))
        step("keys negotiated over sealed shares (Alg. 3): Σ sk_gi ≡ 0 (mod p)")

        # Alg. 4: mask, sign with a hash-chain link, upload.
        t0 = time.perf_counter()
        uploads: list[bytes] = []
        for u in USER_IDS:
            masked = masking.mask_model(models[u], keys[u], codec, keying.size)
            signed = envelope.sign(
                ids[u],
                TASK,
                MaskedUpload(0, d, vector_to_bytes(masked)),
                prev=GENESIS,
                round=1,
                attempt=0,
            )
            uploads.append(signed.to_bytes())
            report.bytes_uploaded += len(uploads[-1])
        report.seconds["masking + signing (3 users)"] = time.perf_counter() - t0
        upload0 = envelope.open_envelope(uploads[0], roster).message
        assert isinstance(upload0, MaskedUpload)
        # What the provider would get from one upload alone: noise, a chance-level model.
        report.single_upload_accuracy = evaluate(codec.decode_mean(upload0.vector(), 1))
        step("masked uploads signed (Ed25519) and chained by hash (Alg. 4)")

        # Alg. 5: the provider verifies each upload and its chain link, then unmasks the group.
        t0 = time.perf_counter()
        chain = ChainTracker()
        vectors = []
        for data in uploads:
            verified = envelope.open_envelope(data, roster)
            chain.accept(verified.envelope)
            assert isinstance(verified.message, MaskedUpload)
            vectors.append(verified.message.vector())
        agg = masking.aggregate_decrypt(vectors, codec)
        report.seconds["verify + unmask (provider)"] = time.perf_counter() - t0
        plain_sum = sum_vectors([codec.encode(models[u], summands=keying.size) for u in USER_IDS])
        report.exact_field_sum = bool(np.array_equal(agg.field_sum, plain_sum))
        true_mean = np.mean([models[u].astype(np.float64) for u in USER_IDS], axis=0)
        report.max_mean_error = float(np.abs(agg.mean - true_mean).max())
        report.mean_accuracy = evaluate(agg.mean)
        digest = hashlib.sha256(agg.mean.tobytes()).hexdigest()[:16]
        step(f"provider recovered the group mean (Alg. 5), sha256 {digest}…")
    return report
