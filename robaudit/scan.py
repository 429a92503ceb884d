"""The scan pipeline, top to bottom: load model, load data, clean pass, attack, verify, measure,
certify, report, gate.

This is also the Python API: build a `ScanConfig` and call `scan()`. The CLI is a thin
layer over it.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robaudit import __version__
from robaudit.attacks import AttackRun, ThreatOutcome, run_threat, verify_adversarial
from robaudit.attacks.runner import (
    AttackRecord,
    MinimalOutcome,
    NoProgress,
    ProgressSink,
    judge,
    run_minimal,
    run_spatial,
    verify_spatial,
)
from robaudit.attacks.spatial import describe
from robaudit.stages.certify import CertifyResult, certify_stage
from robaudit.stages.measure import IndicatorResult, check_plot_dir, indicator_stage, write_plots
from robaudit.stages.trust import TrustStage
from robaudit.certify.budget import BUDGETS as CERTIFY_BUDGETS
from robaudit.battery import DEFAULT_PRESET, RANDOMIZED, REPEATS, Spec, build_battery, override, preset_specs
from robaudit.data import check_compatible, load_data
from robaudit.data.dataset import Dataset
from robaudit.errors import RobauditError
from robaudit.gate import Baseline, MaxDrop, Threshold, check_baseline, check_baseline_data, check_thresholds_cover, evaluate
from robaudit.models import load_model, wrap_model
from robaudit.models.detect import RawModel
from robaudit.models.randomized import EOT
from robaudit.models.wrapper import AuditModel, WrapInfo
from robaudit.precision import NOTE as PRECISION_NOTE
from robaudit.report.schema import (
    SCHEMA_VERSION,
    AttackSummary,
    Curve,
    DataInfo,
    MinimalNormSummary,
    ModelInfo,
    GateCheck,
    Report,
    SampleRecord,
    SampleThreat,
    Summary,
    ThreatSummary,
)
from robaudit.threats import SPATIAL, Threat, parse_threat, perturbation_norms

DEFAULT_THREAT = "linf:8/255"
CURVE_POINTS = 25
PROBE_SIZE = 8


@dataclass
class ScanConfig:
    """Everything a scan needs; the CLI fills it from flags."""

    model: Path
    data: str = "digits"
    format: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    trust_pickle: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    input_range: tuple[float, float] = (0.0, 1.0)
    n: int | None = None
    seed: int = 0
    data_dir: Path | None = None
    threats: list[Threat] = field(default_factory=lambda: [parse_threat(DEFAULT_THREAT)])
    preset: str = DEFAULT_PRESET
    attacks: list[Spec] | None = None  # from a TOML file; replaces the preset's list
    steps: int | None = None
    restarts: int | None = None
    step_sizes: list[float] | None = None
    batch_size: int | None = None
    device: str = "auto"
    thresholds: list[Threshold] = field(default_factory=list)
    max_drops: list[MaxDrop] = field(default_factory=list)  # allowed drops against `baseline` (robaudit.gate)
    baseline: Baseline | None = None
    certify: str = "auto"  # "auto" (when cheap enough: robaudit.stages.certify), "on" or "off"
    certify_budget: str = "default"
    indicator: str = "auto"  # "auto" (when it costs less than the attacks: robaudit.stages.measure), "on" or "off"
    plots: Path | None = None  # folder for decision-surface and curve PNGs
    checks: str = "on"  # trust checks and adaptation (robaudit.stages.trust): "on" or "off"
    strict: bool = False  # any failed trust check fails the gate

    def validate(self) -> None:
        """Reject impossible settings before any file is read."""
        lo, hi = self.input_range
        if not lo < hi:
            raise RobauditError(f"--input-range {lo},{hi}: the lower end must be below the upper end")
        if not self.threats:
            raise RobauditError("no threat given; pass e.g. --threat linf:8/255")
        if self.steps is not None and self.steps < 1:
            raise RobauditError("--steps must be at least 1")
        if self.restarts is not None and self.restarts < 1:
            raise RobauditError("--restarts must be at least 1")
        if self.step_sizes is not None and any(not 0 < s <= 10 for s in self.step_sizes):
            raise RobauditError("--step-sizes are multiples of eps and must lie in (0, 10]")
        if self.batch_size is not None and self.batch_size < 1:
            raise RobauditError("--batch-size must be at least 1")
        if self.n is not None and self.n < 1:
            raise RobauditError("--n must be at least 1")
        for threat in self.threats:
            if threat.norm == "l1":
                raise RobauditError(f"threat {threat.spec}: L1 attacks are not available yet (use linf or l2)")
        for name in ("certify", "indicator"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise RobauditError(f"{name} must be auto, on or off, not '{getattr(self, name)}'")
        if self.checks not in ("on", "off"):
            raise RobauditError(f"checks must be on or off, not '{self.checks}'")
        if self.strict and self.checks == "off":
            raise RobauditError("--strict needs the trust checks; drop --no-checks")
        if self.plots is not None:
            check_plot_dir(self.plots)
        if self.certify_budget not in CERTIFY_BUDGETS:
            raise RobauditError(f"--certify-budget must be one of {', '.join(CERTIFY_BUDGETS)}, not '{self.certify_budget}'")
        rules = [*self.thresholds, *self.max_drops]
        check_thresholds_cover(rules, self.threats, certify=self.certify, indicator=self.indicator)
        check_baseline(self.baseline, self.max_drops, self.threats)

    def battery_specs(self) -> list[Spec]:
        """The effective battery: the TOML file's attacks or the preset, then flag overrides."""
        specs = self.attacks if self.attacks is not None else preset_specs(self.preset)
        return override(specs, steps=self.steps, restarts=self.restarts, step_sizes=self.step_sizes)

    def battery(self, randomized: bool = False) -> list[AttackRun]:
        """The battery to run; for a randomized model (and no attacks given) AutoAttack's rand version."""
        specs = self.battery_specs()
        if randomized and self.attacks is None:
            lp = RANDOMIZED.get(self.preset, RANDOMIZED[DEFAULT_PRESET])["attacks"]
            spatial = [s for s in specs if s.get("attack") == "spatial-grid"]
            specs = override([*lp, *spatial], steps=self.steps, restarts=self.restarts, step_sizes=self.step_sizes)
        return build_battery(specs)


@dataclass
class ScanResult:
    """The report plus what only the process holds (adversarial inputs for --save-adversarial)."""

    report: Report
    data: Dataset
    outcomes: list[ThreatOutcome]


ProgressFactory = Callable[[], ProgressSink]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RobauditError("--device cuda was requested but no CUDA device is available (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise RobauditError(f"--device must be auto, cpu or cuda, not '{name}'")
    return torch.device(name)


def default_batch_size(device: torch.device) -> int:
    """Large enough to amortize per-call overhead, small enough for a laptop or one GPU."""
    return 1024 if device.type == "cuda" else 256


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def scan(config: ScanConfig, progress: ProgressFactory = NoProgress) -> ScanResult:
    """Run a whole audit and return the verified report.

    The global torch generator is seeded from ``config.seed`` for the scan (and restored
    after it): a randomized model draws its noise from it, so the same seed gives the
    same report for such models too.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _scan(config, progress)


def _scan(config: ScanConfig, progress: ProgressFactory) -> ScanResult:
    started = time.perf_counter()
    config.validate()
    battery = config.battery()  # builds every attack now, so a bad attack setting fails before any file is read
    device = resolve_device(config.device)
    lower, upper = config.input_range

    # 1-2. model and data
    raw, data, model, info, reshape_note = prepare(config, device)
    sample_shape = tuple(data.x.shape[1:])
    if config.baseline is not None:  # before any attack: a baseline on other data cannot gate this scan
        check_baseline_data(config.baseline, name=data.name, seed=config.seed, indices=list(data.indices), labels=data.y.tolist())
    loaded = time.perf_counter()
    batch_size = config.batch_size or default_batch_size(device)
    x, y = data.x, data.y

    # 3. trust checks, part 1: a randomized model is attacked through EOT and judged by its worst draw
    # (even with --no-checks: claims on it could not be re-verified otherwise)
    trust = TrustStage(
        config.preset, seed=config.seed, lower=lower, upper=upper, num_classes=info.num_classes,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    model = trust.open(model, x)
    if config.checks == "off":
        trust = None
    randomized = isinstance(model, EOT)
    if randomized:
        battery = config.battery(randomized=True)

    # 4. clean pass, then the model checks (output kind, gradients, stability) on what it gets right
    clean_pred = judge(model, x, y, batch_size, device)
    clean_correct = clean_pred == y
    if trust is not None:
        plain = model.base if randomized else model
        trust.before_attacks(model, plain, info.output_kind, x, y, clean_correct, config.threats)

    # 5. minimal-norm attacks, once per norm: per-sample distances and the accuracy-versus-eps curve
    attack_kw = dict(lower=lower, upper=upper, num_classes=info.num_classes, batch_size=batch_size, device=device)
    minimal: dict[str, MinimalOutcome] = {}
    spatial_battery = [r for r in battery if SPATIAL in r.attack.norms]
    lp_battery = [r for r in battery if SPATIAL not in r.attack.norms]
    for norm in dict.fromkeys(t.norm for t in config.threats if not t.is_spatial):
        hint = max(t.eps for t in config.threats if t.norm == norm)
        runs = [r for r in battery if r.attack.kind == "minimal" and r.attack.supports(Threat(norm=norm, eps=hint))]
        if runs:
            minimal[norm] = run_minimal(
                model, x, y, clean_correct, norm, hint, runs, seed=config.seed, progress=progress(), **attack_kw
            )

    # 6. fixed-radius attacks, one threat at a time, each only on points still robust
    outcomes = []
    for threat in config.threats:
        if threat.is_spatial:
            outcome = run_spatial(
                model, x, y, clean_correct, threat, spatial_battery, seed=config.seed, progress=progress(), **attack_kw
            )
        else:
            outcome = run_threat(
                model, x, y, clean_correct, threat, lp_battery, seed=config.seed, progress=progress(),
                minimal=minimal.get(threat.norm), **attack_kw,
            )  # fmt: skip
        outcomes.append(outcome)

    # 7. trust checks, part 2: probes on what the battery left robust; adaptive attacks on signs of masking
    if trust is not None:
        trust.after_attacks(model, x, y, clean_correct, outcomes, progress)

    # 8. every claim re-checked once more before it is reported
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
    attacked = time.perf_counter()

    # 9. measure: the decision-surface indicator (a randomized model has no single surface)
    battery_passes = sum(r.forwards + r.backwards for o in outcomes for r in o.records)
    battery_passes += sum(r.forwards + r.backwards for m in minimal.values() for r in m.records)
    indicator = indicator_stage(
        model, x, y, config.threats, mode=_deterministic_only(config.indicator, randomized, "--indicator"), battery_passes=battery_passes / max(1, len(y)),
        lower=lower, upper=upper, batch_size=batch_size, seed=config.seed, progress=progress(),
    )  # fmt: skip

    # 10. certify: L2 radii, each held against every verified adversarial example above
    certified = certify_stage(
        model, x, y, clean_correct, outcomes, minimal, mode=_deterministic_only(config.certify, randomized, "--certify"), budget=config.certify_budget,
        attack_seconds=attacked - loaded, l2_threats=[(t.canonical, t.eps) for t in config.threats if t.norm == "l2"],
        lower=lower, upper=upper, batch_size=batch_size, device=device, seed=config.seed, progress=progress(),
    )  # fmt: skip

    # 11. report (with plots when asked for) and gate
    summary = _summary(data.y, clean_correct, outcomes, minimal, certified, indicator)
    if trust is not None:
        summary.diagnostics = trust.report.to_dict()
        summary.diagnostics["passes_per_sample"] = [round(p / max(1, len(y)), 2) for p in trust.report.passes]
    plots = []
    if config.plots is not None:
        plots = write_plots(  # on the plain model: a randomized one is drawn through its EOT mean
            config.plots, model, x, y, clean_correct, list(data.indices), outcomes, summary.curves,
            lower=lower, upper=upper, seed=config.seed,
        )  # fmt: skip

    report = Report(
        schema_version=SCHEMA_VERSION,
        robaudit_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            path=str(config.model),
            format=raw.format,
            sha256=sha256_of(config.model),
            input_shape=list(raw.input_shape) if raw.input_shape else None,
            num_classes=info.num_classes,
            output_kind=info.output_kind,
            batching=info.batching,
            mean=config.mean,
            std=config.std,
            input_range=[lower, upper],
            notes=[
                *raw.notes, *info.notes, *([reshape_note] if reshape_note else []), *_randomized_notes(randomized),
                PRECISION_NOTE,
            ],  # fmt: skip
        ),
        data=DataInfo(
            name=data.name,
            n=len(data.y),
            seed=config.seed,
            indices=list(data.indices),
            source_size=data.source_size,
            sample_shape=list(sample_shape),
            notes=list(data.notes),
        ),
        config=_config_dict(config, battery, batch_size),
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": describe_device(device),
        },
        summary=summary,
        samples=_samples(data, clean_pred, outcomes, minimal, certified, indicator),
        plots=plots,
        timing={
            "total_s": round(time.perf_counter() - started, 3),
            "load_s": round(loaded - started, 3),
            "certify_s": round(certified.seconds, 3) if certified else None,
            "indicator_s": round(indicator.seconds, 3) if indicator else None,
            "attacks_s": {
                **{f"minimal:{m.norm}": {r.name: round(r.seconds, 3) for r in m.records} for m in minimal.values()},
                **{o.threat.canonical: {r.name: round(r.seconds, 3) for r in o.records if not r.skipped} for o in outcomes},
            },
        },
    )
    report.gate = evaluate(report, config.thresholds, config.max_drops, config.baseline)
    if config.strict and trust is not None:
        report.gate.append(strict_check(trust.report.checks))
    return ScanResult(report=report, data=data, outcomes=outcomes)


def _deterministic_only(mode: str, randomized: bool, flag: str) -> str:
    """Indicator and certificate describe one fixed function: off for a randomized model."""
    if not randomized:
        return mode
    if mode == "on":
        raise RobauditError(f"{flag}: the model is randomized (its outputs change between calls); this needs a deterministic model")
    return "off"


def _randomized_notes(randomized: bool) -> list[str]:
    if not randomized:
        return []
    return [
        f"randomized model: attacked through EOT; a prediction is the worst of {REPEATS} seeded draws; no certificate "
        "or indicator (they describe one fixed function)"
    ]


def strict_check(checks: list) -> GateCheck:
    """--strict: the evaluation itself must be trustworthy (no failed trust check)."""
    failed = [c for c in checks if c.verdict == "fail"]
    names = ", ".join(f"{c.name} [{c.threat}]" if c.threat else c.name for c in failed)
    message = "--strict: every trust check passed or warned" if not failed else f"--strict: failed trust checks: {names}"
    return GateCheck(
        expression="--strict", metric="failed_trust_checks", threshold=0.0, value=float(len(failed)),
        passed=not failed, kind="strict", message=message,
    )  # fmt: skip


def prepare(config: ScanConfig, device: torch.device) -> tuple[RawModel, Dataset, AuditModel, WrapInfo, str | None]:
    """Load the model and the data and wrap them into one classifier (shared by `scan` and `surface`)."""
    raw = load_model(
        config.model, fmt=config.format, arch=config.arch, num_classes=config.num_classes, trust_pickle=config.trust_pickle
    )
    channels = raw.input_shape[0] if raw.input_shape and len(raw.input_shape) == 3 else None

    data = load_data(
        config.data, n=config.n, seed=config.seed, data_dir=config.data_dir, input_range=config.input_range, channels=channels
    )
    reshape_note = check_compatible(data, raw.input_shape, raw.num_classes or np.iinfo(np.int64).max)
    sample_shape = tuple(data.x.shape[1:])
    model, info = wrap_model(
        raw, sample_shape=sample_shape, probe=data.x[:PROBE_SIZE], mean=config.mean, std=config.std, device=device
    )
    check_compatible(data, raw.input_shape, info.num_classes)
    for threat in config.threats:
        if threat.is_spatial and (data.x.dim() != 4 or min(data.x.shape[2:]) < 2):
            shape = "x".join(map(str, sample_shape))
            raise RobauditError(f"threat {threat.spec}: spatial threats need image data (C, H, W), not samples of shape {shape}")
    return raw, data, model, info, reshape_note


def _reverify(
    model: torch.nn.Module,
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
    """A final independent check of stored adversarial examples and their printed distances.

    A failure here is a robaudit bug, so it stops the scan rather than print a number.
    """
    if len(idx) == 0:
        return
    ok = verify_adversarial(model, x_adv[idx], x[idx], y[idx], threat, lower, upper, batch_size, device)
    sizes = perturbation_norms(x_adv[idx] - x[idx], threat.norm)
    if not bool(ok.all()) or not torch.allclose(sizes, distance[idx]):
        bad = idx[~ok].tolist()
        raise RuntimeError(f"internal error: adversarial examples for samples {bad[:5]} ({threat}) did not re-verify")


def _config_dict(config: ScanConfig, battery: list[AttackRun], batch_size: int) -> dict:
    return {
        "threats": [t.canonical for t in config.threats],
        "preset": config.preset if config.attacks is None else None,
        "attacks": [
            {"name": r.label, "attack": r.attack.name, "kind": r.attack.kind, "restarts": r.restarts, "params": r.attack.params()}
            for r in battery
        ],
        "steps": config.steps,
        "restarts": config.restarts,
        "step_sizes": config.step_sizes,
        "n": config.n,
        "seed": config.seed,
        "batch_size": batch_size,
        "device": config.device,
        "format": config.format,
        "arch": config.arch,
        "num_classes": config.num_classes,
        "mean": config.mean,
        "std": config.std,
        "input_range": list(config.input_range),
        "fail_under": [t.expression for t in config.thresholds],
        "max_drop": [d.expression for d in config.max_drops],
        "baseline": config.baseline.path if config.baseline is not None else None,
        "certify": config.certify,
        "certify_budget": config.certify_budget,
        "indicator": config.indicator,
        "plots": str(config.plots) if config.plots is not None else None,
        "checks": config.checks,
        "strict": config.strict,
    }


def _attack_summaries(records: list[AttackRecord], n: int) -> list[AttackSummary]:
    return [
        AttackSummary(
            name=r.name,
            params=r.params,
            restarts=r.restarts,
            attempted=r.attempted,
            broke=r.broke,
            robust_accuracy_after=r.robust_after / n,
            forward_passes=r.forwards,
            backward_passes=r.backwards,
            skipped=r.skipped,
        )
        for r in records
    ]


def _per_class(y: torch.Tensor, robust: torch.Tensor) -> dict[str, float]:
    return {str(c): float(robust[y == c].float().mean()) for c in sorted(set(y.tolist()))}


def _curve(norm: str, clean_correct: torch.Tensor, found: MinimalOutcome, outcomes: list[ThreatOutcome]) -> Curve:
    """Robust accuracy against radius: a sample falls at the smallest radius where any verified attack broke it.

    Fixed-radius results count too: a sample broken at eps is broken at every larger radius.
    """
    fall = found.distance.clone()
    for outcome in outcomes:
        if outcome.threat.norm == norm:
            fall = torch.where(outcome.broken, torch.minimum(fall, torch.full_like(fall, outcome.threat.eps)), fall)
    fall[~clean_correct] = 0.0
    finite = fall[torch.isfinite(fall) & clean_correct]
    top = max([o.threat.eps * 2 for o in outcomes if o.threat.norm == norm] + [float(finite.max()) if len(finite) else 0.0])
    grid = torch.linspace(0.0, top, CURVE_POINTS, dtype=torch.float64)
    n = len(fall)
    accuracy = [float(((fall > e) & clean_correct).sum()) / n for e in grid.tolist()]
    median = float(finite.median()) if len(finite) else None
    return Curve(
        norm=norm,
        eps=[round(e, 8) for e in grid.tolist()],
        robust_accuracy=accuracy,
        median_distance=median,
        attacks=[r.name for r in found.records],
    )


def _summary(
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    outcomes: list[ThreatOutcome],
    minimal: dict[str, MinimalOutcome],
    certified: CertifyResult | None,
    indicator: IndicatorResult | None,
) -> Summary:
    n = len(clean_correct)
    threats = []
    for outcome in outcomes:
        robust = clean_correct & ~outcome.broken
        details = _attack_summaries(outcome.records, n)
        threats.append(
            ThreatSummary(
                threat=outcome.threat.canonical,
                norm=outcome.threat.norm,
                eps=outcome.threat.eps,
                spec=outcome.threat.spec,
                shift=outcome.threat.shift,
                robust_accuracy=float(robust.sum()) / n,
                attacks={d.name: d.robust_accuracy_after for d in details},
                attack_details=details,
                forward_passes_per_sample=sum(r.forwards for r in outcome.records) / n,
                backward_passes_per_sample=sum(r.backwards for r in outcome.records) / n,
                per_class=_per_class(y, robust),
            )
        )
    stages = [
        MinimalNormSummary(
            norm=m.norm,
            attack_details=_attack_summaries(m.records, n),
            forward_passes_per_sample=sum(r.forwards for r in m.records) / n,
            backward_passes_per_sample=sum(r.backwards for r in m.records) / n,
        )
        for m in minimal.values()
    ]
    everything = [*stages, *threats]
    return Summary(
        clean_accuracy=float(clean_correct.sum()) / n,
        threats=threats,
        minimal_norm=stages,
        curves=[_curve(m.norm, clean_correct, m, outcomes) for m in minimal.values()],
        forward_passes_per_sample=sum(t.forward_passes_per_sample for t in everything),
        backward_passes_per_sample=sum(t.backward_passes_per_sample for t in everything),
        certificate=certified.summary if certified else None,
        indicator=indicator.summary if indicator else None,
    )


def _samples(
    data: Dataset,
    clean_pred: torch.Tensor,
    outcomes: list[ThreatOutcome],
    minimal: dict[str, MinimalOutcome],
    certified: CertifyResult | None,
    indicator: IndicatorResult | None,
) -> list[SampleRecord]:
    """Per-sample results; ``distance`` is the smallest verified perturbation found under that norm."""
    records = []
    for i, (index, label, pred) in enumerate(zip(data.indices, data.y.tolist(), clean_pred.tolist())):
        threats = {}
        for outcome in outcomes:
            found = minimal.get(outcome.threat.norm)
            smallest = float(found.distance[i]) if found is not None else float("inf")
            if pred != label:
                entry = SampleThreat(robust=False, broken_by=None, distance=None if outcome.threat.is_spatial else 0.0)
            elif outcome.broken[i] and outcome.transform is not None:
                entry = SampleThreat(
                    robust=False, broken_by=outcome.broken_by[i], distance=None, transform=describe(outcome.transform[i])
                )
            elif outcome.broken[i]:
                distance = min(float(outcome.distance[i]), smallest)
                entry = SampleThreat(robust=False, broken_by=outcome.broken_by[i], distance=distance)
            else:
                entry = SampleThreat(robust=True, broken_by=None, distance=smallest if smallest < float("inf") else None)
            threats[outcome.threat.canonical] = entry
        record = SampleRecord(index=int(index), label=int(label), clean_pred=int(pred), threats=threats)
        if certified is not None:
            found = float(certified.adversarial_l2[i])
            record.adversarial_l2 = found if math.isfinite(found) else None
            if certified.radius is not None:
                record.certified_l2 = float(certified.radius[i])
                record.certified_method = certified.method[i]
        if indicator is not None:
            record.indicator = indicator.samples[i]
        records.append(record)
    return records


def save_adversarial(path: Path, result: ScanResult) -> None:
    """Write verified adversarial inputs so anyone can re-check them with their own tools."""
    arrays: dict[str, np.ndarray] = {}
    indices = np.asarray(result.data.indices, dtype=np.int64)
    for outcome in result.outcomes:
        idx = torch.nonzero(outcome.broken).flatten()
        key = outcome.threat.canonical
        arrays[f"{key}__x"] = outcome.x_adv[idx].to(torch.float32).numpy()
        arrays[f"{key}__index"] = indices[idx.numpy()]
    try:
        with path.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
    except OSError as exc:
        raise RobauditError(f"cannot write {path}: {exc.strerror or exc}") from exc
