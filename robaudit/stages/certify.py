"""The scan's certificate stage: when to certify, and checking every radius before it is printed.

`robaudit.certify` computes the radii; this module decides whether a scan can afford
them (the stated budget), and then holds each radius against everything the scan
found: no verified adversarial example of any threat may lie inside a certified
ball, and a few points just inside each ball must keep the model's decision. A
failure there is a robaudit bug and stops the scan instead of printing a radius. For
an ONNX file, the file itself and the translation the bounds were computed on must
also agree at points inside every ball, or the certificate is unavailable.
Both the certification and those checks run in full float32 precision (`precision.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from robaudit.attacks.runner import MinimalOutcome, ProgressSink, ThreatOutcome, judge, logits
from robaudit.models.wrapper import AuditModel, rounding_agreement
from robaudit.precision import NOTE as PRECISION_NOTE
from robaudit.precision import full_precision
from robaudit.report.schema import CertificateSummary
from robaudit.threats import distances

PILOT = 8  # samples certified first to project the cost in "auto" mode
PILOT_STOP = 4.0  # ... one at a time; it stops as soon as the samples so far project this many times the budget
MIN_BUDGET_S = 10.0  # auto mode may always spend this long
INSIDE = 0.999  # test points at this fraction of the certified radius
RANDOM_PROBES = 8  # random directions per certified sample in the self-check
# an ONNX file's own evaluator against its translation inside each certified ball (`file_mismatch_in_balls`)
FILE_PAIRS = 8  # random directions d, each with -d (one of the two reaches into any half-space through the centre)
FILE_FRACTIONS = (0.33, 0.67, 0.999)  # of the radius
FILE_PROBES = (2 * FILE_PAIRS + 1) * len(FILE_FRACTIONS)  # with the direction towards the closest adversarial example
FILE_CHUNK = 256  # points per call
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class CertifyResult:
    summary: CertificateSummary
    radius: torch.Tensor | None  # float64 (N,), None when unavailable or skipped
    method: list[str] | None
    adversarial_l2: torch.Tensor  # float64 (N,): smallest L2 size of any verified adversarial example, inf if none
    seconds: float = 0.0  # wall time, reported under the report's timing only


def smallest_adversarial_l2(
    x: torch.Tensor, outcomes: list[ThreatOutcome], minimal: dict[str, MinimalOutcome]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the L2 size of the closest verified adversarial example of any threat or stage, and that example."""
    best = torch.full((len(x),), math.inf, dtype=torch.float64)
    closest = x.detach().clone().cpu()
    found = [(o.x_adv, o.broken) for o in outcomes] + [(m.x_adv, torch.isfinite(m.distance)) for m in minimal.values()]
    for x_adv, mask in found:
        idx = torch.nonzero(mask).flatten()
        if len(idx) == 0:
            continue
        size = distances(x_adv[idx], x[idx], "l2")
        better = size < best[idx]
        best[idx[better]] = size[better]
        closest[idx[better]] = x_adv[idx[better]]
    return best, closest


def _summary_of(
    radius: torch.Tensor,
    method: list[str],
    clean_correct: torch.Tensor,
    adversarial_l2: torch.Tensor,
    l2_threats: list[tuple[str, float]],
    budget: str,
    notes: list[str],
) -> CertificateSummary:
    n = len(radius)
    correct = radius[clean_correct]
    quantiles = {f"p{round(q * 100)}": float(torch.quantile(correct, q)) for q in QUANTILES} if len(correct) else {}
    if len(correct):
        quantiles = {"min": float(correct.min()), **quantiles, "max": float(correct.max())}
    both = clean_correct & torch.isfinite(adversarial_l2) & (adversarial_l2 > 0)
    ratios = radius[both] / adversarial_l2[both]
    methods: dict[str, int] = {}
    for i in torch.nonzero(clean_correct).flatten().tolist():
        methods[method[i]] = methods.get(method[i], 0) + 1
    return CertificateSummary(
        available=True,
        reason=None,
        budget=budget,
        certified_accuracy={name: float((radius >= eps).sum()) / n for name, eps in l2_threats},
        radius_quantiles=quantiles,
        median_ratio=float(torch.quantile(ratios, 0.5)) if len(ratios) else None,  # torch.median takes the lower middle
        ratio_samples=int(both.sum()),
        methods=methods,
        notes=notes,
    )


def unavailable(reason: str, budget: str, adversarial_l2: torch.Tensor, seconds: float = 0.0) -> CertifyResult:
    summary = CertificateSummary(available=False, reason=reason, budget=budget)
    return CertifyResult(summary=summary, radius=None, method=None, adversarial_l2=adversarial_l2, seconds=seconds)


def check_radii(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radius: torch.Tensor,
    adversarial_l2: torch.Tensor,
    closest: torch.Tensor,
    *,
    lower: float,
    upper: float,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> str | None:
    """Why no radius may be printed: the scan's own evidence contradicts the bound (None: it does not).

    1. No verified adversarial example (any threat, any stage) lies strictly inside a
       certified ball.
    2. Points at 0.999 of the radius, towards the closest adversarial example found and
       along random directions (clipped to the box, which only moves them closer), keep
       the model's decision.

    A contradiction means the bound does not describe this model (a robaudit bug): every
    radius is withdrawn, and the rest of the report, verified on its own, still stands.
    """
    inside = radius > adversarial_l2 * (1 + 1e-9)
    if bool(inside.any()):
        bad = torch.nonzero(inside).flatten().tolist()[:5]
        return _contradicted(f"a certified L2 radius exceeds an adversarial distance this scan verified (samples {bad})")
    idx = torch.nonzero(radius > 0).flatten()
    if len(idx) == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    xs, ys, rs = x[idx], y[idx], radius[idx]
    directions = [closest[idx] - xs]
    directions += [torch.randn(xs.shape, generator=generator) for _ in range(RANDOM_PROBES)]
    for d in directions:
        probes = _ball_points(xs, rs, d, INSIDE, lower, upper)
        # rounded to the data's float32, a probe at 0.999 of a radius of a few ulps may leave the ball
        inside = (probes.to(torch.float64) - xs.to(torch.float64)).flatten(1).norm(dim=1) <= rs
        with full_precision():
            flipped = (judge(model, probes, ys, batch_size, device, claim="correct") != ys) & inside
        if bool(flipped.any()):
            bad = idx[flipped].tolist()[:5]
            return _contradicted(f"a point inside a certified L2 ball changes the decision (samples {bad})")
    return None


def _contradicted(evidence: str) -> str:
    return (f"{evidence}, so robaudit's bound does not describe this model and no radius is printed; this is a "
            "robaudit bug: please report it with the model")


def _ball_points(
    xs: torch.Tensor, rs: torch.Tensor, direction: torch.Tensor, fraction: float, lower: float, upper: float
) -> torch.Tensor:
    """xs moved `fraction` of each radius along `direction` (per sample), clipped to the box (which only moves
    them closer); a zero direction leaves the sample where it is."""
    size = direction.flatten(1).norm(dim=1).to(torch.float64)
    scale = torch.where(size > 0, fraction * rs / size.clamp_min(1e-30), torch.zeros_like(rs))
    return (xs + direction * scale.to(xs.dtype).view(-1, *([1] * (xs.dim() - 1)))).clamp(lower, upper)


def file_mismatch_in_balls(
    model: nn.Module,
    x: torch.Tensor,
    radius: torch.Tensor,
    closest: torch.Tensor,
    *,
    lower: float,
    upper: float,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> str | None:
    """Why the certificate cannot stand for an ONNX file: its translation computes other scores inside a ball.

    The bounds are computed on onnx2torch's translation, which `wrap_model` compared with the
    file on 24 inputs near the first samples. A mistranslated op in a branch those inputs
    leave inactive could still be active inside some certified ball; so the file itself
    (`AuditModel.file_twin`) and the translation are compared at `FILE_PROBES` points in
    each ball (towards the closest adversarial example and along random directions and their
    opposites, at several fractions of the radius): a branch switched on in a half-space
    that passes near the centre is reached. Sampling, not a proof: a branch active only
    on a small cap of the ball can escape it. None where they agree to rounding, or for
    other formats.
    """
    twin = model.file_twin if isinstance(model, AuditModel) else None
    idx = torch.nonzero(radius > 0).flatten()
    if twin is None or len(idx) == 0:
        return None
    generator = torch.Generator().manual_seed(seed + 1)
    xs, rs = x[idx].cpu(), radius[idx]
    directions = [closest[idx].cpu() - xs]
    for _ in range(FILE_PAIRS):
        d = torch.randn(xs.shape, generator=generator)
        directions += [d, -d]
    worst, differ, total = 0.0, 0, 0
    for d in directions:
        for fraction in FILE_FRACTIONS:
            points = _ball_points(xs, rs, d, fraction, lower, upper)
            with full_precision():
                got = logits(model, points, batch_size, device).double()
                ref = logits(twin, points, FILE_CHUNK, torch.device("cpu")).double()
            if twin.output_kind == "probabilities":  # compared as the file returns them: the log magnifies tiny ones
                got, ref = got.exp(), ref.exp()
            agree = rounding_agreement(got, ref, twin.net.rtol)
            differ += int((~agree).sum())
            total += len(agree)
            worst = max(worst, float((got - ref).abs().amax())) if not bool(agree.all()) else worst
    if differ == 0:
        return None
    return (
        f"certificate unavailable: the ONNX file and its PyTorch translation disagree inside certified balls (class "
        f"scores differ by up to {worst:.3g} at {differ} of {total} points checked with {twin.net.engine}), so radii "
        "computed on the translation would not be about the file"
    )


class _PilotOverBudget(Exception):
    """Raised from the pilot's progress callback to stop it early (`certify_skip_reason`)."""


def certify_skip_reason(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, budget: str, correct: int, attack_seconds: float,
    device: torch.device,
) -> str | None:
    """"auto" mode: certify a pilot of PILOT samples and say why the whole run would take too long (None: run it).

    The projection is the time for all `correct` samples, and the budget as long as the
    attacks took (`attack_seconds`, summed over every rank; at least MIN_BUDGET_S): both
    are totals over the ranks, so the decision does not depend on how many ran the scan
    (a budget of the slowest rank's time against a projection split over the ranks
    certified on 2 ranks what it skipped on 1). The pilot certifies one sample
    at a time and stops once the samples so far project PILOT_STOP times the budget: on a
    large network (minutes per sample) a hopeless pilot costs one sample, not PILOT.
    """
    from robaudit.certify import CertificateUnavailable, certify_l2

    if len(x) == 0:
        return None
    limit = max(MIN_BUDGET_S, attack_seconds)
    size = min(PILOT, len(x))
    started = time.perf_counter()

    def projection(done: int) -> float:
        return (time.perf_counter() - started) / done * correct

    finished = 0

    def tick(count: int) -> None:
        nonlocal finished
        finished += count
        if finished < size and projection(finished) > PILOT_STOP * limit:
            raise _PilotOverBudget

    with full_precision():
        try:
            certify_l2(model.to("cpu"), x[:size], y[:size], budget=budget, batch_size=1, progress=tick)
        except CertificateUnavailable:
            return None  # every chunk will say why, at no cost
        except _PilotOverBudget:
            pass
        finally:
            model.to(device)
    projected = projection(finished)
    if projected <= limit:
        return None
    return (
        f"certificate skipped: projected {projected:.0f} s exceeds the automatic budget of {limit:.0f} s "
        "(as long as the attacks took, at least 10 s; CPU seconds of all processes together); pass --certify to run it"
    )


def certify_stage(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    outcomes: list[ThreatOutcome],
    minimal: dict[str, MinimalOutcome],
    *,
    mode: str,
    budget: str,
    l2_threats: list[tuple[str, float]],
    lower: float,
    upper: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    progress: ProgressSink,
) -> CertifyResult | None:
    """Certified L2 radii of the correctly classified samples, or None when ``mode`` is "off".

    Whether "auto" runs is decided once for the whole scan (`certify_skip_reason`).
    """
    from robaudit.certify import CertificateUnavailable, certify_l2

    if mode == "off":
        return None
    adversarial_l2, closest = smallest_adversarial_l2(x, outcomes, minimal)
    cpu_model = model.to("cpu")
    todo = torch.nonzero(clean_correct).flatten()
    started = time.perf_counter()
    progress.start("certifying L2 radii", max(1, len(todo)))
    with full_precision():  # the certificate's own prediction checks: no TF32 (restored after)
        try:
            parts = [(todo, certify_l2(
                cpu_model, x[todo], y[todo], budget=budget, progress=progress.advance,
                step=getattr(progress, "step", None),  # the bar names the method now running
            ))]  # fmt: skip
        except CertificateUnavailable as exc:
            return unavailable(str(exc), budget, adversarial_l2, time.perf_counter() - started)
        finally:
            progress.finish()
            model.to(device)
    radius = torch.zeros(len(x), dtype=torch.float64)
    method = ["none"] * len(x)
    for idx, cert in parts:
        radius[idx] = cert.radius
        for i, m in zip(idx.tolist(), cert.method):
            method[i] = m
    notes = [n for n in parts[0][1].notes if not n.startswith("largest radius from")] + [PRECISION_NOTE]
    mismatch = file_mismatch_in_balls(
        model, x, radius, closest, lower=lower, upper=upper, batch_size=batch_size, device=device, seed=seed
    )
    if mismatch is not None:
        return unavailable(mismatch, budget, adversarial_l2, time.perf_counter() - started)
    if "l2" not in minimal and bool(torch.isfinite(adversarial_l2).any()):
        notes.append(
            "no minimal-norm L2 attack ran (the preset or config has none), so the adversarial L2 distances are "
            "those of examples found at fixed eps, not the smallest: the median certified / adversarial ratio "
            "understates how close the radii are (the standard preset runs FMN)"
        )
    if isinstance(model, AuditModel) and model.file_twin is not None and bool((radius > 0).any()):
        notes.append(f"the ONNX file and its PyTorch translation agree at {FILE_PROBES} points inside every certified ball")
    contradiction = check_radii(
        model, x, y, radius, adversarial_l2, closest,
        lower=lower, upper=upper, batch_size=batch_size, device=device, seed=seed,
    )  # fmt: skip
    if contradiction is not None:
        return unavailable(contradiction, budget, adversarial_l2, time.perf_counter() - started)
    summary = _summary_of(radius, method, clean_correct, adversarial_l2, l2_threats, budget, notes)
    return CertifyResult(
        summary=summary, radius=radius, method=method, adversarial_l2=adversarial_l2, seconds=time.perf_counter() - started
    )
