"""``fairbus bench evaluation``: what re-deriving a round's evaluation costs (issue 13).

Per group, a ledger node (and the provider, which reports the same numbers) sums the
members' masked uploads (Alg. 5), measures the group's contribution and evaluates the
group model on the committed test set with :class:`~fairbus.evaluation.ExactEvaluator`.
Timed beside the float32 evaluation the provider ran before (whose numbers nobody could
re-derive), on a test set of the model's input shape whose pixels come from a formula
(the cost does not depend on the pixels; no data set can be downloaded here), or on
scikit-learn's digits test set for the digits CNN.

A round's G group models are evaluated together (issue 16, item 3): timed in the same
run are G separate exact evaluations, each by the one-model pass used before issue 16
(:meth:`~fairbus.evaluation.ExactEvaluator.correct_unbatched`) and each by a call of
its own (:meth:`~fairbus.evaluation.ExactEvaluator.correct`), and one batched
evaluation of the G models (:meth:`~fairbus.evaluation.ExactEvaluator.corrects`),
whose counts must equal the separate ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fairbus import masking
from fairbus.detection import group_contributions
from fairbus.evaluation import ExactEvaluator, QuantizedTestSet
from fairbus.field import FixedPointCodec
from fairbus.ledger.verify import round_updates

INPUT_SHAPES = {"mnist_cnn": (1, 28, 28), "cifar10_cnn": (3, 32, 32), "digits_cnn": (1, 8, 8)}
GROUPS_AT_9 = 8
"""Groups evaluated per round at 9 users: 6 basic (two groupings of three), 2 reference
(the README's round anatomy); focus groups add to it once there are key users. The
default G of the batched evaluation."""


@dataclass(frozen=True)
class EvaluationBench:
    model: str
    samples: int
    threads: int
    groups: int
    float_s: float
    """Median seconds of one float32 evaluation (the provider's before issue 13)."""
    exact_s: float
    """Median seconds of one exact evaluation."""
    aggregate_s: float
    """Median seconds to sum three masked uploads and decode the group model."""
    contributions_s: float
    """Seconds to measure the contributions of ``groups`` groups (exactly rounded sums)."""
    unbatched_s: float
    """Median seconds of ``groups`` exact evaluations by the one-model pass used before
    issue 16 (``correct_unbatched``)."""
    separate_s: float
    """Median seconds of ``groups`` exact evaluations, one ``correct`` call each."""
    batched_s: float
    """Median seconds of one batched exact evaluation of ``groups`` models (``corrects``)."""
    batched_equal: bool
    """Whether the batched counts equal the separate ones, model by model."""

    @property
    def group_s(self) -> float:
        return self.aggregate_s + self.exact_s

    @property
    def round_s(self) -> float:
        """What one ledger node spends re-deriving a round of ``groups`` groups: the
        sums, one batched evaluation, the contributions."""
        return self.groups * self.aggregate_s + self.batched_s + self.contributions_s


def synthetic_test_set(model: str, samples: int) -> QuantizedTestSet:
    shape = INPUT_SHAPES[model]
    count = samples * int(np.prod(shape))
    pixels = (np.arange(count, dtype=np.float64) * 0.6180339887) % 1.0
    labels = np.arange(samples) % 10
    return QuantizedTestSet.quantize(pixels.reshape(samples, *shape), labels, 10)


def digits_test_set() -> QuantizedTestSet:
    """scikit-learn's digits test set, as a digits task commits it (450 samples)."""
    from fairbus.training.data import load_digits

    _, test = load_digits(seed=0)
    return QuantizedTestSet.quantize(test.x.numpy(), test.y.numpy(), test.num_classes)


def run(
    model: str,
    samples: int,
    repeats: int,
    threads: int,
    progress: Callable[[int], None] | None = None,
    *,
    groups: int = GROUPS_AT_9,
    digits: bool = False,
) -> EvaluationBench:
    """``digits``: the digits CNN on scikit-learn's digits test set (``samples`` is then
    its size); else a synthetic test set of ``samples``."""
    import torch

    from fairbus.training.data import Dataset
    from fairbus.training.local import Evaluator
    from fairbus.training.models import initial_params

    if groups < 1:
        raise ValueError("groups must be at least 1")
    if digits and model != "digits_cnn":
        raise ValueError("the digits test set is for the digits CNN")
    torch.set_num_threads(threads)
    test_set = digits_test_set() if digits else synthetic_test_set(model, samples)
    exact = ExactEvaluator(model, test_set)
    images = torch.from_numpy((test_set.inputs / 1024.0).astype(np.float32))
    floating = Evaluator(model, Dataset(images, torch.from_numpy(test_set.labels)))
    params = initial_params(model, 0)
    models = [initial_params(model, seed) for seed in range(groups)]
    codec = FixedPointCodec(16)
    uploads = [_masked(params, codec, k) for k in range(3)]
    float_t, exact_t, aggregate_t = [], [], []
    unbatched_t, separate_t, batched_t = [], [], []
    reference: list[int] = []
    separate: list[int] = []
    batched: list[int] = []
    means: dict[int, npt.NDArray[np.float32]] = {}
    for k in range(repeats):
        start = time.perf_counter()
        floating.accuracy(params)
        float_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        exact.correct(params)
        exact_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        means[k % groups] = masking.aggregate_decrypt(uploads, codec).mean
        aggregate_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = [exact.correct_unbatched(one) for one in models]
        unbatched_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        separate = [exact.correct(one) for one in models]
        separate_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = exact.corrects(models)
        batched_t.append(time.perf_counter() - start)
        if progress is not None:
            progress(k + 1)
    while len(means) < groups:
        means[len(means)] = means[0]
    start = time.perf_counter()
    group_contributions(round_updates(means, params), range(min(6, groups)))
    contributions_s = time.perf_counter() - start
    return EvaluationBench(
        model, len(test_set), threads, groups, statistics.median(float_t),
        statistics.median(exact_t), statistics.median(aggregate_t), contributions_s,
        statistics.median(unbatched_t), statistics.median(separate_t),
        statistics.median(batched_t), batched == separate == reference,
    )  # fmt: skip


def _masked(
    params: npt.NDArray[np.float32], codec: FixedPointCodec, k: int
) -> npt.NDArray[np.uint32]:
    """A stand-in masked upload: the encoded model (what is summed costs the same)."""
    return codec.encode(params * np.float32(1.0 + 0.01 * k))
