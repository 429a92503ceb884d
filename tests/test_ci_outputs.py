"""CI-grade reporting, end to end: the [gate] table and gate flags with their exit codes, and the
JUnit, Markdown and HTML files, from real `robaudit scan` processes on a real model."""

from __future__ import annotations

import base64
import importlib.util
import math
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import xmlschema

from conftest import CI_ATTACKS, CiScan, ModelFiles, assert_one_line_error, load_json, run_cli

DATA = Path(__file__).parent / "data"
SCHEMAS = {name: xmlschema.XMLSchema(str(DATA / name)) for name in ("junit.xsd", "junit-ant.xsd")}


def validate_junit(path: Path) -> ET.Element:
    """Valid against both common JUnit schemas (Jenkins', and Ant's strict one that GitLab also reads)."""
    for name, schema in SCHEMAS.items():
        errors = list(schema.iter_errors(str(path)))
        assert not errors, f"{path.name} is not valid against {name}: {errors[0]}"
    return ET.parse(path).getroot()


def down4(value: float) -> str:
    return f"{math.floor(10000 * value + 1e-9) / 10000:.4f}"  # gate figures are rounded down too


def pct(value: float) -> str:
    return f"{math.floor(1000 * value + 1e-9) / 10:.1f}%"  # rounded down: a figure never shows more than measured


def test_the_schemas_reject_what_ci_tools_reject(tmp_path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text('<testsuites><testsuite name="x" tests="1"><testcase name="a"><oops/></testcase></testsuite></testsuites>')
    for schema in SCHEMAS.values():
        assert list(schema.iter_errors(str(bad)))


def test_missed_minimum_from_toml_exits_1_and_junit_shows_the_failing_check(ci_base: CiScan) -> None:
    result = ci_base.result
    assert result.code == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("gate failed:")]
    assert len(failed) == 1 and failed[0].startswith("gate failed: robust_accuracy[linf:0.1] = "), result.stderr
    assert "Traceback" not in result.stderr
    report = load_json(ci_base.json)
    gate = report["gate"]
    # four minimums from [gate.min] and one from --fail-under; the certificate and the indicator ran because a gate named them
    assert {c["metric"] for c in gate} == {
        "clean_accuracy", "robust_accuracy[linf:0.1]", "certified_accuracy[l2:0.5]", "indicator_score", "robust_accuracy[l2:0.5]",
    }  # fmt: skip
    assert all(c["kind"] == "minimum" for c in gate)
    assert [c["metric"] for c in gate if not c["passed"]] == ["robust_accuracy[linf:0.1]"]
    assert report["summary"]["certificate"]["available"] and report["summary"]["indicator"]["score"] is not None

    root = validate_junit(ci_base.junit)
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "1", "0")
    cases = suite.findall("testcase")
    assert len(cases) == 5
    failing = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failing] == ["robust_accuracy[linf:0.1] >= 0.99"]
    failure = failing[0].find("failure")
    robust = next(t["robust_accuracy"] for t in report["summary"]["threats"] if t["threat"] == "linf:0.1")
    assert f"{down4(robust)}" in failure.get("message") and "0.9900" in failure.get("message")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert float(props["clean_accuracy"]) == pytest.approx(report["summary"]["clean_accuracy"], abs=1e-6)
    assert props["model_sha256"] == report["model"]["sha256"]
    assert float(props["indicator_score"]) == report["summary"]["indicator"]["score"]  # at full precision (docs/ci.md)


def test_markdown_summary_has_the_key_figures(ci_base: CiScan) -> None:
    text = ci_base.markdown.read_text(encoding="utf-8")
    report = load_json(ci_base.json)
    assert text.startswith("## robaudit: ❌ gate failed: 1 of 5 checks missed")
    assert f"| clean accuracy | {pct(report['summary']['clean_accuracy'])} |" in text
    for t in report["summary"]["threats"]:
        assert f"| robust accuracy `{t['threat']}` | {pct(t['robust_accuracy'])} |" in text
    certified = report["summary"]["certificate"]["certified_accuracy"]["l2:0.5"]
    assert f"| certified accuracy `l2:0.5` | {pct(certified)} |" in text
    assert f"| indicator score | {report['summary']['indicator']['score']:.3f} |" in text
    assert "### Gate" in text and text.count("❌ **FAIL**") == 1 and text.count("✅ pass") == 4
    assert "`robust_accuracy[linf:0.1]=0.99`" in text
    for section in ("### Threats", "Attack breakdown", "`apgd-ce`", "### Robust accuracy against radius", "### Certified L2 radii", "### Decision-surface indicator"):
        assert section in text, section


def test_html_is_one_self_contained_file_with_its_plots(ci_base: CiScan) -> None:
    page = ci_base.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing is fetched from anywhere: every src/href is a data URI, no stylesheet or script links
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.IGNORECASE)
    assert all(link.startswith("data:") for link in links), links
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert "<style>" in page and "<svg" in page  # inline CSS and the accuracy bars
    report = load_json(ci_base.json)
    assert pct(report["summary"]["clean_accuracy"]) in page and "gate failed" in page
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the plots are inline SVG")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # the curve and every surface slice that --plots wrote
    assert len(uris) == len(report["plots"]) >= 2
    for uri in uris:
        assert base64.b64decode(uri, validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_command_renders_the_same_files_from_the_json(ci_base: CiScan, tmp_path) -> None:
    out = {suffix: tmp_path / f"again.{suffix}" for suffix in ("xml", "md", "html")}
    result = run_cli("report", ci_base.json, "--junit", out["xml"], "--markdown", out["md"], "--html", out["html"], "-q")
    assert result.code == 0, result.stderr
    # the renderers read only the report: the saved JSON gives the very same files
    assert out["xml"].read_text() == ci_base.junit.read_text()
    assert out["md"].read_text() == ci_base.markdown.read_text()
    assert out["html"].read_text() == ci_base.html.read_text()
    assert_one_line_error(run_cli("report", ci_base.json, "--html", ci_base.json), "one of the command's inputs")


def test_gate_from_toml_with_baseline_passes_with_exit_0(ci_base: CiScan, model_files: ModelFiles, tmp_path) -> None:
    shutil.copy(ci_base.json, tmp_path / "baseline.json")
    config = tmp_path / "audit.toml"
    config.write_text(
        CI_ATTACKS
        + '\n[gate]\nbaseline = "baseline.json"\nmin = { "robust_accuracy[linf:0.1]" = 0.05 }\n'
        + '[gate.max_drop]\n"robust_accuracy[linf:0.1]" = { absolute = 0.0, relative = 0.0 }\nrobust_accuracy = 0.01\n'
    )
    junit = tmp_path / "gate.xml"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "--config", config,
        "--no-certify", "--no-indicator", "--junit", junit, "--json", tmp_path / "r.json", "-q",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "gate failed" not in result.stderr
    gate = load_json(tmp_path / "r.json")["gate"]
    assert [c["kind"] for c in gate] == ["minimum", "max_drop_absolute", "max_drop_relative", "max_drop_absolute", "max_drop_absolute"]
    assert {c["metric"] for c in gate if c["expression"] == "robust_accuracy=0.01"} == {"robust_accuracy[linf:0.1]", "robust_accuracy[l2:0.5]"}
    assert all(c["passed"] and c["baseline"] == c["value"] for c in gate[1:])  # same model, data and seed: no drop at all
    suite = validate_junit(junit).find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("5", "0")


def test_drop_beyond_max_drop_flag_exits_1(ci_base: CiScan, ci_degraded: CiScan) -> None:
    result = ci_degraded.result
    base, new = load_json(ci_base.json), load_json(ci_degraded.json)
    before = next(t["robust_accuracy"] for t in base["summary"]["threats"] if t["threat"] == "linf:0.1")
    after = next(t["robust_accuracy"] for t in new["summary"]["threats"] if t["threat"] == "linf:0.1")
    assert after < before, "the degraded model should be less robust"
    assert result.code == 1, result.stderr
    said = f"dropped {down4(before - after)} from {down4(before)} to {down4(after)}"
    assert f"gate failed: robust_accuracy[linf:0.1] {said}" in result.stderr
    [check] = new["gate"]
    assert check["kind"] == "max_drop_absolute" and check["baseline"] == before and check["value"] == after
    assert new["config"]["baseline"] == str(ci_base.json) and new["config"]["max_drop"] == ["robust_accuracy[linf:0.1]=0"]
    suite = validate_junit(ci_degraded.junit).find("testsuite")
    [case] = suite.findall("testcase")
    assert case.get("classname") == "robaudit.gate.max_drop" and case.find("failure") is not None


@pytest.mark.parametrize(
    ("args", "toml", "fragment"),
    [
        (("--max-drop", "robust_accuracy[linf:0.1]=0.02"), None, "needs a baseline report"),
        (("--max-drop", "clean_accuracy=150%", "--baseline", "BASE"), None, "between 0 and 1"),
        (("--fail-under", "certified_accuracy[linf:0.1]=0.2"), None, "L2 threats only"),
        ((), '[gate]\nminimum = { clean_accuracy = 0.9 }\n', "unknown key(s) in [gate]: minimum"),
        ((), '[gate.max_drop]\n"robust_accuracy[linf:0.1]" = { absolute = 0.02, relativ = 0.1 }\n', "unknown key(s) relativ"),
        (("--seed", "5", "--max-drop", "clean_accuracy=0.1", "--baseline", "BASE"), None, "scanned on different data"),
    ],
)
def test_gate_mistakes_are_one_line_usage_errors(
    ci_base: CiScan, model_files: ModelFiles, tmp_path, args: tuple[str, ...], toml: str | None, fragment: str
) -> None:
    args = tuple(str(ci_base.json) if a == "BASE" else a for a in args)
    extra: tuple[str | Path, ...] = ()
    if toml is not None:
        config = tmp_path / "audit.toml"
        config.write_text(toml)
        extra = ("--config", config)
    result = run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "-t", "linf:0.1", *args, *extra)
    assert_one_line_error(result, fragment)


def test_gates_find_a_threat_by_the_name_the_report_gives_it(model_files: ModelFiles, tmp_path) -> None:
    """8/255 is `l2:0.0313725` in the report, 1.6e-6 of eps away: a gate may name the threat either way."""
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "10", "-t", "l2:8/255", "--preset", "quick",
        "--steps", "2", "--certify", "--certify-budget", "fast", "--no-indicator", "--json", out, "-q",
        "--fail-under", "certified_accuracy[l2:8/255]=0", "--fail-under", "robust_accuracy[l2:0.0313725]=0",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert [c["passed"] for c in load_json(out)["gate"]] == [True, True]
    compared = run_cli("compare", out, out, "--max-drop", "certified_accuracy[l2:0.0313725]=0", "--max-drop",
                       "robust_accuracy[l2:8/255]=0", "-q")
    assert compared.code == 0, compared.stderr


def _edited(source: Path, target: Path, edit) -> Path:
    import json

    raw = json.loads(source.read_text())
    edit(raw)
    target.write_text(json.dumps(raw))
    return target


def _lie_about_gate(raw: dict) -> None:
    failed = next(c for c in raw["gate"] if not c["passed"])
    failed["passed"] = True


def _duplicate_sample(raw: dict) -> None:
    raw["samples"][1] = raw["samples"][0]


def _certified_accuracy_off_by_a_tenth(raw: dict) -> None:
    table = raw["summary"]["certificate"]["certified_accuracy"]
    key = next(iter(table))
    table[key] = table[key] + 0.1 if table[key] < 0.9 else table[key] - 0.1


def _radius_beyond_its_adversarial_example(raw: dict) -> None:
    sample = next(s for s in raw["samples"] if s["adversarial_l2"] is not None and s["label"] == s["clean_pred"])
    sample["certified_l2"] = 2 * sample["adversarial_l2"]


def _certificate_unavailable_with_figures(raw: dict) -> None:
    raw["summary"]["certificate"].update(available=False, reason="certificate unavailable: x")
    for sample in raw["samples"]:
        sample["certified_l2"] = sample["certified_method"] = None


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_lie_about_gate, "says passed=True for value"),
        (lambda r: r["summary"]["threats"][0].update(robust_accuracy=7.0), "is not a fraction in [0, 1]"),
        (lambda r: r["summary"]["threats"][0].update(robust_accuracy=r["summary"]["threats"][0]["robust_accuracy"] + 0.1),
         "differs from its samples'"),
        (lambda r: r["summary"].update(clean_accuracy="0.9"), "summary.clean_accuracy is str '0.9', not a number"),
        (lambda r: r["summary"]["threats"][0].update(per_class=[1.0]), "per_class is list, not an object"),
        (lambda r: r.update(timing="fast"), "timing is str, not an object"),
        (lambda r: r["gate"][0].update(value="x"), "gate[0].value is str 'x', not a number"),
        (lambda r: r["samples"][0].pop("label"), "samples[0].label"),
        (_duplicate_sample, "each once, in order"),
        # the certificate's figures are checked against the samples as the accuracies are (a CLI review found none)
        (_certified_accuracy_off_by_a_tenth, "differs from its samples'"),
        (lambda r: r["samples"][0].update(certified_l2=-0.5), "is not a radius"),
        (lambda r: r["samples"][0].update(certified_method="bogus"), "certified_method 'bogus' is none of"),
        (_radius_beyond_its_adversarial_example, "exceeds its adversarial example's distance"),
        (lambda r: r["summary"]["certificate"]["methods"].update(crown=99), "methods"),
        (lambda r: r["summary"]["certificate"]["certified_accuracy"].update({"linf:0.1": 0.0}), "not an L2 threat"),
        (_certificate_unavailable_with_figures, "unavailable but gives figures"),
    ],
)
def test_hand_edited_reports_are_refused_not_rendered(ci_base: CiScan, tmp_path, edit, fragment: str) -> None:
    """`report`, `compare` and `--baseline` read only what a scan could have written: one line, exit 2, no exit 3."""
    bad = _edited(ci_base.json, tmp_path / "bad.json", edit)
    assert_one_line_error(run_cli("report", bad, "--junit", tmp_path / "o.xml", "-q"), fragment)
    assert_one_line_error(run_cli("compare", ci_base.json, bad, "-q"), fragment)


def test_keys_a_later_minor_version_adds_are_ignored(ci_base: CiScan, tmp_path) -> None:
    def add(raw: dict) -> None:
        raw["new_top"] = 1
        raw["summary"]["threats"][0]["new_key"] = [1]
        raw["samples"][0]["threats"][raw["summary"]["threats"][0]["threat"]]["new_key"] = "x"
        raw["gate"][0]["new_key"] = None

    newer = _edited(ci_base.json, tmp_path / "newer.json", add)
    result = run_cli("report", newer, "--markdown", tmp_path / "o.md", "-q")
    assert result.code == 0, result.stderr
    assert (tmp_path / "o.md").read_text() == ci_base.markdown.read_text()


def test_every_renderer_rounds_the_indicator_score_and_the_curve_radii_down(ci_base: CiScan) -> None:
    """A score of 1.23386 read 1.234 beside a gate that failed it at 1.234; a curve radius of 0.15065 read 0.151."""
    import io

    from rich.console import Console

    from robaudit.report.html import render_html
    from robaudit.report.junit import render_junit
    from robaudit.report.markdown import render_markdown
    from robaudit.report.schema import read_report
    from robaudit.report.terminal import render

    report = read_report(ci_base.json)
    assert report.summary.indicator and report.summary.curves
    report.summary.indicator["score"] = 1.2338625609617275
    report.summary.curves[0].eps[0] = 0.15065
    out = io.StringIO()
    render(report, Console(file=out, width=400, color_system=None))
    texts = {"terminal": out.getvalue(), "markdown": render_markdown(report), "html": render_html(report),
             "junit": render_junit(report)}  # fmt: skip
    for name, text in texts.items():
        assert "1.233" in text and "1.234" not in text, name
    for name in ("terminal", "markdown"):
        assert "0.15:" in texts[name] and "0.151" not in texts[name], name
