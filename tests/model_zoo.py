"""Small real architectures for the model-loading tests, importable as `--arch model_zoo:NAME`.

They live in an importable module (not the test file) because pickled modules and
`--arch package.module:factory` both need to import the class by name.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv + ReLU + AvgPool + Linear on 1x8x8: AveragePool is what trips onnx2torch at opset 19+."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.pool(self.bn(self.conv(x)))).flatten(1))


class TinyMLP(nn.Module):
    """MLP taking 64 values in any layout (e.g. (B, 64, 1) like VNN-COMP's flat MNIST nets)."""

    def __init__(self, num_classes: int = 10, softmax: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, num_classes))
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out.softmax(1) if self.softmax else out


class Batch1CNN(TinyCNN):
    """Flattens with a hard-coded batch of 1, like graphs exported with a static batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.pool(self.bn(self.conv(x)))).reshape(1, -1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics so eval/train mode differences show up in outputs."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    return _randomize_bn(TinyCNN(num_classes))


def flat_linear(num_classes: int = 10) -> nn.Sequential:
    """One linear layer on the flattened digits (checkpoint-entry tests)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def tiny_mlp(num_classes: int = 10) -> TinyMLP:
    return TinyMLP(num_classes)


class NoisyMLP(TinyMLP):
    """A fixed random offset drawn when built and not saved (a non-persistent buffer): each build differs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.register_buffer("noise", 3 * torch.randn(num_classes), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.noise


def noisy_mlp(num_classes: int = 10) -> NoisyMLP:
    return NoisyMLP(num_classes)


class RandomizedMLP(TinyMLP):
    """Noise on the input at every call (a randomized defense): each run differs, each build is the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + 0.3 * torch.randn_like(x))


def randomized_mlp(num_classes: int = 10) -> RandomizedMLP:
    return RandomizedMLP(num_classes)


def lazy_mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def not_a_model() -> str:
    return "nope"


class AutocastMLP(TinyMLP):
    """TinyMLP computing under torch.autocast(float16) inside its forward (torch.fx drops the block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            out = self.body(x)
        return out.float()


def autocast_mlp(num_classes: int = 10) -> AutocastMLP:
    return AutocastMLP(num_classes)
