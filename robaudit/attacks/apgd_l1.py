"""APGD under an L1 threat: the L1-APGD of AutoAttack ("Mind the box", Croce & Hein, ICML 2021).

Plain APGD steps are dense and the L1 ball has its mass at the corners, so under an
L1 threat AutoAttack runs another algorithm, which this module follows:

- the projection is the exact Euclidean projection onto the L1 ball intersected with
  the input box (`project_l1_box`): a projection onto the ball followed by clipping
  spends the budget on pixels the box cuts away (most of them on images with many
  pixels at 0 or 1);
- a step moves the coordinates whose |gradient| is in the top ``share`` of the
  coordinates, all by the same amount, ``step / count`` along the gradient's sign; there
  is no momentum;
- every 4% of a stage's iterations the share becomes the sparsity of the best point so
  far divided by 1.5, ``||x_best - x||_0 / d / 1.5``; where that sparsity fell below 95%
  of the previous check's, the step goes back to the stage's eps and the run continues
  from the best point and its gradient, elsewhere the step shrinks by 1.5 (never below
  eps / 10);
- eps schedule: 3 eps for 30% of the steps, then 2 eps for 30%, then eps for the rest;
  each stage starts at the best point of the one before, projected into its own ball.
  Only the last stage's points count as adversarial: a point misclassified at 3 eps is
  not one at eps.

With fewer than `MIN_SCHEDULED_STEPS` steps the run is a single stage at eps. Cost: one
forward and one backward per iteration and per point still attacked, and one forward
per stage (the last iterate of a stage is only evaluated).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from robaudit.attacks.base import AttackContext, project, project_l1_box
from robaudit.threats import Threat

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, active indices) -> per-sample loss

STAGES = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))  # (multiple of eps, share of the steps): AutoAttack's L1 schedule
MIN_SCHEDULED_STEPS = 10  # below this, one stage at eps (each stage needs a few checks to adapt its share)
CHECK_EVERY = 0.04  # share of a stage's iterations between checks of the sparsity
SHARE_DIVISOR = 1.5  # the share follows the best point's sparsity divided by this
SPARSER = 0.95  # a check where the sparsity fell below this ratio resets the step
STEP_SHRINK = 1.5  # otherwise the step shrinks by this factor
MIN_STEP = 0.1  # in units of the stage's eps
START_SHARE = 0.2  # the share when the start point is x itself (nothing to read a sparsity from)
THRESHOLD_BISECTIONS = 16  # halvings that find each row's |gradient| threshold for its share


def stage_plan(steps: int) -> list[tuple[float, int]]:
    """(multiple of eps, iterations) per stage, the iterations summing to ``steps``."""
    if steps < MIN_SCHEDULED_STEPS:
        return [(1.0, steps)]
    counts = [math.ceil(share * steps) for _, share in STAGES[:-1]]
    counts.append(steps - sum(counts))
    return [(factor, count) for (factor, _), count in zip(STAGES, counts)]


def sparsity(delta: torch.Tensor) -> torch.Tensor:
    """Per row, the number of coordinates a perturbation moves."""
    return (delta.flatten(1) != 0).sum(dim=1).to(delta.dtype)


def sparse_step(grad: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The sign of the gradient on each row's top ``share`` of coordinates by |gradient|, of L1 size 1.

    The threshold is found by bisection on the count of coordinates at or above it
    (a sort per row costs five times as much), so a row may move a few more coordinates
    than its share where many |gradients| are nearly equal.
    """
    flat = grad.flatten(1)
    size = flat.abs()
    wanted = (share.clamp(0, 1) * flat.shape[1]).clamp_min(1)[:, None]
    below = torch.zeros_like(wanted)  # at least `wanted` coordinates reach `below`
    above = size.amax(dim=1, keepdim=True)
    for _ in range(THRESHOLD_BISECTIONS):
        mid = (below + above) / 2
        enough = (size >= mid).sum(dim=1, keepdim=True) >= wanted
        below, above = torch.where(enough, mid, below), torch.where(enough, above, mid)
    chosen = (size >= below) & (flat != 0)
    step = flat.sign() * chosen
    return (step / chosen.sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)


def _into_ball(point: torch.Tensor, x: torch.Tensor, eps: float, ctx: AttackContext, threat: Threat | None) -> torch.Tensor:
    """`point` projected onto the L1 ball of radius eps around x and the box; exactly inside `threat`'s ball if given."""
    if threat is not None:  # the last stage: its points are candidates, checked against the ball in float64
        return project(point, x, threat, ctx.lower, ctx.upper)
    size = torch.full((len(x),), eps, dtype=torch.float64, device=x.device)
    delta = project_l1_box(point - x, size, x, ctx.lower, ctx.upper)
    return (x + delta).clamp(ctx.lower, ctx.upper)


def apgd_l1_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    ctx: AttackContext,
    loss_fn: LossFn,
    steps: int,
    x_init: torch.Tensor,
    evaluate: Callable,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One L1-APGD run from `x_init`: (candidates, found adversarial (bool), best loss of the last stage)."""
    n = x.shape[0]
    view = (-1, *([1] * (x.dim() - 1)))
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_found = x.clone()
    plan = stage_plan(steps)
    point = x + plan[0][0] * (x_init - x)  # a start in the eps ball, scaled to the first stage's ball
    loss_best = torch.full((n,), -math.inf, device=x.device)
    for number, (factor, iterations) in enumerate(plan):
        final = number == len(plan) - 1
        eps = factor * threat.eps
        ball = threat if final else None
        point = _into_ball(point, x, eps, ctx, ball)
        point, loss_best = _stage(model, x, y, eps, ctx, loss_fn, iterations, point, evaluate, ball, found, x_found, view)
    out = torch.where(found.view(view), x_found, point)
    return out, found, loss_best


def _stage(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, ctx: AttackContext, loss_fn: LossFn, iterations: int,
    start: torch.Tensor, evaluate: Callable, ball: Threat | None, found: torch.Tensor, x_found: torch.Tensor,
    view: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One stage at radius eps: its best point per sample and its loss; the last stage (`ball` given) fills
    `found` and `x_found`."""
    final = ball is not None
    n, d = x.shape[0], x[0].numel()
    everyone = torch.arange(n, device=x.device)
    x_adv = start.clone()
    logits, loss, grad = evaluate(model, x_adv, loss_fn, everyone, need_grad=iterations > 0)
    if final:
        broke = logits.argmax(dim=1) != y
        x_found[broke], found[broke] = x_adv[broke], True
    x_best, loss_best = x_adv.clone(), loss.clone()
    if iterations == 0:
        return x_best, loss_best
    grad_best = grad.clone()
    step = torch.full((n,), eps, device=x.device, dtype=x.dtype)
    moved = sparsity(x_adv - x)
    share = torch.where(moved > 0, moved / d / SHARE_DIVISOR, torch.full_like(moved, START_SHARE))
    previous = torch.where(moved > 0, moved, torch.full_like(moved, float(d)))
    check_every, since_check = max(int(CHECK_EVERY * iterations), 1), 0
    active = torch.nonzero(~found).flatten() if final else everyone

    for i in range(iterations):
        if active.numel() == 0:
            break
        z = x_adv[active] + step[active].view(view) * sparse_step(grad[active], share[active])
        z = _into_ball(z, x[active], eps, ctx, ball)
        x_adv[active] = z
        logits, loss, g = evaluate(model, z, loss_fn, active, need_grad=i < iterations - 1)
        broke = logits.argmax(dim=1) != y[active] if final else torch.zeros(len(active), dtype=torch.bool, device=x.device)
        x_found[active[broke]] = z[broke]
        found[active[broke]] = True
        better = loss > loss_best[active]
        improved = active[better]
        x_best[improved], loss_best[improved] = z[better], loss[better]
        if g is not None:
            grad[active] = g
            grad_best[improved] = g[better]

        since_check += 1
        if since_check == check_every:
            since_check = 0
            now = sparsity(x_best[active] - x[active])
            sparser = now / previous[active].clamp_min(1) < SPARSER
            share[active] = now / d / SHARE_DIVISOR
            step[active] = torch.where(sparser, torch.full_like(now, eps), step[active] / STEP_SHRINK).clamp(MIN_STEP * eps, eps)
            previous[active] = now
            reset = active[sparser]
            x_adv[reset], grad[reset] = x_best[reset], grad_best[reset]
        active = active[~broke]
    return x_best, loss_best
