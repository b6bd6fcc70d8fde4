"""Models, offline data loaders (on small files written here), partitions, attacks."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fairbus.errors import FairbusError
from fairbus.training.attacks import Attack, Behaviour
from fairbus.training.config import MAX_LOCAL_STEPS, equal_local_steps
from fairbus.training.data import (
    Dataset,
    DatasetError,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)
from fairbus.training.layout import FEATURE_VALUES, feature_values
from fairbus.training.local import Evaluator, TrainConfig, Trainer
from fairbus.training.models import (
    build_model,
    count_parameters,
    flatten_params,
    initial_params,
    load_params,
)
from fairbus.training.sgd import MomentumSGD


def test_the_papers_mnist_cnn_has_582026_parameters() -> None:
    model = build_model("mnist_cnn")
    assert count_parameters(model) == 582_026
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model if isinstance(m, torch.nn.MaxPool2d)]
    fcs = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(pools), len(fcs)) == (2, 2, 2)
    cifar = build_model("cifar10_cnn")
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    counts = [
        sum(isinstance(m, t) for m in cifar)
        for t in (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.Linear)
    ]
    assert counts == [8, 4, 3]


@pytest.mark.parametrize("name", sorted(FEATURE_VALUES))
def test_the_feature_layers_are_the_leading_convolutional_parameters(name: str) -> None:
    model = build_model(name)
    convolutional = [
        p for m in model.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters()
    ]
    leading = list(model.parameters())[: len(convolutional)]
    assert all(a is b for a, b in zip(leading, convolutional, strict=True))
    assert feature_values(name) == FEATURE_VALUES[name] == sum(p.numel() for p in convolutional)
    assert feature_values(None) is None and feature_values("resnet") is None


def test_flatten_and_load_round_trip() -> None:
    flat = initial_params("digits_cnn", seed=3)
    model = build_model("digits_cnn")
    load_params(model, flat)
    np.testing.assert_array_equal(flatten_params(model), flat)
    np.testing.assert_array_equal(initial_params("digits_cnn", seed=3), flat)


def _idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x803, *images.shape) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


def test_mnist_idx_files_plain_and_gzipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (20, 28, 28))
    train_y = rng.integers(0, 10, 20)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(train_x))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(train_y))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(train_x[:5])))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(train_y[:5])))
    train, test = load_mnist(tmp_path)
    assert train.x.shape == (20, 1, 28, 28) and len(test) == 5
    assert train.x.max() <= 1.0
    np.testing.assert_array_equal(train.y.numpy(), train_y)
    np.testing.assert_allclose(train.x[3, 0].numpy(), train_x[3] / 255.0, rtol=1e-6)
    train2, _ = load_dataset("mnist", tmp_path)
    assert len(train2) == 20


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (struct.pack(">IIII", 0x999, 1, 2, 2) + b"\0" * 4, "magic"),
        (struct.pack(">IIII", 0x803, 5, 28, 28) + b"\0" * 10, "header says"),
        (b"\0\0", "too short"),
    ],
)
def test_malformed_idx_is_refused(tmp_path: Path, images: bytes, message: str) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(np.zeros(1)))
    with pytest.raises(DatasetError, match=message):
        load_mnist(tmp_path)


def test_missing_files_and_bad_gzip(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match="gzip"):
        load_mnist(tmp_path)
    with pytest.raises(DatasetError, match="needs a data directory"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset("imagenet")


def _cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"testing batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [b"x.png"] * n,
    }
    return pickle.dumps(batch, protocol=2)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    for k in range(1, 6):
        (tmp_path / f"data_batch_{k}").write_bytes(_cifar_batch(4, k))
    (tmp_path / "test_batch").write_bytes(_cifar_batch(3, 9))
    train, test = load_cifar10(tmp_path)
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) <= 1.0


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned",))


def test_cifar10_unpickler_refuses_code(tmp_path: Path) -> None:
    for k in range(1, 6):
        (tmp_path / f"data_batch_{k}").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DatasetError, match="never should"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path)


def test_partitions() -> None:
    parts = partition_iid(100, 9, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    labels = np.repeat(np.arange(10), 30)
    skewed = partition_dirichlet(labels, 5, alpha=0.1, seed=2)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(300))
    assert all(len(p) >= 10 for p in skewed)
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in skewed]
    assert np.mean(dominant) > 0.3  # non-IID: each user is dominated by few classes
    with pytest.raises(DatasetError):
        partition_iid(3, 9, seed=0)


def test_the_classes_partition_gives_each_user_two_or_three_classes() -> None:
    labels = np.repeat(np.arange(10), 30)
    parts = partition_classes(labels, 9, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))  # each sample once
    held = [set(labels[p].tolist()) for p in parts]
    assert [len(h) for h in held] == [2, 3] * 4 + [2]
    assert set().union(*held) == set(range(10))  # every class is someone's
    assert len({frozenset(h) for h in held}) > 4  # not the same few sets over and over
    for cls in range(10):  # a class is split equally among the users holding it
        shares = [
            int((labels[p] == cls).sum()) for p, h in zip(parts, held, strict=True) if cls in h
        ]
        assert max(shares) - min(shares) <= 1
    assert [p.tolist() for p in partition_classes(labels, 9, seed=3)] == [p.tolist() for p in parts]
    few = partition_classes(labels, 2, seed=3)  # room for five of the ten classes
    assert [len({int(c) for c in labels[p]}) for p in few] == [2, 3]
    with pytest.raises(DatasetError, match="two or three of 2 classes"):
        partition_classes(np.repeat(np.arange(2), 30), 4, seed=0)


def test_the_quantity_partition_draws_unequal_shares_of_iid_data() -> None:
    parts = partition_quantity(900, 9, alpha=0.5, seed=4)
    assert sorted(np.concatenate(parts).tolist()) == list(range(900))
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 10 and sizes[-1] > 3 * sizes[0]  # some users hold far less
    with pytest.raises(DatasetError, match="alpha must be > 0"):
        partition_quantity(900, 9, alpha=0.0, seed=4)
    with pytest.raises(DatasetError, match="cannot give 9 users 10 each"):
        partition_quantity(80, 9, alpha=0.5, seed=4)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    train, test = load_digits()
    return train.subset(np.arange(450)), test


def test_local_training_learns_digits(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    trainer = Trainer("digits_cnn", train, TrainConfig(local_epochs=25), seed=0)
    evaluator = Evaluator("digits_cnn", test)
    start = initial_params("digits_cnn", 0)
    trained = trainer.train(start)
    assert evaluator.accuracy(trained) > evaluator.accuracy(start) + 0.5


def test_attacks(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    start = initial_params("digits_cnn", 0)
    free = Attack(Behaviour.FREE_RIDER).local_model(
        start, Trainer("digits_cnn", train, TrainConfig(local_epochs=1), 0), 0
    )
    np.testing.assert_array_equal(free, start)
    noisy = Attack(Behaviour.DISGUISED_FREE_RIDER, noise_std=1e-3).local_model(start, None, 0)  # type: ignore[arg-type]
    assert 0 < np.abs(noisy - start).max() < 1e-2
    honest = Trainer("digits_cnn", train, TrainConfig(local_epochs=1), seed=5).train(start)
    poison = Attack(Behaviour.POISONER, poison_scale=2.0).local_model(
        start, Trainer("digits_cnn", train, TrainConfig(local_epochs=1), seed=5), 0
    )
    np.testing.assert_allclose(poison, start - 2.0 * (honest - start), rtol=1e-5, atol=1e-6)
    evaluator = Evaluator("digits_cnn", test)
    cfg = TrainConfig(local_epochs=25)
    flipped = Attack(Behaviour.LABEL_FLIPPER).local_model(
        start, Trainer("digits_cnn", train, cfg, 1), 0
    )
    good = Trainer("digits_cnn", train, cfg, 1).train(start)
    assert evaluator.accuracy(flipped) < 0.2 < evaluator.accuracy(good)


def _two_classes(digits: tuple[Dataset, Dataset]) -> Dataset:
    train, _ = digits
    return train.subset(np.flatnonzero(train.y.numpy() < 2))


def test_the_restricted_softmax_scales_only_the_absent_classes_logits(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, _ = digits
    two = _two_classes(digits)
    trainer = Trainer("digits_cnn", two, TrainConfig(absent_class_scale=0.25), seed=0)
    scale = trainer.logit_scale(two.y)
    assert scale is not None
    assert scale.tolist() == [1.0, 1.0] + [0.25] * 8
    assert trainer.logit_scale(train.y) is None  # every class held: plain softmax
    plain = Trainer("digits_cnn", two, TrainConfig(absent_class_scale=1.0), seed=0)
    assert plain.logit_scale(two.y) is None


def test_a_user_holding_every_class_trains_the_same_with_or_without_it(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, _ = digits
    start = initial_params("digits_cnn", 0)
    runs = [
        Trainer("digits_cnn", train, TrainConfig(local_steps=5, absent_class_scale=s), 3).train(
            start
        )
        for s in (0.5, 1.0)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_the_restricted_softmax_keeps_a_two_class_user_from_forgetting_the_others(
    digits: tuple[Dataset, Dataset],
) -> None:
    # Issue 13: start from a model that knows every class, train on two classes only;
    # the plain softmax forgets the other eight, the restricted one keeps more of them.
    train, test = digits
    start = Trainer("digits_cnn", train, TrainConfig(local_epochs=60), seed=0).train(
        initial_params("digits_cnn", 0)
    )
    others = test.subset(np.flatnonzero(test.y.numpy() >= 2))
    evaluator = Evaluator("digits_cnn", others)
    kept = {
        scale: evaluator.accuracy(
            Trainer(
                "digits_cnn",
                _two_classes(digits),
                TrainConfig(local_steps=60, absent_class_scale=scale),
                1,
            ).train(start)
        )
        for scale in (1.0, 0.5)
    }
    assert evaluator.accuracy(start) > 0.85  # measured 0.93
    assert kept[1.0] < 0.5 < kept[0.5], kept  # measured 0.27 and 0.78


def test_the_proximal_term_keeps_a_users_model_nearer_the_global_one(
    digits: tuple[Dataset, Dataset],
) -> None:
    start = initial_params("digits_cnn", 0)
    two = _two_classes(digits)
    distance = {
        mu: float(
            np.linalg.norm(
                Trainer("digits_cnn", two, TrainConfig(local_steps=30, proximal_mu=mu), 2).train(
                    start
                )
                - start
            )
        )
        for mu in (0.0, 1.0, 10.0)
    }
    assert distance[0.0] > distance[1.0] > distance[10.0] > 0, distance


@pytest.mark.parametrize("mu", [-0.1, 100.5, True, "1", float("nan")])
def test_a_bad_proximal_mu_is_refused(mu: object) -> None:
    with pytest.raises(FairbusError, match="proximal_mu"):
        TrainConfig(proximal_mu=mu)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [-0.1, 1.01, True, "0.5", float("nan")])
def test_a_bad_absent_class_scale_is_refused(scale: object) -> None:
    with pytest.raises(FairbusError, match="absent_class_scale"):
        TrainConfig(absent_class_scale=scale)  # type: ignore[arg-type]


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every local SGD step count itself; returns the counter (one element)."""
    counter = [0]
    step = MomentumSGD.step

    def counting(self: MomentumSGD) -> None:
        counter[0] += 1
        step(self)

    monkeypatch.setattr(MomentumSGD, "step", counting)
    return counter


@pytest.mark.parametrize("samples", [20, 64, 150, 450])
@pytest.mark.parametrize("steps", [1, 7, 47])
def test_local_steps_takes_exactly_that_many_steps(
    digits: tuple[Dataset, Dataset], samples: int, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However much data a user holds: exactly ``local_steps`` full batches, every sample
    used as often as any other (to within one), and ``train`` steps that often."""
    data = digits[0].subset(np.arange(samples))
    config = TrainConfig(local_steps=steps)
    assert config.steps_per_round(samples) == steps
    batches = list(Trainer("digits_cnn", data, config, seed=3).batches())
    assert len(batches) == steps
    assert all(len(b) == min(config.batch_size, samples) for b in batches)
    uses = np.bincount(torch.cat(batches).numpy(), minlength=samples)
    assert uses.max() - uses.min() <= 1
    counter = _count_steps(monkeypatch)
    Trainer("digits_cnn", data, config, seed=3).train(initial_params("digits_cnn", 0))
    assert counter[0] == steps


def test_local_steps_is_deterministic_per_seed(digits: tuple[Dataset, Dataset]) -> None:
    data = digits[0].subset(np.arange(100))
    start = initial_params("digits_cnn", 0)
    config = TrainConfig(local_steps=5)
    one = Trainer("digits_cnn", data, config, seed=4).train(start)
    again = Trainer("digits_cnn", data, config, seed=4).train(start)
    other = Trainer("digits_cnn", data, config, seed=5).train(start)
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)


@pytest.mark.parametrize("samples", [55, 150, 450])
def test_no_local_steps_keeps_local_epochs_passes(
    digits: tuple[Dataset, Dataset], samples: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None: ``local_epochs`` shuffled passes of ``batch_size`` batches, the last one of a
    pass shorter, in the same order as before ``local_steps`` existed."""
    data = digits[0].subset(np.arange(samples))
    config = TrainConfig(local_epochs=3)
    generator = torch.Generator().manual_seed(6)
    expected = []
    for _ in range(3):
        order = torch.randperm(samples, generator=generator)
        expected += [order[s : s + 64] for s in range(0, samples, 64)]
    batches = list(Trainer("digits_cnn", data, config, seed=6).batches())
    assert len(batches) == len(expected) == config.steps_per_round(samples)
    assert all(torch.equal(b, e) for b, e in zip(batches, expected, strict=True))
    counter = _count_steps(monkeypatch)
    Trainer("digits_cnn", data, config, seed=6).train(initial_params("digits_cnn", 0))
    assert counter[0] == 3 * -(-samples // 64)


def test_attacks_that_train_take_the_same_local_steps(
    digits: tuple[Dataset, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = digits[0].subset(np.arange(30))
    start = initial_params("digits_cnn", 0)
    config = TrainConfig(local_steps=4)
    honest = Trainer("digits_cnn", data, config, seed=2).train(start)
    poison = Attack(Behaviour.POISONER).local_model(
        start, Trainer("digits_cnn", data, config, seed=2), 0
    )
    np.testing.assert_allclose(poison, start - (honest - start), rtol=1e-5, atol=1e-6)
    counter = _count_steps(monkeypatch)
    Attack(Behaviour.LABEL_FLIPPER).local_model(start, Trainer("digits_cnn", data, config, 2), 0)
    assert counter[0] == 4


@pytest.mark.parametrize("steps", [0, -1, MAX_LOCAL_STEPS + 1, True, 2.5, "10"])
def test_bad_local_steps_are_refused(steps: object) -> None:
    with pytest.raises(FairbusError, match="local_steps must be None or an integer"):
        TrainConfig(local_steps=steps)  # type: ignore[arg-type]
    assert TrainConfig(local_steps=MAX_LOCAL_STEPS).steps_per_round(1) == MAX_LOCAL_STEPS


@pytest.mark.parametrize(
    ("samples", "users", "expected"),
    [(1347, 9, 60), (1347, 30, 20), (60_000, 9, 20 * 105), (10, 9, 20), (1, 1, 20)],
)
def test_equal_steps_are_an_average_users_local_epochs(
    samples: int, users: int, expected: int
) -> None:
    """local_epochs passes in batches of batch_size over ceil(samples / users) samples."""
    config = TrainConfig()
    assert equal_local_steps(config, samples, users) == expected
    resolved = config.for_task(samples, users)
    assert resolved.local_steps == expected
    assert resolved.steps_per_round(3) == resolved.steps_per_round(3_000) == expected


def test_equal_steps_leave_an_explicit_count_or_per_user_epochs_alone() -> None:
    assert TrainConfig(local_steps=7).for_task(1347, 9).local_steps == 7
    per_user = TrainConfig(equal_steps=False)
    assert per_user.for_task(1347, 9) is per_user
    assert per_user.steps_per_round(64) < per_user.steps_per_round(640)
    with pytest.raises(FairbusError, match="no local steps"):
        TrainConfig().for_task(0, 9)


@pytest.mark.parametrize("model_name", ["digits_cnn", "mnist_cnn"])
def test_local_sgd_is_torch_optims_sgd_to_the_bit(model_name: str) -> None:
    # fairbus.training.sgd.MomentumSGD stands in for torch.optim.SGD (whose first use
    # imports torch._dynamo): the same parameters after every step, bit for bit.
    torch.manual_seed(0)
    shape = (12, 1, 8, 8) if model_name == "digits_cnn" else (12, 1, 28, 28)
    x, y = torch.rand(shape), torch.randint(0, 10, (12,))
    models = [build_model(model_name) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = MomentumSGD(models[0].parameters(), lr=0.01, momentum=0.9)
    theirs = torch.optim.SGD(models[1].parameters(), lr=0.01, momentum=0.9)
    start = flatten_params(models[0])
    for step in range(4):
        for model, opt in ((models[0], ours), (models[1], theirs)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[step::2]), y[step::2])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        assert np.array_equal(flatten_params(models[0]), flatten_params(models[1]))
    assert not np.array_equal(flatten_params(models[0]), start)
