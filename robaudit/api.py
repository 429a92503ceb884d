"""The Python API: `robaudit.audit(...)`, the same audit the `robaudit scan` command runs.

The command line only parses flags and renders; every scan policy lives here or below
(the audit file merged under the arguments, the default threat, a gate on the
certificate or the indicator turning that stage on), so a script and the CLI get the
same report from the same settings.

    import robaudit
    report = robaudit.audit("model.onnx", "cifar10", threats=["linf:8/255"], n=500)
    report = robaudit.audit(my_module, (x, y), threats=["l2:0.5"], preset="quick")
    print(report.summary.threats[0].robust_accuracy)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from robaudit.errors import RobauditError
from robaudit.report.schema import Report
from robaudit.threats import Threat, parse_threat

def build_config(
    model: str | Path | torch.nn.Module,
    data: str | Path | tuple[Any, Any] = "digits",
    *,
    threats: Iterable[str | Threat] | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    fail_under: Sequence[str] = (),
    max_drop: Sequence[str] = (),
    baseline: str | Path | None = None,
    force_baseline: bool = False,
    certify: bool | None = None,
    indicator: bool | None = None,
    checks: bool = True,
    **settings: Any,
):
    """The `ScanConfig` for these arguments: what `audit` runs and what `robaudit scan` runs.

    ``data`` is a built-in name, a path, or ``(x, y)`` arrays/tensors. ``certify`` and
    ``indicator``: True / False, or None for automatic. ``settings`` are the other
    `ScanConfig` fields (``n``, ``seed``, ``mean``, ``std``, ``input_range``, ``steps``,
    ``batch_size``, ``device``, ``chunk_size``, ``checkpoint``, ...).
    """
    from robaudit.battery import DEFAULT_PRESET, read_config
    from robaudit.gate import Baseline, parse_max_drop, parse_threshold
    from robaudit.report.schema import read_report
    from robaudit.scan import DEFAULT_THREAT, ScanConfig

    known = set(ScanConfig.__dataclass_fields__) - {"model", "data", "threats", "preset", "attacks", "thresholds",
                                                     "max_drops", "baseline", "certify", "indicator", "checks"}  # fmt: skip
    unknown = sorted(set(settings) - known)
    if unknown:
        raise RobauditError(f"unknown audit setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    file_config = read_config(Path(config_file)) if config_file is not None else {}
    specs = list(threats) if threats else (file_config.get("threats") or [DEFAULT_THREAT])
    gate_spec = file_config.get("gate")
    thresholds = [parse_threshold(f) for f in fail_under] + (gate_spec.minimums if gate_spec else [])
    max_drops = [parse_max_drop(f) for f in max_drop] + (gate_spec.max_drops if gate_spec else [])
    baseline_path = baseline or (gate_spec.baseline if gate_spec else None)
    if force_baseline and not baseline_path:
        raise RobauditError("--force-baseline needs a baseline report: pass --baseline BASE.json or set baseline in [gate]")
    # a gate on the certificate or the indicator turns the stage on (unless it was switched off: a usage error)
    gated: list[str] = []
    if certify is None and any(r.metric == "certified_accuracy" for r in [*thresholds, *max_drops]):
        certify = True
        gated.append("certify")
    if indicator is None and any(r.metric == "indicator_score" for r in [*thresholds, *max_drops]):
        indicator = True
        gated.append("indicator")
    for key in ("data_dir", "plots", "checkpoint"):
        if settings.get(key) is not None:
            settings[key] = Path(settings[key])
    if "input_range" in settings:
        settings["input_range"] = tuple(settings["input_range"])
    return ScanConfig(
        model=model if isinstance(model, torch.nn.Module) else Path(model),
        data=data if isinstance(data, (tuple, list)) else str(data),
        threats=[t if isinstance(t, Threat) else parse_threat(str(t)) for t in specs],
        preset=preset if preset is not None else file_config.get("preset", DEFAULT_PRESET),
        attacks=None if preset is not None else file_config.get("attacks"),
        thresholds=thresholds,
        max_drops=max_drops,
        baseline=Baseline(read_report(Path(baseline_path)), str(baseline_path), force=force_baseline) if baseline_path else None,
        certify="auto" if certify is None else ("on" if certify else "off"),
        indicator="auto" if indicator is None else ("on" if indicator else "off"),
        checks="on" if checks else "off",
        gated_stages=tuple(gated),
        **settings,
    )


def audit(
    model: str | Path | torch.nn.Module,
    data: str | Path | tuple[Any, Any] = "digits",
    *,
    threats: Iterable[str | Threat] | None = None,
    preset: str | None = None,
    progress=None,
    **options: Any,
) -> Report | None:
    """Audit `model` on `data` and return the verified `Report` (what `robaudit scan` prints).

    ``model``: a model file (ONNX, TorchScript, torch.export, safetensors with ``arch``,
    ...) or an in-memory ``torch.nn.Module`` mapping (B, *sample_shape) pixels to logits
    (it is copied: yours is not changed). ``data``: a built-in dataset name, a path, or
    ``(x, y)`` arrays. ``threats``: e.g. ``["linf:8/255", "l2:0.5"]``. ``preset``:
    ``quick``, ``standard``, ``thorough``. Other keywords: see `build_config`. Bad input
    raises `RobauditError` with a one-sentence message. Under torchrun, ranks other than
    0 return None.
    """
    from robaudit.attacks.runner import NoProgress
    from robaudit.scan import scan

    config = build_config(model, data, threats=threats, preset=preset, **options)
    result = scan(config, progress=progress or NoProgress)
    return result.report if result is not None else None  # under torchrun only rank 0 gets the report
