"""Checks run on the model before any attack: randomness, output kind, gradients, stability.

Each costs a few passes per sampled point, next to thousands for the battery.
"""

from __future__ import annotations

import torch
from torch import nn

from robaudit.attacks.losses import cross_entropy, margin
from robaudit.checks.verdict import FAIL, PASS, WARN, CheckResult
from robaudit.models.randomized import RandomnessEvidence

ZERO_SHARE = 0.10  # share of points with zero / non-finite gradients that means masking
ASCENT_SHARE = 0.5  # below this share, a step along the gradient does not raise the loss: shattered
# A step along the gradient must beat a random step of the same size on this share of points. A real
# gradient beats it almost everywhere (first order against none); a decoy gradient unrelated to the
# decisions wins about half the time, and random steps alone raise the margin on 64-71% of the demo
# CNN's points, so ASCENT_SHARE by itself cannot tell a decoy from a gradient (hunt 13: 53% passed).
BEATS_RANDOM_SHARE = 0.65
# ... at a small step: at a quarter of a large eps (Linf 0.4 on MNIST: 0.1 per pixel) a random sign step moves
# the margin as much as a gradient step does, and a healthy MLP fell to 62% (hunt 17). Linf 0.02 of the input
# range per pixel (an L2 step of the same norm) keeps the healthy fixtures at 95-100% and the decoy below 50%.
COMPARE_STEP = 0.02
STABILITY_CALLS = 4
UNSTABLE_WARN, UNSTABLE_FAIL = 0.02, 0.10


def randomness(evidence: RandomnessEvidence, eot_samples: int, repeats: int) -> CheckResult:
    """Check 1: do repeated forward passes on the same batch agree?"""
    numbers = {
        "calls": evidence.calls,
        "samples": evidence.samples,
        "max_relative_logit_change": evidence.max_relative_change,
        "prediction_change_rate": evidence.prediction_changes,
    }
    if not evidence.stochastic:
        return CheckResult("randomness", PASS, f"{evidence.calls} passes on {evidence.samples} inputs gave identical outputs", numbers)
    return CheckResult(
        "randomness",
        WARN,
        f"outputs change between passes (up to {evidence.max_relative_change:.1%} of the logit scale, predictions on "
        f"{evidence.prediction_changes:.0%} of inputs); adapted: EOT gradients over {eot_samples} draws, a point counts "
        f"as correct only if all {repeats} draws get it right; results vary from run to run",
        {**numbers, "eot_samples": eot_samples, "repeats": repeats},
    )


def output_kind(kind: str, saturated: float) -> CheckResult:
    """Check 2: logits or probabilities (whose losses saturate)?"""
    if kind != "probabilities":
        return CheckResult("output", PASS, "the model returns logits", {"output_kind": kind})
    return CheckResult(
        "output",
        WARN,
        f"the model returns probabilities ({saturated:.0%} of rows exactly one-hot in float32); attacks use log-probabilities",
        {"output_kind": kind, "one_hot_rows": saturated},
    )


def _input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss) -> tuple[torch.Tensor, torch.Tensor]:
    point = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(point)
        values = loss(out, y)
        if not values.requires_grad:  # the graph detaches its input: no gradient at all
            return values.detach(), torch.zeros_like(x)
        grad = torch.autograd.grad(values.sum(), point, allow_unused=True)[0]
    return values.detach(), torch.zeros_like(x) if grad is None else grad.detach()


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: float, norm: str, lower: float, upper: float) -> CheckResult:
    """Check 3: are input gradients of the loss usable on correctly classified points?

    Zero or non-finite margin gradients mean white-box attacks cannot move (rounding,
    detached or shattered layers); margin gradients that do not raise the margin when
    followed for a small step mean the gradient is noise; cross-entropy gradients that
    vanish while margin gradients do not mean the outputs saturate (scaled or squashed
    scores), which margin losses and score-based attacks get around.
    """
    if len(x) == 0:
        return CheckResult("gradients", PASS, "no correctly classified point to check", {"points": 0})
    m_value, g_margin = _input_gradients(model, x, y, margin)
    _, g_ce = _input_gradients(model, x, y, cross_entropy)
    flat_m, flat_ce = g_margin.flatten(1), g_ce.flatten(1)
    finite = torch.isfinite(flat_m).all(dim=1)
    zero_m = finite & (flat_m.abs().amax(dim=1) == 0)
    zero_ce = torch.isfinite(flat_ce).all(dim=1) & (flat_ce.abs().amax(dim=1) == 0)
    usable = finite & ~zero_m
    direction = torch.zeros_like(g_margin)
    direction[usable] = g_margin[usable].sign() if norm == "linf" else g_margin[usable] / flat_m[usable].norm(dim=1).view(
        -1, *([1] * (x.dim() - 1))
    )
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    random = noise.sign() if norm == "linf" else noise / noise.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    cap = COMPARE_STEP * (upper - lower) * (1.0 if norm == "linf" else x[0].numel() ** 0.5)
    small = min(step, cap)
    with torch.no_grad():
        moved = margin(model((x + step * direction).clamp(lower, upper)), y)
        along = moved if small == step else margin(model((x + small * direction).clamp(lower, upper)), y)
        moved_random = margin(model((x + small * random).clamp(lower, upper)), y)
    rose = usable & (moved > m_value)
    beat = usable & (along > moved_random)
    n = len(x)
    evidence = {
        "points": n,
        "zero_margin_gradient": float(zero_m.float().mean()),
        "nonfinite_gradient": float((~finite).float().mean()),
        "zero_cross_entropy_gradient": float(zero_ce.float().mean()),
        "margin_rose_along_gradient": float(rose.float().mean()),
        "gradient_beat_random_step": float(beat.float().mean()),
        "compare_step": small,
        "step": step,
        "norm": norm,
    }
    dead = float((~usable).float().mean())
    if dead >= ZERO_SHARE:
        return CheckResult(
            "gradients", FAIL,
            f"input gradients are zero or non-finite on {dead:.0%} of {n} correctly classified points: "
            "white-box attacks cannot move there",
            evidence,
        )  # fmt: skip
    if evidence["margin_rose_along_gradient"] < ASCENT_SHARE:
        return CheckResult(
            "gradients", FAIL,
            f"a {norm} step of {step:.3g} along the gradient raised the margin on only "
            f"{evidence['margin_rose_along_gradient']:.0%} of {n} points: gradients are shattered",
            evidence,
        )  # fmt: skip
    if evidence["gradient_beat_random_step"] < BEATS_RANDOM_SHARE:
        return CheckResult(
            "gradients", FAIL,
            f"a {norm} step of {small:.3g} along the gradient raised the margin more than a random step of the same "
            f"size on only {evidence['gradient_beat_random_step']:.0%} of {n} points: the gradient does not lead "
            "towards the decision boundary",
            evidence,
        )  # fmt: skip
    if evidence["zero_cross_entropy_gradient"] >= ZERO_SHARE:
        return CheckResult(
            "gradients", WARN,
            f"cross-entropy gradients vanish on {evidence['zero_cross_entropy_gradient']:.0%} of {n} points (saturated "
            "scores) while margin gradients work",
            evidence,
        )  # fmt: skip
    return CheckResult(
        "gradients", PASS,
        f"gradients usable on {1 - dead:.0%} of {n} points; a small step along them raised the margin on "
        f"{evidence['margin_rose_along_gradient']:.0%}, more than a random step on {evidence['gradient_beat_random_step']:.0%}",
        evidence,
    )  # fmt: skip


@torch.no_grad()
def stability(judge, x: torch.Tensor, y: torch.Tensor, size: float, lower: float, upper: float, seed: int,
              randomized: bool = False) -> CheckResult:  # fmt: skip
    """Check 10: does tiny random noise flip decisions on correctly classified points?

    ``judge(x, y)`` returns the labels claims rest on (worst case for randomized models,
    whose own randomness then flips decisions too: at most a warning, as the randomness
    check already says it).
    """
    n = len(x)
    if n == 0:
        return CheckResult("stability", PASS, "no correctly classified point to check", {"points": 0})
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.zeros(n, dtype=torch.bool)
    for _ in range(STABILITY_CALLS):
        noise = (2 * torch.rand(x.shape, generator=gen) - 1) * size
        flipped |= judge((x + noise.to(x.dtype)).clamp(lower, upper), y) != y
    share = float(flipped.float().mean())
    evidence = {"points": n, "noise_linf": size, "draws": STABILITY_CALLS, "flipped": share}
    verdict = PASS if share <= UNSTABLE_WARN else WARN if share <= UNSTABLE_FAIL or randomized else FAIL
    text = f"uniform noise of size {size:.2g} flipped {share:.0%} of {n} correctly classified points"
    if randomized and share > UNSTABLE_WARN:
        text += " (new draws of a randomized model: its own noise flips them too)"
    return CheckResult("stability", verdict, text, evidence)
