"""The demo model that ships with robaudit: a small CNN for the bundled 8x8 digits.

`scripts/train_demo.py` trains it and writes `digits_cnn.onnx` and
`digits_cnn.safetensors` beside this file. The factory below is what
`--arch robaudit.demo:digits_cnn` builds before loading the safetensors weights.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from torch import nn


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Two 3x3 convolutions (the second strided) and a linear layer, for 1x8x8 inputs in [0, 1].

    Kept small on purpose: the standard battery (with Square's 5000 queries on every
    robust point) must finish on the demo in seconds on a laptop CPU.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, num_classes),
    )


def demo_path(name: str = "digits_cnn.onnx") -> Path:
    """Where an installed demo file lives (inside the package)."""
    return Path(str(resources.files("robaudit.demo").joinpath(name)))
