"""From per-sample measurements to one model-level score that orders models by robustness.

Per sample i and threat t the safety factor is rho_i = g_i / D_i: the margin divided by
the predicted worst-case drop of g inside the ball (0 for a misclassified sample). The
per-threat score is the median of rho over all samples, the model score the mean over
threats. rho > 1 predicts the decision holds; the median says how much margin the
typical sample has relative to how fast g can fall, which is what robust accuracy
integrates. The median is robust to the few samples where the bound is far off, and it
needs no clipping or temperature.

D_i is the larger of the second-order prediction and the largest change of g seen at
random points on the ball's surface: the prediction is a model of g, and where it is
beaten by a random point it is wrong, so the observation wins (and the tool says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import median
from typing import TYPE_CHECKING

from robaudit.threats import Threat

if TYPE_CHECKING:
    from robaudit.measures.indicator import ModelIndicator, SampleIndicator

MASKING_RATE = 0.05  # more random probes than this beat the predicted worst case: masking suspected

RHO_CAP = 1e6  # a sample with a positive margin and no measurable drop (flagged as masking when common)

FORMULA = (
    "score = mean over threats t of median over all samples i of rho_i(t) = g_i / D_i(t) (0 when g_i <= 0, "
    "capped at 1e6), with g = z_y - max_(j!=y) z_j on the logits, D_i(t) = max(P_i(t), O_i(t)), "
    "P = eps*||J||_dual + 1/2*L*r^2 the second-order predicted drop (||J||_dual = ||J||_1 for linf, ||J||_2 for l2, "
    "||J||_inf for l1; r = the ball's L2 radius: eps*sqrt(d) for linf, eps otherwise; "
    "L = max(largest |Hessian eigenvalue| at x from Lanczos, finite-difference curvature "
    "max_u ||grad g(x + r u) - grad g(x)|| / r over the steepest-descent direction of g under the threat's norm "
    "and random unit directions u)) and "
    "O = the largest |g change| at random points on the ball's surface. Higher = more robust; rho > 1 predicts "
    "(does not certify) that the decision holds. Meant for ranking models, not as a robust accuracy."
)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(median(finite)) if finite else float("nan")


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def safety(g: float, drop: float) -> float:
    """rho = g / drop: 0 when misclassified, RHO_CAP when nothing moves g."""
    if g <= 0:
        return 0.0
    return RHO_CAP if drop <= g / RHO_CAP else g / drop


def effective_drop(sample: SampleIndicator, key: str) -> float:
    """The larger of the predicted and the observed drop; unbounded (inf) where either is not a number.

    A NaN drop comes from a gradient or curvature that is not finite at or near x: g may fall
    arbitrarily fast there, so nothing is predicted to hold (rho 0), and a median over NaNs
    (which `statistics.median` would return an arbitrary element of) never happens.
    """
    predicted, observed = sample.predicted_drop[key], sample.observed_drop.get(key, 0.0)
    if not (math.isfinite(predicted) and math.isfinite(observed)):
        return math.inf
    return max(predicted, observed)


def threat_parts(samples: Sequence[SampleIndicator], key: str) -> dict[str, float]:
    """Per-threat summaries (keys suffixed with ``[threat]``)."""
    effective = [effective_drop(s, key) for s in samples]
    correct = [s for s in samples if s.g > 0]
    rho = [safety(s.g, d) for s, d in zip(samples, effective)]
    violated = [s for s in correct if s.observed_drop.get(key, 0.0) > s.predicted_drop[key] * (1 + 1e-6) + 1e-9]
    return {
        f"score[{key}]": float(median(rho)),
        f"mean_clipped_safety[{key}]": _mean([min(1.0, r) for r in rho]),
        f"predicted_robust_accuracy[{key}]": _mean([float(s.g > d) for s, d in zip(samples, effective)]),
        f"median_predicted_drop[{key}]": _median([s.predicted_drop[key] for s in correct]),
        f"median_observed_drop[{key}]": _median([s.observed_drop.get(key, float("nan")) for s in correct]),
        f"bound_violation_rate[{key}]": len(violated) / len(correct) if correct else 0.0,
    }


def surface_parts(samples: Sequence[SampleIndicator]) -> dict[str, float]:
    """Threat-free summaries: Jacobian and Hessian sizes over correctly classified samples."""
    correct = [s for s in samples if s.g > 0] or list(samples)
    smooth = [s for s in correct if not s.piecewise_linear]
    return {
        "n": float(len(samples)),
        "clean_accuracy": _mean([float(s.g > 0) for s in samples]),
        "median_margin": _median([s.g for s in correct]),
        "median_jacobian_l1": _median([s.jacobian_l1 for s in correct]),
        "median_jacobian_l2": _median([s.jacobian_l2 for s in correct]),
        "mean_jacobian_zero_ratio": _mean([s.jacobian_zero_ratio for s in correct]),
        "zero_gradient_fraction": _mean([float(s.jacobian_l2 == 0) for s in correct]),
        "piecewise_linear_fraction": _mean([float(s.piecewise_linear) for s in correct]),
        "median_hessian_max_abs": _median([s.hessian_max_abs for s in smooth]),
        "median_hessian_max": _median([s.hessian_max for s in smooth]),
        "median_hessian_min": _median([s.hessian_min for s in smooth]),
        "mean_hessian_zero_ratio": _mean([s.hessian_zero_ratio for s in smooth if s.hessian_zero_ratio is not None]),
        "median_curvature": _median([s.curvature for s in correct if s.curvature is not None]),
    }


def _finite_derivatives(s: SampleIndicator) -> bool:
    """Gradient, curvature and predicted drops finite (a NaN Hessian makes the drop NaN too, unless it was not
    measured at all: a model-level note says so, and the drops use the curvature alone)."""
    values = [s.jacobian_l2, *s.curvature_by_threat.values(), *s.predicted_drop.values()]
    return all(math.isfinite(v) for v in values)


def aggregate(samples: Sequence[SampleIndicator], threats: Sequence[Threat]) -> ModelIndicator:
    """The model-level indicator (cost fields are filled in by the caller)."""
    from robaudit.measures.indicator import ModelIndicator

    parts = surface_parts(samples)
    notes: list[str] = []
    keys = [t.canonical for t in threats]
    for key in keys:
        parts.update(threat_parts(samples, key))
    if keys:
        score = _mean([parts[f"score[{k}]"] for k in keys])
        formula = FORMULA
    else:  # no threat: the first-order L2 distance to the boundary, g / ||J||_2, median over all samples
        score = float(median([safety(s.g, s.jacobian_l2 if math.isfinite(s.jacobian_l2) else math.inf) for s in samples]))
        formula = (
            "score = median over samples of g / ||J||_2 (first-order L2 distance to the boundary; 0 if misclassified, "
            "capped at 1e6)"
        )
    worst = max((parts[f"bound_violation_rate[{k}]"] for k in keys), default=0.0)
    masking = worst > MASKING_RATE or parts["zero_gradient_fraction"] > MASKING_RATE
    if masking:
        notes.append(
            f"gradient masking suspected: random points in the ball moved g by more than the gradient and curvature "
            f"predict for {100 * worst:.0f}% of correctly classified samples, and "
            f"{100 * parts['zero_gradient_fraction']:.0f}% have an exactly zero gradient; the gradient does not describe "
            "this model, so neither does the score: run the attack battery (with black-box attacks) instead"
        )
    unknown = [s for s in samples if not _finite_derivatives(s)]
    if unknown:
        notes.append(
            f"{len(unknown)} of {len(samples)} samples have a gradient or curvature that is not finite (the model is "
            "not differentiable there, e.g. sqrt at 0 or a probability that underflows): their Hessian values are "
            "null, and their predicted drop is taken as unbounded (rho 0)"
        )
    if parts["piecewise_linear_fraction"] > 0:
        notes.append(
            "piecewise-linear model (autograd Hessian is zero almost everywhere): its Hessian eigenvalues say nothing; "
            "the second-order term rests on the finite-difference curvature at each threat's scale alone"
        )
    parts = {k: float(v) for k, v in parts.items() if math.isfinite(v)}  # JSON-safe: absent = not applicable
    return ModelIndicator(
        score=score, higher_is_more_robust=True, parts=parts, formula=formula, zero_threshold=0.0,
        curvature_scale=None, hvp_per_sample=0, seconds=0.0, masking_suspected=masking, notes=notes,
    )  # fmt: skip
