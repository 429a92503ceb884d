"""Per-sample attack losses on logits; higher means closer to (or past) a misclassification."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted cross-entropy, per sample."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W margin: max_{j != y} z_j - z_y. Positive exactly when the point is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


LOSSES = {"ce": cross_entropy, "margin": margin}


def get_loss(name: str):
    """Look up a loss by its configuration name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(LOSSES)})") from None
