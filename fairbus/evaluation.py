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
* the predicted class is the first largest logit (numpy's ``argmax``), compared with the
  label; accuracy is ``correct / samples``, one correctly rounded division.

Not in the paper: it evaluates with whatever arithmetic the provider likes, because
there nobody checks. No library computes a CNN in exact integer arithmetic at this speed
(int8 kernels such as torch.ao saturate and round per backend), hence this module.
"""

from __future__ import annotations

import math
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


class EvaluationError(FairbusError):
    """A test set or a model the exact evaluation cannot run."""


@dataclass(frozen=True)
class QuantizedTestSet:
    """The task's test set as the exact evaluation reads it: ``inputs`` (N, C, H, W)
    integers in [0, INPUT_MAX] (as float64, exact), ``labels`` (N,) int64."""

    inputs: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    classes: int

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
    """``correct(params)``: how many test samples the model with flat parameters
    ``params`` (float32, in ``model.parameters()`` order) classifies right, exactly."""

    def __init__(self, model_name: str, test_set: QuantizedTestSet) -> None:
        from fairbus.training.models import build_model, count_parameters

        self.model_name = model_name
        self.layers = _layers(build_model(model_name))
        self.size = count_parameters(build_model(model_name))
        self.test_set = test_set
        self._check_fit()

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

    def correct(self, params: npt.NDArray[np.float32]) -> int:
        import torch

        flat = np.asarray(params)
        if flat.shape != (self.size,):
            raise EvaluationError(f"{self.model_name} has {self.size} parameters, got {flat.shape}")
        if not np.isfinite(flat).all():
            return 0
        weights = _quantized_weights(flat.astype(np.float64), self.layers)
        right = 0
        x_all = self.test_set.inputs
        y_all = self.test_set.labels
        with torch.no_grad():
            for start in range(0, len(y_all), BATCH):
                x = torch.from_numpy(x_all[start : start + BATCH])
                logits = _forward(x, self.layers, weights).numpy()
                right += int((logits.argmax(axis=1) == y_all[start : start + BATCH]).sum())
        return right


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


def _quantized_weights(
    flat: npt.NDArray[np.float64], layers: list[_Layer]
) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
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
    weights: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]],
) -> torch.Tensor:
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
