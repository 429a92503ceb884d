"""Decision-surface robustness indicator (Yu, Liu, Wang, Chen): Jacobian and Hessian of g per sample.

For each sample: g = z_y - max_{j != y} z_j at x, its input gradient J (one backward),
the extreme Hessian eigenvalues and a near-zero-eigenvalue fraction from batched Lanczos
on Hessian-vector products (double backprop), and the second-order predicted drop of g
inside each threat ball (`bounds.py`). The bound's curvature term also uses a
finite-difference curvature measured across the ball (at its L2 radius, along the
attack direction and random directions): the Hessian at x alone understates how fast
the gradient changes over a finite perturbation. Piecewise-linear nets (ReLU, max-pool),
whose autograd Hessian is exactly zero, are detected from the first Hessian-vector
product, skip Lanczos and rely on the finite-difference curvature alone.

Random probes on each ball's surface (forward passes only) test the prediction: a
probe that moves g more than the predicted worst case means the local picture is wrong
there, the signature of gradient masking (e.g. input quantization). The model-level
score (`score.py`) takes the larger of the two and reports how often that happened.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from robaudit.attacks.runner import NoProgress, ProgressSink
from robaudit.errors import RobauditError
from robaudit.measures.bounds import ball_probes, l2_radius, predicted_drop
from robaudit.measures.decision import LocalModel, NoSecondDerivative, evaluate, fd_curvature
from robaudit.measures.lanczos import lanczos
from robaudit.measures.streams import SampleStreams, normal
from robaudit.measures.score import aggregate
from robaudit.threats import Threat

DEFAULT_ZERO_THRESHOLD = 1e-3
PIECEWISE_RTOL = 1e-6  # ||H v|| <= this * ||J||: no measurable second derivative
DEFAULT_SCALE = 0.5  # finite-difference scale without threats (pixel L2 units)
HEADLINE = ""  # key of the reported curvature's scale among the per-threat ones
LANCZOS_MEMORY = 256 * 2**20  # bytes of Lanczos vectors per batch; larger inputs get smaller batches


@dataclass(frozen=True)
class Budget:
    """How much work per sample: Lanczos steps (= HVPs), curvature directions, probes per threat."""

    lanczos_steps: int
    curvature_random: int
    probes: int


BUDGETS: dict[str, Budget] = {
    "fast": Budget(lanczos_steps=8, curvature_random=1, probes=2),
    "default": Budget(lanczos_steps=16, curvature_random=2, probes=4),
    "thorough": Budget(lanczos_steps=48, curvature_random=6, probes=16),
}


@dataclass
class SampleIndicator:
    """One sample's local decision surface (plain floats, JSON-friendly via ``to_dict``).

    ``hessian_*`` describe the Hessian at x itself (Lanczos). ``curvature`` is the
    finite-difference curvature at the scale ``ModelIndicator.curvature_scale``, measured
    for every net: for piecewise-linear nets the ``hessian_*`` values are the autograd
    Hessian (exactly zero), ``hessian_zero_ratio`` is None, and ``curvature`` is the only
    second-order information; show it there, not the zeros. The bound for threat t uses
    L = max(hessian_max_abs, curvature_by_threat[t]).
    """

    g: float
    jacobian_l1: float
    jacobian_l2: float
    jacobian_linf: float
    jacobian_zero_ratio: float
    hessian_max_abs: float
    hessian_max: float
    hessian_min: float
    hessian_zero_ratio: float | None
    curvature: float | None
    piecewise_linear: bool
    predicted_drop: dict[str, float]
    predicted_holds: dict[str, bool]
    observed_drop: dict[str, float] = field(default_factory=dict)  # largest |g change| over the random probes
    curvature_by_threat: dict[str, float] = field(default_factory=dict)  # at each threat's scale, used in its bound

    def to_dict(self) -> dict[str, Any]:
        """JSON has no NaN: a value that could not be measured (a gradient that is not finite) is null."""
        return _finite_or_none(asdict(self))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


@dataclass
class ModelIndicator:
    """The model-level score and what it was made of; ``formula`` says how, in words."""

    score: float
    higher_is_more_robust: bool
    parts: dict[str, float]
    formula: str
    zero_threshold: float
    curvature_scale: float | None
    hvp_per_sample: int
    seconds: float
    forwards_per_sample: float = 0.0
    backwards_per_sample: float = 0.0
    curvature_scales: dict[str, float] = field(default_factory=dict)  # threat -> h used in its bound
    masking_suspected: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Batch:
    """Per-sample tensors of one batch (float64, CPU)."""

    g: torch.Tensor
    j1: torch.Tensor
    j2: torch.Tensor
    jinf: torch.Tensor
    jzero: torch.Tensor
    hmax: torch.Tensor
    hmin: torch.Tensor
    habs: torch.Tensor
    hzero: torch.Tensor
    curvature: dict[str, torch.Tensor]  # per threat key (and HEADLINE): FD curvature at that scale
    piecewise: torch.Tensor
    drop: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]


@dataclass
class _Settings:
    threats: list[Threat]
    budget: Budget
    zero_threshold: float
    scales: dict[str, tuple[str, float]]  # threat key (and HEADLINE) -> (attack-direction norm, scale h)
    box: tuple[float, float] | None
    generator: SampleStreams | None = None  # one stream per sample of the batch being measured (set per batch)


@dataclass
class _Cost:
    """Per-sample passes summed over the samples (divided by n at the end)."""

    forwards: int = 0
    backwards: int = 0
    hvps: int = 0
    no_hessian: str | None = None  # why no Hessian-vector product could be taken (an op without a second derivative)


def _spectrum(local: LocalModel, x: torch.Tensor, s: _Settings, cost: _Cost) -> tuple[torch.Tensor, ...]:
    """(max, min, max |.|, zero fraction, piecewise flag) of each sample's Hessian.

    The first Hessian-vector product decides: exactly (to PIECEWISE_RTOL) zero means a
    piecewise-linear net and no more products are spent on it.
    """
    b = len(x)
    v0 = normal(s.generator, (b, x[0].numel()), torch.float64).to(x.device)
    v0 = v0 / v0.norm(dim=1, keepdim=True)
    # A sample whose gradient or any Hessian-vector product is not finite (a probability that
    # underflows, sqrt at 0) has no Hessian to speak of: its values are NaN (unknown), and its
    # products are zeroed so they cannot spoil the other samples' Lanczos runs.
    broken = ~torch.isfinite(local.grad.flatten(1)).all(dim=1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        nonlocal broken
        out = local.hvp(v.view_as(x)).flatten(1).double()
        broken = broken | ~torch.isfinite(out).all(dim=1)
        return torch.where(broken[:, None], torch.zeros_like(out), out)

    zeros = torch.zeros(b, dtype=torch.float64, device=x.device)
    nan = torch.full_like(zeros, float("nan"))
    try:
        hv0 = matvec(v0)
    except NoSecondDerivative as exc:  # the Hessian is unknown, not zero: NaN, and not piecewise linear
        cost.no_hessian = str(exc)
        return nan, nan, nan, nan, torch.zeros(b, dtype=torch.bool, device=x.device)
    piecewise = (hv0.norm(dim=1) <= PIECEWISE_RTOL * local.grad.flatten(1).double().norm(dim=1)) & ~broken
    if piecewise.all():
        cost.hvps += b
        return zeros, zeros, zeros, nan, piecewise
    run = lanczos(
        matvec, v0, s.budget.lanczos_steps, generator=s.generator, first_product=hv0, noise_eps=torch.finfo(x.dtype).eps
    )
    cost.hvps += b * run.steps
    keep = ~piecewise
    top, bottom, largest = (torch.where(broken, nan, v * keep) for v in run.extremes())
    zero_fraction = torch.where(keep & ~broken, run.fraction_within(s.zero_threshold), nan)
    return top, bottom, largest, zero_fraction, piecewise


def _measure_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: _Settings, cost: _Cost) -> _Batch:
    b = len(x)
    local = LocalModel(model, x, y)
    cost.forwards += b
    cost.backwards += b
    grad = local.grad.flatten(1).double()
    hmax, hmin, habs, hzero, piecewise = _spectrum(local, x, s, cost)

    curvature = {}
    for plan in sorted(set(s.scales.values())):
        norm, h = plan
        kappa = fd_curvature(model, x, y, local.grad, h, norm, s.budget.curvature_random, s.generator, s.box)
        curvature[plan] = kappa.to(habs.device)
        cost.forwards += b * (1 + s.budget.curvature_random)
        cost.backwards += b * (1 + s.budget.curvature_random)

    drops, observed = {}, {}
    for threat in s.threats:
        key = threat.canonical
        second = curvature[s.scales[key]]  # with an unknown Hessian, the finite-difference curvature alone
        drops[key] = predicted_drop(grad, second if cost.no_hessian else torch.maximum(habs, second), threat)
        observed[key] = _probe(model, x, y, local.g, threat, s, cost)
    return _Batch(
        g=local.g.double(), j1=grad.abs().sum(1), j2=grad.norm(dim=1), jinf=grad.abs().amax(1),
        jzero=(grad.abs() <= s.zero_threshold).double().mean(1), hmax=hmax, hmin=hmin, habs=habs, hzero=hzero,
        curvature={k: curvature[plan] for k, plan in s.scales.items()}, piecewise=piecewise, drop=drops,
        observed=observed,
    )  # fmt: skip


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, threat: Threat, s: _Settings, cost: _Cost):
    """Largest |g(x + delta) - g(x)| over random points on the ball's surface (kept in the box)."""
    count = s.budget.probes
    if count == 0:
        return torch.zeros(len(x), dtype=torch.float64, device=x.device)
    points = x.unsqueeze(0) + ball_probes(x, threat, count, s.generator)
    if s.box is not None:
        points = points.clamp(*s.box)
    moved = evaluate(model, points.flatten(0, 1), y.repeat(count), batch_size=max(len(x), 1) * count)
    cost.forwards += len(x) * count
    return (moved.view(count, -1) - g).abs().amax(dim=0).double()


def _samples(parts: list[_Batch], threats: list[Threat]) -> list[SampleIndicator]:
    def cat(name: str) -> list:
        return torch.cat([getattr(p, name).cpu() for p in parts]).tolist()

    def cat_dict(name: str, key: str) -> list:
        return torch.cat([getattr(p, name)[key].cpu() for p in parts]).tolist()

    cols = {n: cat(n) for n in ("g", "j1", "j2", "jinf", "jzero", "hmax", "hmin", "habs", "hzero", "piecewise")}
    keys = [t.canonical for t in threats]
    drop = {k: cat_dict("drop", k) for k in keys}
    seen = {k: cat_dict("observed", k) for k in keys}
    curv = {k: cat_dict("curvature", k) for k in [HEADLINE, *keys]}
    out = []
    for i, g in enumerate(cols["g"]):
        pl = bool(cols["piecewise"][i])
        out.append(
            SampleIndicator(
                g=g, jacobian_l1=cols["j1"][i], jacobian_l2=cols["j2"][i], jacobian_linf=cols["jinf"][i],
                jacobian_zero_ratio=cols["jzero"][i], hessian_max_abs=cols["habs"][i], hessian_max=cols["hmax"][i],
                hessian_min=cols["hmin"][i], hessian_zero_ratio=None if pl else cols["hzero"][i],
                curvature=curv[HEADLINE][i], piecewise_linear=pl,
                predicted_drop={k: drop[k][i] for k in keys},
                predicted_holds={k: bool(drop[k][i] < g) for k in keys},
                observed_drop={k: seen[k][i] for k in keys},
                curvature_by_threat={k: curv[k][i] for k in keys},
            )  # fmt: skip
        )
    return out


def _scales(threats: list[Threat], dim: int, fixed: float | None) -> dict[str, tuple[str, float]]:
    """(attack-direction norm, finite-difference scale h) per threat key, and the headline one under HEADLINE."""
    if fixed is not None and not (math.isfinite(fixed) and fixed > 0):
        raise RobauditError("curvature_scale must be a positive number (pixel L2 units)")
    plans = {t.canonical: (t.norm, float(fixed if fixed is not None else l2_radius(t, dim))) for t in threats}
    plans[HEADLINE] = min(plans.values(), key=lambda p: p[1], default=("l2", float(fixed or DEFAULT_SCALE)))
    return plans


def _batch_for(batch_size: int, dim: int, steps: int) -> int:
    """Cap the batch so the Lanczos vectors (steps x batch x d float64) fit LANCZOS_MEMORY."""
    return max(1, min(batch_size, LANCZOS_MEMORY // (8 * dim * (steps + 1))))


def measure_indicator(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threats: list[Threat],
    *,
    batch_size: int = 64,
    lanczos_steps: int | None = None,
    budget: str = "default",
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
    curvature_scale: float | None = None,
    box: tuple[float, float] | None = None,
    seed: int = 0,
    progress: ProgressSink | None = None,
) -> tuple[list[SampleIndicator], ModelIndicator]:
    """Measure every sample's local decision surface and the model-level indicator.

    ``model`` maps (B, *sample_shape) inputs to (B, K) logits in eval mode; ``y`` are the
    true labels. ``budget`` picks Lanczos steps, curvature directions and probes
    (`BUDGETS`); ``lanczos_steps`` overrides the budget's. ``curvature_scale`` (h, pixel L2
    units) fixes one finite-difference scale for every threat; by default each threat
    uses the L2 radius of its own ball (the bound's Taylor remainder spans the ball) and
    the reported ``curvature`` the smallest of them (0.5 without threats). ``box`` clips
    the random probes to the input range.
    """
    if budget not in BUDGETS:
        raise RobauditError(f"unknown indicator budget '{budget}' (known: {', '.join(BUDGETS)})")
    if len(x) == 0 or len(x) != len(y):
        raise RobauditError(f"the indicator needs samples and as many labels (got {len(x)} and {len(y)})")
    spent = BUDGETS[budget]
    if lanczos_steps is not None:
        if lanczos_steps < 1:
            raise RobauditError("lanczos_steps must be at least 1")
        spent = Budget(lanczos_steps, spent.curvature_random, spent.probes)
    dim = math.prod(x.shape[1:])
    scales = _scales(threats, dim, curvature_scale)
    settings = _Settings(list(threats), spent, zero_threshold, scales, box)
    sink = progress or NoProgress()
    device = next((p.device for p in model.parameters()), x.device)
    started = time.perf_counter()
    cost = _Cost()
    chunk = _batch_for(batch_size, dim, spent.lanczos_steps)
    sink.start("indicator", len(x))
    parts = []
    for i in range(0, len(x), chunk):
        xb, yb = x[i : i + chunk].to(device), y[i : i + chunk].to(device).long()
        streams = SampleStreams.for_samples(seed, i, len(xb))  # a sample's draws do not depend on its batch
        parts.append(_measure_batch(model, xb, yb, dataclasses.replace(settings, generator=streams), cost))
        sink.advance(len(xb))
    sink.finish()
    samples = _samples(parts, settings.threats)
    model_level = aggregate(samples, settings.threats)
    n = len(x)
    model_level.zero_threshold = zero_threshold
    model_level.curvature_scale = scales[HEADLINE][1]
    model_level.curvature_scales = {k: h for k, (_, h) in scales.items() if k != HEADLINE}
    model_level.hvp_per_sample = math.ceil(cost.hvps / n)
    model_level.forwards_per_sample = cost.forwards / n
    model_level.backwards_per_sample = cost.backwards / n
    model_level.seconds = time.perf_counter() - started
    if cost.no_hessian:
        model_level.notes.append(
            f"Hessian not measured: torch cannot differentiate the model's backward twice ({cost.no_hessian}); "
            "hessian_* are unknown (NaN) and the predicted drops use the finite-difference curvature alone"
        )
    return samples, model_level
