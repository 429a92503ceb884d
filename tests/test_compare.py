"""`robaudit compare` on reports made by real scans: a trained CNN and a deliberately degraded copy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import CiScan, ModelFiles, assert_one_line_error, load_json, run_cli
from test_ci_outputs import validate_junit


def robust(report: dict, threat: str) -> float:
    return next(t["robust_accuracy"] for t in report["summary"]["threats"] if t["threat"] == threat)


def flips(base: dict, new: dict, threat: str) -> tuple[list[int], list[int]]:
    """Robust -> broken and broken -> robust, by sample index, computed straight from the two JSON files."""
    before = {s["index"]: s["threats"][threat]["robust"] for s in base["samples"]}
    lost = [s["index"] for s in new["samples"] if before[s["index"]] and not s["threats"][threat]["robust"]]
    won = [s["index"] for s in new["samples"] if not before[s["index"]] and s["threats"][threat]["robust"]]
    return lost, won


def test_deltas_and_flipped_samples(ci_base: CiScan, ci_degraded: CiScan, tmp_path) -> None:
    out, md = tmp_path / "diff.json", tmp_path / "diff.md"
    result = run_cli("compare", ci_base.json, ci_degraded.json, "--json", out, "--markdown", md)
    assert result.code == 0, result.stderr  # no allowed drop was given: a report, not a gate
    base, new, diff = load_json(ci_base.json), load_json(ci_degraded.json), load_json(out)
    metrics = {m["key"]: m for m in diff["metrics"]}
    expected = {
        "clean_accuracy": (base["summary"]["clean_accuracy"], new["summary"]["clean_accuracy"]),
        "robust_accuracy[linf:0.1]": (robust(base, "linf:0.1"), robust(new, "linf:0.1")),
        "robust_accuracy[l2:0.5]": (robust(base, "l2:0.5"), robust(new, "l2:0.5")),
        "certified_accuracy[l2:0.5]": tuple(r["summary"]["certificate"]["certified_accuracy"]["l2:0.5"] for r in (base, new)),
        "indicator_score": (base["summary"]["indicator"]["score"], new["summary"]["indicator"]["score"]),
        "forward_passes_per_sample": (base["summary"]["forward_passes_per_sample"], new["summary"]["forward_passes_per_sample"]),
    }
    for key, (b, n) in expected.items():
        assert (metrics[key]["base"], metrics[key]["new"]) == (b, n), key
        assert metrics[key]["delta"] == pytest.approx(n - b, abs=1e-12), key
    assert metrics["robust_accuracy[linf:0.1]"]["delta"] < 0
    for threat in ("linf:0.1", "l2:0.5"):
        lost, won = flips(base, new, threat)
        assert [f["index"] for f in diff["flipped"][threat]] == lost
        assert diff["fixed"][threat] == won
        by_index = {s["index"]: s for s in new["samples"]}
        for f in diff["flipped"][threat]:
            assert f["broken_by"] == by_index[f["index"]]["threats"][threat]["broken_by"]
    lost, _ = flips(base, new, "linf:0.1")
    assert lost, "the degraded model should lose some robust samples"
    # the table names the flipped samples by index; the Markdown lists them too
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ linf:0.1"))
    assert f"{lost[0]} (" in row
    text = md.read_text(encoding="utf-8")
    assert "### Samples that flipped from robust to broken" in text and f"{lost[0]} (" in text
    delta = metrics["robust_accuracy[linf:0.1]"]["delta"]
    down = lambda v: f"{math.floor(1000 * v + 1e-9) / 10:.1f}%"  # noqa: E731 - figures are rounded down
    assert f"| robust accuracy linf:0.1 | {down(robust(base, 'linf:0.1'))} | {down(robust(new, 'linf:0.1'))} | {100 * delta:+.1f} pp |" in text
    assert diff["notes"] == [] and diff["mismatch"] == [] and diff["passed"] is True


def test_regression_beyond_the_allowed_drop_exits_1(ci_base: CiScan, ci_degraded: CiScan, tmp_path) -> None:
    drop = robust(load_json(ci_base.json), "linf:0.1") - robust(load_json(ci_degraded.json), "linf:0.1")
    assert drop > 0
    pair = (ci_base.json, ci_degraded.json)
    tight = run_cli("compare", *pair, "--max-drop", f"robust_accuracy[linf:0.1]={drop / 2}", "-q", "--junit", tmp_path / "c.xml")
    assert tight.code == 1, tight.stderr
    assert "gate failed: robust_accuracy[linf:0.1] dropped" in tight.stderr and "Traceback" not in tight.stderr
    suite = validate_junit(tmp_path / "c.xml").find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    loose = run_cli("compare", *pair, "--max-drop", f"robust_accuracy[linf:0.1]={drop + 0.01}", "-q")
    assert loose.code == 0, loose.stderr
    # relative limits from [gate.max_drop]: allowed a fraction of the base value
    base_value = robust(load_json(ci_base.json), "linf:0.1")
    config = tmp_path / "audit.toml"
    config.write_text(f'[gate.max_drop]\n"robust_accuracy[linf:8/80]" = {{ relative = {0.5 * drop / base_value} }}\n')
    assert run_cli("compare", *pair, "--config", config, "-q").code == 1
    config.write_text(f'[gate.max_drop]\n"robust_accuracy[linf:8/80]" = {{ relative = {min(1.0, 1.5 * drop / base_value)} }}\n')
    assert run_cli("compare", *pair, "--config", config, "-q").code == 0


def test_same_report_compares_clean(ci_base: CiScan, tmp_path) -> None:
    out = tmp_path / "same.json"
    result = run_cli("compare", ci_base.json, ci_base.json, "--max-drop", "robust_accuracy=0", "--json", out, "-q")
    assert result.code == 0, result.stderr
    diff = load_json(out)
    assert all(m["delta"] == 0 for m in diff["metrics"])
    assert all(not v for v in diff["flipped"].values()) and len(diff["gate"]) == 2
    assert "same model file" in diff["notes"][0]


def test_different_data_or_threats_are_refused_without_force(ci_base: CiScan, model_files: ModelFiles, tmp_path) -> None:
    other = tmp_path / "seed1.json"
    scanned = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "--seed", "1", "-t", "linf:0.1",
        "--preset", "quick", "--steps", "3", "--no-certify", "--no-indicator", "--json", other, "-q",
    )  # fmt: skip
    assert scanned.code == 0, scanned.stderr
    refused = run_cli("compare", ci_base.json, other)
    assert_one_line_error(refused, "refusing to compare")
    assert "seed 0 vs 1" in refused.stderr and "only in base: l2:0.5" in refused.stderr and "--force" in refused.stderr
    out = tmp_path / "forced.json"
    forced = run_cli("compare", ci_base.json, other, "--force", "--json", out)
    assert forced.code == 0, forced.stderr
    diff = load_json(out)
    assert any("seed 0 vs 1" in m for m in diff["mismatch"]) and "compared with --force" in forced.stdout
    assert list(diff["flipped"]) == ["linf:0.1"]
    assert any("attack batteries differ" in n for n in diff["notes"])


def test_bad_inputs_are_one_line_errors(ci_base: CiScan, tmp_path) -> None:
    assert_one_line_error(run_cli("compare", ci_base.json, tmp_path / "missing.json"), "does not exist")
    assert_one_line_error(run_cli("compare", ci_base.json, ci_base.json, "--max-drop", "robust_accuracy[l2:9]=0.1"), "has no threat l2:9")
    assert_one_line_error(run_cli("compare", ci_base.json, ci_base.json, "--max-drop", "clean_accuracy>0.1"), "must look like")
    assert_one_line_error(run_cli("compare", ci_base.json, ci_base.json, "--json", ci_base.json), "one of the command's inputs")
    # hunt 19: an absolute accuracy drop above 1 is a gate that cannot fail
    assert_one_line_error(run_cli("compare", ci_base.json, ci_base.json, "--max-drop", "robust_accuracy=2"), "5% is written 0.05")
    two = tmp_path / "two.toml"
    two.write_text('[gate.max_drop]\n"robust_accuracy[linf:0.1]" = 2\n')
    assert_one_line_error(run_cli("compare", ci_base.json, ci_base.json, "--config", two), "its absolute drop must too")
    no_gate = tmp_path / "audit.toml"
    no_gate.write_text('threats = ["linf:0.1"]\n')
    assert_one_line_error(run_cli("compare", ci_base.json, ci_base.json, "--config", no_gate), "has no [gate] table")
    assert json.loads(Path(ci_base.json).read_text())["schema_version"] == "1.6"


def test_reports_on_other_pixels_with_the_same_name_indices_and_labels_are_not_compared(
    model_files: ModelFiles, tmp_path
) -> None:
    """A flipped copy of the images under the same file name: refused by compare and by --baseline (data.sha256)."""
    import numpy as np

    source = np.load(model_files.data_npz)
    other = tmp_path / "other" / model_files.data_npz.name
    other.parent.mkdir()
    np.savez(other, x=source["x"][..., ::-1, :].copy(), y=source["y"])
    fast = ("--n", "10", "-t", "linf:0.1", "--preset", "quick", "--steps", "2", "--no-certify", "--no-indicator", "-q")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli("scan", model_files.onnx, "--data", model_files.data_npz, *fast, "--json", a).code == 0
    assert run_cli("scan", model_files.onnx, "--data", other, *fast, "--json", b).code == 0
    assert load_json(a)["data"]["sha256"] != load_json(b)["data"]["sha256"]
    assert_one_line_error(run_cli("compare", a, b, "-q"), "pixels differ at the same indices and labels")
    assert_one_line_error(
        run_cli("scan", model_files.onnx, "--data", other, *fast, "--baseline", a, "--max-drop", "clean_accuracy=0"),
        "pixels differ at the same indices and labels",
    )
    assert run_cli("compare", a, a, "-q").code == 0


def _without_certificate(report: Path, target: Path, reason: str | None) -> Path:
    """A copy of `report` whose scan got no certificate: unavailable for `reason`, or not run (None)."""
    data = load_json(report)
    cert = data["summary"]["certificate"]
    data["summary"]["certificate"] = None if reason is None else {
        **cert, "available": False, "reason": reason, "certified_accuracy": {}, "radius_quantiles": {},
        "median_ratio": None, "ratio_samples": 0, "methods": {}, "notes": [],
    }  # fmt: skip
    for sample in data["samples"]:
        sample["certified_l2"], sample["certified_method"] = None, None
    target.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("reason", ["certificate unavailable: net.Erf: OnnxErf", None], ids=["unavailable", "not-run"])
def test_a_certified_drop_rule_fails_when_the_new_report_has_no_certificate(ci_base: CiScan, tmp_path, reason) -> None:
    """A model change that loses its certificate fails the drop rule (exit 1, outputs written, the reason given), as
    `scan --baseline` does; it was an input error (exit 2) with no output. A base without it is still an input error."""
    new = _without_certificate(ci_base.json, tmp_path / "new.json", reason)
    junit, out = tmp_path / "cmp.xml", tmp_path / "cmp.json"
    rule = "certified_accuracy[l2:0.5]=0.1"
    result = run_cli("compare", ci_base.json, new, "--max-drop", rule, "--junit", junit, "--json", out)
    assert result.code == 1, (result.stdout, result.stderr)
    why = reason or "its scan ran no certificate"
    assert why in " ".join(result.stdout.split()), result.stdout
    assert junit.exists() and why in junit.read_text()
    (check,) = [c for c in load_json(out)["gate"] if c["metric"] == "certified_accuracy[l2:0.5]"]
    assert check["passed"] is False and check["value"] is None
    assert_one_line_error(run_cli("compare", new, ci_base.json, "--max-drop", rule), f"has no certified_accuracy[l2:0.5] ({why})")


def test_certificate_budgets_that_differ_are_noted(ci_base: CiScan, tmp_path) -> None:
    """A CLI review: certified accuracy fell from 56% to 0% between budgets default and fast with no word of why."""
    data = load_json(ci_base.json)
    data["summary"]["certificate"]["budget"] = "tight"
    other = tmp_path / "tight.json"
    other.write_text(json.dumps(data))
    out = tmp_path / "cmp.json"
    result = run_cli("compare", ci_base.json, other, "--json", out, "-q")
    assert result.code == 0, result.stderr
    assert any("certificate budgets differ (base: fast; new: tight)" in n for n in load_json(out)["notes"])
    same = tmp_path / "same.json"
    assert run_cli("compare", ci_base.json, ci_base.json, "--json", same, "-q").code == 0
    assert not any("budgets" in n for n in load_json(same)["notes"])
