"""One chunk of samples through the scan: the per-sample work every rank does on its shard.

A scan splits its samples into fixed chunks (``--chunk-size``, in the order of the data's
indices) and each chunk is audited on its own with a seed of its own, so a sample's
results depend only on its chunk, never on how many processes share the work or which
one ran it. Two passes per chunk:

1. `attack_chunk`: clean pass, trust checks before the attacks, minimal-norm attacks,
   fixed-radius attacks, trust probes and adaptive attacks, and the re-verification of
   every adversarial example;
2. `finish_chunk`: the decision-surface indicator and the certificate, once the whole
   scan has decided (from every chunk's attack cost) whether they run.

Between the passes a chunk's results live on disk (the checkpoint folder or a spool
folder), so memory does not grow with the number of samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from robaudit.attacks import AttackRun, ThreatOutcome, run_threat, verify_adversarial
from robaudit.attacks.runner import MinimalOutcome, judge, run_minimal, run_spatial, verify_spatial
from robaudit.batching import AdaptiveBatch
from robaudit.models.randomized import EOT
from robaudit.progress import prefixed
from robaudit.stages.certify import CertifyResult, certify_stage, smallest_adversarial_l2, unavailable
from robaudit.stages.measure import IndicatorResult, indicator_stage
from robaudit.stages.trust import TRUST_LABEL, TrustReport, TrustStage
from robaudit.threats import SPATIAL, Threat, distances

SEED_STRIDE = 1000  # chunk k attacks with seed + k * SEED_STRIDE (chunk 0 keeps the scan's seed)


def chunk_seed(seed: int, k: int) -> int:
    """The seed of chunk k: fixed by the scan's seed and the chunk alone."""
    return seed + k * SEED_STRIDE


@dataclass
class ChunkAttacks:
    """What pass 1 found on one chunk (tensors cover the chunk's samples only)."""

    k: int
    start: int
    stop: int
    clean_pred: torch.Tensor
    minimal: dict[str, MinimalOutcome]
    outcomes: list[ThreatOutcome]
    trust: TrustReport | None
    seconds: float  # wall time of the pass
    battery_passes: int  # forward + backward passes of the battery (not the trust probes)

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass
class ChunkFinal:
    """What pass 2 measured on one chunk."""

    k: int
    indicator: IndicatorResult | None
    certified: CertifyResult | None
    notes: list[str] = field(default_factory=list)


@dataclass
class ChunkSetup:
    """What every chunk of a scan shares."""

    threats: list[Threat]
    battery: list[AttackRun]
    trust: TrustStage | None
    output_kind: str
    lower: float
    upper: float
    num_classes: int
    batch_size: AdaptiveBatch  # the scan's: runner loops back off on CUDA out-of-memory; other stages read .size
    device: torch.device
    seed: int
    preset: str


def attack_chunk(
    setup: ChunkSetup, model: nn.Module, k: int, start: int, x: torch.Tensor, y: torch.Tensor, progress
) -> ChunkAttacks:
    """Pass 1 on one chunk: clean pass, attacks, trust checks and the re-verification of every claim."""
    started = time.perf_counter()
    seed = chunk_seed(setup.seed, k)
    torch.manual_seed(seed)  # a randomized model draws from the global generator: the same draws for this chunk anywhere
    randomized = isinstance(model, EOT)
    trust = setup.trust.for_chunk(seed) if setup.trust is not None else None

    clean_pred = judge(model, x, y, setup.batch_size, setup.device, claim="correct")
    clean_correct = clean_pred == y
    if trust is not None:
        plain = model.base if randomized else model
        trust.before_attacks(model, plain, setup.output_kind, x, y, clean_correct, setup.threats)

    kw = dict(lower=setup.lower, upper=setup.upper, num_classes=setup.num_classes, batch_size=setup.batch_size, device=setup.device)
    minimal: dict[str, MinimalOutcome] = {}
    spatial_battery = [r for r in setup.battery if SPATIAL in r.attack.norms]
    lp_battery = [r for r in setup.battery if SPATIAL not in r.attack.norms]
    for norm in dict.fromkeys(t.norm for t in setup.threats if not t.is_spatial):
        hint = max(t.eps for t in setup.threats if t.norm == norm)
        runs = [r for r in setup.battery if r.attack.kind == "minimal" and r.supports(Threat(norm=norm, eps=hint))]
        if runs:
            minimal[norm] = run_minimal(model, x, y, clean_correct, norm, hint, runs, seed=seed, progress=progress(), **kw)

    outcomes = []
    for threat in setup.threats:
        if threat.is_spatial:
            outcome = run_spatial(model, x, y, clean_correct, threat, spatial_battery, seed=seed, progress=progress(), **kw)
        else:
            outcome = run_threat(
                model, x, y, clean_correct, threat, lp_battery, seed=seed, progress=progress(),
                minimal=minimal.get(threat.norm), **kw,
            )  # fmt: skip
        outcomes.append(outcome)
    battery_passes = sum(r.forwards + r.backwards for o in outcomes for r in o.records)
    battery_passes += sum(r.forwards + r.backwards for m in minimal.values() for r in m.records)

    if trust is not None:
        trust.after_attacks(model, x, y, clean_correct, outcomes, progress)
    reverify(model, x, y, clean_correct, outcomes, minimal, lower=setup.lower, upper=setup.upper,
             batch_size=setup.batch_size, device=setup.device)  # fmt: skip
    return ChunkAttacks(
        k=k, start=start, stop=start + len(y), clean_pred=clean_pred, minimal=minimal, outcomes=outcomes,
        trust=trust.report if trust is not None else None, seconds=time.perf_counter() - started,
        battery_passes=battery_passes,
    )  # fmt: skip


def adapt_chunk(setup: ChunkSetup, model: nn.Module, part: ChunkAttacks, x: torch.Tensor, y: torch.Tensor, progress) -> None:
    """Masking showed in another chunk: run the adaptive battery here too, then re-verify.

    A masked model shows its signs on some chunks' probes and not on others'; its robust
    accuracy must not depend on which. Marks the chunk as adapted (``trust.masking``).
    """
    seed = chunk_seed(setup.seed, part.k)
    torch.manual_seed(seed + 2)
    trust = setup.trust.for_chunk(seed)  # type: ignore[union-attr]
    trust.report = part.trust  # type: ignore[assignment]
    trust.ensure_surrogate(model.base if isinstance(model, EOT) else model)
    clean_correct = part.clean_pred == y
    labelled = prefixed(progress, TRUST_LABEL)
    trust.adapt(model, x, y, clean_correct, part.outcomes, labelled, "gradient masking signs in another chunk of the scan")
    part.trust.masking = True  # type: ignore[union-attr]
    reverify(model, x, y, clean_correct, part.outcomes, part.minimal, lower=setup.lower, upper=setup.upper,
             batch_size=setup.batch_size, device=setup.device)  # fmt: skip


def finish_chunk(
    setup: ChunkSetup,
    model: nn.Module,
    part: ChunkAttacks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    indicator: bool,
    certify: bool,
    certify_budget: str,
    certify_skipped: str | None = None,
    progress,
) -> ChunkFinal:
    """Pass 2 on one chunk: the indicator and the certificate, each held against pass 1's examples."""
    seed = chunk_seed(setup.seed, part.k)
    torch.manual_seed(seed + 1)
    clean_correct = part.clean_pred == y
    measured = indicator_stage(
        model, x, y, setup.threats, mode="on" if indicator else "off", battery_passes=0.0,
        lower=setup.lower, upper=setup.upper, batch_size=setup.batch_size.size, seed=seed, progress=progress(),
    )  # fmt: skip
    if certify_skipped is not None:  # the scan decided it would take too long: still report the attack distances
        certified = unavailable(certify_skipped, certify_budget, smallest_adversarial_l2(x, part.outcomes, part.minimal)[0])
        return ChunkFinal(k=part.k, indicator=measured, certified=certified)
    certified = certify_stage(
        model, x, y, clean_correct, part.outcomes, part.minimal, mode="on" if certify else "off", budget=certify_budget,
        l2_threats=[(t.canonical, t.eps) for t in setup.threats if t.norm == "l2"],
        lower=setup.lower, upper=setup.upper, batch_size=setup.batch_size.size, device=setup.device, seed=seed,
        progress=progress(),
    )  # fmt: skip
    return ChunkFinal(k=part.k, indicator=measured, certified=certified)


def reverify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    outcomes: list[ThreatOutcome],
    minimal: dict[str, MinimalOutcome],
    *,
    lower: float,
    upper: float,
    batch_size: int,
    device: torch.device,
) -> None:
    """Every claim re-checked once more before it is kept: a failure is a robaudit bug and stops the scan."""
    check = dict(lower=lower, upper=upper, batch_size=batch_size, device=device)
    for outcome in outcomes:
        if bool((outcome.broken & ~clean_correct).any()):
            raise RuntimeError("internal error: a misclassified sample was reported as broken by an attack")
        idx = torch.nonzero(outcome.broken).flatten()
        if outcome.transform is not None:
            ok = verify_spatial(model, outcome.x_adv[idx], x[idx], y[idx], outcome.transform[idx], outcome.threat, **check)
            if not bool(ok.all()):
                raise RuntimeError(f"internal error: spatial examples for samples {idx[~ok].tolist()[:5]} did not re-verify")
        else:
            _reverify(model, outcome.x_adv, idx, x, y, outcome.threat, outcome.distance, **check)
    for norm, found in minimal.items():
        idx = torch.nonzero(torch.isfinite(found.distance)).flatten()
        _reverify(model, found.x_adv, idx, x, y, Threat(norm=norm, eps=float("inf")), found.distance, **check)


def _reverify(
    model: nn.Module,
    x_adv: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    distance: torch.Tensor,
    lower: float,
    upper: float,
    batch_size: int,
    device: torch.device,
) -> None:
    if len(idx) == 0:
        return
    ok = verify_adversarial(model, x_adv[idx], x[idx], y[idx], threat, lower, upper, batch_size, device)
    sizes = distances(x_adv[idx], x[idx], threat.norm)
    if not bool(ok.all()) or not torch.allclose(sizes, distance[idx]):
        bad = idx[~ok].tolist()
        raise RuntimeError(f"internal error: adversarial examples for samples {bad[:5]} ({threat}) did not re-verify")

