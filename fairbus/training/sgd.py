"""Minibatch SGD with momentum, as ``torch.optim.SGD`` computes it for CPU tensors.

Written here, not taken from ``torch.optim``, for one reason: an optimizer imports
``torch._dynamo`` the first time one is built (torch 2.13 wraps
``Optimizer.add_param_group`` in ``torch._disable_dynamo``), which costs 1.2-1.5 s of
CPU at the start of every user process on this machine kind — more than a round of
local training on digits, paid by each of the nine users of a task on the same cores.
The update is torch's own single-tensor path (``torch.optim.sgd._single_tensor_sgd``
with dampening 0, no Nesterov, no weight decay, not maximizing), the one torch takes
for CPU tensors (foreach kernels are for accelerators); ``tests/unit/test_training.py``
checks that both give the same parameters to the bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MomentumSGD:
    """``torch.optim.SGD(params, lr=lr, momentum=momentum)``'s ``zero_grad`` and ``step``."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``, torch's default)."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One step: buf ← momentum · buf + grad (grad itself at the first step), then
        param ← param − lr · buf."""
        for k, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.momentum != 0:
                buf = self._buffers[k]
                if buf is None:
                    buf = grad.detach().clone()
                    self._buffers[k] = buf
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            param.add_(grad, alpha=-self.lr)
