"""Count model passes, so attack cost is reported in units that do not depend on the machine."""

from __future__ import annotations

import torch
from torch import nn


class CountingModel(nn.Module):
    """Wraps a classifier and counts per-sample forward and backward passes.

    A forward of a batch of B inputs counts B; a backward counts B when a gradient
    flows back through that forward's output (counted by a tensor hook, so a forward
    whose output is never differentiated costs no backward).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        batch = int(x.shape[0]) * getattr(self.model, "samples", 1)  # an EOT model draws `samples` times
        self.forwards += batch
        if out.requires_grad:
            out.register_hook(self._backward_hook(batch))
        return out

    def _backward_hook(self, batch: int):
        def hook(grad: torch.Tensor) -> None:
            self.backwards += batch

        return hook

    def snapshot(self) -> tuple[int, int]:
        """Current (forwards, backwards), for measuring one attack's share."""
        return self.forwards, self.backwards
