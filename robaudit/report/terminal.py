"""Render a report in the terminal with rich; the same code serves `scan` and `report`."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from robaudit.report.schema import Report


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


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
    attack_times = report.timing.get("attacks_s", {})
    for t in report.summary.threats:
        seconds = sum(attack_times.get(t.threat, {}).values())
        table.add_row(
            f"robust accuracy [bold]{t.threat}[/bold]" + (f" [dim]({escape(t.spec)})[/dim]" if t.spec and t.spec != t.threat else ""),
            _pct(t.robust_accuracy),
            f"{t.forward_passes_per_sample:.1f}",
            f"{t.backward_passes_per_sample:.1f}",
            f"{seconds:.1f}s" if attack_times else "",
        )
    return table


def _attacks(report: Report) -> Table:
    table = Table(title="Attacks (each runs only on points still robust)", title_justify="left")
    for column in ("threat", "attack", "attempted", "broke", "robust after", "passes (f/b)"):
        table.add_column(column, justify="left" if column in ("threat", "attack") else "right")
    for t in report.summary.threats:
        for a in t.attack_details:
            if a.skipped:
                table.add_row(t.threat, a.name, "-", "-", _pct(a.robust_accuracy_after), f"[dim]{a.skipped}[/dim]")
                continue
            restarts = f" x{a.restarts}" if a.restarts > 1 else ""
            table.add_row(
                t.threat,
                f"{a.name}{restarts}",
                str(a.attempted),
                str(a.broke),
                _pct(a.robust_accuracy_after),
                f"{a.forward_passes}/{a.backward_passes}",
            )
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
        relation = ">=" if check.passed else "<"
        lines.append(f"{mark} ", style=style)
        lines.append(f"{check.metric} = {check.value:.4f} {relation} {check.threshold:.4f}\n")
    return lines


def render(report: Report, console: Console) -> None:
    """Print the whole report."""
    parts = [_header(report)]
    notes = _notes(report)
    if notes:
        parts.append(notes)
    console.print(Panel(Group(*parts), title=f"robaudit {report.robaudit_version}", title_align="left"))
    console.print(_results(report))
    console.print(_attacks(report))
    gate = _gate(report)
    if gate:
        console.print(Panel(gate, title="gate", title_align="left"))
