"""Exact evaluation: a group model's accuracy on the task's test set, the same number on
every machine (issue 13, item 1).

The provider reports each group's accuracy (the input of Algorithm 6) and every ledger
node re-derives it before it admits the evaluation, so the number must not depend on the
CPU, the BLAS library or the thread count. Floating-point inference does: summation
order changes the last bits of a logit and, near a tie, the predicted class. So the
model runs in fixed point, in integers that float64 holds exactly:

* inputs are quantized to ``INPUT_FRAC_BITS`` fractional bits (the committed test set
  holds them already quantized, :class:`QuantizedTestSet`), weights and biases to
  ``WEIGHT_FRAC_BITS`` (rounded half to even, clamped to ``WEIGHT_LIMIT``);
* every convolution and linear layer is an im2col matrix product of integers in float64:
  each product is below 2^(ACT_BITS + WEIGHT_BITS) and each sum of at most 2^13 of them
  below 2^53, so every addition is exact whatever order BLAS picks, then the result is
  rescaled by a power of two and floored (exact), and clamped to ``ACT_LIMIT``;
* ReLU, max pooling and flattening only move or compare integers;
* a round's group models are evaluated together (:meth:`ExactEvaluator.scores`, issue
  16, item 3), which changes no integer, hence no count;
* the predicted class is the first largest logit (numpy's ``argmax``), compared with the
  label; accuracy is ``correct / samples``, one correctly rounded division;
* the true class's rank is the number of logits strictly above the true class's logit
  (0 when it is predicted, ties never count against it), summed over the test set as an
  integer; the mean rank is ``rank_sum / samples``, one correctly rounded division.

The rank is not in the paper either. It says how far a model is from right where the
accuracy cannot: with three poisoners among nine users every group model classifies
at chance for rounds, yet the groups with more honest members rank the true class
higher (README, "Issue 13, fifth change"). The aggregation can choose by it there
(:class:`~fairbus.aggregation.CleanGroupAverage`, ``rank_margin``), and
every evaluation records it so the ledger re-derives it and a restored provider reads it.

Not in the paper: it evaluates with whatever arithmetic the provider likes, because
there nobody checks. No library computes a CNN in exact integer arithmetic at this speed
(int8 kernels such as torch.ao saturate and round per backend), hence this module.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fairbus.errors import FairbusError, SchemaError
from fairbus.wire.messages import CommittedTestSet

if TYPE_CHECKING:
    import torch

INPUT_FRAC_BITS = 10
"""Fractional bits of an activation (and of an input, which lies in [0, 1])."""
WEIGHT_FRAC_BITS = 12
"""Fractional bits of a weight: a resolution of 2.4e-4."""
ACT_BITS = 23
ACT_LIMIT = 2**ACT_BITS
"""|activation| in fixed point is clamped here: ±8192 in real terms."""
WEIGHT_BITS = 16
WEIGHT_LIMIT = 2**WEIGHT_BITS
"""|weight| in fixed point is clamped here: ±16 in real terms."""
MAX_FAN_IN = 2 ** (52 - ACT_BITS - WEIGHT_BITS) - 1
"""The most products one output may sum: (fan-in + 1 for the bias) · 2^39 < 2^53."""
INPUT_MAX = 2**INPUT_FRAC_BITS
"""A quantized input lies in [0, INPUT_MAX] (an image in [0, 1])."""
BATCH = 256
"""The most test samples one chunk of an evaluation takes."""
WORK_BYTES = 32 * 2**20
"""About the most bytes the activations and im2col matrices of one chunk of a batched
evaluation hold (chunks take fewer samples, passes fewer models, to stay near it)."""
MIN_CHUNK = 16
"""A pass takes no more models than leave a chunk this many samples within WORK_BYTES."""
FIRST_COLS_BYTES = 128 * 2**20
"""The first layer's im2col of the test set is kept for later calls when it fits here."""


_Weights = list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]
"""Each conv or linear layer's (weight matrix, bias) in fixed point, for one model."""


class EvaluationError(FairbusError):
    """A test set or a model the exact evaluation cannot run."""


@dataclass(frozen=True)
class ExactScore:
    """One model on the test set, in integers: ``correct`` samples classified right and
    ``rank_sum``, the true class's rank (logits strictly above it) summed over the
    ``samples``. A model holding NaN or infinity gets 0 right and the worst rank,
    ``classes - 1``, for every sample."""

    correct: int
    rank_sum: int
    samples: int
    class_right: tuple[int, ...] = ()
    """Per class c, the samples of class c classified c (issue 13, item 2)."""
    class_called: tuple[int, ...] = ()
    """Per class c, the samples of any class classified c."""

    @classmethod
    def worst(cls, samples: int, classes: int) -> ExactScore:
        """A model holding NaN or infinity: none right, the true class last everywhere,
        no class predicted."""
        nothing = (0,) * classes
        return cls(0, samples * (classes - 1), samples, nothing, nothing)

    @property
    def accuracy(self) -> float:
        """correct / samples."""
        return self.correct / self.samples

    @property
    def mean_rank(self) -> float:
        """rank_sum / samples: 0.0 for a model right everywhere, about (classes - 1) / 2
        for a guess."""
        return self.rank_sum / self.samples


@dataclass(frozen=True)
class QuantizedTestSet:
    """The task's test set as the exact evaluation reads it: ``inputs`` (N, C, H, W)
    integers in [0, INPUT_MAX] (as float64, exact), ``labels`` (N,) int64."""

    inputs: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    classes: int

    @property
    def class_samples(self) -> tuple[int, ...]:
        """How many test samples each class has."""
        return tuple(int(v) for v in np.bincount(self.labels, minlength=self.classes))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def quantize(
        cls, images: npt.NDArray[np.floating], labels: npt.NDArray[np.integer], classes: int
    ) -> QuantizedTestSet:
        """From images in [0, 1] (N, C, H, W) and their labels."""
        x = np.asarray(images, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 4 or y.shape != (x.shape[0],) or not len(y):
            raise EvaluationError(f"a test set needs (N, C, H, W) images and N labels, "
                                  f"got {x.shape} and {y.shape}")  # fmt: skip
        if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
            raise EvaluationError("test images must lie in [0, 1]")
        if y.min() < 0 or y.max() >= classes:
            raise EvaluationError(f"test labels must lie in [0, {classes})")
        return cls(np.rint(x * INPUT_MAX), y, classes)

    def to_message(self) -> CommittedTestSet:
        """The body of the task's ``test_set`` transaction (the ledger nodes keep it)."""
        return CommittedTestSet(
            tuple(self.inputs.shape[1:]), self.classes,
            self.inputs.astype("<u2").tobytes(), self.labels.astype(np.uint8).tobytes(),
        )  # fmt: skip

    @classmethod
    def from_message(cls, message: CommittedTestSet) -> QuantizedTestSet:
        """Strict: sizes must agree and every value be in range (the wire schema bounds
        the bytes already); raises :class:`~fairbus.errors.SchemaError`."""
        c, h, w = message.shape
        per_sample = c * h * w
        n = len(message.labels)
        if n == 0 or len(message.inputs) != 2 * n * per_sample:
            raise SchemaError(
                f"test set: {len(message.inputs)} input bytes for {n} labels of {c}x{h}x{w}"
            )
        x = np.frombuffer(message.inputs, dtype="<u2").reshape(n, c, h, w)
        y = np.frombuffer(message.labels, dtype=np.uint8).astype(np.int64)
        if int(x.max()) > INPUT_MAX or int(y.max()) >= message.classes:
            raise SchemaError("test set: an input or a label is out of range")
        return cls(x.astype(np.float64), y, message.classes)


class ExactEvaluator:
    """``scores(models)``: how many test samples each model classifies right and how its
    true class ranks, exactly (:class:`ExactScore`), for models given as flat parameters
    (float32, in ``model.parameters()`` order); ``corrects`` and ``accuracies`` of them,
    ``correct(params)`` and ``accuracy(params)`` for one model.

    Batched (issue 16, item 3): the provider and every ledger node evaluate a round's G
    group models (about 2n/3 + focus + reference groups; 8 at 9 users) on the same test
    set, so :meth:`scores` runs them together (:func:`_forward_many`): the first
    layer's im2col of the test set is the same for every model, computed once (kept
    while it fits ``FIRST_COLS_BYTES``) and multiplied by the G models' first-layer
    weights stacked in one matrix product; every later layer is one batched matrix
    product over the G models (``torch.bmm``). Test samples go through in chunks sized
    so that the activations and im2col matrices of a chunk's models stay near
    ``WORK_BYTES`` (the models are split into passes when G is large), and each
    chunk's large buffers are reused by the next.

    Batching cannot change a count. Every value is an integer: each product is below
    2^(ACT_BITS + WEIGHT_BITS) = 2^39 and each output's sum of at most 2^13 of them and
    its bias below 2^53, so a float64 sum is exact in any order and grouping (the one
    BLAS picks for a stacked or a batched product, whatever its blocking and thread
    count, included); the rescaling by 2^-WEIGHT_FRAC_BITS and the floor are exact;
    clamping, ReLU and max pooling compare integers, and the layouts only move them. So
    each model's logits are the very integers its own pass gives
    (:meth:`score_unbatched`, the reference the tests compare with), and so are its
    count and its rank sum."""

    def __init__(self, model_name: str, test_set: QuantizedTestSet) -> None:
        from fairbus.training.models import build_model, count_parameters

        self.model_name = model_name
        self.layers = _layers(build_model(model_name))
        self.size = count_parameters(build_model(model_name))
        self.test_set = test_set
        self._check_fit()
        self._sample_bytes = _bytes_per_sample(self.layers, test_set.inputs.shape[1:])
        self._first_cols: torch.Tensor | None = None
        self._first_cols_lock = threading.Lock()

    def _check_fit(self) -> None:
        """That the test set's inputs go through the model and its classes are the
        model's outputs (one sample, zero weights); raises :class:`EvaluationError`."""
        import torch

        shape = self.test_set.inputs.shape[1:]
        zeros = _quantized_weights(np.zeros(self.size), self.layers)
        try:
            with torch.no_grad():
                out = _forward(torch.zeros((1, *shape), dtype=torch.float64), self.layers, zeros)
        except RuntimeError as exc:
            raise EvaluationError(
                f"test inputs of shape {shape} do not fit {self.model_name}: {exc}"
            ) from None
        if tuple(out.shape) != (1, self.test_set.classes):
            raise EvaluationError(f"{self.model_name} gives {out.shape[1]} classes, the test "
                                  f"set has {self.test_set.classes}")  # fmt: skip

    def accuracy(self, params: npt.NDArray[np.float32]) -> float:
        """correct / samples (0.0 for a model holding NaN or infinity)."""
        return self.correct(params) / len(self.test_set)

    def accuracies(self, models: Sequence[npt.NDArray[np.float32]]) -> list[float]:
        """:meth:`accuracy` of each model, evaluated together (:meth:`scores`)."""
        return [score.accuracy for score in self.scores(models)]

    def correct(self, params: npt.NDArray[np.float32]) -> int:
        """The count for one model (:meth:`scores` of one)."""
        return self.scores([params])[0].correct

    def corrects(self, models: Sequence[npt.NDArray[np.float32]]) -> list[int]:
        """Each model's count of correctly classified test samples (:meth:`scores`)."""
        return [score.correct for score in self.scores(models)]

    def scores(self, models: Sequence[npt.NDArray[np.float32]]) -> list[ExactScore]:
        """Each model's :class:`ExactScore`, in order, the models evaluated together
        (``[]`` for no model)."""
        flats = [self._checked(params) for params in models]
        scores = [ExactScore.worst(len(self.test_set), self.test_set.classes)] * len(flats)
        finite = [k for k, flat in enumerate(flats) if np.isfinite(flat).all()]
        per_pass = max(1, WORK_BYTES // (MIN_CHUNK * self._sample_bytes))
        for start in range(0, len(finite), per_pass):
            batch = finite[start : start + per_pass]
            quantized = [_quantized_weights(flats[k].astype(np.float64), self.layers)
                         for k in batch]  # fmt: skip
            for k, score in zip(batch, self._scores_of(quantized), strict=True):
                scores[k] = score
        return scores

    def correct_unbatched(self, params: npt.NDArray[np.float32]) -> int:
        """The count for one model by its own pass (:meth:`score_unbatched`)."""
        return self.score_unbatched(params).correct

    def score_unbatched(self, params: npt.NDArray[np.float32]) -> ExactScore:
        """The score of one model by its own pass (NCHW, ``torch.nn.functional.unfold``,
        ``BATCH`` samples at a time): the reference :meth:`scores` equals."""
        import torch

        flat = self._checked(params)
        samples = len(self.test_set)
        if not np.isfinite(flat).all():
            return ExactScore.worst(samples, self.test_set.classes)
        weights = _quantized_weights(flat.astype(np.float64), self.layers)
        classes = self.test_set.classes
        ranks = 0
        right = np.zeros(classes, dtype=np.int64)
        called = np.zeros(classes, dtype=np.int64)
        x_all = self.test_set.inputs
        y_all = self.test_set.labels
        with torch.no_grad():
            for start in range(0, len(y_all), BATCH):
                x = torch.from_numpy(x_all[start : start + BATCH])
                logits = _forward(x, self.layers, weights).numpy()
                labels = y_all[start : start + BATCH]
                predicted = logits.argmax(axis=1)
                right += np.bincount(labels[predicted == labels], minlength=classes)
                called += np.bincount(predicted, minlength=classes)
                truth = np.take_along_axis(logits, labels[:, None], axis=1)
                ranks += int((logits > truth).sum())
        return _score(right, int(ranks), called, samples)

    def _checked(self, params: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        flat = np.asarray(params)
        if flat.shape != (self.size,):
            raise EvaluationError(f"{self.model_name} has {self.size} parameters, got {flat.shape}")
        return flat

    def _scores_of(self, quantized: list[_Weights]) -> list[ExactScore]:
        """The scores of models (at most one pass's worth), chunk by chunk of samples."""
        import torch

        stacked = _stacked(quantized, self.layers)
        chunk = max(1, min(BATCH, WORK_BYTES // (len(quantized) * self._sample_bytes)))
        x_all = self.test_set.inputs
        y_all = self.test_set.labels
        first = self._first_layer_cols()
        scratch = _Scratch()
        models, classes = len(quantized), self.test_set.classes
        right = np.zeros(models * classes, dtype=np.int64)
        called = np.zeros(models * classes, dtype=np.int64)
        ranks = np.zeros(models, dtype=np.int64)
        offsets = (np.arange(models) * classes)[:, None]
        with torch.no_grad():
            for start in range(0, len(y_all), chunk):
                x = torch.from_numpy(x_all[start : start + chunk])
                cols = None
                if first is not None:
                    rows = first.shape[0] // len(y_all)
                    cols = first[start * rows : (start + x.shape[0]) * rows]
                logits = _forward_many(x, self.layers, stacked, cols, scratch).numpy()
                labels = y_all[start : start + chunk]
                predicted = logits.argmax(axis=2)
                hits = predicted == labels
                slots = offsets + labels  # (model, sample) -> model's slot of the true class
                right += np.bincount(slots[hits], minlength=models * classes)
                called += np.bincount((offsets + predicted).ravel(), minlength=models * classes)
                truth = np.take_along_axis(logits, labels[None, :, None], axis=2)
                ranks += (logits > truth).sum(axis=(1, 2))
        samples = len(y_all)
        return [
            _score(r, int(k), c, samples)
            for r, k, c in zip(
                right.reshape(models, classes), ranks, called.reshape(models, classes), strict=True
            )
        ]

    def _first_layer_cols(self) -> torch.Tensor | None:
        """The im2col of the whole test set for a first layer that is a convolution
        (rows: sample, output position; columns: a window in (kh, kw, C) order), kept
        for every later call while it fits ``FIRST_COLS_BYTES``; None otherwise."""
        import torch

        layer = self.layers[0]
        if layer.kind != "conv":
            return None
        n, c, height, width = self.test_set.inputs.shape
        out_h, out_w = (_out_side(side, layer) for side in (height, width))
        size = 8 * n * out_h * out_w * c * layer.kernel**2
        if size > FIRST_COLS_BYTES:
            return None
        with self._first_cols_lock:
            if self._first_cols is None:
                x = torch.from_numpy(self.test_set.inputs).permute(0, 2, 3, 1)
                self._first_cols = _im2col(x, layer)
            return self._first_cols


def _score(
    right: npt.NDArray[np.int64], rank_sum: int, called: npt.NDArray[np.int64], samples: int
) -> ExactScore:
    """An :class:`ExactScore` from per-class counts."""
    return ExactScore(
        int(right.sum()),
        rank_sum,
        samples,
        tuple(int(v) for v in right),
        tuple(int(v) for v in called),
    )


@dataclass(frozen=True)
class _Layer:
    kind: str  # "conv", "linear", "relu", "pool", "flatten"
    weight_shape: tuple[int, ...] = ()
    bias: int = 0
    kernel: int = 0
    padding: int = 0
    stride: int = 1


def _layers(model: object) -> list[_Layer]:
    from torch import nn

    if not isinstance(model, nn.Sequential):
        raise EvaluationError(f"exact evaluation needs an nn.Sequential, not {type(model)}")
    out: list[_Layer] = []
    for module in model:
        if isinstance(module, nn.Conv2d):
            k, s, p = module.kernel_size, module.stride, module.padding
            if (
                len(set(k)) != 1 or len(set(s)) != 1 or not isinstance(p, tuple)
                or len(set(p)) != 1 or module.groups != 1 or module.dilation != (1, 1)
                or module.bias is None
            ):  # fmt: skip
                raise EvaluationError(f"exact evaluation cannot run {module}")
            fan_in = module.in_channels * k[0] * k[1]
            out.append(_Layer("conv", tuple(module.weight.shape), module.out_channels,
                              k[0], p[0], s[0]))  # fmt: skip
        elif isinstance(module, nn.Linear):
            fan_in = module.in_features
            out.append(_Layer("linear", tuple(module.weight.shape), module.out_features))
        elif isinstance(module, nn.ReLU):
            out.append(_Layer("relu"))
            continue
        elif isinstance(module, nn.MaxPool2d):
            if module.kernel_size != module.stride or module.padding != 0:
                raise EvaluationError(f"exact evaluation cannot run {module}")
            out.append(_Layer("pool", kernel=int(module.kernel_size)))  # type: ignore[arg-type]
            continue
        elif isinstance(module, nn.Flatten):
            out.append(_Layer("flatten"))
            continue
        else:
            raise EvaluationError(f"exact evaluation cannot run {type(module).__name__}")
        if fan_in > MAX_FAN_IN:
            raise EvaluationError(f"a fan-in of {fan_in} exceeds the exact bound {MAX_FAN_IN}")
    return out


def _quantized_weights(flat: npt.NDArray[np.float64], layers: list[_Layer]) -> _Weights:
    """Each conv or linear layer's (weight matrix, bias) in fixed point: the weights at
    WEIGHT_FRAC_BITS, the bias at the product's INPUT_FRAC_BITS + WEIGHT_FRAC_BITS."""
    out = []
    offset = 0
    bias_scale = 2.0 ** (INPUT_FRAC_BITS + WEIGHT_FRAC_BITS)
    bias_limit = 2.0 ** (ACT_BITS + WEIGHT_BITS)
    for layer in layers:
        if layer.kind not in ("conv", "linear"):
            continue
        count = math.prod(layer.weight_shape)
        w = flat[offset : offset + count].reshape(layer.weight_shape[0], -1)
        b = flat[offset + count : offset + count + layer.bias]
        offset += count + layer.bias
        w_q = np.clip(np.rint(w * 2.0**WEIGHT_FRAC_BITS), -WEIGHT_LIMIT, WEIGHT_LIMIT)
        b_q = np.clip(np.rint(b * bias_scale), -bias_limit, bias_limit)
        out.append((w_q, b_q))
    return out


def _forward(
    x: torch.Tensor,
    layers: list[_Layer],
    weights: _Weights,
) -> torch.Tensor:
    """The logits (n, classes) of one model on ``x`` (n, C, H, W): the reference pass
    (NCHW, ``torch.nn.functional.unfold``) that :func:`_forward_many` must equal."""
    import torch
    from torch.nn import functional

    params = iter(weights)
    for layer in layers:
        if layer.kind == "relu":
            x = torch.clamp(x, min=0.0)
        elif layer.kind == "pool":
            x = functional.max_pool2d(x, layer.kernel)
        elif layer.kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            w_np, b_np = next(params)
            w, b = torch.from_numpy(w_np), torch.from_numpy(b_np)
            if layer.kind == "conv":
                n, _, height, width = x.shape
                out_h, out_w = (
                    (side + 2 * layer.padding - layer.kernel) // layer.stride + 1
                    for side in (height, width)
                )
                cols = functional.unfold(
                    x, layer.kernel, padding=layer.padding, stride=layer.stride
                )
                z = (torch.matmul(w, cols) + b[:, None]).reshape(n, w.shape[0], out_h, out_w)
            else:
                z = torch.matmul(x, w.T) + b
            x = torch.clamp(torch.floor(z / 2.0**WEIGHT_FRAC_BITS), -ACT_LIMIT, ACT_LIMIT)
    return x


@dataclass(frozen=True)
class _Stacked:
    """One conv or linear layer of G models: ``w`` (G, outputs, fan-in), each model's
    weight matrix (a conv's fan-in in the (kh, kw, C) order of a channels-last window),
    and ``b`` (G, outputs)."""

    w: torch.Tensor
    b: torch.Tensor


class _Scratch:
    """Buffers that chunk after chunk of one evaluation reuses: a fresh tensor of many
    megabytes costs as many page faults as the work done in it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, key: tuple[int, str], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        size = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.float64)
            self._buffers[key] = buffer
        return buffer[:size].view(shape)


def _stacked(quantized: list[_Weights], layers: list[_Layer]) -> list[_Stacked]:
    import torch

    weighted = [layer for layer in layers if layer.kind in ("conv", "linear")]
    out = []
    for j, layer in enumerate(weighted):
        matrices = [weights[j][0] for weights in quantized]
        if layer.kind == "conv":
            outputs, channels, kh, kw = layer.weight_shape
            matrices = [m.reshape(outputs, channels, kh, kw).transpose(0, 2, 3, 1)
                        .reshape(outputs, -1) for m in matrices]  # fmt: skip
        biases = [weights[j][1] for weights in quantized]
        out.append(_Stacked(torch.from_numpy(np.stack(matrices)),
                            torch.from_numpy(np.stack(biases))))  # fmt: skip
    return out


def _out_side(side: int, layer: _Layer) -> int:
    return (side + 2 * layer.padding - layer.kernel) // layer.stride + 1


def _bytes_per_sample(layers: list[_Layer], shape: tuple[int, ...]) -> int:
    """About the most bytes one sample of one model holds at once in
    :func:`_forward_many` (float64): a conv layer's input, its channels-last and padded
    copies, its im2col and its output; another layer's input and output."""
    dims = list(shape)
    peak = math.prod(dims)
    for layer in layers:
        before = math.prod(dims)
        if layer.kind == "conv":
            c, height, width = dims
            out_h, out_w = (_out_side(side, layer) for side in (height, width))
            padded = c * (height + 2 * layer.padding) * (width + 2 * layer.padding)
            cols = c * layer.kernel**2 * out_h * out_w
            dims = [layer.weight_shape[0], out_h, out_w]
            peak = max(peak, 2 * before + padded + cols + math.prod(dims))
        elif layer.kind == "pool":
            dims = [dims[0], dims[1] // layer.kernel, dims[2] // layer.kernel]
        elif layer.kind == "flatten":
            dims = [before]
        elif layer.kind == "linear":
            dims = [layer.weight_shape[0]]
        peak = max(peak, before + math.prod(dims))
    return 8 * peak


def _forward_many(
    x: torch.Tensor,
    layers: list[_Layer],
    weights: list[_Stacked],
    first: torch.Tensor | None,
    scratch: _Scratch,
) -> torch.Tensor:
    """The logits (G, n, classes) of the G models of ``weights`` on the n samples ``x``
    (n, C, H, W); ``first``: the first layer's im2col of ``x``, if known.

    Until the first conv or linear layer the activations are the samples' own,
    channels-last (n, H, W, C) or flat (n, F), the same for every model: that layer is
    one matrix product of the G models' weight matrices stacked, (G·outputs, fan-in),
    with its im2col or the inputs. Every later one is a batched product over the G
    models (``torch.bmm``). A conv layer's output is channels-first, (G, C, n, H, W)
    (the product's long side is then the positions, which BLAS runs fastest), and is
    made channels-last (G·n, H, W, C) for the next conv layer's im2col, whose windows
    are then runs of k·C contiguous values; a linear layer's is (G, n, F).

    The ReLUs and max poolings right after a conv or linear layer are applied before
    its bias, rescaling, floor and clamp, on the raw sums (4x fewer values to rescale
    after a 2x2 pooling): the same integers, since adding a channel's bias and each of
    those steps is a non-decreasing function of one value, which commutes with taking
    a maximum (max f(a_i) = f(max a_i)), and a ReLU after the clamp is the clamp from
    0 instead of from -ACT_LIMIT."""
    import torch

    g = weights[0].w.shape[0]
    n = x.shape[0]
    x = x.permute(0, 2, 3, 1)
    shared = True
    params = iter(weights)
    index = 0
    while index < len(layers):
        layer = layers[index]
        index += 1
        if layer.kind == "relu":
            x = torch.clamp(x, min=0.0)
        elif layer.kind == "pool":
            x = _pool(x, layer.kernel, channels_last=shared)
        elif layer.kind == "flatten":
            if shared and x.dim() == 4:
                x = x.permute(0, 3, 1, 2).reshape(n, -1)
            elif x.dim() == 5:
                x = x.permute(0, 2, 1, 3, 4).reshape(g, n, -1)
        else:
            stack = next(params)
            outputs, fan_in = stack.w.shape[1:]
            if layer.kind == "conv":
                height, width = x.shape[1:3] if shared else x.shape[3:]
                out_h, out_w = (_out_side(side, layer) for side in (height, width))
                z = scratch.get((index, "out"), (g, outputs, n * out_h * out_w))
                if shared:
                    cols = first if first is not None else _im2col(x, layer, scratch, index)
                    torch.mm(stack.w.reshape(-1, fan_in), cols.T, out=z.view(g * outputs, -1))
                else:
                    channels = x.shape[1]
                    x = x.permute(0, 2, 3, 4, 1).reshape(g * n, height, width, channels)
                    cols = _im2col(x, layer, scratch, index).view(g, -1, fan_in)
                    torch.bmm(stack.w, cols.transpose(1, 2), out=z)
                x = z.view(g, outputs, n, out_h, out_w)
                bias = stack.b[:, :, None, None, None]
            elif shared:
                z = torch.mm(x, stack.w.reshape(-1, fan_in).T)
                x = z.reshape(n, g, outputs).permute(1, 0, 2).contiguous()
                bias = stack.b[:, None, :]
            else:
                x = torch.bmm(x, stack.w.transpose(1, 2))
                bias = stack.b[:, None, :]
            shared = False
            lowest = -ACT_LIMIT
            while index < len(layers) and layers[index].kind in ("relu", "pool"):
                if layers[index].kind == "pool":
                    x = _pool(x, layers[index].kernel, channels_last=False)
                else:
                    lowest = 0
                index += 1
            x.add_(bias).mul_(2.0**-WEIGHT_FRAC_BITS).floor_().clamp_(lowest, ACT_LIMIT)
    return x


def _im2col(
    x: torch.Tensor, layer: _Layer, scratch: _Scratch | None = None, key: int = 0
) -> torch.Tensor:
    """(B·H'·W', k·k·C) from channels-last (B, H, W, C): each output position's window,
    in the order (kh, kw, C) (of :func:`_stacked`'s conv weights). A window's row is k·C
    contiguous values, so the copy runs in long strides."""
    from torch.nn import functional

    p, k, s = layer.padding, layer.kernel, layer.stride
    if p:
        x = functional.pad(x, (0, 0, p, p, p, p))
    x = x.contiguous()
    b, height, width, c = x.shape
    out_h, out_w = (height - k) // s + 1, (width - k) // s + 1
    shape = (b, out_h, out_w, k, k * c)
    windows = x.as_strided(shape, (height * width * c, s * width * c, s * c, width * c, 1))
    cols = windows.contiguous() if scratch is None else scratch.get((key, "cols"), shape)
    if scratch is not None:
        cols.copy_(windows)
    return cols.view(b * out_h * out_w, k * k * c)


def _pool(x: torch.Tensor, k: int, *, channels_last: bool) -> torch.Tensor:
    """Max pooling by k × k windows, stride k, of channels-last (B, H, W, C) or
    channels-first (..., H, W) values (the rows and columns beyond the last whole window
    dropped, as ``max_pool2d`` does): the maximum of k rows, then of k columns, each a
    slice of a reshaped view."""
    import torch

    if channels_last:
        lead, height, width, tail = x.shape[:1], x.shape[1], x.shape[2], x.shape[3]
    else:
        lead, height, width, tail = x.shape[:-2], x.shape[-2], x.shape[-1], 1
    h, w = height // k, width // k
    if (h * k, w * k) != (height, width):
        x = x[:, : h * k, : w * k] if channels_last else x[..., : h * k, : w * k]
    row = w * k * tail
    rows = x.reshape(*lead, h, k * row)
    out = rows[..., :row]
    for i in range(1, k):
        out = torch.maximum(out, rows[..., i * row : (i + 1) * row])
    cols = out.reshape(*lead, h, w, k * tail)
    out = cols[..., :tail]
    for j in range(1, k):
        out = torch.maximum(out, cols[..., j * tail : (j + 1) * tail])
    return out.reshape(*lead, h, w, tail) if channels_last else out.reshape(*lead, h, w)
