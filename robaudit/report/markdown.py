"""Markdown for a CI job summary (``--markdown "$GITHUB_STEP_SUMMARY"``) or a merge-request note.

GitHub-flavoured Markdown: a headline with the gate's verdict, the key figures, the gate
checks, the threats, the attack breakdown (folded in a ``<details>`` block), the curve,
the certificate and the indicator when the report has them. Reads the Report only.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from robaudit.report.common import canonical_aside, certificate_methods, count, duration, per_sample, threat_name, total_seconds, unproven, with_threat_names
from robaudit.report.common import verdict as scan_verdict
from robaudit.report.files import write_text
from robaudit.report.numbers import fixed, floor_fixed, floor_pct, floor_sig, gate_figures
from robaudit.report.schema import GateCheck, Report

if TYPE_CHECKING:
    from robaudit.compare import Comparison


INDICATOR_PARTS = ("median_jacobian_l2", "median_curvature", "median_hessian_max_abs", "predicted_robust_accuracy[")


def cell(text: object) -> str:
    """Text safe inside a table cell: no pipes, no HTML, no line breaks."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def code(text: object) -> str:
    value = str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{value}`"


def pct(value: float | None) -> str:
    return "n/a" if value is None else floor_pct(value)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` has one letter per column (l or r), left by default."""
    marks = [("---:" if (align[i:i + 1] == "r") else "---") for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def verdict(checks: Sequence[GateCheck]) -> str:
    if not checks:
        return "no gate checks"
    missed = sum(not c.passed for c in checks)
    if missed:
        return f"❌ gate failed: {missed} of {len(checks)} check{'s' if len(checks) != 1 else ''} missed"
    return f"✅ gate passed: {len(checks)} check{'s' if len(checks) != 1 else ''}"


def gate_table(checks: Sequence[GateCheck]) -> list[str]:
    rows = []
    for c in checks:
        rows.append((
            "✅ pass" if c.passed else "❌ **FAIL**",
            cell(c.describe()),
            *gate_figures(c),
            "" if c.baseline is None else fixed(c.baseline),
            code(c.expression),
        ))  # fmt: skip
    return table(("result", "check", "value", "lowest passing", "baseline", "rule"), rows, "llrrrl")


def _headline(report: Report) -> list[str]:
    m, d, s = report.model, report.data, report.summary
    meta = (
        f"**model** {code(Path(m.path).name)} ({cell(m.format)}, sha256 {code(m.sha256[:12])}) · "
        f"**data** {code(Path(d.name).name)}: {d.n} of {d.source_size} samples, seed {d.seed} · "
        f"**device** {cell(report.environment.get('device', '?'))} · robaudit {cell(report.robaudit_version)}"
    )
    total = total_seconds(report)
    if total is not None:
        meta += f" · total {duration(total)}"
    rows = [("clean accuracy", pct(s.clean_accuracy))]
    rows += [(f"robust accuracy {_threat(report, t.threat)}", pct(t.robust_accuracy)) for t in s.threats]
    if s.certificate is not None and s.certificate.available:
        rows += [(f"certified accuracy {_threat(report, k)}", pct(v)) for k, v in s.certificate.certified_accuracy.items()]
    if s.indicator and isinstance(s.indicator.get("score"), (int, float)):
        rows.append(("indicator score", fixed(s.indicator['score'], 3)))
    lines = [f"## robaudit: {verdict(report.gate)}", ""]
    warning = scan_verdict(report)
    if warning.level == "warn":  # the gate passed (or there is none) but the trust checks say the figures may be too high
        headline = warning.headline.removeprefix("WARN: ").replace("see Trust checks above", "see Trust checks below")
        lines += [f"> **Warning**: {cell(headline)}: {cell(warning.advice)}.", ""]
    return [*lines, meta, "", *table(("metric", "value"), rows, "lr")]


def _threat(report: Report, canonical: str) -> str:
    """The threat as the user wrote it (``linf:8/255``), the canonical name beside it when it differs."""
    aside = canonical_aside(report, canonical)
    return code(threat_name(report, canonical)) + (f" ({code(aside)})" if aside else "")


def _threats(report: Report) -> list[str]:
    times = report.timing.get("attacks_s", {})
    rows = []
    for t in report.summary.threats:
        seconds = sum(times.get(t.threat, {}).values()) if isinstance(times.get(t.threat), dict) else None
        rows.append((
            _threat(report, t.threat),
            pct(t.robust_accuracy),
            per_sample(t.forward_passes_per_sample),
            per_sample(t.backward_passes_per_sample),
            "" if seconds is None else f"{seconds:.1f} s",
        ))  # fmt: skip
    return ["### Threats", "", *table(("threat", "robust accuracy", "fwd / sample", "bwd / sample", "time"), rows, "lrrrr")]


def _attacks(report: Report) -> list[str]:
    rows = []
    for m in report.summary.minimal_norm:
        for a in m.attack_details:
            rows.append((
                f"minimal {cell(m.norm)}", code(a.name), count(a.attempted), count(a.broke), "any radius",
                f"{count(a.forward_passes)}/{count(a.backward_passes)}",
            ))  # fmt: skip
    for t in report.summary.threats:
        threat = code(threat_name(report, t.threat))
        for a in t.attack_details:
            if a.skipped:
                rows.append((threat, code(a.name), "", count(a.broke), pct(a.robust_accuracy_after), cell(a.skipped)))
                continue
            name = a.name + (f" x{a.restarts}" if a.restarts > 1 else "")
            rows.append((
                threat, code(name), count(a.attempted), count(a.broke), pct(a.robust_accuracy_after),
                f"{count(a.forward_passes)}/{count(a.backward_passes)}",
            ))  # fmt: skip
    if not rows:
        return []
    return [
        "<details><summary>Attack breakdown (each attack runs only on points still robust; 'broke' counts points it broke first)</summary>",
        "",
        *table(("threat", "attack", "attempted", "broke", "robust after", "passes (f/b)"), rows, "llrrrr"),
        "</details>",
        "",
    ]


def _curves(report: Report) -> list[str]:
    if not report.summary.curves:
        return []
    rows = []
    for c in report.summary.curves:
        step = max(1, (len(c.eps) - 1) // 6)
        points = ", ".join(f"{floor_sig(c.eps[i], 3)}: {pct(c.robust_accuracy[i])}" for i in range(0, len(c.eps), step))
        rows.append((cell(c.norm), "-" if c.median_distance is None else floor_sig(c.median_distance), points))
    caveats = [u for u in (unproven(report, c) for c in report.summary.curves) if u.count]
    notes = [line for u in caveats for line in (f"> **Upper bound**: {cell(u.sentence())}", "")]
    return ["### Robust accuracy against radius", "", *table(("norm", "median distance", "radius: robust accuracy"), rows, "lrl"), *notes]


def _certificate(report: Report) -> list[str]:
    cert = report.summary.certificate
    if cert is None:
        return []
    if not cert.available:
        return ["### Certified L2 radii", "", cell(cert.reason or "not available"), ""]
    rows = [(f"certified accuracy {code(threat_name(report, k))}", pct(v)) for k, v in cert.certified_accuracy.items()]
    if cert.radius_quantiles:
        rows.append(("radius quantiles (correct samples)", ", ".join(f"{k}: {floor_sig(v)}" for k, v in cert.radius_quantiles.items())))
    if cert.median_ratio is not None:
        rows.append(("median certified / smallest adversarial L2", f"{floor_fixed(cert.median_ratio, 3)} ({cert.ratio_samples} samples)"))
    rows.append(("method that gave the radius", cell(certificate_methods(cert))))
    return [f"### Certified L2 radii (budget {cell(cert.budget)})", "", *table(("metric", "value"), rows, "lr"), *_section_notes(cert.notes)]


def _section_notes(notes: list[str]) -> list[str]:
    """A section's notes as list items under its table, then a blank line (nothing when there are none)."""
    return [*(f"- note: {cell(n)}" for n in notes), ""] if notes else []


def _indicator(report: Report) -> list[str]:
    ind = report.summary.indicator
    if not ind or "score" not in ind:
        return []
    rows = [("score (higher = flatter decision surface = more robust)", fixed(ind['score'], 3))]
    for key, value in (ind.get("parts") or {}).items():
        if isinstance(value, (int, float)) and key.startswith(INDICATOR_PARTS):
            shown = pct(value) if key.startswith("predicted_robust_accuracy") else f"{value:.4g}"
            rows.append((code(with_threat_names(report, key)), shown))
    if ind.get("masking_suspected"):
        rows.append(("**masking suspected**", "the score is not meaningful"))
    return ["### Decision-surface indicator", "", *table(("metric", "value"), rows, "lr"), *_section_notes(ind.get("notes") or [])]


VERDICT_MARK = {"pass": "🟢 pass", "warn": "🟡 warn", "fail": "🔴 **fail**", "skipped": "⚪ skipped"}  # not the gate's marks


def _diagnostics(report: Report) -> list[str]:
    diag = report.summary.diagnostics
    if not diag:
        return []
    rows = [
        (cell(c["name"]), code(threat_name(report, c["threat"])) if c["threat"] else "", VERDICT_MARK.get(c["verdict"], c["verdict"]), cell(c["summary"]))
        for c in diag["checks"]
    ]
    lines = [f"### Trust checks: {VERDICT_MARK.get(diag['verdict'], diag['verdict'])}", "", *table(("check", "threat", "verdict", "evidence"), rows)]
    lines += [f"- adapted: {cell(a)}" for a in diag.get("adaptations", [])]
    if diag.get("note"):
        white = ", ".join(f"{code(threat_name(report, k))} {pct(v)}" for k, v in diag.get("white_box_robust_accuracy", {}).items())
        lines.append(f"- **{cell(diag['note'])}** (white-box only: {white})")
    return lines + [""]


def _notes(report: Report) -> list[str]:
    notes = [*report.model.notes, *report.data.notes]
    return ["### Notes", "", *[f"- {cell(n)}" for n in notes], ""] if notes else []


def render_markdown(report: Report) -> str:
    parts = _headline(report)
    if report.gate:
        parts += ["### Gate", "", *gate_table(report.gate)]
    parts += _threats(report) + _diagnostics(report) + _attacks(report) + _curves(report) + _certificate(report) + _indicator(report) + _notes(report)
    return "\n".join(parts).rstrip() + "\n"


def write_markdown(report: Report, path: Path) -> None:
    write_text(path, render_markdown(report), "Markdown file")


def render_comparison_markdown(comparison: Comparison) -> str:
    """The deltas of `robaudit compare`, the flipped samples and the drop checks."""
    c = comparison
    lines = [
        f"## robaudit compare: {verdict(c.checks)}",
        "",
        f"**base** {code(Path(c.base_path).name)} (model sha256 {code(c.base.model.sha256[:12])}) → "
        f"**new** {code(Path(c.new_path).name)} (model sha256 {code(c.new.model.sha256[:12])}) · "
        f"**data** {code(Path(c.new.data.name).name)}: {c.new.data.n} samples, seed {c.new.data.seed}",
        "",
    ]
    if c.mismatch:
        lines += [f"> **Warning**: compared with --force although {cell('; '.join(c.mismatch))}.", ""]
    rows = []
    for d in c.metrics:
        fmt = (lambda v: pct(v)) if d.unit == "fraction" else (lambda v: "n/a" if v is None else f"{v:.4g}")
        change = "n/a" if d.delta is None else (f"{100 * d.delta:+.1f} pp" if d.unit == "fraction" else f"{d.delta:+.4g}")
        relative = "" if d.relative is None else f"{100 * d.relative:+.1f}%"
        rows.append((cell(d.label), fmt(d.base), fmt(d.new), change, relative))
    lines += ["### Metrics", "", *table(("metric", "base", "new", "change", "relative"), rows, "lrrrr")]
    if c.checks:
        lines += ["### Allowed drops", "", *gate_table(c.checks)]
    rows = []
    for threat, flips in c.flipped.items():
        shown = ", ".join(f"{f.index} ({cell(f.broken_by or 'misclassified')})" for f in flips[:50])
        more = f", ... {len(flips) - 50} more" if len(flips) > 50 else ""
        rows.append((code(threat), len(flips), len(c.fixed.get(threat, [])), (shown + more) or "none"))
    if rows:
        lines += [
            "### Samples that flipped from robust to broken",
            "",
            *table(("threat", "robust → broken", "broken → robust", "sample index (broken by)"), rows, "lrrl"),
        ]
    return "\n".join(lines).rstrip() + "\n"
