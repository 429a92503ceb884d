"""Per-sample attack losses on logits; higher means closer to (or past) a misclassification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# DLR's denominator offset (Croce & Hein 2020 and the original auto-attack code).
DLR_EPS = 1e-12


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted cross-entropy, per sample."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W margin: max_{j != y} z_j - z_y. Positive exactly when the point is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


def targeted_margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_t - z_y: positive once the target class beats the true class."""
    return (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (untargeted): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12).

    ``pi`` sorts the logits in decreasing order. The loss is invariant to shifting and
    rescaling the logits. It needs at least 3 classes; with fewer, this returns the
    margin loss (same sign, same maximizers for 2 classes) instead of failing.
    """
    if logits.shape[1] < 3:
        return margin(logits, y)
    top = logits.topk(3, dim=1).values
    # -(z_y - max_{i != y} z_i) is exactly the margin loss.
    return margin(logits, y) / (top[:, 0] - top[:, 2] + DLR_EPS)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

    It needs at least 4 classes; with fewer, this returns the targeted margin z_t - z_y.
    """
    if logits.shape[1] < 4:
        return targeted_margin(logits, y, target)
    top = logits.topk(4, dim=1).values
    return targeted_margin(logits, y, target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_EPS)


LOSSES = {"ce": cross_entropy, "margin": margin, "dlr": dlr}


def get_loss(name: str):
    """Look up a loss by its configuration name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(LOSSES)})") from None
