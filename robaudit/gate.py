"""The CI gate: thresholds on summary metrics, turned into pass/fail with reasons.

Two kinds of rule, from flags or from the ``[gate]`` table of an audit TOML file:

- a minimum (``--fail-under "robust_accuracy[linf:8/255]=0.40"``, ``[gate.min]``):
  the metric must be at least this value;
- a maximum drop against a baseline report (``--max-drop "robust_accuracy[linf:8/255]=0.02,5%"``,
  ``[gate.max_drop]``): the metric may fall below the baseline's by at most an absolute
  amount and/or a fraction of the baseline value, in the manner of MLflow's model
  validation thresholds (``min_absolute_change`` / ``min_relative_change``, here allowed
  drops rather than required gains). When both are given, both must hold.

Metrics: ``clean_accuracy``, ``robust_accuracy[THREAT]``, ``certified_accuracy[THREAT]``
(L2 threats; from the certificate) and ``indicator_score`` (the decision-surface
indicator). Rules are parsed and checked against the scan's threats before any attack
runs, so a typo costs the user a second, not a full scan. This module does not import
torch: ``robaudit compare`` uses it and starts in a fraction of a second.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from robaudit.errors import RobauditError
from robaudit.report.numbers import distinct, fixed
from robaudit.report.schema import GateCheck, Report, is_number
from robaudit.threats import Threat, parse_number, parse_threat

METRICS = ("clean_accuracy", "robust_accuracy", "certified_accuracy", "indicator_score")
PER_THREAT = ("robust_accuracy", "certified_accuracy")
ACCURACIES = ("clean_accuracy", "robust_accuracy", "certified_accuracy")
_NAME = r"(?P<metric>[a-z_]+)\s*(\[(?P<threat>[^\]]+)\])?"
_EXPR = re.compile(rf"^\s*{_NAME}\s*=\s*(?P<value>[^=]+?)\s*$")
_KEY = re.compile(rf"^\s*{_NAME}\s*$")
# Drops are compared with this slack so that 0.45 - 0.05 >= 0.40 holds in floating point.
_SLACK = 1e-9


@dataclass(frozen=True)
class Threshold:
    """A minimum for one metric (``threat`` set for per-threat metrics)."""

    expression: str
    metric: str
    threat: Threat | None
    minimum: float
    source: str = "--fail-under"

    @property
    def name(self) -> str:
        return metric_name(self.metric, self.threat)


@dataclass(frozen=True)
class MaxDrop:
    """How far a metric may fall below the baseline report's value.

    ``absolute`` is in the metric's own units (0.02 = two points of accuracy),
    ``relative`` a fraction of the baseline value (0.05 = 5 %). A per-threat metric
    without a threat applies to every threat that the scan and the baseline share.
    """

    expression: str
    metric: str
    threat: Threat | None
    absolute: float | None = None
    relative: float | None = None
    source: str = "--max-drop"

    @property
    def name(self) -> str:
        return metric_name(self.metric, self.threat) if self.threat or self.metric not in PER_THREAT else f"{self.metric}[*]"


@dataclass
class GateSpec:
    """The ``[gate]`` table of an audit file, parsed."""

    minimums: list[Threshold]
    max_drops: list[MaxDrop]
    baseline: Path | None = None


@dataclass
class Baseline:
    """The report that ``--max-drop`` rules compare with."""

    report: Report
    path: str
    force: bool = False  # compare even when the data differ


def metric_name(metric: str, threat: Threat | None) -> str:
    return f"{metric}[{threat.canonical}]" if threat is not None else metric


def _parse_metric(metric: str, threat_text: str | None, where: str, *, any_threat: bool = False) -> tuple[str, Threat | None]:
    if metric not in METRICS:
        raise RobauditError(f"{where}: unknown metric '{metric}' (known: {', '.join(METRICS)})")
    threat = parse_threat(threat_text) if threat_text else None
    if metric in PER_THREAT and threat is None and not any_threat:
        raise RobauditError(f"{where}: {metric} needs a threat, e.g. {metric}[{'l2:0.5' if metric == 'certified_accuracy' else 'linf:8/255'}]")
    if metric not in PER_THREAT and threat is not None:
        raise RobauditError(f"{where}: {metric} takes no threat")
    if metric == "certified_accuracy" and threat is not None and threat.norm != "l2":
        raise RobauditError(f"{where}: certified accuracy exists for L2 threats only, not {threat.canonical}")
    return metric, threat


def _check_minimum(metric: str, minimum: float, where: str) -> None:
    if not math.isfinite(minimum):
        raise RobauditError(f"{where}: the threshold must be a finite number")
    if metric in ACCURACIES and not 0.0 <= minimum <= 1.0:
        raise RobauditError(f"{where}: the threshold must be between 0 and 1")


def _number_in(text: str, where: str) -> float:
    """`parse_number`, its error naming the flag and expression it came from."""
    try:
        return parse_number(text)
    except RobauditError as exc:
        raise RobauditError(f"{where}: {exc}") from None


def parse_threshold(expression: str) -> Threshold:
    """Parse ``robust_accuracy[linf:8/255]=0.40``, ``clean_accuracy=0.9`` or ``indicator_score=0.5``."""
    where = f"--fail-under '{expression}'"
    match = _EXPR.match(expression)
    if not match:
        raise RobauditError(
            f"{where} must look like METRIC=VALUE or METRIC[THREAT]=VALUE, e.g. robust_accuracy[linf:8/255]=0.40"
        )
    metric, threat = _parse_metric(match["metric"], match["threat"], where)
    value = match["value"].strip()
    if value.endswith("%"):
        raise RobauditError(f"{where}: write the minimum as a fraction (0.9, not 90%); % is for --max-drop's relative drops")
    minimum = _number_in(value, where)
    _check_minimum(metric, minimum, where)
    return Threshold(expression=expression.strip(), metric=metric, threat=threat, minimum=minimum)


def _check_drop(metric: str, absolute: float | None, relative: float | None, where: str) -> None:
    if absolute is None and relative is None:
        raise RobauditError(f"{where}: give an absolute drop, a relative drop, or both")
    if absolute is not None and not (math.isfinite(absolute) and absolute >= 0):
        raise RobauditError(f"{where}: the absolute drop must be a non-negative number")
    if absolute is not None and metric in ACCURACIES and absolute > 1:  # a gate that no accuracy can fail
        raise RobauditError(f"{where}: an accuracy lies between 0 and 1, so its absolute drop must too (5% is written 0.05)")
    if relative is not None and not (math.isfinite(relative) and 0 <= relative <= 1):
        raise RobauditError(f"{where}: the relative drop must lie between 0 and 1 (0% and 100%)")


def _drop_expression(name: str, absolute: float | None, relative: float | None) -> str:
    parts = ([f"{absolute:g}"] if absolute is not None else []) + ([f"{100 * relative:g}%"] if relative is not None else [])
    return f"{name}={','.join(parts)}"


def parse_max_drop(expression: str) -> MaxDrop:
    """Parse ``METRIC[THREAT]=0.02`` (absolute), ``=5%`` (relative to the baseline) or ``=0.02,5%`` (both)."""
    where = f"--max-drop '{expression}'"
    match = _EXPR.match(expression)
    if not match:
        raise RobauditError(
            f"{where} must look like METRIC[THREAT]=DROP, e.g. robust_accuracy[linf:8/255]=0.02 (absolute), "
            "=5% (relative to the baseline) or =0.02,5% (both)"
        )
    metric, threat = _parse_metric(match["metric"], match["threat"], where, any_threat=True)
    absolute = relative = None
    for part in (p.strip() for p in match["value"].split(",")):
        if part.endswith("%"):
            if relative is not None:
                raise RobauditError(f"{where}: two relative drops")
            relative = _number_in(part[:-1], where) / 100
        else:
            if absolute is not None:
                raise RobauditError(f"{where}: two absolute drops (write a relative one with %, e.g. 5%)")
            absolute = _number_in(part, where)
    _check_drop(metric, absolute, relative, where)
    return MaxDrop(expression=expression.strip(), metric=metric, threat=threat, absolute=absolute, relative=relative)


def parse_gate_table(raw: Any, path: Path) -> GateSpec:
    """Parse the ``[gate]`` table of an audit file (docs/ci.md); unknown keys are errors.

    ``baseline`` is resolved relative to the folder of the TOML file.
    """
    where = f"config file {path}"
    if not isinstance(raw, dict):
        raise RobauditError(f"{where}: 'gate' must be a table ([gate])")
    known = {"min", "max_drop", "baseline"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RobauditError(f"{where}: unknown key(s) in [gate]: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    minimums, drops = [], []
    table = raw.get("min", {})
    if not isinstance(table, dict):
        raise RobauditError(f"{where}: [gate] min must be a table of METRIC = MINIMUM")
    for key, value in table.items():
        at = f"{where}: [gate.min] '{key}'"
        match = _KEY.match(key)
        if not match:
            raise RobauditError(f"{at} must be a metric such as \"robust_accuracy[linf:8/255]\" or clean_accuracy")
        metric, threat = _parse_metric(match["metric"], match["threat"], at)
        if not is_number(value):
            raise RobauditError(f"{at}: the minimum must be a number, not {value!r}")
        _check_minimum(metric, float(value), at)
        minimums.append(
            Threshold(expression=f"{key.strip()}={value}", metric=metric, threat=threat, minimum=float(value), source=f"[gate.min] of {path}")
        )
    table = raw.get("max_drop", {})
    if not isinstance(table, dict):
        raise RobauditError(f"{where}: [gate] max_drop must be a table of METRIC = DROP or METRIC = {{absolute = .., relative = ..}}")
    for key, value in table.items():
        at = f"{where}: [gate.max_drop] '{key}'"
        match = _KEY.match(key)
        if not match:
            raise RobauditError(f"{at} must be a metric such as \"robust_accuracy[linf:8/255]\" or clean_accuracy")
        metric, threat = _parse_metric(match["metric"], match["threat"], at, any_threat=True)
        if is_number(value):
            absolute, relative = float(value), None
        elif isinstance(value, dict):
            extra = sorted(set(value) - {"absolute", "relative"})
            if extra:
                raise RobauditError(f"{at}: unknown key(s) {', '.join(extra)} (known: absolute, relative)")
            for name in ("absolute", "relative"):
                if name in value and not is_number(value[name]):
                    raise RobauditError(f"{at}: {name} must be a number, not {value[name]!r}")
            absolute = float(value["absolute"]) if "absolute" in value else None
            relative = float(value["relative"]) if "relative" in value else None
        else:
            raise RobauditError(f"{at} must be a number (absolute drop) or {{absolute = 0.02, relative = 0.05}}")
        _check_drop(metric, absolute, relative, at)
        drops.append(
            MaxDrop(
                expression=_drop_expression(key.strip(), absolute, relative), metric=metric, threat=threat,
                absolute=absolute, relative=relative, source=f"[gate.max_drop] of {path}",
            )
        )  # fmt: skip
    baseline = raw.get("baseline")
    if baseline is not None and not (isinstance(baseline, str) and baseline.strip()):
        raise RobauditError(f"{where}: [gate] baseline must be the path of a JSON report")
    return GateSpec(minimums=minimums, max_drops=drops, baseline=(path.parent / baseline) if baseline else None)


def read_gate_config(path: Path) -> GateSpec:
    """The [gate] table of an audit file, for `robaudit compare` (the file's scan settings are not used there)."""
    from robaudit.config_file import load_toml

    raw = load_toml(path)
    if "gate" not in raw:
        raise RobauditError(f"config file {path} has no [gate] table")
    return parse_gate_table(raw["gate"], path)


def _not_scanned(rule: Threshold | MaxDrop, threats: Sequence[Threat]) -> None:
    scanned = ", ".join(t.canonical for t in threats)
    assert rule.threat is not None
    raise RobauditError(
        f"{rule.source} '{rule.expression}' names threat {rule.threat.canonical}, "
        f"which is not scanned (scanned: {scanned}); add --threat {rule.threat.spec or rule.threat.canonical}"
    )


def check_thresholds_cover(
    thresholds: Sequence[Threshold | MaxDrop],
    threats: Sequence[Threat],
    *,
    certify: str = "auto",
    indicator: str = "auto",
) -> None:
    """Every per-threat rule must name a threat that the scan will run, and its stage must run."""
    for rule in thresholds:
        if rule.threat and not any(rule.threat.same_as(t) for t in threats):
            _not_scanned(rule, threats)
        if rule.metric == "certified_accuracy":
            if certify == "off":
                raise RobauditError(f"{rule.source} '{rule.expression}' needs the certificate: drop --no-certify")
            if rule.threat is None and not any(t.norm == "l2" for t in threats):
                raise RobauditError(f"{rule.source} '{rule.expression}': no L2 threat is scanned, so there is no certified accuracy")
        if rule.metric == "indicator_score" and indicator == "off":
            raise RobauditError(f"{rule.source} '{rule.expression}' needs the indicator: drop --no-indicator")


def check_baseline(baseline: Baseline | None, max_drops: Sequence[MaxDrop], threats: Sequence[Threat]) -> None:
    """A drop needs a baseline that has the metric; a baseline needs a drop to check."""
    if max_drops and baseline is None:
        rule = max_drops[0]
        raise RobauditError(
            f"{rule.source} '{rule.expression}' needs a baseline report: pass --baseline BASE.json or set baseline in [gate]"
        )
    if baseline is None:
        return
    if not max_drops:
        raise RobauditError(
            f"--baseline {baseline.path} needs at least one --max-drop METRIC=DROP or a [gate.max_drop] table to check"
        )
    for rule in max_drops:
        targets = expand(rule, threats, baseline.report)
        if not targets:
            raise RobauditError(f"{rule.source} '{rule.expression}': the baseline {baseline.path} shares no threat with this scan")
        for metric, threat in targets:
            if metric_value(baseline.report, metric, threat) is None:
                raise RobauditError(
                    f"{rule.source} '{rule.expression}': the baseline {baseline.path} has no {metric_name(metric, threat)}"
                    + why_missing(baseline.report, metric)
                )


def why_missing(report: Report, metric: str) -> str:
    if metric == "certified_accuracy":
        cert = report.summary.certificate
        return f" ({cert.reason})" if cert is not None and cert.reason else " (its scan ran no certificate)"
    if metric == "indicator_score":
        return " (its scan ran no indicator)"
    return ""


def report_threats(report: Report) -> list[Threat]:
    return [Threat(norm=t.norm, eps=t.eps, spec=t.threat, shift=t.shift) for t in report.summary.threats]


def expand(rule: MaxDrop | Threshold, threats: Sequence[Threat], baseline: Report | None = None) -> list[tuple[str, Threat | None]]:
    """The (metric, threat) pairs a rule checks: a per-threat metric without a threat means
    every threat of ``threats`` (that the baseline has too, when one is given)."""
    if rule.metric not in PER_THREAT or rule.threat is not None:
        return [(rule.metric, rule.threat)]
    chosen = [t for t in threats if rule.metric != "certified_accuracy" or t.norm == "l2"]
    if baseline is not None:
        known = report_threats(baseline)
        chosen = [t for t in chosen if any(t.same_as(k) for k in known)]
    return [(rule.metric, t) for t in chosen]


def metric_value(report: Report, metric: str | Threshold, threat: Threat | None = None) -> float | None:
    """Read a metric from a finished report; ``None`` when the report does not have it."""
    if isinstance(metric, Threshold):
        metric, threat = metric.metric, metric.threat
    summary = report.summary
    if metric == "clean_accuracy":
        return summary.clean_accuracy
    if metric == "indicator_score":
        score = (summary.indicator or {}).get("score")
        return float(score) if is_number(score) and math.isfinite(score) else None
    if metric == "robust_accuracy":
        for t in summary.threats:
            if threat is not None and threat.same_as(Threat(norm=t.norm, eps=t.eps, shift=t.shift)):
                return t.robust_accuracy
        return None
    if metric == "certified_accuracy":
        cert = summary.certificate
        if cert is None or not cert.available or threat is None:
            return None
        for key, value in cert.certified_accuracy.items():
            try:
                if threat.same_as(parse_threat(key)):
                    return value
            except RobauditError:
                continue
        return None
    raise RobauditError(f"unknown metric '{metric}'")


def _minimum_check(report: Report, threshold: Threshold) -> GateCheck:
    value = metric_value(report, threshold.metric, threshold.threat)
    name = threshold.name
    if value is None:
        message = f"{name} is not in the report{why_missing(report, threshold.metric)}, so it cannot meet its minimum {threshold.minimum:.4g}"
        passed = False
    else:
        passed = value >= threshold.minimum
        relation = "meets its minimum" if passed else "is below its minimum"
        shown, minimum = distinct(value, threshold.minimum)
        message = f"{name} = {shown} {relation} {minimum}"
        if threshold.metric == "indicator_score" and (report.summary.indicator or {}).get("masking_suspected"):
            message += " (masking suspected: the score is not meaningful)"
    return GateCheck(
        expression=threshold.expression, metric=name, threshold=threshold.minimum, value=value, passed=passed,
        kind="minimum", message=message,
    )  # fmt: skip


def drop_checks(rule: MaxDrop, new: Report, base: Report, metric: str, threat: Threat | None, base_label: str = "baseline") -> list[GateCheck]:
    """One check per limit of a rule (absolute, relative) for one (metric, threat)."""
    name = metric_name(metric, threat)
    value, before = metric_value(new, metric, threat), metric_value(base, metric, threat)
    checks = []
    for kind, allowed in (("max_drop_absolute", rule.absolute), ("max_drop_relative", rule.relative)):
        if allowed is None:
            continue
        if before is None:
            checks.append(GateCheck(
                expression=rule.expression, metric=name, threshold=0.0, value=value, passed=False, kind=kind,
                allowed_drop=allowed, message=f"{name} is not in the {base_label} report, so its drop cannot be checked",
            ))  # fmt: skip
            continue
        limit = allowed if kind == "max_drop_absolute" else allowed * abs(before)
        floor = before - limit
        said = f"{allowed:.4g}" if kind == "max_drop_absolute" else f"{100 * allowed:.4g}% of {fixed(before)} = {fixed(limit)}"
        if value is None:
            passed = False
            message = f"{name} is not in the report{why_missing(new, metric)}; the {base_label} had {fixed(before)}"
        else:
            drop = before - value
            passed = drop <= limit + _SLACK
            if drop > 0:
                verdict = "within the allowed" if passed else "more than the allowed"
                message = f"{name} dropped {fixed(drop)} from {fixed(before)} to {fixed(value)}, {verdict} {said}"
            else:
                message = f"{name} = {fixed(value)} did not drop ({base_label} {fixed(before)}; allowed drop {said})"
        checks.append(GateCheck(
            expression=rule.expression, metric=name, threshold=floor, value=value, passed=passed, kind=kind,
            baseline=before, allowed_drop=allowed, message=message,
        ))  # fmt: skip
    return checks


def evaluate(
    report: Report,
    thresholds: Iterable[Threshold],
    max_drops: Iterable[MaxDrop] = (),
    baseline: Baseline | Report | None = None,
) -> list[GateCheck]:
    """Compare each metric with its minimum (a value equal to it passes), then each drop with its limit."""
    checks = [_minimum_check(report, t) for t in thresholds]
    max_drops = list(max_drops)
    if max_drops:
        base = baseline.report if isinstance(baseline, Baseline) else baseline
        if base is None:
            raise RobauditError("--max-drop needs a baseline report (--baseline BASE.json)")
        for rule in max_drops:
            for metric, threat in expand(rule, report_threats(report), base):
                checks += drop_checks(rule, report, base, metric, threat)
    return checks


def data_mismatch(
    base: Report, *, name: str, seed: int, indices: Sequence[int], labels: Sequence[int] | None, digest: str | None = None
) -> list[str]:
    """How the data of a run differ from a baseline report's (empty when they are the same).

    `digest` is the run's `Dataset.digest`; a report written before schema 1.5 has none to compare.
    """
    problems = []
    if Path(base.data.name).name != Path(name).name:
        problems.append(f"data '{base.data.name}' vs '{name}'")
    if base.data.seed != seed:
        problems.append(f"seed {base.data.seed} vs {seed}")
    if list(base.data.indices) != list(indices):
        if len(base.data.indices) != len(indices):
            problems.append(f"{len(base.data.indices)} vs {len(indices)} samples")
        else:
            differ = sum(a != b for a, b in zip(base.data.indices, indices))
            problems.append(f"sample indices differ at {differ} of {len(indices)} positions")
    elif labels is not None and [s.label for s in base.samples] != list(labels):
        problems.append("labels differ at the same indices (not the same data file)")
    elif digest is not None and base.data.sha256 is not None and digest != base.data.sha256:
        problems.append("pixels differ at the same indices and labels (not the same data)")
    return problems


def threat_mismatch(base: Report, new: Report) -> list[str]:
    """Differences of threat settings: the threats themselves and the input range they live in."""
    problems = []
    a, b = report_threats(base), report_threats(new)
    only_a = [t.canonical for t in a if not any(t.same_as(o) for o in b)]
    only_b = [t.canonical for t in b if not any(t.same_as(o) for o in a)]
    if only_a or only_b:
        problems.append(
            "threats differ ("
            + "; ".join(([f"only in base: {', '.join(only_a)}"] if only_a else []) + ([f"only in new: {', '.join(only_b)}"] if only_b else []))
            + ")"
        )
    if list(base.model.input_range) != list(new.model.input_range):
        problems.append(f"input range {base.model.input_range} vs {new.model.input_range}")
    return problems


def check_baseline_data(
    baseline: Baseline, *, name: str, seed: int, indices: Sequence[int], labels: Sequence[int], digest: str | None = None
) -> None:
    """Refuse (exit 2) to gate against a baseline scanned on other data, unless forced."""
    if baseline.force:
        return
    problems = data_mismatch(baseline.report, name=name, seed=seed, indices=indices, labels=labels, digest=digest)
    if problems:
        raise RobauditError(
            f"the baseline {baseline.path} was scanned on different data ({'; '.join(problems)}); "
            "its figures are not comparable (pass --force-baseline to compare anyway)"
        )
