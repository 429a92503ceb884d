"""A pickled classifier whose copy cannot be read on torchrun's rank 1 (a broken copy on one machine)."""

from __future__ import annotations

import os

from torch import nn


class FailsOnRank1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def __setstate__(self, state: dict) -> None:
        if os.environ.get("RANK") == "1":
            raise RuntimeError("this copy of the weights is corrupt")
        super().__setstate__(state)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)
