"""The Python API, `robaudit.audit`: in-memory modules and tensors as well as files, and the
same report the CLI prints for the same settings (the CLI holds no scan policy of its own)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import robaudit
from robaudit.errors import RobauditError
from tests.conftest import bundled_digits, demo_classifier, run_cli

N = 16
SETTINGS = dict(threats=["linf:8/255", "l2:0.5"], preset="quick", n=N, checks=False, certify=True, indicator=False,
                certify_budget="fast")


def _data() -> tuple[np.ndarray, np.ndarray]:
    x, y = bundled_digits()
    return x[:64], y[:64]


def _same_results(a: dict, b: dict) -> None:
    """Per-sample results and the summary, apart from where the model came from."""
    assert a["samples"] == b["samples"]
    assert a["summary"] == b["summary"]


def test_audit_takes_a_module_and_arrays_and_leaves_them_unchanged() -> None:
    module = demo_classifier().train().requires_grad_(True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x, y = _data()
    x_before = x.copy()
    report = robaudit.audit(module, (x, y), **SETTINGS)
    assert report.data.n == N and report.model.format == "module"
    assert report.model.path.startswith("<torch.nn.Module ")
    assert 0.0 <= report.summary.threats[0].robust_accuracy <= report.summary.clean_accuracy
    assert report.summary.certificate is not None and report.summary.certificate.available
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert np.array_equal(x, x_before)


def test_audit_and_the_cli_give_the_same_report(tmp_path: Path) -> None:
    module = demo_classifier()
    x, y = _data()
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    scripted = tmp_path / "model.pt"
    torch.jit.trace(module, torch.rand(2, *x.shape[1:])).save(str(scripted))

    from_api = robaudit.audit(scripted, data, **SETTINGS).to_dict()
    out = tmp_path / "cli.json"
    result = run_cli("scan", scripted, "--data", data, "--threat", "linf:8/255", "--threat", "l2:0.5", "--preset", "quick",
                     "--n", str(N), "--no-checks", "--certify", "--certify-budget", "fast", "--no-indicator", "-q",
                     "--json", out)  # fmt: skip
    assert result.code == 0, result.stderr
    _same_results(from_api, json.loads(out.read_text()))
    # and an in-memory module gives the results its saved file gives
    _same_results(robaudit.audit(module, (x, y), **SETTINGS).to_dict(), from_api)


def test_a_gate_on_the_certificate_turns_it_on_in_the_api_too() -> None:
    x, y = _data()
    report = robaudit.audit(demo_classifier(), (x, y), threats=["l2:0.5"], preset="quick", n=8, checks=False,
                            certify_budget="fast", fail_under=["certified_accuracy[l2:0.5]=0.0"])  # fmt: skip
    assert report.summary.certificate is not None and report.summary.certificate.available
    assert [c.passed for c in report.gate] == [True]


def test_an_audit_notes_classes_the_data_never_uses() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12)).eval()
    x, y = _data()
    report = robaudit.audit(model, (x, y), threats=["linf:8/255"], preset="quick", n=8, checks=False, indicator=False)
    top = int(y.max())
    assert f"the model scores 12 classes and the data's labels run 0 to {top}" in " ".join(report.data.notes)
    assert not any("scores" in n for n in robaudit.audit(demo_classifier(), (x, y), threats=["linf:8/255"],
                                                          preset="quick", n=8, checks=False, indicator=False).data.notes)


def test_the_report_is_written_to_a_path_given_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md writes `report.write_json("report.json")` (hunt 19: AttributeError on a str)."""
    x, y = _data()
    report = robaudit.audit(demo_classifier(), (x, y), preset="quick", n=4, checks=False, certify=False, indicator=False)
    monkeypatch.chdir(tmp_path)
    report.write_json("report.json")
    assert json.loads((tmp_path / "report.json").read_text())["summary"] == report.to_dict()["summary"]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(threats=["l3:1"]), "l3"),
        (dict(preset="strongest"), "preset"),
        (dict(bogus=1), "unknown audit setting"),
        (dict(data=(np.zeros((4, 1, 8, 8)),)), "pair"),
    ],
)
def test_bad_api_input_is_a_one_sentence_error(kwargs: dict, fragment: str) -> None:
    data = kwargs.pop("data", _data())
    with pytest.raises(RobauditError, match=fragment):
        robaudit.audit(demo_classifier(), data, n=4, checks=False, **kwargs)


def test_every_key_of_the_json_report_is_in_its_documented_schema() -> None:
    """docs/report-schema.md is the contract CI scripts read: hunt 19 found seven config keys it left out."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "report-schema.md").read_text()
    x, y = _data()
    report = robaudit.audit(demo_classifier(), (x, y), threats=["linf:8/255", "l2:0.5"], preset="quick", n=8,
                            certify=True, indicator=True, certify_budget="fast").to_dict()  # fmt: skip
    summary, sample = report["summary"], report["samples"][0]
    parts = {
        "report": report, "config": report["config"], "config.attacks": report["config"]["attacks"][0],
        "model": report["model"], "data": report["data"], "timing": report["timing"], "summary": summary,
        "summary.threats": summary["threats"][0], "certificate": summary["certificate"], "indicator": summary["indicator"],
        "diagnostics": summary["diagnostics"], "sample": sample, "sample.indicator": sample["indicator"],
    }  # fmt: skip
    missing = {where: [k for k in keys if f"`{k}`" not in doc] for where, keys in parts.items()}
    missing = {where: keys for where, keys in missing.items() if keys}
    assert not missing, f"keys the report has and docs/report-schema.md does not name: {missing}"
    assert all(f"`threats[t].{k}`" in doc for k in sample["threats"]["l2:0.5"])
