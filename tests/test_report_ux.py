"""What a new user reads at the end of a scan: the verdict line, threats as written, readable counts,
the curve's upper-bound caveat, coloured verdicts and per-class accuracy in the HTML page.

Real `robaudit scan` / `robaudit report` processes on a real model, and the real report they wrote.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CiScan, CliResult, ModelFiles, load_json, run_cli
from robaudit.measures.plots import _titles, never_broken
from robaudit.report.common import unproven
from robaudit.report.schema import read_report

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# a deliberately short minimal-norm search: it leaves many correctly classified samples unbroken at
# every radius, the case where the curve would otherwise read as "robust at any radius"
WEAK = """threats = ["linf:8/255", "l2:0.5"]

[[attacks]]
attack = "fmn"
steps = 3

[[attacks]]
attack = "apgd-ce"
steps = 5
"""


@dataclass
class WeakScan:
    result: CliResult
    json: Path
    markdown: Path
    html: Path
    plots: Path


@pytest.fixture(scope="module")
def weak_scan(model_files: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> WeakScan:
    root = tmp_path_factory.mktemp("weak")
    (root / "weak.toml").write_text(WEAK)
    scan = WeakScan(None, root / "r.json", root / "r.md", root / "r.html", root / "plots")  # type: ignore[arg-type]
    scan.result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "--config", root / "weak.toml",
        "--no-checks", "--no-certify", "--json", scan.json, "--markdown", scan.markdown, "--html", scan.html,
        "--plots", scan.plots,
    )  # fmt: skip
    assert scan.result.code == 0, scan.result.stderr
    return scan


def last_lines(stdout: str, n: int = 2) -> list[str]:
    return [line.rstrip() for line in stdout.splitlines() if line.strip()][-n:]


def test_unbroken_samples_match_the_curve_floor(weak_scan: WeakScan) -> None:
    report = read_report(weak_scan.json)
    assert report.summary.curves
    for curve in report.summary.curves:
        u = unproven(report, curve)
        # counted from the sample records, it is exactly where the scan's curve levels off
        assert u.n == 30 and u.count / u.n == pytest.approx(curve.robust_accuracy[-1])
        assert never_broken(curve) == pytest.approx(u.fraction)
    assert any(unproven(report, c).count for c in report.summary.curves), "the weak FMN should leave samples unbroken"


def test_every_renderer_marks_the_curve_as_an_upper_bound(weak_scan: WeakScan) -> None:
    report = read_report(weak_scan.json)
    markdown = weak_scan.markdown.read_text(encoding="utf-8")
    page = weak_scan.html.read_text(encoding="utf-8")
    stdout = " ".join(weak_scan.result.stdout.split())  # rich wraps long lines
    for curve in report.summary.curves:
        u = unproven(report, curve)
        if not u.count:
            continue
        sentence = f"{u.count} of 30 samples ({100 * u.fraction:.1f}%): minimal-norm attack found nothing at any {curve.norm} radius"
        assert f"upper bound: {sentence}" in stdout
        assert f"> **Upper bound**: {sentence}" in markdown
        assert f"<strong>Upper bound.</strong> {sentence}" in page
        assert "not proven robust" in stdout and "not proven robust" in markdown and "not proven robust" in page
    assert (weak_scan.plots / "accuracy_vs_eps.png").read_bytes()[:4] == b"\x89PNG"


def test_threats_are_shown_as_the_user_wrote_them(weak_scan: WeakScan) -> None:
    markdown = weak_scan.markdown.read_text(encoding="utf-8")
    page = weak_scan.html.read_text(encoding="utf-8")
    stdout = weak_scan.result.stdout
    # the user's form first, the canonical name (used by the gate and the JSON) beside it
    assert "robust accuracy linf:8/255 (linf:0.0313725)" in stdout
    assert re.search(r"│ linf:8/255\s+│ apgd-ce", stdout), stdout
    assert "| robust accuracy `linf:8/255` (`linf:0.0313725`) |" in markdown
    assert "| `linf:8/255` | `apgd-ce` |" in markdown
    assert "robust accuracy <code>linf:8/255</code>" in page and "robust linf:8/255" in page


def test_the_scan_ends_with_a_verdict_and_its_time(weak_scan: WeakScan, ci_base: CiScan) -> None:
    report = load_json(weak_scan.json)
    first, second = last_lines(weak_scan.result.stdout)
    assert first.startswith("DONE: no gate checks") and f"(total {report['timing']['total_s']:.1f} s)" in first
    assert "--fail-under" in second

    shown = run_cli("report", ci_base.json)
    assert shown.code == 0, shown.stderr
    first, second = last_lines(shown.stdout)
    assert first.startswith("FAIL: 1 of 5 gate checks failed  (total "), first
    assert "exit code is 1" in second


def test_large_counts_have_thousands_separators(ci_base: CiScan) -> None:
    report = read_report(ci_base.json)
    shown = run_cli("report", ci_base.json)
    markdown = ci_base.markdown.read_text(encoding="utf-8")
    page = ci_base.html.read_text(encoding="utf-8")
    attacks = [a for t in report.summary.threats for a in t.attack_details if not a.skipped]
    attacks += [a for m in report.summary.minimal_norm for a in m.attack_details]
    big = [a for a in attacks if a.forward_passes >= 1000]
    assert big, "the CI scan has attacks with over 1000 forward passes"
    for a in big:
        pair = f"{a.forward_passes:,}/{a.backward_passes:,}"
        assert "," in pair and pair in shown.stdout and pair in markdown and pair in page


def test_html_colours_every_verdict_and_says_it_in_words(ci_base: CiScan) -> None:
    page = ci_base.html.read_text(encoding="utf-8")
    report = load_json(ci_base.json)
    css = page.split("<style>")[1].split("</style>")[0]
    for level in ("pass", "warn", "fail"):
        assert re.search(rf"\.{level}\{{background:#[0-9a-f]{{6}};color:#[0-9a-f]{{6}}\}}", css), level
    gate = page.split("<h2>Gate</h2>")[1].split("</table>")[0]
    assert gate.count('<span class="tag fail">✖ FAIL</span>') == 1 and gate.count('<span class="tag pass">✔ PASS</span>') == 4
    assert '<span class="verdict fail">✖ gate failed: 1 of 5 checks missed</span>' in page
    verdict = report["summary"]["diagnostics"]["verdict"]
    trust = page.split(f"<h2>Trust checks: {verdict}</h2>")[1].split("</table>")[0]
    assert trust.startswith(f'<p><span class="tag {verdict}">')
    for check in report["summary"]["diagnostics"]["checks"]:
        assert f'<span class="tag {check["verdict"]}">' in trust


def test_html_has_a_per_class_table(ci_base: CiScan) -> None:
    page = ci_base.html.read_text(encoding="utf-8")
    report = load_json(ci_base.json)
    section = page.split("<h2>Robust accuracy per class</h2>")[1].split("</table>")[0]
    threats = report["summary"]["threats"]
    assert "<th>class</th>" in section and all(f"<th>robust {t['threat']}</th>" in section for t in threats)
    for c in threats[0]["per_class"]:
        cells = [f'<td class="num">{math.floor(1000 * t["per_class"][c] + 1e-9) / 10:.1f}%</td>' for t in threats]
        assert f"<tr><td>{c}</td>{''.join(cells)}</tr>" in section


def test_trust_warnings_give_a_warn_verdict_everywhere(weak_scan: WeakScan, tmp_path) -> None:
    """A real report whose trust checks warned (edited from a real scan: a healthy model never warns)."""
    raw = load_json(weak_scan.json)
    raw["summary"]["diagnostics"] = {
        "verdict": "warn",
        "checks": [{"name": "gradients", "threat": "linf:0.0313725", "verdict": "warn", "summary": "gradients vanish on 40% of points"}],
        "adaptations": [],
    }
    warned = tmp_path / "warned.json"
    warned.write_text(json.dumps(raw))
    md, html = tmp_path / "w.md", tmp_path / "w.html"
    shown = run_cli("report", warned, "--markdown", md, "--html", html)
    assert shown.code == 0, shown.stderr
    first, second = last_lines(shown.stdout)
    assert first.startswith("WARN: trust checks warned (see Trust checks above)  (total "), first
    assert "docs/trust.md" in second
    assert re.search(r"│ gradients\s+│ linf:8/255\s+│ warn", shown.stdout), shown.stdout
    assert "> **Warning**: trust checks warned (see Trust checks below): the attacks may not have worked" in md.read_text()
    page = html.read_text()
    assert '<p class="banner warn">⚠ <strong>WARN: trust checks warned (see Trust checks below)' in page
    assert '<span class="tag warn">⚠ WARN</span>' in page


def test_surface_titles_are_short_enough_not_to_overlap() -> None:
    class Slice:
        def __init__(self, title: str) -> None:
            self.title, self.label = title, 3

    prefix = "a_rather_long_model_name_v2.onnx (label 7, predicted 7): "
    shared, panels = _titles([Slice(prefix + "random plane"), Slice(prefix + "attack plane (adversarial example, linf:0.0313725)")])
    assert shared == prefix.removesuffix(": ")
    assert panels[0] == "random plane" and all(len(line) <= 34 for p in panels for line in p.split("\n"))
    # two models: nothing shared, each title breaks after its model part
    shared, panels = _titles([Slice("m1.onnx (label 7, predicted 7): random plane"), Slice("m2.onnx (label 7, predicted 7): random plane")])
    assert shared == "" and panels[0] == "m1.onnx (label 7, predicted 7)\nrandom plane"


def test_curve_drops_a_sample_at_its_verified_distance_not_at_eps() -> None:
    """A sample a fixed-radius attack broke at L2 distance 0.3 under l2:0.5 is not robust at 0.31; no minimal-norm
    attack found it (distance inf). The curve must fall there, never sit above the report's own distances."""
    import torch

    from robaudit.attacks.runner import MinimalOutcome, ThreatOutcome
    from robaudit.scan import _curve
    from robaudit.threats import parse_threat

    n = 3
    found = MinimalOutcome("l2", torch.tensor([0.2, math.inf, math.inf], dtype=torch.float64), ["fmn", None, None],
                           torch.zeros(n, 1))
    outcome = ThreatOutcome(parse_threat("l2:0.5"), torch.tensor([True, True, False]), ["fmn", "pgd", None],
                            torch.tensor([0.2, 0.3, math.nan], dtype=torch.float64), torch.zeros(n, 1))
    curve = _curve("l2", torch.ones(n, dtype=torch.bool), found, [outcome])
    assert curve.eps == torch.linspace(0.0, 1.0, len(curve.eps), dtype=torch.float64).tolist()  # not rounded
    for e, acc in zip(curve.eps, curve.robust_accuracy):
        assert acc == pytest.approx((int(e < 0.2) + int(e < 0.3) + 1) / n), e
