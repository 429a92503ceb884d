"""The one interface every attack implements, and the geometry they share.

Attacks stay small: an attack only proposes candidate inputs. The runner
(`robaudit.attacks.runner`) owns batching, skipping points that are already broken,
restarts, pass counting, projection into the threat ball and the input box, and the
re-verification that decides whether a candidate counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.threats import Threat, perturbation_norms


@dataclass(frozen=True)
class AttackContext:
    """What an attack may know besides the batch: box bounds, RNG, class count, a warm start.

    ``start`` (per point of the batch, NaN rows where there is none) is a point worth
    starting from: the minimal-norm stage's nearest adversarial input. Attacks that can
    use it (APGD with ``start="warm"``) begin their first run there, projected into the
    threat ball. ``restart`` counts the runs of the same attack on the batch.
    """

    lower: float
    upper: float
    num_classes: int
    generator: torch.Generator
    start: torch.Tensor | None = None
    restart: int = 0


class Attack(ABC):
    """A perturbation search.

    ``kind`` is ``"fixed"`` for attacks that search inside the threat's radius and
    ``"minimal"`` for attacks that look for the smallest perturbation (their results
    also give a per-sample distance). ``randomized`` attacks benefit from restarts.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "fixed"
    # Set by `perturb` in attacks that watch their own iterates: True where some iterate was
    # misclassified. The runner counts such points whose returned candidate does not verify
    # (the "silent success" trust check: a bookkeeping bug, or a randomized model).
    crossed: torch.Tensor | None = None
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = True

    def supports(self, threat: Threat) -> bool:
        """Whether this attack can run under the threat's norm."""
        return threat.norm in self.norms

    @abstractmethod
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        """Return candidate inputs, same shape as ``x``: adversarial where the attack succeeded."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The attack's effective parameters, written into the report's config."""


DUAL = {"linf": 1.0, "l2": 2.0, "l1": float("inf")}  # the norm that measures gradients against each threat
L1_TOP = 0.05  # share of coordinates an L1 step moves (AutoAttack's APGD-L1 starts at 5%; 1% was weaker than FMN, measured)


L1_BOX_BISECTIONS = 20  # halvings of the threshold's bracket before the linear solves
L1_BOX_SOLVES = 2  # linear solves inside the bracket: each is exact unless a breakpoint lies in it


def input_gradient(total: torch.Tensor, point: torch.Tensor, *, retain_graph: bool | None = None) -> torch.Tensor:
    """d total / d point as a dense tensor of its own.

    autograd may hand back a broadcast view (the gradient of `0 * x.sum()` is one value
    expanded to the input's shape, stride 0), and the attacks write into gradients in
    place (`sign_`, indexed assignment), which such a view refuses.
    """
    (grad,) = torch.autograd.grad(total, point, retain_graph=retain_graph)
    return grad if grad.is_contiguous() else grad.contiguous()


def _l1_box_size(size: torch.Tensor, room: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Per row, the L1 size of the box-capped soft threshold at lam: sum min(max(size - lam, 0), room)."""
    kept = size - lam
    kept.clamp_(min=0)
    torch.minimum(kept, room, out=kept)
    return kept.sum(dim=1, keepdim=True)


def project_l1_box(delta: torch.Tensor, eps: torch.Tensor, x: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Euclidean projection of each row of `delta` onto {d : ||d||_1 <= eps_row, lower <= x + d <= upper}.

    Projecting onto the L1 ball first and clipping to the box after wastes budget on
    coordinates the box cuts: on images with many pixels at 0 or 1 most of an L1 step can
    vanish that way ("Mind the box", Croce & Hein 2021). The exact projection keeps
    ``sign(d) * clamp(|d| - lam, 0, room)``, where room is how far the box lets the
    coordinate move its way, for the threshold lam >= 0 at which the L1 size (falling
    monotonically and piecewise linearly in lam) is eps. A bisection narrows lam down to
    a bracket; inside it the coordinates that are neither zero nor at their room give lam
    by one linear equation, which then splits the bracket again. The result uses the
    bracket's upper end, where the L1 size was at most eps as summed in the delta's dtype
    (callers that need the ball exactly apply `within_rounding`).
    """
    flat, point = delta.flatten(1), x.flatten(1).to(delta.dtype)
    room = torch.where(flat >= 0, upper - point, point - lower).clamp_min(0)
    size = flat.abs()
    boxed = torch.minimum(size, room)
    e = eps.to(device=flat.device, dtype=flat.dtype)[:, None]
    over = (boxed.sum(dim=1, keepdim=True) > e).flatten()
    if bool(over.any()):
        s, r, e = size[over], room[over], e[over]
        below = torch.zeros_like(e)  # the L1 size at `below` exceeds eps, at `above` it does not
        above = s.amax(dim=1, keepdim=True)
        for _ in range(L1_BOX_BISECTIONS):
            mid = (below + above) / 2
            too_big = _l1_box_size(s, r, mid) > e
            below, above = torch.where(too_big, mid, below), torch.where(too_big, above, mid)
        for _ in range(L1_BOX_SOLVES):
            mid = (below + above) / 2
            capped = s - mid >= r
            free = (s > mid) & ~capped
            count = free.sum(dim=1, keepdim=True)
            fixed = torch.where(free, s, 0).sum(dim=1, keepdim=True) + torch.where(capped, r, 0).sum(dim=1, keepdim=True)
            lam = torch.where(count > 0, (fixed - e) / count.clamp_min(1), above)
            lam = torch.minimum(torch.maximum(lam, below), above)
            too_big = _l1_box_size(s, r, lam) > e
            below, above = torch.where(too_big, lam, below), torch.where(too_big, above, lam)
        boxed[over] = torch.minimum((s - above).clamp_min(0), r)
    return (flat.sign() * boxed).view_as(delta)


def project(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat, lower: float, upper: float) -> torch.Tensor:
    """Project onto the threat ball around ``x`` intersected with the input box.

    For Linf the two projections commute. For L2, shrinking the perturbation first and
    clipping to the box afterwards can only shrink each coordinate further, so the result
    stays in the ball. For L1 the projection onto the intersection is computed exactly
    (`project_l1_box`).
    """
    delta = x_adv - x
    if threat.norm == "linf":
        delta = delta.clamp(-threat.eps, threat.eps)
    elif threat.norm == "l2":
        norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        factor = (threat.eps / norms).clamp(max=1.0)
        delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
    elif threat.norm == "l1":
        eps = torch.full((len(delta),), float(threat.eps), dtype=torch.float64, device=delta.device)
        delta = project_l1_box(delta, eps, x, lower, upper)
    return within_rounding((x + delta).clamp(lower, upper), x, threat)


def within_rounding(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat, tries: int = 4) -> torch.Tensor:
    """`x_adv` with the coordinates that float32 rounding of x + delta carried past eps moved back towards x.

    x + eps rounds to the nearest float32, up to half a unit in the last place of x above
    x + eps: nothing at eps = 8/255, but 19% of eps at 1e-7. Where the exact (float64) norm
    exceeds eps, every moved coordinate steps one float32 towards x, a few times; a point
    still outside becomes x itself (no candidate). Verification accepts only what lies
    within eps (`threats.within_ball`).
    """
    delta = x_adv.double() - x.double()
    norms = perturbation_norms(delta, threat.norm)
    over = norms > threat.eps
    if not bool(over.any()):
        return x_adv
    if threat.norm == "linf":  # first the projection again, in float64 (an input in float64 stays exact)
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        scale = torch.where(over, threat.eps / norms.clamp_min(1e-300) * (1 - 1e-12), torch.ones_like(norms))
        delta = delta * scale.view(-1, *([1] * (delta.dim() - 1)))
    x_adv = torch.where(over.view(-1, *([1] * (x.dim() - 1))), (x.double() + delta).to(x_adv.dtype), x_adv)
    for _ in range(tries):
        delta = x_adv.double() - x.double()
        over = perturbation_norms(delta, threat.norm) > threat.eps
        if not bool(over.any()):
            return x_adv
        step = torch.nextafter(x_adv, x)
        if threat.norm == "linf":  # only the coordinates past eps
            move = delta.abs() > threat.eps
        else:
            move = (delta != 0) & over.view(-1, *([1] * (delta.dim() - 1)))
        x_adv = torch.where(move, step, x_adv)
    delta = x_adv.double() - x.double()
    over = (perturbation_norms(delta, threat.norm) > threat.eps).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(over, x, x_adv)


def random_start(x: torch.Tensor, threat: Threat, ctx: AttackContext) -> torch.Tensor:
    """A random point in the threat ball (uniform cube for Linf, uniform ball for L2), in the box."""
    shape = x.shape
    if threat.norm == "linf":
        noise = torch.rand(shape, generator=ctx.generator, device="cpu").to(x.device)
        delta = (2 * noise - 1) * threat.eps
    elif threat.norm == "l2":
        direction = torch.randn(shape, generator=ctx.generator, device="cpu").to(x.device)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        dim = x[0].numel()
        radius = torch.rand(shape[0], generator=ctx.generator, device="cpu").to(x.device) ** (1.0 / dim)
        delta = direction * (threat.eps * radius).view(-1, *([1] * (x.dim() - 1)))
    elif threat.norm == "l1":  # a Laplace direction of L1 norm eps times U^(1/d): uniform in the L1 ball
        raw = torch.empty(shape).exponential_(generator=ctx.generator)
        signs = torch.randint(0, 2, shape, generator=ctx.generator) * 2 - 1
        direction = (raw * signs).to(x.device)
        direction = direction / direction.flatten(1).abs().sum(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        radius = torch.rand(shape[0], generator=ctx.generator, device="cpu").to(x.device) ** (1.0 / x[0].numel())
        delta = direction * (threat.eps * radius).view(-1, *([1] * (x.dim() - 1)))
    else:
        raise NotImplementedError(f"random start for {threat.norm} is not implemented")
    return (x + delta.to(x.dtype)).clamp(ctx.lower, ctx.upper)


def normalized_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size for the norm (sign for Linf, unit L2 vector for L2)."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        size = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / size.view(-1, *([1] * (grad.dim() - 1)))
    if norm == "l1":  # sparse steepest ascent (SLIDE, Tramer & Boneh 2019): the top L1_TOP share of coordinates
        flat = grad.flatten(1)
        k = max(1, int(flat.shape[1] * L1_TOP))
        cut = flat.abs().topk(k, dim=1).values[:, -1:]
        chosen = (flat.abs() >= cut) & (flat != 0)
        step = flat.sign() * chosen
        return (step / chosen.sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)
    raise NotImplementedError(f"steps for {norm} are not implemented")
