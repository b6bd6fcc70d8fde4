"""Issue 16, item 3: a round's group models evaluated together
(:meth:`fairbus.evaluation.ExactEvaluator.corrects`) give, model by model, the very counts
(and logits) of one pass per model (:meth:`~fairbus.evaluation.ExactEvaluator.
correct_unbatched`): on the digits test set and on small synthetic ones, for one model and
several, across chunks of samples and passes of models, with and without the first
layer's cached im2col, for models of every layer pattern the evaluation runs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from fairbus import evaluation
from fairbus.bench.evaluation import digits_test_set, synthetic_test_set
from fairbus.evaluation import EvaluationError, ExactEvaluator, ExactScore, QuantizedTestSet
from fairbus.training import models as model_registry
from fairbus.training.models import initial_params
from tests.support_draws import SeededDraws


def _models(name: str, count: int, seed: int = 0) -> list[npt.NDArray[np.float32]]:
    """``count`` different models: initial ones from different seeds, scaled and
    perturbed well beyond an initial model's spread."""
    rng = SeededDraws(seed)
    out = []
    for k in range(count):
        params = initial_params(name, seed + k).astype(np.float64)
        out.append((params * 4.0 + rng.normal(0.0, 0.3, params.size)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def digits() -> ExactEvaluator:
    return ExactEvaluator("digits_cnn", digits_test_set())


def test_batched_counts_equal_one_pass_per_model_on_digits(digits: ExactEvaluator) -> None:
    models = _models("digits_cnn", 8)
    reference = [digits.score_unbatched(params) for params in models]
    assert len({r.correct for r in reference}) > 1  # different models: a mix-up would show
    assert len({r.rank_sum for r in reference}) > 1
    assert digits.scores(models) == reference
    assert digits.corrects(models) == [r.correct for r in reference]
    assert [digits.correct(params) for params in models] == [r.correct for r in reference]
    assert digits.scores(models[:1]) == reference[:1]  # G = 1
    assert digits.scores(models[::-1]) == reference[::-1]
    assert digits.accuracies(models) == [r.correct / len(digits.test_set) for r in reference]
    assert [r.mean_rank for r in reference] == [r.rank_sum / r.samples for r in reference]


def test_batched_logits_are_the_reference_logits(digits: ExactEvaluator) -> None:
    """Stronger than the counts: every logit of every model is the same integer."""
    models = _models("digits_cnn", 3, seed=7)
    quantized = [evaluation._quantized_weights(p.astype(np.float64), digits.layers)
                 for p in models]  # fmt: skip
    x = torch.from_numpy(digits.test_set.inputs)
    with torch.no_grad():
        many = evaluation._forward_many(
            x, digits.layers, evaluation._stacked(quantized, digits.layers), None,
            evaluation._Scratch(),
        ).numpy()  # fmt: skip
        for k, weights in enumerate(quantized):
            one = evaluation._forward(x, digits.layers, weights).numpy()
            assert np.array_equal(many[k], one)


def test_chunks_of_samples_and_passes_of_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 samples in chunks of 7 (the last one short) and 5 models in passes of 3 and
    2, on the paper's MNIST CNN: the counts of one pass per model."""
    evaluator = ExactEvaluator("mnist_cnn", synthetic_test_set("mnist_cnn", 40))
    models = _models("mnist_cnn", 5, seed=3)
    reference = [evaluator.score_unbatched(params) for params in models]
    monkeypatch.setattr(evaluation, "MIN_CHUNK", 7)
    monkeypatch.setattr(evaluation, "WORK_BYTES", 21 * evaluator._sample_bytes)
    assert evaluator.scores(models) == reference
    monkeypatch.setattr(evaluation, "WORK_BYTES", 1)  # one sample, one model at a time
    assert evaluator.scores(models[:2]) == reference[:2]


def test_with_and_without_the_cached_first_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    test_set = synthetic_test_set("digits_cnn", 100)
    models = _models("digits_cnn", 4, seed=11)
    cached = ExactEvaluator("digits_cnn", test_set)
    first = cached.scores(models)
    assert cached._first_cols is not None
    assert cached.scores(models) == first  # from the cache
    monkeypatch.setattr(evaluation, "FIRST_COLS_BYTES", 0)
    uncached = ExactEvaluator("digits_cnn", test_set)
    assert uncached.scores(models) == first
    assert uncached._first_cols is None
    assert first == [cached.score_unbatched(params) for params in models]


class _Mlp(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class _Odd(nn.Sequential):
    """A pooling before the first conv, a stride of 2, padding, a pooling that drops a
    row and a column, a ReLU after a pooling, a conv straight after a conv."""

    def __init__(self) -> None:
        super().__init__(
            nn.MaxPool2d(1), nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.MaxPool2d(3),
            nn.ReLU(), nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(12, 10),
        )  # fmt: skip


@pytest.mark.parametrize(("name", "model", "shape"),
                         [("mlp", _Mlp, (1, 8, 8)), ("odd", _Odd, (2, 13, 13))])  # fmt: skip
def test_every_layer_pattern(
    monkeypatch: pytest.MonkeyPatch, name: str, model: type[nn.Module], shape: tuple[int, ...]
) -> None:
    monkeypatch.setitem(model_registry.MODELS, name, model)
    rng = SeededDraws(5)
    test_set = QuantizedTestSet.quantize(rng.random((60, *shape)), rng.integers(0, 10, 60), 10)
    evaluator = ExactEvaluator(name, test_set)
    models = _models(name, 4, seed=2)
    reference = [evaluator.score_unbatched(params) for params in models]
    assert evaluator.scores(models) == reference
    monkeypatch.setattr(evaluation, "WORK_BYTES", 5 * evaluator._sample_bytes)
    assert evaluator.scores(models) == reference


def test_no_model_gives_no_count(digits: ExactEvaluator) -> None:
    assert digits.scores([]) == []
    assert digits.corrects([]) == []
    assert digits.accuracies([]) == []


def test_a_non_finite_model_counts_zero_and_leaves_the_others(digits: ExactEvaluator) -> None:
    models = _models("digits_cnn", 3, seed=4)
    broken = models[1].copy()
    broken[5] = np.nan
    samples = len(digits.test_set)
    classes = digits.test_set.classes
    worst = ExactScore(0, samples * (classes - 1), samples, (0,) * classes, (0,) * classes)
    scores = digits.scores([models[0], broken, models[2]])
    assert scores == [digits.score_unbatched(models[0]), worst,
                      digits.score_unbatched(models[2])]  # fmt: skip
    assert digits.scores([broken]) == [worst] == [digits.score_unbatched(broken)]
    assert digits.corrects([broken]) == [0]


def test_a_model_of_the_wrong_size_is_refused(digits: ExactEvaluator) -> None:
    models = _models("digits_cnn", 2)
    with pytest.raises(EvaluationError, match="parameters"):
        digits.corrects([models[0], models[1][:-1]])


def test_the_bench_times_both_and_finds_them_equal() -> None:
    from fairbus.bench.evaluation import run

    threads = torch.get_num_threads()
    try:
        result = run("digits_cnn", 0, 1, 1, groups=3, digits=True)
    finally:
        torch.set_num_threads(threads)
    assert result.batched_equal and result.samples == 450 and result.groups == 3
    assert result.batched_s > 0 and result.separate_s > 0 and result.unbatched_s > 0


def test_class_counts_add_up_to_the_counts_and_the_test_set(digits: ExactEvaluator) -> None:
    """Per class: right ≤ the class's samples; every sample is called some class once."""
    samples = digits.test_set.class_samples
    for score in digits.scores(_models("digits_cnn", 3, seed=7)):
        assert sum(score.class_right) == score.correct
        assert sum(score.class_called) == score.samples == sum(samples)
        assert all(r <= n for r, n in zip(score.class_right, samples, strict=True))
        assert all(r <= c for r, c in zip(score.class_right, score.class_called, strict=True))
