"""Randomized models: detect them, attack them with EOT, and judge them by their worst draw.

A model that draws noise (input noise, dropout left on at inference) gives a different
answer on every call. Attacking one draw follows noise, not the model, so attacks see
the Expectation over Transformation (Athalye et al. 2018): `EOT` averages the logits of
several draws in one batched call, and its gradient is the average gradient.

Judging: a point counts as correctly classified only if every one of ``repeats`` draws
classifies it correctly, and an adversarial example counts if any draw misclassifies
it (the worst case over repeats, from the defender's side). To make every such claim
re-verifiable, the draws for an input are seeded from the input's own bytes: the same
input always meets the same ``repeats`` draws, whichever batch it comes in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

DETECT_CALLS = 4
DETECT_RTOL = 1e-4  # relative logit change between calls that float nondeterminism never reaches


@dataclass
class RandomnessEvidence:
    """What repeated forward passes on the same batch showed."""

    calls: int
    samples: int
    max_relative_change: float  # max |logit difference| over calls / logit scale
    prediction_changes: float  # fraction of samples whose predicted class changed between calls
    seedable: bool  # the same torch seed gives the same outputs (needed for re-verification)

    @property
    def stochastic(self) -> bool:
        return self.max_relative_change > DETECT_RTOL


@torch.no_grad()
def detect_randomness(model: nn.Module, x: torch.Tensor, calls: int = DETECT_CALLS) -> RandomnessEvidence:
    """Call the model `calls` times on one batch and compare the outputs."""
    outs = torch.stack([model(x).float() for _ in range(calls)])
    scale = outs.abs().amax().clamp_min(1e-12)
    change = float((outs - outs[0]).abs().amax() / scale)
    preds = outs.argmax(dim=2)
    changed = float((preds != preds[0]).any(dim=0).float().mean())
    seedable = True
    if change > DETECT_RTOL:
        first, second = (_seeded(model, x, 1234) for _ in range(2))
        seedable = bool(torch.equal(first, second))
    return RandomnessEvidence(calls, len(x), change, changed, seedable)


def _seeded(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return model(x).float()


class EOT(nn.Module):
    """Average logits over `samples` draws of a randomized model, in one batched call."""

    def __init__(self, base: nn.Module, samples: int, repeats: int, seed: int = 0) -> None:
        super().__init__()
        if samples < 1 or repeats < 1:
            raise ValueError("EOT needs at least one sample and one repeat")
        self.base = base
        self.samples = samples
        self.repeats = repeats
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tiled = x.repeat(self.samples, *([1] * (x.dim() - 1)))
        return self.base(tiled).view(self.samples, b, -1).mean(dim=0)

    @torch.no_grad()
    def worst_predictions(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per input, a wrong class seen in one of `repeats` seeded draws, else the true class."""
        out = torch.empty(len(x), dtype=torch.long)
        for i in range(len(x)):
            xi = x[i : i + 1]
            draws = _seeded(self.base, xi.repeat(self.repeats, *([1] * (x.dim() - 1))), self._seed_for(xi))
            preds = draws.argmax(dim=1).cpu()
            wrong = preds[preds != int(y[i])]
            out[i] = wrong[0] if len(wrong) else int(y[i])
        return out

    def _seed_for(self, xi: torch.Tensor) -> int:
        digest = hashlib.blake2b(xi.detach().to(torch.float32).cpu().numpy().tobytes(), digest_size=8)
        digest.update(self.seed.to_bytes(8, "little", signed=True))
        return int.from_bytes(digest.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF
