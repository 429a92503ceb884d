"""One self-contained HTML file: inline CSS, every plot embedded, no external resource.

Figures: an inline SVG bar chart of the headline accuracies (always), the robust
accuracy against radius curves as a PNG data URI drawn with matplotlib (an inline SVG
line chart when matplotlib is missing), and every PNG listed in ``report.plots``
(``--plots``) as a data URI. Reads the Report only; the file can be mailed, archived as a
CI artifact or opened offline.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import tempfile
from pathlib import Path

from robaudit.errors import RobauditError
from robaudit.report.common import (
    canonical_aside, certificate_methods, count, duration, per_sample, threat_name, total_seconds, unproven,
    unproven_fractions, verdict, with_threat_names,
)  # fmt: skip
from robaudit.report.files import write_text
from robaudit.report.numbers import fixed, floor_fixed, floor_pct, floor_sig, gate_figures
from robaudit.report.schema import Curve, Report

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#1f2328;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{display:inline-block;padding:.3rem .8rem;border-radius:.4rem;font-weight:600}
.pass{background:#dafbe1;color:#116329}.fail{background:#ffebe9;color:#a40e26}.none,.skipped{background:#f6f8fa;color:#57606a}
.warn{background:#fff8c5;color:#7a4a00}
.tag{display:inline-block;padding:.05rem .45rem;border-radius:.3rem;font-weight:600;font-size:.85em;white-space:nowrap}
.banner{padding:.5rem .8rem;border-radius:.4rem;border-left:.3rem solid currentColor}
.meta{color:#57606a;font-size:.9rem}.note{color:#7a4a00}code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #d0d7de;padding:.3rem;background:#fff;box-sizing:border-box}figcaption{color:#57606a;font-size:.85rem}
svg text{font-family:system-ui,sans-serif;font-size:12px;fill:#1f2328}
"""


INDICATOR_PARTS = ("median_jacobian_l2", "median_curvature", "median_hessian_max_abs", "predicted_robust_accuracy[")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else floor_pct(value)


def _table(header: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _bars(report: Report) -> str:
    """Horizontal bars of clean, robust and certified accuracy (inline SVG, no dependencies)."""
    s = report.summary
    items = [("clean accuracy", s.clean_accuracy, "#57606a")]
    items += [(f"robust {threat_name(report, t.threat)}", t.robust_accuracy, "#0969da") for t in s.threats]
    if s.certificate is not None and s.certificate.available:
        items += [(f"certified {threat_name(report, k)}", v, "#1a7f37") for k, v in s.certificate.certified_accuracy.items()]
    label_w, bar_w, row_h = 220, 420, 26
    height = row_h * len(items) + 24
    parts = [
        f'<svg role="img" aria-label="accuracies" width="{label_w + bar_w + 70}" '
        f'height="{height}" viewBox="0 0 {label_w + bar_w + 70} {height}">'
    ]
    for i, (label, value, colour) in enumerate(items):
        y = 8 + i * row_h
        width = max(0.0, min(1.0, value)) * bar_w
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{_e(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="{row_h - 8}" fill="#f6f8fa" stroke="#d0d7de"/>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="{row_h - 8}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 15}">{_pct(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_curves(curves: list[Curve], floors: dict[str, float] | None = None) -> str:
    """Robust accuracy against radius as an inline SVG line chart (the fallback without matplotlib)."""
    colours = ["#0969da", "#cf222e", "#1a7f37", "#8250df"]
    w, h, left, bottom, top, right = 520, 300, 50, 40, 20, 20
    xmax = max((max(c.eps) for c in curves if c.eps), default=1.0) or 1.0
    px = lambda e: left + (w - left - right) * e / xmax  # noqa: E731
    py = lambda a: top + (h - top - bottom) * (1 - a)  # noqa: E731
    parts = [f'<svg role="img" aria-label="robust accuracy against radius" width="{w}" height="{h}" viewBox="0 0 {w} {h}">']
    parts.append(f'<line x1="{left}" y1="{py(0)}" x2="{w - right}" y2="{py(0)}" stroke="#57606a"/>')
    parts.append(f'<line x1="{left}" y1="{py(0)}" x2="{left}" y2="{py(1)}" stroke="#57606a"/>')
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 6}" y="{py(tick) + 4}" text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{left}" y="{h - 8}">0</text><text x="{w - right}" y="{h - 8}" text-anchor="end">{xmax:.3g}</text>')
    parts.append(f'<text x="{(w + left) / 2}" y="{h - 8}" text-anchor="middle">eps</text>')
    for i, c in enumerate(curves):
        points = " ".join(f"{px(e):.1f},{py(a):.1f}" for e, a in zip(c.eps, c.robust_accuracy))
        colour = colours[i % len(colours)]
        floor = (floors or {}).get(c.norm, 0.0)
        if floor > 0:  # never broken: counted as robust at every radius, not proven robust
            parts.append(
                f'<rect x="{left}" y="{py(floor):.1f}" width="{w - left - right}" height="{py(0) - py(floor):.1f}" '
                f'fill="{colour}" fill-opacity="0.12"><title>{_e(c.norm)}: {100 * floor:.1f}% never broken '
                "(minimal-norm attack found nothing; not proven robust)</title></rect>"
            )
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{w - right - 4}" y="{top + 14 * (i + 1)}" text-anchor="end" fill="{colour}">{_e(c.norm)}</text>')
    parts.append("</svg>")
    return "".join(parts)


CURVE_FILE = "accuracy_vs_eps.png"  # the curve that --plots writes (robaudit.stages.measure)


def _scan_curve(report: Report) -> Path | None:
    for name in report.plots:
        if Path(name).name == CURVE_FILE and Path(name).is_file():
            return Path(name)
    return None


def _curve_figure(report: Report) -> str:
    curves = report.summary.curves
    if not curves:
        return ""
    caption = "Robust accuracy against radius (verified minimal-norm and fixed-radius results)"
    caveats = "".join(
        f'<p class="banner warn"><strong>Upper bound.</strong> {_e(u.sentence())}</p>'
        for u in (unproven(report, c) for c in curves)
        if u.count
    )
    drawn = _scan_curve(report)
    if drawn is not None:  # --plots drew it already
        uri = png_data_uri(drawn.read_bytes())
        return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>{caveats}'
    floors = unproven_fractions(report)
    if importlib.util.find_spec("matplotlib") is not None:
        from robaudit.measures.plots import save_curve_png

        try:
            with tempfile.TemporaryDirectory(prefix="robaudit-html-") as tmp:
                path = save_curve_png(curves, Path(tmp) / "curve.png", unproven=floors)
                uri = png_data_uri(path.read_bytes())
            return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>{caveats}'
        except (RobauditError, OSError):
            pass
    return f"<figure>{_svg_curves(curves, floors)}<figcaption>{_e(caption)}</figcaption></figure>{caveats}"


def _plot_figures(report: Report) -> str:
    figures, missing = [], []
    for name in report.plots:
        path = Path(name)
        if report.summary.curves and path == _scan_curve(report):
            continue  # shown as the curve figure
        if path.suffix.lower() != ".png" or not path.is_file():
            missing.append(name)
            continue
        uri = png_data_uri(path.read_bytes())
        figures.append(f'<figure><img src="{uri}" alt="{_e(path.name)}"><figcaption>{_e(path.name)}</figcaption></figure>')
    if missing:
        figures.append(f'<p class="note">not embedded (file not found when the page was written): {_e(", ".join(missing))}</p>')
    return "".join(figures)


def _gate(report: Report) -> str:
    if not report.gate:
        return ""
    rows = [
        [
            _tag("pass" if c.passed else "fail"),
            _e(c.describe()),
            *gate_figures(c),
            "" if c.baseline is None else fixed(c.baseline),
            f"<code>{_e(c.expression)}</code>",
        ]
        for c in report.gate
    ]
    return "<h2>Gate</h2>" + _table(["result", "check", "value", "lowest passing", "baseline", "rule"], rows, {2, 3, 4})


def _verdict(report: Report) -> str:
    if not report.gate:
        gate = '<span class="verdict none">no gate checks</span>'
    elif missed := sum(not c.passed for c in report.gate):
        gate = f'<span class="verdict fail">✖ gate failed: {missed} of {len(report.gate)} checks missed</span>'
    else:
        gate = f'<span class="verdict pass">✔ gate passed: {len(report.gate)} check{"s" if len(report.gate) != 1 else ""}</span>'
    v = verdict(report)
    if v.level != "warn":
        return f"<p>{gate}</p>"
    headline = v.headline.replace("see Trust checks above", "see Trust checks below")
    return f'<p>{gate}</p><p class="banner warn">⚠ <strong>{_e(headline)}</strong>: {_e(v.advice)}.</p>'


TAG = {"pass": "✔ PASS", "warn": "⚠ WARN", "fail": "✖ FAIL", "skipped": "– skipped"}


TRUST_MEANING = {
    "pass": "the attacks could work on this model: no sign of gradient masking or randomness they missed",
    "warn": "signs that the attacks may not have worked fully: robust accuracy may be too high (docs/trust.md)",
    "fail": "the attacks did not work on this model: robust accuracy is not trustworthy (docs/trust.md)",
}


def _tag(level: str) -> str:
    """A verdict as a coloured tag with its word and a symbol (colour is never the only cue)."""
    return f'<span class="tag {_e(level)}">{_e(TAG.get(level, level))}</span>'


def _threats(report: Report) -> str:
    times = report.timing.get("attacks_s", {})
    rows = []
    for t in report.summary.threats:
        per = times.get(t.threat)
        rows.append([
            _threat(report, t.threat), _pct(t.robust_accuracy), per_sample(t.forward_passes_per_sample),
            per_sample(t.backward_passes_per_sample), f"{sum(per.values()):.1f} s" if isinstance(per, dict) else "",
        ])  # fmt: skip
    html_ = "<h2>Threats</h2>" + _table(["threat", "robust accuracy", "fwd / sample", "bwd / sample", "time"], rows, {1, 2, 3, 4})
    rows = []
    for m in report.summary.minimal_norm:
        for a in m.attack_details:
            rows.append([
                f"minimal {_e(m.norm)}", _e(a.name), count(a.attempted), count(a.broke), "any radius",
                f"{count(a.forward_passes)}/{count(a.backward_passes)}",
            ])  # fmt: skip
    for t in report.summary.threats:
        threat = f"<code>{_e(threat_name(report, t.threat))}</code>"
        for a in t.attack_details:
            name = a.name + (f" x{a.restarts}" if a.restarts > 1 else "")
            cost = _e(a.skipped) if a.skipped else f"{count(a.forward_passes)}/{count(a.backward_passes)}"
            rows.append([threat, _e(name), "" if a.skipped else count(a.attempted), count(a.broke), _pct(a.robust_accuracy_after), cost])
    if rows:
        html_ += "<h2>Attack breakdown</h2><p class=\"meta\">Each attack runs only on points still robust; 'broke' counts the points it broke first.</p>"
        html_ += _table(["threat", "attack", "attempted", "broke", "robust after", "passes (f/b)"], rows, {2, 3, 4, 5})
    return html_


def _threat(report: Report, canonical: str) -> str:
    """The threat as the user wrote it (``linf:8/255``), the canonical name beside it when it differs."""
    aside = canonical_aside(report, canonical)
    shown = f"<code>{_e(threat_name(report, canonical))}</code>"
    return shown + (f' <span class="meta">(<code>{_e(aside)}</code>)</span>' if aside else "")


def _per_class(report: Report) -> str:
    """Robust accuracy of each class under each threat: one row per class, one column per threat."""
    threats = [t for t in report.summary.threats if t.per_class]
    if not threats:
        return ""
    classes = list(dict.fromkeys(c for t in threats for c in t.per_class))
    rows = [[_e(c), *[_pct(t.per_class[c]) if c in t.per_class else "n/a" for t in threats]] for c in classes]
    header = ["class", *[f"robust {threat_name(report, t.threat)}" for t in threats]]
    table = _table(header, rows, set(range(1, len(header))))
    if len(classes) > 20:  # a long table stays folded
        table = f"<details><summary>{len(classes)} classes</summary>{table}</details>"
    return "<h2>Robust accuracy per class</h2>" + table


def _certificate(report: Report) -> str:
    cert = report.summary.certificate
    if cert is None:
        return ""
    if not cert.available:
        return f'<h2>Certified L2 radii</h2><p class="note">{_e(cert.reason or "not available")}</p>'
    rows = [[f"certified accuracy {_threat(report, k)}", _pct(v)] for k, v in cert.certified_accuracy.items()]
    if cert.radius_quantiles:
        rows.append(["radius quantiles (correct samples)", _e(", ".join(f"{k}: {floor_sig(v)}" for k, v in cert.radius_quantiles.items()))])
    if cert.median_ratio is not None:
        rows.append(["median certified / smallest adversarial L2", f"{floor_fixed(cert.median_ratio, 3)} ({cert.ratio_samples} samples)"])
    rows.append(["method that gave the radius", _e(certificate_methods(cert))])
    return f"<h2>Certified L2 radii (budget {_e(cert.budget)})</h2>" + _table(["metric", "value"], rows, {1}) + _notes(cert.notes)


def _notes(notes: list[str]) -> str:
    """Notes as paragraphs of class `note`."""
    return "".join(f'<p class="note">note: {_e(n)}</p>' for n in notes)


def _indicator(report: Report) -> str:
    ind = report.summary.indicator
    if not ind or "score" not in ind:
        return ""
    rows = [["score (higher = flatter decision surface = more robust)", fixed(ind['score'], 3)]]
    for key, value in (ind.get("parts") or {}).items():
        if isinstance(value, (int, float)) and key.startswith(INDICATOR_PARTS):
            rows.append([f"<code>{_e(with_threat_names(report, key))}</code>", _pct(value) if key.startswith("predicted_robust_accuracy") else f"{value:.4g}"])
    if ind.get("masking_suspected"):
        rows.append(["<strong>masking suspected</strong>", "the score is not meaningful"])
    return "<h2>Decision-surface indicator</h2>" + _table(["metric", "value"], rows, {1}) + _notes(ind.get("notes") or [])


def _diagnostics(report: Report) -> str:
    diag = report.summary.diagnostics
    if not diag:
        return ""
    rows = [
        [_e(c["name"]), f"<code>{_e(threat_name(report, c['threat']))}</code>" if c["threat"] else "", _tag(c["verdict"]), _e(c["summary"])]
        for c in diag["checks"]
    ]
    rows += [["<strong>adapted</strong>", "", "", _e(a)] for a in diag.get("adaptations", [])]
    if diag.get("note"):
        white = ", ".join(f"{_e(threat_name(report, k))} {_pct(v)}" for k, v in diag.get("white_box_robust_accuracy", {}).items())
        rows.append(["<strong>note</strong>", "", "", f"{_e(diag['note'])} (white-box only: {white})"])
    level = diag["verdict"]
    meaning = f'<p>{_tag(level)} {_e(TRUST_MEANING.get(level, ""))}</p>'
    return f"<h2>Trust checks: {_e(level)}</h2>{meaning}" + _table(["check", "threat", "verdict", "evidence"], rows)


def render_html(report: Report) -> str:
    m, d, s = report.model, report.data, report.summary
    title = f"robaudit: {Path(m.path).name} on {Path(d.name).name}"
    headline = [["clean accuracy", _pct(s.clean_accuracy)]]
    headline += [[f"robust accuracy {_threat(report, t.threat)}", _pct(t.robust_accuracy)] for t in s.threats]
    if s.certificate is not None and s.certificate.available:
        headline += [[f"certified accuracy {_threat(report, k)}", _pct(v)] for k, v in s.certificate.certified_accuracy.items()]
    if s.indicator and isinstance(s.indicator.get("score"), (int, float)):
        headline.append(["indicator score", fixed(s.indicator['score'], 3)])
    notes = _notes([*m.notes, *d.notes])
    meta = (
        f"model <code>{_e(m.path)}</code> ({_e(m.format)}, sha256 <code>{_e(m.sha256[:12])}</code>) · "
        f"data <code>{_e(d.name)}</code>: {d.n} of {d.source_size} samples, seed {d.seed} · "
        f"device {_e(report.environment.get('device', '?'))} · robaudit {_e(report.robaudit_version)} · {_e(report.created)}"
    )
    total = total_seconds(report)
    if total is not None:
        meta += f" · total {_e(duration(total))}"
    body = [
        f"<h1>{_e(title)}</h1>",
        _verdict(report),
        f'<p class="meta">{meta}</p>',
        notes,
        _table(["metric", "value"], headline, {1}),
        f"<figure>{_bars(report)}<figcaption>Clean, robust and certified accuracy</figcaption></figure>",
        _gate(report),
        _threats(report),
        _diagnostics(report),
    ]
    curve = _curve_figure(report)
    if curve:
        body += ["<h2>Robust accuracy against radius</h2>", curve]
    body += [_per_class(report), _certificate(report), _indicator(report)]
    plots = _plot_figures(report)
    if plots:
        body += ["<h2>Plots</h2>", plots]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(b for b in body if b) + "\n</body>\n</html>\n"
    )


def write_html(report: Report, path: Path) -> None:
    write_text(path, render_html(report), "HTML file")
