"""The scan pipeline, top to bottom: load model, load data, clean pass, attack, verify, measure,
certify, report, gate.

This is also the Python API: build a `ScanConfig` and call `scan()`. The CLI is a thin
layer over it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robaudit import __version__
from robaudit.atomic import write_output
from robaudit.attacks import AttackRun, ThreatOutcome
from robaudit.attacks.runner import AttackRecord, MinimalOutcome, NoProgress, ProgressSink
from robaudit.attacks.spatial import describe
from robaudit.checkpoint import (
    PROBE_KEY, ChunkStore, attacks_from_plain, code_digest, attacks_to_plain, final_from_plain, final_to_plain, model_probe,
    open_checkpoint, plan_chunks, robaudit_digest,
)
from robaudit.distributed import Cluster
from robaudit.progress import prefixed
from robaudit.stages.certify import CertifyResult, certify_skip_reason
from robaudit.stages.chunk import ChunkAttacks, ChunkSetup, adapt_chunk, attack_chunk, finish_chunk
from robaudit.stages.measure import INDICATOR_PASSES, PLOT_SAMPLES, IndicatorResult, check_plot_dir, write_plots
from robaudit.stages.merge import merge_certified, merge_indicator, merge_minimal, merge_outcomes, merge_trust
from robaudit.stages.trust import PROBE_POINTS, TrustStage
from robaudit.certify.budget import BUDGETS as CERTIFY_BUDGETS
from robaudit.battery import DEFAULT_PRESET, RANDOMIZED, REPEATS, Spec, build_battery, override, preset_specs
from robaudit.data import check_compatible, class_count_note, load_data
from robaudit.data.files import FLAT_INPUT
from robaudit.layout import image_channels
from robaudit.data.dataset import Dataset
from robaudit.batching import AdaptiveBatch
from robaudit.errors import RobauditError
from robaudit.gate import Baseline, MaxDrop, Threshold, check_baseline, check_baseline_data, check_thresholds_cover, evaluate
from robaudit.models import load_model, module_model, wrap_model
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
from robaudit.threats import Threat, check_distinct, parse_threat

DEFAULT_THREAT = "linf:8/255"
CURVE_POINTS = 25
PROBE_SIZE = 8


MAX_SEED = 2**32 - 1  # the chunks and probes add offsets to it: far below what torch.manual_seed takes


def check_seed(seed: int) -> None:
    """One rule for every command: an integer from 0 to MAX_SEED (2^64 crashed deep inside torch, after the attacks)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RobauditError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}")


@dataclass
class ScanConfig:
    """Everything a scan needs; the CLI fills it from flags."""

    model: Path | torch.nn.Module  # a model file, or an in-memory module (copied, never changed)
    data: str | tuple = "digits"  # a built-in name, a path, or (x, y) arrays
    format: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    trust_pickle: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    input_range: tuple[float, float] = (0.0, 1.0)
    n: int | None = None
    first: int | None = None  # the first N samples in the source's order instead of a stratified sample
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
    gated_stages: tuple[str, ...] = ()  # "certify" / "indicator" that a gate turned on from "auto" (not the user's flag)
    plots: Path | None = None  # folder for decision-surface and curve PNGs
    checks: str = "on"  # trust checks and adaptation (robaudit.stages.trust): "on" or "off"
    strict: bool = False  # any failed trust check fails the gate
    chunk_size: int = 256  # samples audited together with one seed (robaudit.stages.chunk); part of the results
    checkpoint: Path | None = None  # folder keeping finished chunks, so a killed scan resumes (robaudit.checkpoint)
    keep_adversarial: bool = False  # keep every adversarial input in ScanResult.outcomes (memory grows with n)

    def validate(self) -> None:
        """Reject impossible settings before any file is read."""
        lo, hi = self.input_range
        if not lo < hi:
            raise RobauditError(f"--input-range {lo},{hi}: the lower end must be below the upper end")
        if not self.threats:
            raise RobauditError("no threat given; pass e.g. --threat linf:8/255")
        check_distinct(self.threats)
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
        if self.first is not None and self.n is not None:
            raise RobauditError("--first and --n both choose the samples: pass one of them")
        if self.first is not None and self.first < 1:
            raise RobauditError("--first must be at least 1")
        if self.chunk_size < 1:
            raise RobauditError("--chunk-size must be at least 1")
        check_seed(self.seed)
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
        battery = self.battery()
        for threat in self.threats:  # a threat no entry runs under would be reported 100% robust
            if not any(run.supports(threat) for run in battery):
                raise RobauditError(
                    f"no attack of the battery runs under {threat.canonical} (its entries: "
                    f"{', '.join(run.label for run in battery)}); add one that supports {threat.norm}, or drop the threat"
                )

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


def model_digest(model: Path | torch.nn.Module) -> str:
    """SHA-256 of the model file (with an ONNX file's external data files), or of an in-memory module's class name and state dict."""
    if not isinstance(model, torch.nn.Module):
        from robaudit.models.onnx_file import external_data_files

        extra = external_data_files(model)
        if not extra:
            return sha256_of(model)
        digest = hashlib.sha256(sha256_of(model).encode())
        for path in extra:  # another weights file (or the same one renamed) is another model
            digest.update(path.name.encode())
            digest.update(sha256_of(path).encode() if path.is_file() else b"missing")
        return digest.hexdigest()
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_label(model: Path | torch.nn.Module) -> str:
    """What the report calls the model: its path, or the module's class."""
    return f"<torch.nn.Module {type(model).__qualname__}>" if isinstance(model, torch.nn.Module) else str(model)


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


def scan(config: ScanConfig, progress: ProgressFactory = NoProgress, cluster: Cluster | None = None) -> ScanResult | None:
    """Run a whole audit and return the verified report (on rank 0; None on the other torchrun ranks).

    The samples are audited in chunks of ``config.chunk_size``, each with a seed of its
    own (`robaudit.stages.chunk`), so the report does not depend on how many processes
    shared the work. The global torch generator is restored after the scan.
    """
    config.validate()  # before torch.manual_seed, which fails on seeds past 64 bits
    cluster = cluster or Cluster()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _scan(config, progress, cluster)


def _scan(config: ScanConfig, progress: ProgressFactory, cluster: Cluster) -> ScanResult | None:
    started = time.perf_counter()
    battery = config.battery()  # builds every attack now, so a bad attack setting fails before any file is read
    device = resolve_device(config.device)
    lower, upper = config.input_range

    # 1-2. model and data (the data's labels and index list; pixels are read a chunk at a time)
    raw, data, model, info, reshape_note = prepare(config, device)
    if config.baseline is not None:  # before any attack: a baseline on other data cannot gate this scan
        check_baseline_data(
            config.baseline, name=data.name, seed=config.seed, indices=list(data.indices), labels=data.y.tolist(),
            digest=data.digest(config.chunk_size),
        )
    loaded = time.perf_counter()
    batch_size = config.batch_size or default_batch_size(device)
    batch = AdaptiveBatch(batch_size)  # halves on CUDA out-of-memory, for the rest of the scan
    y = data.y

    # 3. trust checks, part 1: a randomized model is attacked through EOT and judged by its worst draw
    # (even with --no-checks: claims on it could not be re-verified otherwise)
    trust = TrustStage(
        config.preset, seed=config.seed, lower=lower, upper=upper, num_classes=info.num_classes,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    model = trust.open(model, data.take(0, PROBE_POINTS))
    opened = trust.report
    randomized = isinstance(model, EOT)
    if randomized:
        battery = config.battery(randomized=True)
    for run in battery:  # the report shows each attack's settings for this model whether or not it ran (resumed scans)
        if getattr(run.attack, "num_classes", 0) is None:
            run.attack.num_classes = info.num_classes
        targets = getattr(run.attack, "targets_for", None)
        if config.attacks is not None and targets is not None and info.num_classes and targets(info.num_classes) == 0:
            raise RobauditError(  # an entry of the user's own list that would silently run nothing
                f"attack '{run.label}': skip_targets {getattr(run.attack, 'skip_targets', 0)} leaves no target class to attack on a "
                f"{info.num_classes}-class model; lower skip_targets or drop the entry"
            )
    _deterministic_only(config.indicator, randomized, "--indicator")  # a usage error: before any attack
    _deterministic_only(config.certify, randomized, "--certify")
    setup = ChunkSetup(
        threats=config.threats, battery=battery, trust=trust if config.checks == "on" else None, output_kind=info.output_kind,
        lower=lower, upper=upper, num_classes=info.num_classes, batch_size=batch, device=device, seed=config.seed,
        preset=config.preset,
    )  # fmt: skip

    # 4-8. every chunk of this rank: clean pass, attacks, trust checks, re-verification; then indicator, certificate
    chunks = plan_chunks(len(y), config.chunk_size)
    fingerprint = _fingerprint(config, data, battery, batch_size, device, model, randomized, raw.net)
    if cluster.distributed:  # identical copies on every rank, pixels and network code included
        cluster.agree({
            **{k: v for k, v in fingerprint.items() if k != PROBE_KEY}, "data_sha256": data.digest(),
            "model_code_sha256": fingerprint["model_code_sha256"] or code_digest(raw.net, config.arch),
        })  # fmt: skip
    store = _open_store(config, cluster, fingerprint)
    try:
        mine = cluster.shard(len(chunks))
        costs = [0.0] * 5  # battery passes, samples, attack seconds, correctly classified samples, chunks with masking

        def stored_attacks(k: int, dense: bool) -> ChunkAttacks:  # a malformed file is a one-line error (`read`)
            parse = functools.partial(attacks_from_plain, threats=config.threats, sample_shape=data.sample_shape, dense=dense)
            return store.read(k, "attacks", parse)

        reused = sum(not store.missing(k) for k in mine)  # chunks a checkpoint already held (a resumed scan)
        for k in mine:
            start, stop = chunks[k]
            if store.missing(k):
                x = data.take(start, stop)
                store.discard(k, "final")  # a final pass of the attacks being redone would not be about them
                store.save_pixels(k, x)
                part = attack_chunk(setup, model, k, start, x, y[start:stop], _in_chunk(progress, k, chunks))
                store.save(k, "attacks", attacks_to_plain(part))
            else:  # a resumed chunk: only if its pixels are the ones it was attacked on
                store.check_pixels(k, data.take(start, stop))
            part = stored_attacks(k, dense=False)
            masked = float(part.trust is not None and part.trust.masking)
            costs = [a + b for a, b in zip(costs, [part.battery_passes, part.n, part.seconds, float((part.clean_pred == y[start:stop]).sum()), masked])]
        # the attack seconds stored with the chunks, not this run's wall time: a resumed scan decides the same
        decisions = _decide(config, store, cluster, costs, model, data, chunks, randomized)

        for k in mine:
            start, stop = chunks[k]
            if not store.has(k, "final"):
                part = stored_attacks(k, dense=True)
                x = data.take(start, stop)
                if decisions.get("masking") and part.trust is not None and not part.trust.masking:
                    adapt_chunk(setup, model, part, x, y[start:stop], _in_chunk(progress, k, chunks))
                    store.save(k, "attacks", attacks_to_plain(part))  # before pass 2: a resume must not adapt twice
                final = finish_chunk(
                    setup, model, part, x, y[start:stop], indicator=decisions["indicator"],
                    certify=decisions["certify"], certify_budget=config.certify_budget,
                    certify_skipped=decisions["certify_reason"], progress=_in_chunk(progress, k, chunks),
                )  # fmt: skip
                store.save(k, "final", final_to_plain(final))
        dense = config.keep_adversarial or config.plots is not None
        results = [
            (stored_attacks(k, dense),
             store.read(k, "final", final_from_plain))
            for k in mine
        ]  # fmt: skip
        gathered = cluster.gather((results, batch.note, reused))
    finally:
        store.close()
    if gathered is None:
        return None
    ordered = sorted((r for rank, _, _ in gathered for r in rank), key=lambda r: r[0].k)
    batch_notes = list(dict.fromkeys(note for _, note, _ in gathered if note))  # each rank backs off on its own
    resumed = sum(count for _, _, count in gathered)
    parts, finals = [a for a, _ in ordered], [f for _, f in ordered]
    if [p.k for p in parts] != list(range(len(chunks))):
        raise RuntimeError("internal error: chunks are missing from the merged results")

    # 9. merge the chunks
    clean_pred = _cat_long([p.clean_pred for p in parts])
    clean_correct = clean_pred == y
    outcomes = merge_outcomes(parts, y)
    minimal = merge_minimal(parts, y)
    trust_report = merge_trust(opened, parts) if config.checks == "on" else None
    l2_threats = [(t.canonical, t.eps) for t in config.threats if t.norm == "l2"]
    certified = merge_certified(finals, clean_correct, l2_threats, config.certify_budget)
    indicator = merge_indicator(finals, [p.n for p in parts], config.threats)

    # 10. report (with plots when asked for) and gate
    summary = _summary(data.y, clean_correct, outcomes, minimal, certified, indicator)
    if trust_report is not None:
        summary.diagnostics = trust_report.to_dict()
        summary.diagnostics["passes_per_sample"] = [round(p / max(1, len(y)), 2) for p in trust_report.passes]
    plots = []
    if config.plots is not None:
        plots = _write_plots(config, model, data, clean_correct, outcomes, summary.curves, lower, upper)
    report = Report(
        schema_version=SCHEMA_VERSION,
        robaudit_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            path=model_label(config.model),
            format=raw.format,
            sha256=model_digest(config.model),
            input_shape=list(raw.input_shape) if raw.input_shape else None,
            num_classes=info.num_classes,
            output_kind=info.output_kind,
            batching=info.batching,
            mean=config.mean,
            std=config.std,
            input_range=[lower, upper],
            notes=[
                *raw.notes, *info.notes, *([reshape_note] if reshape_note else []), *_randomized_notes(randomized),
                *batch_notes,
                PRECISION_NOTE,
            ],  # fmt: skip
        ),
        data=DataInfo(
            name=data.name,
            n=len(data.y),
            seed=config.seed,
            indices=list(data.indices),
            source_size=data.source_size,
            sample_shape=list(data.sample_shape),
            notes=list(data.notes),
            sha256=data.digest(config.chunk_size),
            files=data.files,
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
            "ranks": cluster.world,
            "chunks": len(chunks),
            "chunks_resumed": resumed,  # attacked by an earlier, interrupted run: their attacks_s are that run's
            "certify_s": round(certified.seconds, 3) if certified else None,
            "indicator_s": round(indicator.seconds, 3) if indicator else None,
            "attacks_s": {
                **{f"minimal:{m.norm}": {r.name: round(r.seconds, 3) for r in m.records} for m in minimal.values()},
                **{o.threat.canonical: {r.name: round(r.seconds, 3) for r in o.records if not r.skipped} for o in outcomes},
            },
        },
    )
    report.gate = evaluate(report, config.thresholds, config.max_drops, config.baseline)
    if config.strict and trust_report is not None:
        report.gate.append(strict_check(trust_report.checks))
    return ScanResult(report=report, data=data, outcomes=outcomes)


def _in_chunk(progress: ProgressFactory, k: int, chunks: list) -> ProgressFactory:
    """Progress labels that say which chunk (when there is more than one)."""
    if len(chunks) <= 1:
        return progress
    return prefixed(progress, f"chunk {k + 1}/{len(chunks)}")


def _cat_long(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _open_store(config: ScanConfig, cluster: Cluster, fingerprint: dict) -> ChunkStore:
    """The user's checkpoint folder (rank 0 creates it, the others then check it), or a private spool."""
    if config.checkpoint is None:
        return ChunkStore.spool()
    if cluster.is_main:
        store = open_checkpoint(config.checkpoint, fingerprint, is_main=True)
    cluster.barrier("opening the checkpoint")
    if not cluster.is_main:
        store = open_checkpoint(config.checkpoint, fingerprint, is_main=False)
    return store


def _fingerprint(
    config: ScanConfig, data: Dataset, battery: list[AttackRun], batch_size: int, device: torch.device,
    model: torch.nn.Module, randomized: bool, net: torch.nn.Module,
) -> dict:  # fmt: skip
    """Everything a chunk's results depend on: a checkpoint written for other values is refused.

    The model file's hash does not cover the code that builds the network (`--arch`, the
    classes behind a pickle), so a checkpoint also keeps that code's digest and what the
    network computes.
    """
    settings = _config_dict(config, battery, batch_size)
    # "device" as asked ("auto") gives way to the device it resolved to, which the results depend on
    for key in ("fail_under", "max_drop", "baseline", "strict", "plots", "n", "device"):
        settings.pop(key, None)
    for stage in config.gated_stages:  # gates are not part of it, so neither is the stage a gate turned on:
        settings[stage] = "auto"  # a resumed scan keeps the checkpoint's decision (`_decide`)
    return {
        "robaudit": __version__,
        "robaudit_code_sha256": robaudit_digest(),
        "model_sha256": model_digest(config.model),
        "data": data.name,
        "data_source_size": data.source_size,
        "data_indices": hashlib.sha256(np.asarray(data.indices, dtype=np.int64).tobytes()).hexdigest(),
        "data_labels": hashlib.sha256(data.y.numpy().astype(np.int64).tobytes()).hexdigest(),
        "device": device.type,
        "chunk_size": config.chunk_size,
        "model_code_sha256": code_digest(net, config.arch) if config.checkpoint is not None else None,
        **settings,
        PROBE_KEY: None if randomized or config.checkpoint is None else model_probe(model, data.sample_shape, config.input_range, device),
    }


def _decide(
    config: ScanConfig, store: ChunkStore, cluster: Cluster, costs: list[float], model: torch.nn.Module,
    data: Dataset, chunks: list[tuple[int, int]], randomized: bool,
) -> dict:  # fmt: skip
    """Whether the indicator and the certificate run: one decision for the whole scan, from every rank's costs.

    A checkpoint keeps the decision, so a resumed scan makes the same one.
    """
    kept = store.decisions() if store.keep else None
    if kept is not None:
        return kept
    passes, n, attack_total, correct, masked = cluster.all_sum(costs)  # attack seconds of every rank together
    indicator_mode = _deterministic_only(config.indicator, randomized, "--indicator")
    indicator = indicator_mode == "on" or (indicator_mode == "auto" and passes / max(1.0, n) >= INDICATOR_PASSES)
    certify_mode = _deterministic_only(config.certify, randomized, "--certify")
    l2 = any(t.norm == "l2" for t in config.threats)
    decision = {
        "indicator": indicator, "certify": certify_mode == "on" or (certify_mode == "auto" and l2), "certify_reason": None,
        "masking": masked > 0,  # masking seen in any chunk: every chunk gets the adaptive battery
    }  # fmt: skip
    if certify_mode == "auto" and l2:
        reason = None
        if cluster.is_main:  # a pilot on the first chunk's samples projects the cost over every rank
            start, stop = chunks[0]
            pilot = store.read(0, "attacks", lambda stored: stored["clean_pred"] == data.y[start:stop])
            reason = certify_skip_reason(
                model, data.take(start, stop)[pilot], data.y[start:stop][pilot], budget=config.certify_budget,
                correct=int(correct), attack_seconds=attack_total, device=config_device(model),
            )  # fmt: skip
        decision["certify_reason"] = cluster.broadcast(reason)
    if store.keep and cluster.is_main:
        store.save_decisions(decision)
    return decision


def config_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _write_plots(config: ScanConfig, model, data: Dataset, clean_correct, outcomes, curves, lower: float, upper: float) -> list[str]:
    """Decision-surface slices of the first correctly classified samples (only those are read) and the curves."""
    picked = torch.nonzero(clean_correct).flatten()[:PLOT_SAMPLES].tolist()
    x = torch.cat([data.take(i, i + 1) for i in picked]) if picked else data.take(0, 0)
    subset = [replace(o, broken=o.broken[picked], x_adv=o.x_adv[picked], broken_by=[o.broken_by[i] for i in picked]) for o in outcomes]
    return write_plots(  # on the plain model: a randomized one is drawn through its EOT mean
        config.plots, model, x, data.y[picked], clean_correct[picked], [data.indices[i] for i in picked], subset, curves,
        lower=lower, upper=upper, seed=config.seed,
    )  # fmt: skip


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
    if isinstance(config.model, torch.nn.Module):
        raw = module_model(config.model)
    else:
        raw = load_model(
            config.model, fmt=config.format, arch=config.arch, num_classes=config.num_classes, trust_pickle=config.trust_pickle
        )
    channels = image_channels(raw.input_shape or raw.input_dims)
    if raw.input_shape and len(raw.input_shape) == 1:
        channels = FLAT_INPUT  # data flatten in their stored order, never transposed first

    data = load_data(
        config.data, n=config.n, seed=config.seed, data_dir=config.data_dir, input_range=config.input_range, channels=channels,
        first=config.first,
    )
    reshape_note = check_compatible(data, raw.input_shape, raw.num_classes or np.iinfo(np.int64).max)
    sample_shape = data.sample_shape
    model, info = wrap_model(
        raw, sample_shape=sample_shape, probe=data.take(0, PROBE_SIZE), mean=config.mean, std=config.std, device=device
    )
    check_compatible(data, raw.input_shape, info.num_classes)
    if (classes_note := class_count_note(data, info.num_classes)) is not None:
        data.notes.append(classes_note)
    if model.model_shape is not None:  # the wrapper's own note says how the samples reach the net
        reshape_note = None
    for threat in config.threats:
        if threat.is_spatial and (len(sample_shape) != 3 or min(sample_shape[1:]) < 2):
            shape = "x".join(map(str, sample_shape))
            raise RobauditError(f"threat {threat.spec}: spatial threats need image data (C, H, W), not samples of shape {shape}")
    return raw, data, model, info, reshape_note


def _config_dict(config: ScanConfig, battery: list[AttackRun], batch_size: int) -> dict:
    return {
        "threats": [t.canonical for t in config.threats],
        "preset": config.preset,  # with [[attacks]] too: it still sets the trust checks (and the checkpoint's fingerprint)
        "attacks": [
            {"name": r.label, "attack": r.attack.name, "kind": r.attack.kind, "restarts": r.restarts,
             "near": r.near, "close": r.close, "stalled": r.stalled,
             **({"norms": list(r.norms)} if r.norms is not None else {}), "params": r.attack.params()}
            for r in battery
        ],
        "steps": config.steps,
        "restarts": config.restarts,
        "step_sizes": config.step_sizes,
        "n": config.n,
        "first": config.first,
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
    return {str(c): float(int(robust[y == c].sum()) / int((y == c).sum())) for c in sorted(set(y.tolist()))}


def _curve(norm: str, clean_correct: torch.Tensor, found: MinimalOutcome, outcomes: list[ThreatOutcome]) -> Curve:
    """Robust accuracy against radius: a sample falls at the smallest radius where any verified attack broke it.

    Fixed-radius results count too: a sample broken by an example at distance d <= eps is
    broken at every radius from d on (eps where no distance was recorded).
    """
    fall = found.distance.clone()
    for outcome in outcomes:
        if outcome.threat.norm == norm:
            eps = torch.full_like(fall, outcome.threat.eps)
            size = torch.where(torch.isfinite(outcome.distance), torch.minimum(outcome.distance.to(fall.dtype), eps), eps)
            fall = torch.where(outcome.broken, torch.minimum(fall, size), fall)
    fall[~clean_correct] = 0.0
    finite = fall[torch.isfinite(fall) & clean_correct]
    top = max([o.threat.eps * 2 for o in outcomes if o.threat.norm == norm] + [float(finite.max()) if len(finite) else 0.0])
    grid = torch.linspace(0.0, top, CURVE_POINTS, dtype=torch.float64)
    n = len(fall)
    accuracy = [float(((fall > e) & clean_correct).sum()) / n for e in grid.tolist()]
    median = float(torch.quantile(finite, 0.5)) if len(finite) else None  # the mean of the middle two when even
    return Curve(
        norm=norm,
        eps=grid.tolist(),  # exact: rounded to 8 decimals, radii below 1e-6 were shown up to 20% off
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
        arrays[f"{key}__label"] = result.data.y[idx].to(torch.int64).numpy()  # the true class, which x no longer gets
    try:
        write_output(path, lambda handle: np.savez_compressed(handle, **arrays))
    except OSError as exc:
        raise RobauditError(f"cannot write {path}: {exc.strerror or exc}") from exc
