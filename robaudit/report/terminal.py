"""Render a report in the terminal with rich; the same code serves `scan` and `report`."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from robaudit.report.common import (
    canonical_aside, certificate_methods, count, duration, per_sample, threat_name, total_seconds, unproven, verdict,
    with_threat_names,
)  # fmt: skip
from robaudit.report.schema import Report
from robaudit.report.numbers import fixed, floor_fixed, floor_pct, floor_sig


def _pct(value: float) -> str:
    return floor_pct(value)


def _header(report: Report) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    m, d = report.model, report.data
    shape = "x".join(map(str, m.input_shape)) if m.input_shape else "not stated in the file"
    grid.add_row("model", f"{escape(m.path)}  [dim]({m.format}, sha256 {m.sha256[:12]})[/dim]")
    grid.add_row("input", escape(f"{shape}, {m.num_classes} classes, {m.output_kind}, range {m.input_range}"))
    if m.mean is not None or m.std is not None:
        grid.add_row("preprocessing", escape(f"mean {m.mean}, std {m.std}"))
    grid.add_row("data", f"{escape(d.name)}: {d.n} of {d.source_size} samples (seed {d.seed})")
    grid.add_row("device", escape(report.environment.get("device", "?")))
    return grid


def _results(report: Report) -> Table:
    table = Table(title="Robustness", title_justify="left", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("fwd / sample", justify="right")
    table.add_column("bwd / sample", justify="right")
    table.add_column("time", justify="right")
    table.add_row("clean accuracy", _pct(report.summary.clean_accuracy), "", "", "")
    if report.summary.minimal_norm:
        minimal_times = {k: v for k, v in report.timing.get("attacks_s", {}).items() if k.startswith("minimal:")}
        for m in report.summary.minimal_norm:
            seconds = sum(minimal_times.get(f"minimal:{m.norm}", {}).values())
            table.add_row(
                f"minimal-norm search {m.norm}", "", per_sample(m.forward_passes_per_sample),
                per_sample(m.backward_passes_per_sample), f"{seconds:.1f}s" if minimal_times else "",
            )  # fmt: skip
    attack_times = report.timing.get("attacks_s", {})
    for t in report.summary.threats:
        seconds = sum(attack_times.get(t.threat, {}).values())
        table.add_row(
            f"robust accuracy [bold]{escape(threat_name(report, t.threat))}[/bold]"
            + (f" [dim]({escape(t.threat)})[/dim]" if canonical_aside(report, t.threat) else ""),
            _pct(t.robust_accuracy),
            per_sample(t.forward_passes_per_sample),
            per_sample(t.backward_passes_per_sample),
            f"{seconds:.1f}s" if attack_times else "",
        )
    return table


def _attacks(report: Report) -> Table:
    table = Table(title="Attacks (each runs only on points still robust; 'broke' counts points it broke first)", title_justify="left")
    for column in ("threat", "attack", "attempted", "broke", "robust after"):
        table.add_column(column, justify="left" if column in ("threat", "attack") else "right", overflow="fold")
    # never truncated: the widest count pair ("33,670/33,300") keeps its width, the other columns fold
    widest = max([len(f"{count(a.forward_passes)}/{count(a.backward_passes)}") for a in _all_attacks(report)] + [6])
    table.add_column("passes (f/b)", justify="right", min_width=widest, no_wrap=True)
    for m in report.summary.minimal_norm:
        for a in m.attack_details:
            table.add_row(
                f"minimal {m.norm}", a.name, count(a.attempted), count(a.broke), "[dim]any radius[/dim]",
                f"{count(a.forward_passes)}/{count(a.backward_passes)}",
            )  # fmt: skip
    for t in report.summary.threats:
        name = escape(threat_name(report, t.threat))
        for a in t.attack_details:
            if a.skipped and a.skipped.startswith("minimal-norm stage"):
                table.add_row(name, a.name, "", count(a.broke), _pct(a.robust_accuracy_after), "[dim]shared[/dim]")
                continue
            if a.skipped:
                table.add_row(name, a.name, "-", "-", _pct(a.robust_accuracy_after), f"[dim]{escape(a.skipped)}[/dim]")
                continue
            restarts = f" x{a.restarts}" if a.restarts > 1 else ""
            table.add_row(
                name,
                f"{a.name}{restarts}",
                count(a.attempted),
                count(a.broke),
                _pct(a.robust_accuracy_after),
                f"{count(a.forward_passes)}/{count(a.backward_passes)}",
            )
    return table


def _all_attacks(report: Report) -> list:
    return [a for m in report.summary.minimal_norm for a in m.attack_details] + [
        a for t in report.summary.threats for a in t.attack_details if not a.skipped
    ]


def _curves(report: Report) -> Group | Table | None:
    if not report.summary.curves:
        return None
    table = Table(
        title="Robust accuracy against radius (from verified minimal-norm and fixed-radius results)", title_justify="left"
    )
    table.add_column("norm")
    table.add_column("median distance", justify="right")
    table.add_column("radius -> robust accuracy")
    for c in report.summary.curves:
        step = max(1, (len(c.eps) - 1) // 6)
        points = "  ".join(f"{floor_sig(c.eps[i], 3)}: {_pct(c.robust_accuracy[i])}" for i in range(0, len(c.eps), step))
        median = floor_sig(c.median_distance) if c.median_distance is not None else "-"
        table.add_row(c.norm, median, points)
    caveats = [unproven(report, c) for c in report.summary.curves]
    caveats = [u for u in caveats if u.count]
    if not caveats:
        return table
    # samples no attack broke are not proven robust: the curve's floor is an artefact of the attack's failure
    return Group(table, Text("\n".join(f"upper bound: {u.sentence()}" for u in caveats), style="yellow"))


def _certificate(report: Report) -> Group | Text | None:
    cert = report.summary.certificate
    if cert is None:
        return None
    if not cert.available:
        return Text(f"Certified L2 radii: {cert.reason}", style="yellow")
    table = Table(
        title=(
            "Certified L2 radii (lower bounds: no perturbation this small changes the decision; "
            f"budget {cert.budget}, {report.timing.get('certify_s') or 0:.1f}s)"
        ),
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in cert.certified_accuracy.items():
        table.add_row(f"certified accuracy {escape(threat_name(report, name))}", _pct(value))
    quantiles = "  ".join(f"{k}: {floor_sig(v)}" for k, v in cert.radius_quantiles.items())
    table.add_row("radius (correct samples)", quantiles or "-")
    if cert.median_ratio is not None:
        table.add_row(
            "median certified / smallest adversarial L2",
            f"{floor_fixed(cert.median_ratio, 3)} [dim]({cert.ratio_samples} samples; 1 = pinned down exactly)[/dim]",
        )
    table.add_row("method that gave the radius", certificate_methods(cert))
    # what the radius covers (float32 rounding, precision) is part of the claim: show it with the table
    return _with_notes(table, cert.notes)


def _with_notes(table: Table, notes: list[str]) -> Group:
    """A section's table with its notes under it, dimmed."""
    return Group(table, Text("\n".join(f"note: {n}" for n in notes), style="dim")) if notes else Group(table)


def _indicator(report: Report) -> Table | Group | None:
    ind = report.summary.indicator
    if not ind:
        return None
    parts = ind.get("parts", {})
    table = Table(
        title=(
            "Decision-surface indicator (no attacks: how steep and curved the decision function is around each sample; "
            "docs/indicator.md)"
        ),
        title_justify="left",
    )
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    table.add_row(
        "score", fixed(ind['score'], 3),
        "median margin / predicted worst drop in the ball; higher = flatter, wider plateau = more robust; "
        "above 1 the second-order bound predicts most decisions hold",
    )  # fmt: skip
    for key, meaning in (
        ("median_jacobian_l2", "gradient size of the margin (small = robust)"),
        ("median_curvature", "curvature (finite differences; ReLU nets have no Hessian)"),
        ("median_hessian_max_abs", "largest Hessian eigenvalue (smooth nets)"),
    ):
        if key in parts:
            table.add_row(key.removeprefix("median_"), f"{parts[key]:.4g}", meaning)
    for key, value in parts.items():
        if key.startswith("predicted_robust_accuracy["):
            table.add_row(escape(with_threat_names(report, key)), _pct(value), "samples whose drop (predicted, or seen at random points in the ball where larger) stays below their margin (a prediction, not a bound)")
    if ind.get("masking_suspected"):
        table.add_row("[bold red]masking suspected[/bold red]", "yes", "random probes beat the predicted drop: the score is not meaningful")
    notes = ind.get("notes") or []  # what the score could not measure
    return _with_notes(table, notes) if notes else table


VERDICT_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


def _diagnostics(report: Report) -> Table | None:
    """Trust checks: could the attacks have worked? One row per check, with its numbers."""
    diag = report.summary.diagnostics
    if not diag:
        return None
    verdict = diag["verdict"]
    table = Table(
        title=f"Trust checks: [{VERDICT_STYLE.get(verdict, '')}]{verdict.upper()}[/] (docs/trust.md)", title_justify="left"
    )
    table.add_column("check")
    table.add_column("threat")
    table.add_column("verdict")
    table.add_column("evidence")
    for check in diag["checks"]:
        style = VERDICT_STYLE.get(check["verdict"], "")
        table.add_row(check["name"], escape(threat_name(report, check["threat"])), f"[{style}]{check['verdict']}[/]", escape(check["summary"]))
    for text in diag.get("adaptations", []):
        table.add_row("[bold]adapted[/bold]", "", "", escape(text))
    if diag.get("note"):
        white = ", ".join(f"{threat_name(report, k)} {_pct(v)}" for k, v in diag.get("white_box_robust_accuracy", {}).items())
        table.add_row("[bold red]note[/bold red]", "", "", escape(f"{diag['note']} (white-box only: {white})"))
    return table


def _per_class(report: Report) -> Table | None:
    threats = report.summary.threats
    if not threats or not threats[0].per_class or len(threats[0].per_class) > 20:
        return None
    table = Table(title="Robust accuracy per class", title_justify="left")
    table.add_column("threat")
    classes = list(threats[0].per_class)
    for c in classes:
        table.add_column(c, justify="right")
    for t in threats:
        table.add_row(escape(threat_name(report, t.threat)), *[floor_pct(t.per_class.get(c, 0.0), 0)[:-1] for c in classes])
    return table


def _notes(report: Report) -> Text | None:
    notes = [*report.model.notes, *report.data.notes]
    if not notes:
        return None
    return Text("\n".join(f"note: {n}" for n in notes), style="yellow")


def _gate(report: Report) -> Text | None:
    if not report.gate:
        return None
    lines = Text()
    for check in report.gate:
        mark, style = ("PASS", "green") if check.passed else ("FAIL", "bold red")
        lines.append(f"{mark} ", style=style)
        lines.append(f"{check.describe()}\n")
    lines.rstrip()
    return lines


VERDICT_LINE_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red", "none": "bold"}


def _verdict(report: Report) -> Text:
    """The last line of a scan: PASS / WARN / FAIL / DONE, the total time, and what to do about a warning."""
    v = verdict(report)
    line = Text(v.headline, style=VERDICT_LINE_STYLE[v.level])
    total = total_seconds(report)
    if total is not None:
        line.append(f"  (total {duration(total)})", style="dim")
    if v.advice:
        line.append(f"\n{v.advice}", style="dim" if v.level in ("pass", "none") else "")
    return line


def render(report: Report, console: Console) -> None:
    """Print the whole report."""
    parts = [_header(report)]
    notes = _notes(report)
    if notes:
        parts.append(notes)
    console.print(Panel(Group(*parts), title=f"robaudit {report.robaudit_version}", title_align="left"))
    console.print(_results(report))
    console.print(_attacks(report))
    for extra in (_diagnostics(report), _curves(report), _certificate(report), _indicator(report), _per_class(report)):
        if extra is not None:
            console.print(extra)
    gate = _gate(report)
    if gate:
        console.print(Panel(gate, title="gate", title_align="left"))
    console.print(_verdict(report))
