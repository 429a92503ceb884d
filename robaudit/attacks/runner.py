"""The shared loop that runs a battery of attacks under one threat.

It batches, runs each attack (and each restart) only on points that are still robust,
counts model passes per attack, projects candidates into the threat ball and the
input box, and accepts a candidate only after an independent re-verification: a
fresh float32 forward pass of the uncounted model, the norm checked in float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, project
from robaudit.attacks.counting import CountingModel
from robaudit.threats import Threat, perturbation_norms, within_ball

BOX_TOL = 1e-6


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
    """One entry of a battery: an attack and how many times to restart it."""

    attack: Attack
    restarts: int = 1


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


@dataclass
class ThreatOutcome:
    """Per-sample results of a battery under one threat."""

    threat: Threat
    broken: torch.Tensor  # bool (N,): an attack found a verified adversarial example
    broken_by: list[str | None]
    distance: torch.Tensor  # float64 (N,): norm of the accepted perturbation, NaN where none
    x_adv: torch.Tensor  # (N, ...) accepted adversarial inputs (rows valid where broken)
    records: list[AttackRecord] = field(default_factory=list)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Class predictions in batches (eval mode, no gradients), returned on the CPU."""
    preds = [model(x[i : i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def verify_adversarial(
    model: nn.Module,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: Threat,
    lower: float,
    upper: float,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Independent check of candidate adversarial examples: misclassified, in the ball, in the box."""
    x_adv = x_adv.detach().to(torch.float32).cpu()
    x = x.detach().cpu()
    in_box = (x_adv >= lower - BOX_TOL).flatten(1).all(dim=1) & (x_adv <= upper + BOX_TOL).flatten(1).all(dim=1)
    finite = torch.isfinite(x_adv).flatten(1).all(dim=1)
    in_ball = within_ball(x_adv - x, threat)
    wrong = predict(model, x_adv, batch_size, device) != y.cpu()
    return wrong & in_ball & in_box & finite


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
    batch_size: int,
    device: torch.device,
    seed: int,
    progress: ProgressSink | None = None,
) -> ThreatOutcome:
    """Run every attack of the battery in order; later attacks only see points still robust."""
    progress = progress or NoProgress()
    n = len(x)
    counted = CountingModel(model)
    ctx = AttackContext(lower=lower, upper=upper, num_classes=num_classes, generator=torch.Generator().manual_seed(seed))
    broken = torch.zeros(n, dtype=torch.bool)
    broken_by: list[str | None] = [None] * n
    distance = torch.full((n,), float("nan"), dtype=torch.float64)
    x_adv = x.detach().clone().cpu()
    records: list[AttackRecord] = []

    runs_total = sum(run.restarts for run in battery if run.attack.supports(threat))
    progress.start(f"{threat.canonical}", max(1, runs_total * n))
    for run in battery:
        attack = run.attack
        record = AttackRecord(name=attack.name, params=attack.params(), restarts=run.restarts)
        records.append(record)
        if not attack.supports(threat):
            record.skipped = f"{attack.name} does not support {threat.norm}"
            record.robust_after = int((clean_correct & ~broken).sum())
            continue
        start_time = time.perf_counter()
        f0, b0 = counted.snapshot()
        for _ in range(run.restarts):
            todo = torch.nonzero(clean_correct & ~broken).flatten()
            record.attempted = max(record.attempted, len(todo))
            progress.advance(n - len(todo))
            for chunk in torch.split(todo, batch_size):
                xb, yb = x[chunk].to(device), y[chunk].to(device)
                candidates = attack.perturb(counted, xb, yb, threat, ctx).detach()
                candidates = project(candidates, xb, threat, lower, upper)
                ok = verify_adversarial(model, candidates, x[chunk], y[chunk], threat, lower, upper, batch_size, device)
                hits = chunk[ok]
                broken[hits] = True
                x_adv[hits] = candidates[ok].cpu()
                distance[hits] = perturbation_norms(candidates[ok].cpu() - x[hits], threat.norm)
                for i in hits.tolist():
                    broken_by[i] = attack.name
                record.broke += len(hits)
                progress.advance(len(chunk))
        f1, b1 = counted.snapshot()
        record.forwards, record.backwards = f1 - f0, b1 - b0
        record.seconds = time.perf_counter() - start_time
        record.robust_after = int((clean_correct & ~broken).sum())
    progress.finish()
    return ThreatOutcome(threat=threat, broken=broken, broken_by=broken_by, distance=distance, x_adv=x_adv, records=records)
