"""The CI gate: thresholds on summary metrics, turned into pass/fail with reasons.

Expressions are parsed before any attack runs, so a typo costs the user a second,
not a full scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from robaudit.errors import RobauditError
from robaudit.report.schema import GateCheck, Report
from robaudit.threats import Threat, parse_number, parse_threat

METRICS = ("clean_accuracy", "robust_accuracy")
_EXPR = re.compile(r"^\s*(?P<metric>[a-z_]+)\s*(\[(?P<threat>[^\]]+)\])?\s*=\s*(?P<value>[^=]+?)\s*$")


@dataclass(frozen=True)
class Threshold:
    """A minimum for one metric (``threat`` set for per-threat metrics)."""

    expression: str
    metric: str
    threat: Threat | None
    minimum: float

    @property
    def name(self) -> str:
        return f"{self.metric}[{self.threat.canonical}]" if self.threat else self.metric


def parse_threshold(expression: str) -> Threshold:
    """Parse ``robust_accuracy[linf:8/255]=0.40`` or ``clean_accuracy=0.9``."""
    match = _EXPR.match(expression)
    if not match:
        raise RobauditError(
            f"--fail-under '{expression}' must look like METRIC=VALUE or METRIC[THREAT]=VALUE, "
            "e.g. robust_accuracy[linf:8/255]=0.40"
        )
    metric = match["metric"]
    if metric not in METRICS:
        raise RobauditError(f"--fail-under '{expression}': unknown metric '{metric}' (known: {', '.join(METRICS)})")
    threat = parse_threat(match["threat"]) if match["threat"] else None
    if metric == "robust_accuracy" and threat is None:
        raise RobauditError(f"--fail-under '{expression}': robust_accuracy needs a threat, e.g. robust_accuracy[linf:8/255]=0.4")
    if metric == "clean_accuracy" and threat is not None:
        raise RobauditError(f"--fail-under '{expression}': clean_accuracy takes no threat")
    minimum = parse_number(match["value"])
    if not 0.0 <= minimum <= 1.0:
        raise RobauditError(f"--fail-under '{expression}': the threshold must be between 0 and 1")
    return Threshold(expression=expression.strip(), metric=metric, threat=threat, minimum=minimum)


def check_thresholds_cover(thresholds: list[Threshold], threats: list[Threat]) -> None:
    """Every per-threat threshold must name a threat that the scan will run."""
    for threshold in thresholds:
        if threshold.threat and not any(threshold.threat.same_as(t) for t in threats):
            scanned = ", ".join(t.canonical for t in threats)
            raise RobauditError(
                f"--fail-under '{threshold.expression}' names threat {threshold.threat.canonical}, "
                f"which is not scanned (scanned: {scanned}); add --threat {threshold.threat.spec}"
            )


def metric_value(report: Report, threshold: Threshold) -> float:
    """Read the metric a threshold refers to from a finished report."""
    if threshold.metric == "clean_accuracy":
        return report.summary.clean_accuracy
    for summary in report.summary.threats:
        if threshold.threat and threshold.threat.same_as(Threat(norm=summary.norm, eps=summary.eps, shift=summary.shift)):
            return summary.robust_accuracy
    raise RobauditError(f"the report has no result for {threshold.name}")


def evaluate(report: Report, thresholds: list[Threshold]) -> list[GateCheck]:
    """Compare each metric with its minimum; a value equal to the minimum passes."""
    checks = []
    for threshold in thresholds:
        value = metric_value(report, threshold)
        checks.append(
            GateCheck(
                expression=threshold.expression,
                metric=threshold.name,
                threshold=threshold.minimum,
                value=value,
                passed=value >= threshold.minimum,
            )
        )
    return checks
