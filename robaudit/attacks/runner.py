"""The shared loop that runs a battery of attacks under one threat.

It batches, runs each attack (and each restart) only on points that are still robust,
counts model passes per attack, projects candidates into the threat ball and the
input box, and accepts a candidate only after an independent re-verification: a
fresh float32 forward pass of the uncounted model (in full precision: no TF32), the
norm checked in float64.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, project
from robaudit.attacks.counting import CountingModel
from robaudit.batching import AdaptiveBatch, Restore, as_batch, rng_checkpoint
from robaudit.models.randomized import EOT
from robaudit.models.wrapper import AuditModel
from robaudit.precision import full_precision
from robaudit.threats import Threat, distances, within_ball

BOX_TOL = 1e-6
FILE_BATCH = 256  # rows per call of an ONNX file's own engine (`confirm_in_file`)


class ProgressSink(Protocol):
    """Where the runner reports progress (a rich progress bar in the CLI)."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    """The progress sink for library use and ``--quiet``."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class AttackRun:
    """One entry of a battery: an attack, how many times to restart it, and its report label."""

    attack: Attack
    restarts: int = 1
    label: str = ""
    # Only on points the minimal-norm stage of the same norm found within near * eps (or not at all):
    # the points near the boundary, where a stronger attack can still matter.
    near: float | None = None
    # Only on points an earlier attack of the same threat brought within close * (clean margin)
    # of the boundary: its best candidate's margin z_y - max_j z_j at most close times the clean one.
    # With `near` too, a point either selects runs.
    close: float | None = None
    # With `close`: also run on stalled points (at least `STALLED` of the clean margin left).
    stalled: bool = True
    # Only under these norms (None: every norm the attack supports), e.g. AutoAttack's L1 budgets.
    norms: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.label = self.label or self.attack.name

    def supports(self, threat: Threat) -> bool:
        """Whether this entry runs under the threat: its attack supports the norm and the entry names it."""
        return self.attack.supports(threat) and (self.norms is None or threat.norm in self.norms)


@dataclass
class AttackRecord:
    """What one attack did under one threat (for the report)."""

    name: str
    params: dict[str, Any]
    restarts: int
    attempted: int = 0
    broke: int = 0
    robust_after: int = 0
    forwards: int = 0
    backwards: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    silent: int = 0  # points the attack itself saw misclassified whose returned candidate did not verify
    minimal: bool = False  # a minimal-norm attack's result, merged into a threat (its steps are not the battery's)


@dataclass
class ThreatOutcome:
    """Per-sample results of a battery under one threat."""

    threat: Threat
    broken: torch.Tensor  # bool (N,): an attack found a verified adversarial example
    broken_by: list[str | None]
    distance: torch.Tensor  # float64 (N,): norm of the accepted perturbation, NaN where none
    x_adv: torch.Tensor  # (N, ...) accepted adversarial inputs (rows valid where broken)
    records: list[AttackRecord] = field(default_factory=list)
    transform: torch.Tensor | None = None  # spatial threats: float64 (N, 3) rotation, dx, dy; NaN where none


@dataclass
class MinimalOutcome:
    """Smallest verified adversarial perturbation per sample under one norm (inf where none)."""

    norm: str
    distance: torch.Tensor  # float64 (N,)
    found_by: list[str | None]
    x_adv: torch.Tensor
    records: list[AttackRecord] = field(default_factory=list)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int | AdaptiveBatch, device: torch.device) -> torch.Tensor:
    """Class predictions in batches (eval mode, no gradients), returned on the CPU.

    `batch_size` may be the scan's `AdaptiveBatch`, which halves on CUDA out-of-memory;
    the global generator is put back before a chunk is retried (a randomized model draws from it).
    """
    preds = as_batch(batch_size).run(
        len(x), lambda start, stop: model(x[start:stop].to(device)).argmax(dim=1).cpu(), checkpoint=rng_checkpoint
    )
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def judge(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
    claim: str = "misclassified",
) -> torch.Tensor:
    """The labels a claim rests on: plain predictions, or for a randomized model (`EOT`) a
    wrong class seen in any of its seeded repeated draws (the worst case over repeats).

    For an ONNX file the claim must hold in the file itself too (`confirm_in_file`): `claim`
    says which verdict is being claimed, "misclassified" (an adversarial example) or
    "correct" (a clean prediction, a point inside a certified ball).
    """
    if isinstance(model, EOT):
        return model.worst_predictions(x.to(device), y.cpu())
    return confirm_in_file(model, x, y, predict(model, x, batch_size, device), claim)


def confirm_in_file(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, claim: str) -> torch.Tensor:
    """`pred` where the ONNX file itself (`AuditModel.file_twin`) agrees with its verdict on `claim`.

    The translation that the attacks run matches the file to float32 rounding, but a point
    found on a decision boundary can sit on the other side of it in the file's own
    arithmetic. Rows whose claimed verdict the file does not share get the file's verdict:
    label y where "misclassified" does not hold there, the file's wrong label where
    "correct" does not. Other models: `pred` unchanged.
    """
    twin = model.file_twin if isinstance(model, AuditModel) else None
    if twin is None:
        return pred
    y = y.cpu()
    rows = torch.nonzero(pred != y if claim == "misclassified" else pred == y).flatten()
    if len(rows) == 0:
        return pred
    got = predict(twin, x[rows].detach().cpu(), FILE_BATCH, torch.device("cpu"))
    differs = (got == y[rows]) if claim == "misclassified" else (got != y[rows])
    pred = pred.clone()
    pred[rows[differs]] = got[differs]  # y where a "misclassified" point is correct in the file, its wrong label otherwise
    return pred


def verify_adversarial(
    model: nn.Module,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    lower: float,
    upper: float,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
) -> torch.Tensor:
    """Independent check of candidate adversarial examples: misclassified, in the ball, in the box."""
    return verify_with_margins(model, x_adv, x, y, threat, lower, upper, batch_size, device)[0]


def verify_with_margins(
    model: nn.Module,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    lower: float,
    upper: float,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify_adversarial`, plus each candidate's margin z_y - max_{j != y} z_j from the same pass.

    The margin (float64; NaN for a randomized model, whose verdict comes from repeated
    draws) says how close a failed candidate came: the runner's ``close`` filter reads it.
    """
    x_adv = x_adv.detach().to(torch.float32).cpu()
    x = x.detach().cpu()
    if len(x_adv) == 0:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    in_ball = within_ball(x_adv, x, threat)
    with full_precision():  # the verdict must not depend on the GPU's TF32 defaults
        pred, margin = _judge_with_margins(model, x_adv, y, batch_size, device)
    return (pred != y.cpu()) & in_ball & _in_box(x_adv, lower, upper), margin


def _judge_with_margins(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | AdaptiveBatch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`judge`'s labels and, from the same pass, the margins (NaN for a randomized model)."""
    if isinstance(model, EOT):
        return judge(model, x, y, batch_size, device), torch.full((len(x),), float("nan"), dtype=torch.float64)
    z = logits(model, x, batch_size, device)
    pred, margin = z.argmax(dim=1), class_margins(z, y.cpu())
    confirmed = confirm_in_file(model, x, y, pred, "misclassified")
    return confirmed, torch.where(confirmed != pred, margin.clamp_min(0.0), margin)  # the file's side: no wrong margin


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int | AdaptiveBatch, device: torch.device) -> torch.Tensor:
    """The model's outputs in batches (no gradients), returned on the CPU."""
    out = as_batch(batch_size).run(len(x), lambda start, stop: model(x[start:stop].to(device)).cpu(), checkpoint=rng_checkpoint)
    return torch.cat(out) if out else torch.empty(0)


def class_margins(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per row, in float64 (negative: misclassified)."""
    z = z.to(torch.float64)
    own = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return own - others.max(dim=1).values


def _in_box(x_adv: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    flat = x_adv.flatten(1)
    return (flat >= lower - BOX_TOL).all(dim=1) & (flat <= upper + BOX_TOL).all(dim=1) & torch.isfinite(flat).all(dim=1)


@dataclass
class _Stage:
    """What one stage (a threat, or a norm's minimal-norm search) shares across its attacks."""

    model: nn.Module
    counted: CountingModel
    x: torch.Tensor
    y: torch.Tensor
    ctx: AttackContext
    batch: AdaptiveBatch  # shared by every chunk loop of the stage (and the scan, when it passes one in)
    device: torch.device
    progress: ProgressSink
    starts: torch.Tensor | None = None  # per point: a warm start for the attacks (AttackContext.start)

    def context(self, chunk: torch.Tensor, restart: int) -> AttackContext:
        """The attack context for one chunk of points and one restart."""
        start = None if self.starts is None else self.starts[chunk].to(self.device)
        return dataclasses.replace(self.ctx, start=start, restart=restart)

    def checkpoint(self) -> Restore:
        """The state a chunk starts from: the attack generator, torch's global ones, the pass counts."""
        rng = rng_checkpoint(self.ctx.generator)
        counts = self.counted.snapshot()

        def restore() -> None:
            rng()
            self.counted.forwards, self.counted.backwards = counts

        return restore


def _run_attack(
    stage: _Stage, run: AttackRun, threat: Threat, todo_fn, accept_fn, record: AttackRecord, propose=None
) -> None:
    """Run one battery entry (with restarts) on the points `todo_fn` names; `accept_fn` keeps results.

    ``propose(xb, yb, ctx)`` makes the candidates; by default the attack's ``perturb``.
    """
    if propose is None:
        def propose(xb: torch.Tensor, yb: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
            return run.attack.perturb(stage.counted, xb, yb, threat, ctx).detach()

    name_attack = getattr(stage.progress, "step", None)  # name the attack now running (robaudit.progress)
    if name_attack is not None:
        name_attack(run.label)
    start_time = time.perf_counter()
    f0, b0 = stage.counted.snapshot()
    own = getattr(run.attack, "passes", None)  # attacks querying a model of their own (a surrogate)
    e0 = own() if own else (0, 0)
    n = len(stage.x)
    for restart in range(run.restarts):
        todo = todo_fn()
        record.attempted = max(record.attempted, len(todo))
        stage.progress.advance(n - len(todo))
        if len(todo) == 0:
            continue
        step = _chunk_step(stage, todo, propose, accept_fn, record, restart)
        stage.batch.run(len(todo), step, checkpoint=stage.checkpoint)
    f1, b1 = stage.counted.snapshot()
    e1 = own() if own else (0, 0)
    record.forwards, record.backwards = f1 - f0 + e1[0] - e0[0], b1 - b0 + e1[1] - e0[1]
    record.seconds = time.perf_counter() - start_time
    record.params = run.attack.params()  # what actually ran (e.g. a loss fallback for few classes)


def _chunk_step(stage: _Stage, todo: torch.Tensor, propose, accept_fn, record: AttackRecord, restart: int = 0):
    """One chunk of `todo`: propose, then accept. Nothing is kept until accept's last model call
    has passed, so a chunk that runs out of GPU memory can be run again from its start."""

    def step(start: int, stop: int) -> None:
        chunk = todo[start:stop]
        xb, yb = stage.x[chunk].to(stage.device), stage.y[chunk].to(stage.device)
        candidates = propose(xb, yb, stage.context(chunk, restart))
        record.broke += accept_fn(chunk, candidates, xb)
        stage.progress.advance(len(chunk))

    return step


def _stage(model, x, y, lower, upper, num_classes, batch_size, device, seed, progress) -> _Stage:
    generator = torch.Generator().manual_seed(seed)
    ctx = AttackContext(lower=lower, upper=upper, num_classes=num_classes, generator=generator)
    return _Stage(model, CountingModel(model), x, y, ctx, as_batch(batch_size), device, progress or NoProgress())


def run_minimal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    norm: str,
    hint_eps: float,
    battery: list[AttackRun],
    *,
    lower: float,
    upper: float,
    num_classes: int,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
    seed: int,
    progress: ProgressSink | None = None,
) -> MinimalOutcome:
    """Run minimal-norm attacks on every correctly classified point; keep each sample's smallest verified perturbation."""
    stage = _stage(model, x, y, lower, upper, num_classes, batch_size, device, seed, progress)
    n = len(x)
    distance = torch.full((n,), float("inf"), dtype=torch.float64)
    found_by: list[str | None] = [None] * n
    x_adv = x.detach().clone().cpu()
    hint = Threat(norm=norm, eps=hint_eps)
    unbounded = Threat(norm=norm, eps=float("inf"))
    runs = [r for r in battery if r.supports(hint)]
    stage.progress.start(f"attacking minimal {norm}", max(1, sum(r.restarts for r in runs) * n))
    records = []
    for run in runs:
        record = AttackRecord(name=run.label, params=run.attack.params(), restarts=run.restarts)
        records.append(record)

        def accept(chunk: torch.Tensor, candidates: torch.Tensor, xb: torch.Tensor, run=run) -> int:
            candidates = candidates.clamp(lower, upper)
            ok = verify_adversarial(model, candidates, x[chunk], y[chunk], unbounded, lower, upper, stage.batch, device)
            sizes = distances(candidates.cpu(), x[chunk], norm)
            better = ok & (sizes < distance[chunk])
            hits = chunk[better]
            newly = int(torch.isinf(distance[hits]).sum())
            distance[hits] = sizes[better]
            x_adv[hits] = candidates[better].cpu()
            for i in hits.tolist():
                found_by[i] = run.label
            return newly

        _run_attack(stage, run, hint, lambda: torch.nonzero(clean_correct).flatten(), accept, record)
        record.robust_after = int((clean_correct & torch.isinf(distance)).sum())
    stage.progress.finish()
    return MinimalOutcome(norm=norm, distance=distance, found_by=found_by, x_adv=x_adv, records=records)


def near_points(minimal: MinimalOutcome | None, threat: Threat, near: float | None, n: int) -> torch.Tensor:
    """Points an attack with ``near`` runs on: minimal-norm distance within near * eps, or none found.

    Without a minimal-norm stage of the threat's norm every point qualifies (nothing
    says which points are near), so the attack runs everywhere.
    """
    if near is None or minimal is None or minimal.norm != threat.norm:
        return torch.ones(n, dtype=torch.bool)
    d = minimal.distance
    return ~torch.isfinite(d) | (d <= near * threat.eps)


# A point whose best candidate still keeps this share of its clean margin gave the attacks little
# grip: the margin says nothing about how far its boundary is (on a VNN-COMP MNIST MLP with
# near one-hot outputs, violated instances kept 98.5% and 78.6% after APGD-CE and APGD-T on 3
# targets, and broke only on later targets), so a ``close`` filter keeps it too, unless the
# battery entry says ``stalled = false``.
STALLED = 0.75


def close_points(closest: torch.Tensor, close: float | None, stalled: bool = True) -> torch.Tensor:
    """Points an attack with ``close`` runs on: an earlier candidate's margin within close x the
    clean margin; or (with ``stalled``) the attacks barely moved it (at least `STALLED` of it
    left); or no margin is known (no candidate yet, a randomized model, a clean margin <= 0)."""
    if close is None:
        return torch.ones(len(closest), dtype=torch.bool)
    chosen = torch.isnan(closest) | (closest <= close)
    return chosen | (closest >= STALLED) if stalled else chosen


def focus_points(minimal: MinimalOutcome | None, threat: Threat, run: AttackRun, closest: torch.Tensor, n: int) -> torch.Tensor:
    """The points one battery entry runs on: its ``near`` and ``close`` filters (either one selects)."""
    if run.near is not None and run.close is not None:
        return near_points(minimal, threat, run.near, n) | close_points(closest, run.close, run.stalled)
    if run.close is not None:
        return close_points(closest, run.close, run.stalled)
    return near_points(minimal, threat, run.near, n)


def _clean_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch, device: torch.device) -> torch.Tensor:
    """Each point's clean margin (NaN where it is not positive, or for a randomized model)."""
    m = _judge_with_margins(model, x, y, batch, device)[1]
    return torch.where(m > 0, m, float("nan"))


def warm_starts(minimal: MinimalOutcome, x: torch.Tensor) -> torch.Tensor:
    """Per point the minimal-norm stage's nearest adversarial input (NaN where it found none).

    A point found just beyond eps lies next to the boundary: APGD started there
    (projected into the ball) crosses it far more often than from a random start.
    """
    found = torch.isfinite(minimal.distance).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(found, minimal.x_adv.to(x.dtype), torch.full_like(x, float("nan")))


def run_threat(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    threat: Threat,
    battery: list[AttackRun],
    *,
    lower: float,
    upper: float,
    num_classes: int,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
    seed: int,
    progress: ProgressSink | None = None,
    minimal: MinimalOutcome | None = None,
) -> ThreatOutcome:
    """Run every attack of the battery in order; later attacks only see points still robust.

    Results of a minimal-norm stage for the same norm (``minimal``) count first: a
    sample whose smallest verified perturbation lies within eps is broken without
    another attack, after it re-verifies under this threat.
    """
    stage = _stage(model, x, y, lower, upper, num_classes, batch_size, device, seed, progress)
    n = len(x)
    broken = torch.zeros(n, dtype=torch.bool)
    broken_by: list[str | None] = [None] * n
    distance = torch.full((n,), float("nan"), dtype=torch.float64)
    x_adv = x.detach().clone().cpu()
    records: list[AttackRecord] = []

    if minimal is not None and minimal.norm == threat.norm:
        for record in minimal.records:
            label = record.name
            pick = torch.nonzero(clean_correct & (minimal.distance <= threat.eps)).flatten()
            pick = pick[[minimal.found_by[i] == label for i in pick.tolist()]] if len(pick) else pick
            ok = verify_adversarial(model, minimal.x_adv[pick], x[pick], y[pick], threat, lower, upper, stage.batch, device)
            hits = pick[ok]
            broken[hits] = True
            x_adv[hits] = minimal.x_adv[hits]
            distance[hits] = minimal.distance[hits]
            for i in hits.tolist():
                broken_by[i] = label
            records.append(
                AttackRecord(
                    name=label, params=record.params, restarts=record.restarts, attempted=record.attempted,
                    broke=len(hits), robust_after=int((clean_correct & ~broken).sum()),
                    skipped="minimal-norm stage, shared by every threat of this norm (cost counted there)", minimal=True,
                )
            )  # fmt: skip

    if minimal is not None and minimal.norm == threat.norm:
        stage.starts = warm_starts(minimal, x)
    runs = [r for r in battery if r.attack.kind != "minimal"]
    # Per point the smallest margin share any candidate reached (NaN: none yet, or unknown).
    closest = torch.full((n,), float("nan"), dtype=torch.float64)
    clean_margin = None
    if any(r.close is not None for r in runs):
        with full_precision():
            clean_margin = _clean_margins(model, x, y, stage.batch, device)
    stage.progress.start(f"attacking {threat.canonical}", max(1, sum(r.restarts for r in runs if r.supports(threat)) * n))
    for run in runs:
        record = AttackRecord(name=run.label, params=run.attack.params(), restarts=run.restarts)
        records.append(record)
        if not run.supports(threat):
            record.skipped = (
                f"{run.attack.name} does not support {threat.norm}" if not run.attack.supports(threat)
                else f"this entry runs only under {', '.join(run.norms or ())}"
            )  # fmt: skip
            record.robust_after = int((clean_correct & ~broken).sum())
            continue

        def accept(chunk: torch.Tensor, candidates: torch.Tensor, xb: torch.Tensor, run=run) -> int:
            candidates = project(candidates, xb, threat, lower, upper)
            ok, margin = verify_with_margins(model, candidates, x[chunk], y[chunk], threat, lower, upper, stage.batch, device)
            if clean_margin is not None:
                closest[chunk] = torch.fmin(closest[chunk], margin / clean_margin[chunk])
            crossed = getattr(run.attack, "crossed", None)
            if crossed is not None and len(crossed) == len(ok):
                record.silent += int((crossed.cpu() & ~ok).sum())
            hits = chunk[ok]
            broken[hits] = True
            x_adv[hits] = candidates[ok].cpu()
            distance[hits] = distances(candidates[ok].cpu(), x[hits], threat.norm)
            for i in hits.tolist():
                broken_by[i] = run.label
            return len(hits)

        focus = focus_points(minimal, threat, run, closest, n)
        _run_attack(stage, run, threat, lambda: torch.nonzero(clean_correct & ~broken & focus).flatten(), accept, record)
        for key in ("near", "close"):  # after _run_attack, which sets the attack's own params
            if getattr(run, key) is not None:
                record.params[key] = getattr(run, key)
        if run.close is not None and not run.stalled:
            record.params["stalled"] = False
        record.robust_after = int((clean_correct & ~broken).sum())
    stage.progress.finish()
    return ThreatOutcome(threat=threat, broken=broken, broken_by=broken_by, distance=distance, x_adv=x_adv, records=records)


def verify_spatial(
    model: nn.Module,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    params: torch.Tensor,
    threat: Threat,
    lower: float,
    upper: float,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
) -> torch.Tensor:
    """Independent check of spatial examples: parameters within the limits, the image rebuilt
    from them equal to the stored one, misclassified by a fresh forward pass, in the box."""
    from robaudit.attacks.spatial import transform_images, within_limits

    if len(x_adv) == 0:
        return torch.zeros(0, dtype=torch.bool)
    x_adv = x_adv.detach().to(torch.float32).cpu()
    rebuilt = transform_images(x.detach().cpu().to(torch.float32), params.nan_to_num(0.0), lower)
    same = ((rebuilt - x_adv).flatten(1).abs().amax(dim=1) <= BOX_TOL)
    with full_precision():
        wrong = judge(model, x_adv, y, batch_size, device) != y.cpu()
    return within_limits(params, threat) & same & wrong & _in_box(x_adv, lower, upper)


def run_spatial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    threat: Threat,
    battery: list[AttackRun],
    *,
    lower: float,
    upper: float,
    num_classes: int,
    batch_size: int | AdaptiveBatch,
    device: torch.device,
    seed: int,
    progress: ProgressSink | None = None,
) -> ThreatOutcome:
    """Run the spatial attacks of the battery under a spatial threat, on points still robust.

    The attacks propose transformation parameters; the runner rebuilds each image from
    them and keeps it only after `verify_spatial`.
    """
    from robaudit.attacks.spatial import transform_images

    if x.dim() != 4 or min(x.shape[2:]) < 2:
        raise ValueError(f"threat {threat.spec or threat}: spatial threats need image data (C, H, W)")
    stage = _stage(model, x, y, lower, upper, num_classes, batch_size, device, seed, progress)
    n = len(x)
    broken = torch.zeros(n, dtype=torch.bool)
    broken_by: list[str | None] = [None] * n
    transform = torch.full((n, 3), float("nan"), dtype=torch.float64)
    x_adv = x.detach().clone().cpu()
    records: list[AttackRecord] = []
    runs = [r for r in battery if r.supports(threat)]
    stage.progress.start(f"attacking {threat.canonical}", max(1, sum(r.restarts for r in runs) * n))
    for run in runs:
        record = AttackRecord(name=run.label, params=run.attack.params(), restarts=run.restarts)
        records.append(record)

        def propose(xb: torch.Tensor, yb: torch.Tensor, ctx: AttackContext, run=run) -> torch.Tensor:
            return run.attack.search(stage.counted, xb, yb, threat, lower, stage.batch.size)

        def accept(chunk: torch.Tensor, params: torch.Tensor, xb: torch.Tensor, run=run) -> int:
            candidates = transform_images(x[chunk].to(torch.float32), params.nan_to_num(0.0), lower)
            ok = verify_spatial(model, candidates, x[chunk], y[chunk], params, threat, lower, upper, stage.batch, device)
            hits = chunk[ok]
            broken[hits] = True
            x_adv[hits] = candidates[ok]
            transform[hits] = params[ok]
            for i in hits.tolist():
                broken_by[i] = run.label
            return len(hits)

        _run_attack(
            stage, run, threat, lambda: torch.nonzero(clean_correct & ~broken).flatten(), accept, record, propose=propose
        )
        record.robust_after = int((clean_correct & ~broken).sum())
    stage.progress.finish()
    distance = torch.full((n,), float("nan"), dtype=torch.float64)
    return ThreatOutcome(
        threat=threat, broken=broken, broken_by=broken_by, distance=distance, x_adv=x_adv, records=records,
        transform=transform,
    )  # fmt: skip
