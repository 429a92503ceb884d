"""`robaudit compare BASE.json NEW.json`: what changed between two reports, and is it allowed.

The comparison lists every summary metric of both reports with its change (clean,
robust and certified accuracy, the indicator score, the attacks' passes per sample),
the samples that were robust in BASE and are broken in NEW (matched by their index in
the source data, per threat), and the allowed-drop checks of ``--max-drop`` and
``[gate.max_drop]``. Two reports of different data (name, seed, sample indices, labels)
or threat settings (threats, input range) measure different things: the comparison is
refused unless forced. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robaudit.errors import RobauditError
from robaudit.gate import (
    MaxDrop, data_mismatch, drop_checks, expand, metric_name, metric_value, report_threats, threat_mismatch, why_missing,
)
from robaudit.report.files import write_text
from robaudit.report.numbers import floor_pct, floor_sig
from robaudit.report.schema import GateCheck, Report
from robaudit.threats import Threat, parse_threat


@dataclass
class MetricDelta:
    """One metric in both reports; ``None`` where a report does not have it."""

    key: str
    label: str
    base: float | None
    new: float | None
    unit: str  # "fraction" (accuracies), "score" (indicator) or "passes" (cost per sample)
    higher_is_better: bool | None  # None: a cost figure, neither good nor bad
    delta: float | None = None
    relative: float | None = None

    def __post_init__(self) -> None:
        if self.base is not None and self.new is not None:
            self.delta = self.new - self.base
            self.relative = self.delta / abs(self.base) if self.base else None


@dataclass
class Flip:
    """A sample robust in the base report and broken in the new one."""

    index: int
    label: int
    new_clean_pred: int
    broken_by: str | None  # the attack that broke it in NEW; None when NEW misclassifies it outright
    distance: float | None


@dataclass
class Comparison:
    base_path: str
    new_path: str
    base: Report
    new: Report
    metrics: list[MetricDelta]
    flipped: dict[str, list[Flip]]
    fixed: dict[str, list[int]]  # broken in BASE, robust in NEW
    checks: list[GateCheck] = field(default_factory=list)
    mismatch: list[str] = field(default_factory=list)  # differences overridden by --force
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        def ident(path: str, r: Report) -> dict[str, Any]:
            return {
                "path": path, "created": r.created, "model": r.model.path, "model_sha256": r.model.sha256,
                "data": r.data.name, "n": r.data.n, "seed": r.data.seed, "robaudit_version": r.robaudit_version,
            }  # fmt: skip

        return {
            "base": ident(self.base_path, self.base),
            "new": ident(self.new_path, self.new),
            "metrics": [asdict(m) for m in self.metrics],
            "flipped": {k: [asdict(f) for f in v] for k, v in self.flipped.items()},
            "fixed": self.fixed,
            "gate": [asdict(c) for c in self.checks],
            "passed": self.passed,
            "mismatch": self.mismatch,
            "notes": self.notes,
        }


def _threat_pairs(base: Report, new: Report) -> list[tuple[Threat, str | None, str | None]]:
    """Every threat of either report with its summary name in BASE and in NEW (None where absent)."""
    pairs: list[tuple[Threat, str | None, str | None]] = []
    for t in new.summary.threats:
        threat = Threat(norm=t.norm, eps=t.eps, shift=t.shift)
        match = next((b.threat for b in base.summary.threats if threat.same_as(Threat(norm=b.norm, eps=b.eps, shift=b.shift))), None)
        pairs.append((threat, match, t.threat))
    for b in base.summary.threats:
        threat = Threat(norm=b.norm, eps=b.eps, shift=b.shift)
        if not any(threat.same_as(p[0]) for p in pairs):
            pairs.append((threat, b.threat, None))
    return pairs


def _certified_threats(report: Report) -> list[Threat]:
    cert = report.summary.certificate
    if cert is None or not cert.available:
        return []
    found = []
    for key in cert.certified_accuracy:
        try:
            found.append(parse_threat(key))
        except RobauditError:
            continue
    return found


def _metrics(base: Report, new: Report, pairs: Sequence[tuple[Threat, str | None, str | None]]) -> list[MetricDelta]:
    rows = [MetricDelta("clean_accuracy", "clean accuracy", base.summary.clean_accuracy, new.summary.clean_accuracy, "fraction", True)]
    for threat, _, _ in pairs:
        name = metric_name("robust_accuracy", threat)
        rows.append(MetricDelta(
            name, f"robust accuracy {threat.canonical}", metric_value(base, "robust_accuracy", threat),
            metric_value(new, "robust_accuracy", threat), "fraction", True,
        ))  # fmt: skip
    certified: list[Threat] = []
    for threat in [*_certified_threats(new), *_certified_threats(base)]:
        if not any(threat.same_as(c) for c in certified):
            certified.append(threat)
    for threat in certified:
        rows.append(MetricDelta(
            metric_name("certified_accuracy", threat), f"certified accuracy {threat.canonical}",
            metric_value(base, "certified_accuracy", threat), metric_value(new, "certified_accuracy", threat), "fraction", True,
        ))  # fmt: skip
    b_score, n_score = metric_value(base, "indicator_score"), metric_value(new, "indicator_score")
    if b_score is not None or n_score is not None:
        rows.append(MetricDelta("indicator_score", "indicator score", b_score, n_score, "score", True))
    rows.append(MetricDelta(
        "forward_passes_per_sample", "forward passes / sample", base.summary.forward_passes_per_sample,
        new.summary.forward_passes_per_sample, "passes", None,
    ))  # fmt: skip
    rows.append(MetricDelta(
        "backward_passes_per_sample", "backward passes / sample", base.summary.backward_passes_per_sample,
        new.summary.backward_passes_per_sample, "passes", None,
    ))  # fmt: skip
    return rows


def _flips(base: Report, new: Report, pairs: Sequence[tuple[Threat, str | None, str | None]]) -> tuple[dict[str, list[Flip]], dict[str, list[int]]]:
    before = {s.index: s for s in base.samples}
    flipped: dict[str, list[Flip]] = {}
    fixed: dict[str, list[int]] = {}
    for _, base_key, new_key in pairs:
        if base_key is None or new_key is None:
            continue
        flipped[new_key], fixed[new_key] = [], []
        for sample in new.samples:
            old = before.get(sample.index)
            if old is None or base_key not in old.threats or new_key not in sample.threats:
                continue
            was, now = old.threats[base_key].robust, sample.threats[new_key]
            if was and not now.robust:
                flipped[new_key].append(Flip(sample.index, sample.label, sample.clean_pred, now.broken_by, now.distance))
            elif now.robust and not was:
                fixed[new_key].append(sample.index)
    return flipped, fixed


def _battery(report: Report) -> list[tuple[str, int, str]]:
    return [
        (a.get("name", "?"), a.get("restarts", 1), json.dumps(a.get("params", {}), sort_keys=True))
        for a in report.config.get("attacks", []) if isinstance(a, dict)
    ]  # fmt: skip


def _notes(base: Report, new: Report) -> list[str]:
    notes = []
    if base.model.sha256 == new.model.sha256:
        notes.append("both reports audit the same model file (same sha256): differences come from the settings or the seed")
    if _battery(base) != _battery(new):
        names = lambda r: ", ".join(n for n, _, _ in _battery(r)) or "?"  # noqa: E731
        if names(base) == names(new):  # the same attacks with other settings: name the first that differs
            which = next(f"{a[0]}: {a[1:]} -> {b[1:]}" for a, b in zip(_battery(base), _battery(new)) if a != b)
            what = f"the attack batteries' settings differ ({which}, as (restarts, parameters))"
        else:
            what = f"the attack batteries differ (base: {names(base)}; new: {names(new)})"
        notes.append(f"{what}: a weaker battery raises robust accuracy without the model getting more robust")
    if base.model.mean != new.model.mean or base.model.std != new.model.std:
        notes.append("the preprocessing (--mean/--std) differs")
    budgets = [r.summary.certificate.budget if r.summary.certificate and r.summary.certificate.available else None for r in (base, new)]
    if None not in budgets and budgets[0] != budgets[1]:
        notes.append(
            f"the certificate budgets differ (base: {budgets[0]}; new: {budgets[1]}): a smaller budget proves smaller "
            "radii without the model getting less robust"
        )
    return notes


def compare(
    base: Report,
    new: Report,
    *,
    base_path: str = "base",
    new_path: str = "new",
    max_drops: Sequence[MaxDrop] = (),
    force: bool = False,
) -> Comparison:
    """Compare two reports; refuses (RobauditError, exit 2) different data or threats unless ``force``."""
    mismatch = data_mismatch(
        base, name=new.data.name, seed=new.data.seed, indices=new.data.indices, labels=[s.label for s in new.samples],
        digest=new.data.sha256,
    ) + threat_mismatch(base, new)
    if mismatch and not force:
        raise RobauditError(
            f"refusing to compare {base_path} with {new_path}: {'; '.join(mismatch)}; "
            "the figures measure different things (pass --force to compare anyway)"
        )
    pairs = _threat_pairs(base, new)
    flipped, fixed = _flips(base, new, pairs)
    checks: list[GateCheck] = []
    new_threats = report_threats(new)
    for rule in max_drops:
        if rule.threat is not None and not any(rule.threat.same_as(t) for t in new_threats):
            raise RobauditError(f"{rule.source} '{rule.expression}': {new_path} has no threat {rule.threat.canonical}")
        targets = expand(rule, new_threats, base)
        if not targets:
            raise RobauditError(f"{rule.source} '{rule.expression}': the two reports share no threat for {rule.metric}")
        for metric, threat in targets:
            # a metric the new report lacks (its certificate unavailable, say) fails the gate, as in `scan --baseline`;
            # one the base lacks leaves nothing to compare with: a setup error
            if metric_value(base, metric, threat) is None:
                raise RobauditError(
                    f"{rule.source} '{rule.expression}': {base_path} has no {metric_name(metric, threat)}"
                    + why_missing(base, metric)
                )
            checks += drop_checks(rule, new, base, metric, threat, base_label="base")
    return Comparison(
        base_path=base_path, new_path=new_path, base=base, new=new, metrics=_metrics(base, new, pairs),
        flipped=flipped, fixed=fixed, checks=checks, mismatch=mismatch if force else [], notes=_notes(base, new),
    )  # fmt: skip


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return floor_pct(value) if unit == "fraction" else floor_sig(value)


def _change(d: MetricDelta) -> str:
    if d.delta is None:
        return "n/a"
    text = f"{100 * d.delta:+.1f} pp" if d.unit == "fraction" else f"{d.delta:+.4g}"
    if d.higher_is_better is None or d.delta == 0:
        return text
    good = (d.delta > 0) == d.higher_is_better
    return f"[green]{text}[/green]" if good else f"[red]{text}[/red]"


def render(comparison: Comparison, console: Console, max_listed: int = 30) -> None:
    """The comparison as rich tables."""
    c = comparison
    title = f"{escape(c.base_path)} -> {escape(c.new_path)}"
    table = Table(title=f"Comparison {title}", title_justify="left")
    for name in ("metric", "base", "new", "change", "relative"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for d in c.metrics:
        relative = "" if d.relative is None else f"{100 * d.relative:+.1f}%"
        table.add_row(escape(d.label), _fmt(d.base, d.unit), _fmt(d.new, d.unit), _change(d), relative)
    console.print(table)
    flips = Table(title="Samples that flipped from robust (base) to broken (new), by index in the source data", title_justify="left")
    for name in ("threat", "robust -> broken", "broken -> robust", "samples (broken by)"):
        flips.add_column(name, justify="right" if "->" in name else "left")
    for threat, items in c.flipped.items():
        listed = ", ".join(f"{f.index} ({f.broken_by or 'misclassified'})" for f in items[:max_listed])
        if len(items) > max_listed:
            listed += f", ... {len(items) - max_listed} more (--json lists all)"
        flips.add_row(escape(threat), str(len(items)), str(len(c.fixed.get(threat, []))), escape(listed) or "[dim]none[/dim]")
    console.print(flips)
    for note in [*(f"compared with --force although {m}" for m in c.mismatch), *c.notes]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if c.checks:
        lines = Table.grid(padding=(0, 1))
        for check in c.checks:
            lines.add_row("[green]PASS[/green]" if check.passed else "[bold red]FAIL[/bold red]", escape(check.describe()))
        console.print(lines)


def comparison_junit(comparison: Comparison) -> str:
    from robaudit.report.junit import checks_to_xml

    c = comparison
    props = {
        "base": c.base_path, "new": c.new_path, "base_model_sha256": c.base.model.sha256,
        "new_model_sha256": c.new.model.sha256, "data": c.new.data.name,
    }  # fmt: skip
    for d in c.metrics:
        if d.delta is not None:
            props[f"delta {d.key}"] = f"{d.delta:.6f}"
    out = [f"{d.label}: {_fmt(d.base, d.unit)} -> {_fmt(d.new, d.unit)}" for d in c.metrics]
    out += [f"{threat}: {len(items)} flipped from robust to broken: {', '.join(str(f.index) for f in items)}" for threat, items in c.flipped.items()]
    return checks_to_xml(
        c.checks, suite=f"robaudit compare: {Path(c.base_path).name} -> {Path(c.new_path).name}", properties=props,
        system_out="\n".join(out), created=c.new.created,
    )  # fmt: skip


def write_outputs(comparison: Comparison, *, json_path: Path | None, junit: Path | None, markdown: Path | None) -> None:
    if json_path is not None:
        write_text(json_path, json.dumps(comparison.to_dict(), indent=2) + "\n", "comparison")
    if junit is not None:
        write_text(junit, comparison_junit(comparison), "JUnit file")
    if markdown is not None:
        from robaudit.report.markdown import render_comparison_markdown

        write_text(markdown, render_comparison_markdown(comparison), "Markdown file")
