"""The scan's decision-surface stage: the indicator when it fits the budget, and the plots.

The indicator (`robaudit.measures`) explains the battery's numbers from the shape of
the decision function; its default budget costs about 60 pass-equivalents per sample
(16 Hessian-vector products, about 15 forward and 7 backward passes), so "auto" runs
it whenever the attacks already spent at least that much per sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robaudit.attacks.runner import ProgressSink, ThreatOutcome
from robaudit.errors import RobauditError
from robaudit.report.schema import Curve
from robaudit.threats import Threat

INDICATOR_PASSES = 60  # pass-equivalents per sample of the default indicator budget (docs/indicator.md)
PLOT_SAMPLES = 3  # correctly classified samples whose decision surface --plots draws


@dataclass
class IndicatorResult:
    summary: dict[str, Any]
    samples: list[dict[str, Any]]
    seconds: float


def indicator_stage(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threats: list[Threat],
    *,
    mode: str,
    battery_passes: float,
    lower: float,
    upper: float,
    batch_size: int,
    seed: int,
    progress: ProgressSink,
) -> IndicatorResult | None:
    """Measure the indicator on every sample, or None when off or (auto) dearer than the attacks."""
    from robaudit.measures import measure_indicator

    if mode == "off" or (mode == "auto" and battery_passes < INDICATOR_PASSES):
        return None
    started = time.perf_counter()
    samples, model_level = measure_indicator(
        model, x, y, [t for t in threats if not t.is_spatial], batch_size=min(batch_size, 64), box=(lower, upper),
        seed=seed, progress=progress,
    )  # fmt: skip
    summary = model_level.to_dict()
    summary.pop("seconds", None)  # wall time lives in the report's timing only
    return IndicatorResult(
        summary=summary, samples=[s.to_dict() for s in samples], seconds=time.perf_counter() - started
    )


def require_matplotlib(flag: str) -> None:
    """PNG output is an optional extra; say how to get it before any work starts."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RobauditError(f"{flag} needs matplotlib: pip install 'matplotlib>=3.7' (or pip install '.[plot]' in a robaudit checkout)") from None


def check_plot_dir(path: Path) -> None:
    """Fail before any attack runs when plots cannot be written (no matplotlib, bad folder)."""
    require_matplotlib("--plots")
    if path.exists() and not path.is_dir():
        raise RobauditError(f"--plots {path}: exists and is not a folder")
    if not path.parent.exists():
        raise RobauditError(f"--plots {path}: folder {path.parent} does not exist")
    from robaudit.atomic import probe_folder

    try:  # an unwritable folder fails now, not after the attacks
        probe_folder(path if path.exists() else path.parent)
    except OSError as exc:
        raise RobauditError(f"--plots {path}: cannot write there ({exc.strerror or exc})") from None


def write_plots(
    directory: Path,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_correct: torch.Tensor,
    indices: list[int],
    outcomes: list[ThreatOutcome],
    curves: list[Curve],
    *,
    lower: float,
    upper: float,
    seed: int,
) -> list[str]:
    """Decision-surface slices of the first correctly classified samples and the accuracy-versus-eps curves."""
    from robaudit.measures import save_curve_png, save_png

    directory.mkdir(exist_ok=True)
    written: list[str] = []
    lp = [o for o in outcomes if not o.threat.is_spatial]
    for i in torch.nonzero(clean_correct).flatten().tolist()[:PLOT_SAMPLES]:
        threat = lp[0].threat if lp else Threat(norm="linf", eps=8 / 255)
        broken = lp and bool(lp[0].broken[i])
        direction = (lp[0].x_adv[i] - x[i]) if broken else None
        slices = surface_pair(model, x[i], int(y[i]), threat, direction, lower=lower, upper=upper, seed=seed)
        path = directory / f"surface_{indices[i]}.png"
        save_png(slices, path, shared_scale=True)
        written.append(str(path))
    if curves:
        path = directory / "accuracy_vs_eps.png"
        save_curve_png(curves, path)
        written.append(str(path))
    return written


def surface_pair(
    model: nn.Module,
    x: torch.Tensor,
    label: int,
    threat: Threat,
    direction: torch.Tensor | None,
    *,
    lower: float,
    upper: float,
    seed: int,
    grid: int = 41,
    span: float | None = None,
    name: str = "",
) -> list:
    """A random plane and the attack plane through x, on the same grid.

    The attack direction is a verified adversarial example's (when there is one) or the
    first step of a gradient attack under the threat's norm.
    """
    from robaudit.measures import surface_slice
    from robaudit.measures.decision import attack_direction, gradient

    point = x.unsqueeze(0)
    if direction is None or float(direction.flatten().norm()) == 0:
        direction = attack_direction(gradient(model, point, torch.tensor([label])), threat.norm)[0]
        source = "gradient step"
    else:
        source = "adversarial example"
    if span is None:
        radius = threat.eps * (point[0].numel() ** 0.5) if threat.norm == "linf" else threat.eps
        span = max(2 * radius, 1.5 * float(direction.flatten().norm()) if source == "adversarial example" else 0.0)
    prefix = f"{name}: " if name else ""
    return [
        surface_slice(model, point, label, seed=seed, grid=grid, span=span, title=f"{prefix}random plane"),
        surface_slice(
            model, point, label, direction=direction.unsqueeze(0), seed=seed, grid=grid, span=span,
            title=f"{prefix}attack plane ({source}, {threat.spec})",
        ),
    ]  # fmt: skip
