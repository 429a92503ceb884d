"""Auto-PGD (Croce & Hein 2020): APGD-CE / APGD-DLR and the targeted APGD-T.

A faithful port of the algorithm in the original auto-attack repository
(``autoattack/autopgd_base.py``), for Linf and L2:

- start at a random point on the eps-sphere (Linf: ``t = 2*rand - 1`` scaled so its
  Linf norm is eps; L2: a Gaussian direction scaled to L2 norm eps), clipped to the box;
- initial step size 2*eps; a step is ``z = P(x_k + eta * dir)`` (sign of the gradient
  for Linf, the unit-L2 gradient for L2) followed by the momentum step
  ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))``, with no momentum on the
  first iteration;
- at each checkpoint (see :func:`checkpoint_schedule`), per sample, halve the step and
  restart from the best point seen (and its gradient) if (a) the loss increased in at
  most ``rho`` of the iterations since the last checkpoint, or (b) the step was not
  halved at the previous checkpoint and the best loss has not improved since then.

Bookkeeping follows the original code: condition (b) cannot fire at the first
checkpoint, the comparison in (b) is ``best_then >= best_now``, (a) is
``increases <= rho * gap``, and the momentum term after a restart is
``x_best - x_{k-1}`` (the original does not reset the previous iterate). One
deliberate difference: the original's first oscillation window compares the first
iterate's loss with an uninitialised zero; here it is compared with the starting
point's loss, as the paper defines it.

Cost: one forward and one backward per iteration and per point still attacked, plus
one forward (no backward) per point: the gradient at the starting point is the first
backward, and the last iterate is only evaluated (its gradient would never be used).
Nothing broken: ``forwards = (steps + 1) * n``, ``backwards = steps * n``. A point is
dropped from the batch as soon as a forward pass shows it misclassified, and that
iterate is what is returned for it; an unbroken point returns its highest-loss iterate.
Points never interact (models run in eval mode), so dropping them changes nothing
for the others.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.apgd_l1 import LossFn, apgd_l1_run
from robaudit.attacks.base import DUAL, Attack, AttackContext, input_gradient, normalized_step, project, within_rounding
from robaudit.attacks.losses import dlr_targeted, get_loss
from robaudit.threats import Threat


STARTS = ("random", "warm", "clean")  # "warm": the first run starts at AttackContext.start where there is one;
# "clean": the first run starts at x itself (no randomness in the start: the trust checks' unbounded run)
MOMENTUM = 0.75  # weight of the new gradient step; 1 - MOMENTUM goes to x_k - x_{k-1}
INITIAL_STEP = 2.0  # initial step size, in units of eps (Linf and L2)
L1_METHOD = "L1-APGD: sparse steps of size eps, no momentum, radius 3/2/1 eps over 30/30/40% of the steps"


def schedule_parameters(steps: int) -> tuple[int, int, int]:
    """(first gap, minimal gap, gap decrease) in iterations, exactly as the original computes them."""
    return max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)


def checkpoint_schedule(steps: int) -> list[int]:
    """Iteration counts after which APGD checks its step size (the start, 0, is not a check).

    The first gap is 22% of the iterations, each later gap 3% shorter, never below 6%
    (integer iteration counts as in the original code). For 100 steps:
    ``[22, 41, 57, 70, 80, 87, 93, 99]``, the same as the paper's
    ``ceil(p_j * steps)`` with ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.
    For other step counts the original code's integer gaps are used (they can differ
    from the paper's formula by an iteration or so; e.g. 10 steps check after every
    iteration from the 2nd on).
    """
    first, minimum, decrease = schedule_parameters(steps)
    out: list[int] = []
    done, gap = 0, first
    while done + gap <= steps:
        done += gap
        out.append(done)
        gap = max(gap - decrease, minimum)
    return out


def apgd_start(x: torch.Tensor, threat: Threat, ctx: AttackContext) -> torch.Tensor:
    """A random point on the eps-sphere, clipped to the box (the original's initialisation)."""
    view = (-1, *([1] * (x.dim() - 1)))
    if threat.norm == "linf":
        t = 2 * torch.rand(x.shape, generator=ctx.generator, device="cpu") - 1
        size = t.flatten(1).abs().amax(dim=1)
    elif threat.norm == "l2":
        t = torch.randn(x.shape, generator=ctx.generator, device="cpu")
        size = t.flatten(1).norm(dim=1)
    elif threat.norm == "l1":
        t = torch.randn(x.shape, generator=ctx.generator, device="cpu")
        size = t.flatten(1).abs().sum(dim=1)
    else:
        raise NotImplementedError(f"APGD does not support {threat.norm}")
    delta = threat.eps * t / (size.view(view) + 1e-12)
    return within_rounding((x + delta.to(device=x.device, dtype=x.dtype)).clamp(ctx.lower, ctx.upper), x, threat)


def first_point(x: torch.Tensor, threat: Threat, ctx: AttackContext, start: str) -> torch.Tensor:
    """APGD's first iterate: a random start, the context's start projected into the ball (``warm``), or x (``clean``).

    The random start is always drawn, so the generator advances the same way whatever
    the start; only the first run (``ctx.restart == 0``) is warm or clean.
    """
    out = apgd_start(x, threat, ctx)
    if start == "clean" and ctx.restart == 0:
        return x.clone()
    if start == "warm" and ctx.start is not None and ctx.restart == 0:
        have = torch.isfinite(ctx.start.flatten(1)).all(dim=1)
        if bool(have.any()):
            out[have] = project(ctx.start[have].to(x.dtype), x[have], threat, ctx.lower, ctx.upper)
    return out


def _evaluate(
    model: nn.Module, point: torch.Tensor, loss_fn: LossFn, idx: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward (and, if asked, one backward): logits, per-sample losses, input gradient."""
    point = point.detach().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        logits = model(point)
        losses = loss_fn(logits, idx)
    grad = input_gradient(losses.sum(), point).detach() if need_grad else None
    return logits.detach(), losses.detach(), grad


def apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    ctx: AttackContext,
    loss_fn: LossFn,
    steps: int,
    rho: float,
    x_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from `x_init` (default a random start): (candidates, found adversarial (bool), best loss).

    Under an L1 threat the run is AutoAttack's L1-APGD (`robaudit.attacks.apgd_l1`).
    """
    if threat.norm == "l1":
        start = apgd_start(x, threat, ctx) if x_init is None else x_init
        return apgd_l1_run(model, x, y, threat, ctx, loss_fn, steps, start, _evaluate)
    n = x.shape[0]
    view = (-1, *([1] * (x.dim() - 1)))
    eps = threat.eps
    first_gap, min_gap, gap_decrease = schedule_parameters(steps)

    x_adv = apgd_start(x, threat, ctx) if x_init is None else x_init.clone()
    x_prev = x_adv.clone()
    everyone = torch.arange(n, device=x.device)
    logits, loss, grad = _evaluate(model, x_adv, loss_fn, everyone, need_grad=True)
    assert grad is not None
    found = logits.argmax(dim=1) != y
    x_found = x_adv.clone()  # rows valid where found
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()

    step = torch.full((n,), INITIAL_STEP * eps, device=x.device, dtype=x.dtype)
    last_loss = loss.clone()
    increases = torch.zeros(n, device=x.device)
    reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
    best_last_check = loss_best.clone()
    gap, since_check = first_gap, 0
    active = torch.nonzero(~found).flatten()

    for i in range(steps):
        if active.numel() == 0:
            break
        current, center = x_adv[active], x[active]
        momentum = current - x_prev[active]
        x_prev[active] = current
        z = current + step[active].view(view) * normalized_step(grad[active], threat.norm)
        z = project(z, center, threat, ctx.lower, ctx.upper)
        if i > 0:  # no momentum on the first iteration
            z = current + MOMENTUM * (z - current) + (1 - MOMENTUM) * momentum
            z = project(z, center, threat, ctx.lower, ctx.upper)
        x_adv[active] = z

        logits, loss, g = _evaluate(model, z, loss_fn, active, need_grad=i < steps - 1)
        broke = logits.argmax(dim=1) != y[active]
        x_found[active[broke]] = z[broke]
        found[active[broke]] = True

        increases[active] += (loss > last_loss[active]).to(increases.dtype)
        last_loss[active] = loss
        better = loss > loss_best[active]
        improved = active[better]
        x_best[improved] = z[better]
        loss_best[improved] = loss[better]
        if g is not None:
            grad[active] = g
            grad_best[improved] = g[better]

        since_check += 1
        if since_check == gap:
            oscillating = increases[active] <= gap * rho
            stalled = ~reduced_last[active] & (best_last_check[active] >= loss_best[active])
            reduce = oscillating | stalled
            reduced_last[active] = reduce
            best_last_check[active] = loss_best[active]
            restart = active[reduce]
            step[restart] /= 2
            x_adv[restart] = x_best[restart]
            grad[restart] = grad_best[restart]
            increases.zero_()
            since_check, gap = 0, max(gap - gap_decrease, min_gap)

        active = active[~broke]

    out = torch.where(found.view(view), x_found, x_best)
    return out, found, loss_best


class APGD(Attack):
    """Untargeted APGD on the cross-entropy (``apgd-ce``) or DLR loss (``apgd-dlr``).

    DLR needs at least 3 classes; with fewer the margin loss runs instead (for two
    classes it has the same maximizers), and ``params()`` says so once the class count
    is known (from ``num_classes`` or from the first ``perturb``).
    """

    name: ClassVar[str] = "apgd-ce"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    randomized: ClassVar[bool] = True

    def __init__(
        self, loss: str = "ce", steps: int = 100, rho: float = 0.75, num_classes: int | None = None, start: str = "random"
    ) -> None:
        if loss not in ("ce", "dlr", "margin"):
            raise ValueError(f"APGD supports the losses ce, dlr and margin, not '{loss}'")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, not {start!r}")
        if steps < 1:
            raise ValueError("APGD needs at least one step")
        if not 0 < rho <= 1:
            raise ValueError("rho must be in (0, 1]")
        self.name = f"apgd-{loss}"  # type: ignore[misc]  # the name follows the loss
        self.loss_name = loss
        self.steps = steps
        self.rho = rho
        self.num_classes = num_classes
        self.start = start
        self._classes_seen: int | None = None

    def effective_loss(self, num_classes: int | None) -> str:
        """The loss that actually runs for a model with ``num_classes`` outputs."""
        if self.loss_name != "dlr":
            return self.loss_name
        if num_classes is None:
            return "dlr (margin below 3 classes)"
        return "dlr" if num_classes >= 3 else "margin (dlr needs 3+ classes)"

    def params(self) -> dict[str, Any]:
        classes = self._classes_seen if self._classes_seen is not None else self.num_classes
        return {
            "steps": self.steps,
            "rho": self.rho,
            "loss": self.effective_loss(classes),
            "start": self.start,
            "initial_step": f"{INITIAL_STEP:g}*eps",
            "momentum": MOMENTUM,
            "checkpoints": checkpoint_schedule(self.steps),
            "under_l1": L1_METHOD,
        }

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        base = get_loss(self.loss_name)  # dlr falls back to margin by itself below 3 classes

        def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            self._classes_seen = int(logits.shape[1])
            return base(logits, y[idx])

        init = first_point(x, threat, ctx, self.start)
        out, found, _ = apgd_run(model, x, y, threat, ctx, loss_fn, self.steps, self.rho, init)
        self.crossed = found  # the runner counts points seen broken whose candidate does not verify
        return out


RANKINGS = ("logits", "linear")


def linear_ranking(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, candidates: int
) -> tuple[torch.Tensor, int]:
    """Classes ordered by the linearized distance to their boundary, nearest first (MALT's target choice).

    Melamed et al. (NeurIPS 2024) rank targets by ``(z_y - z_t) / ||grad (z_y - z_t)||_*``
    (the dual norm of the threat's), the distance at which the linearized margin
    reaches zero, instead of by the logit z_t alone: the class with the second-largest
    logit is often not the nearest one. Only the ``candidates`` classes with the largest
    logits after the label are ranked (one backward pass each, through one forward);
    the others follow in logit order. Returns (B, K) with the label in column 0, and K.
    """
    point = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(point)
        classes = int(logits.shape[1])
        by_logit = logits.detach().argsort(dim=1, descending=True)
        others = by_logit[by_logit != y[:, None]].view(len(y), classes - 1)
        m = min(candidates, classes - 1)
        true = logits.gather(1, y[:, None]).squeeze(1)
        distance = torch.empty(len(y), m, device=x.device, dtype=logits.dtype)
        for k in range(m):
            margin = true - logits.gather(1, others[:, k : k + 1]).squeeze(1)
            grad = input_gradient(margin.sum(), point, retain_graph=k < m - 1)
            size = grad.flatten(1).norm(p=DUAL[threat.norm], dim=1)
            distance[:, k] = margin.detach() / size.clamp_min(1e-12)
    order = distance.argsort(dim=1, stable=True)
    ranked = torch.cat([others[:, :m].gather(1, order), others[:, m:]], dim=1)
    return torch.cat([y[:, None], ranked], dim=1), classes


class APGDTargeted(Attack):
    """APGD-T: APGD on the targeted DLR loss, one run per target class.

    The targets are the classes ranked 2, 3, ..., n_targets + 1 by the clean logits
    (capped at the number of classes minus one), or with ``skip_targets = s`` the ones
    ranked s + 2, ..., s + n_targets + 1 (the rest of a list whose head an earlier entry
    ran); each run only attacks the points no earlier target has broken. Targeted DLR
    needs at least 4 classes; with fewer the targeted margin ``z_t - z_y`` runs instead.
    Cost with nothing broken: ``forwards = n * (1 + T * (steps + 1))`` (one clean forward
    ranks the targets), ``backwards = n * T * steps``, with T the number of targets
    actually run; ``ranking="linear"`` adds ``n * min(candidates, classes - 1)`` backwards.
    """

    name: ClassVar[str] = "apgd-t"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    randomized: ClassVar[bool] = True

    def __init__(
        self,
        steps: int = 100,
        n_targets: int = 9,
        rho: float = 0.75,
        num_classes: int | None = None,
        ranking: str = "logits",
        candidates: int = 9,
        skip_targets: int = 0,
    ) -> None:
        if steps < 1:
            raise ValueError("APGD-T needs at least one step")
        if skip_targets < 0:
            raise ValueError("skip_targets must be at least 0")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
        if candidates < 1:
            raise ValueError("candidates must be at least 1")
        if n_targets < 1:
            raise ValueError("APGD-T needs at least one target")
        if not 0 < rho <= 1:
            raise ValueError("rho must be in (0, 1]")
        self.steps = steps
        self.n_targets = n_targets
        self.rho = rho
        self.num_classes = num_classes
        self.ranking = ranking
        self.candidates = candidates
        self.skip_targets = skip_targets
        self._classes_seen: int | None = None

    def targets_for(self, num_classes: int | None) -> int:
        """How many targets run for a model with ``num_classes`` outputs."""
        if num_classes is None:
            return self.n_targets
        return max(0, min(self.n_targets, num_classes - 1 - self.skip_targets))

    def params(self) -> dict[str, Any]:
        classes = self._classes_seen if self._classes_seen is not None else self.num_classes
        if classes is None:
            loss = "dlr-targeted (targeted margin below 4 classes)"
        else:
            loss = "dlr-targeted" if classes >= 4 else "targeted margin (dlr-targeted needs 4+ classes)"
        return {
            "steps": self.steps,
            "rho": self.rho,
            "loss": loss,
            "n_targets": self.targets_for(classes),
            "ranking": self.ranking,
            **({"skip_targets": self.skip_targets} if self.skip_targets else {}),
            **({"candidates": self.candidates} if self.ranking == "linear" else {}),
            "initial_step": f"{INITIAL_STEP:g}*eps",
            "momentum": MOMENTUM,
            "checkpoints": checkpoint_schedule(self.steps),
            "under_l1": L1_METHOD,
        }

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if self.ranking == "linear":
            ranking, classes = linear_ranking(model, x, y, threat, self.candidates)
        else:
            with torch.no_grad():
                clean_logits = model(x)
            classes = int(clean_logits.shape[1])
            ranking = clean_logits.argsort(dim=1, descending=True)
        self._classes_seen = classes

        out = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        first = 2 + self.skip_targets
        for rank in range(first, first + self.targets_for(classes)):
            todo = torch.nonzero(~found).flatten()
            if todo.numel() == 0:
                break
            target = ranking[todo, rank - 1]
            y_todo = y[todo]

            def loss_fn(logits: torch.Tensor, idx: torch.Tensor, y_todo=y_todo, target=target) -> torch.Tensor:
                return dlr_targeted(logits, y_todo[idx], target[idx])

            candidates, hit, loss = apgd_run(model, x[todo], y_todo, threat, ctx, loss_fn, self.steps, self.rho)
            # Broken points take their adversarial iterate; the others keep their highest-loss point.
            keep = hit | (loss > best_loss[todo])
            out[todo[keep]] = candidates[keep]
            best_loss[todo] = torch.maximum(best_loss[todo], loss)
            found[todo[hit]] = True
        self.crossed = found
        return out
