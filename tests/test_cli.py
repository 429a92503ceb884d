"""End-to-end: the real CLI in a subprocess on real model files that the tests create."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ModelFiles, assert_one_line_error, load_json, run_cli, sha256
from robaudit import __version__
from robaudit.demo import demo_path, digits_cnn

FAST = ("--preset", "quick", "--steps", "10", "--quiet")


def test_version() -> None:
    result = run_cli("--version")
    assert result.code == 0
    assert result.stdout.strip() == f"robaudit {__version__}"


@pytest.mark.parametrize("command", ["scan", "report"])
def test_help_explains_with_examples(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.code == 0
    assert "Example" in result.stdout
    if command == "scan":
        for flag in ("--threat", "--data", "--fail-under", "--mean", "--trust-pickle", "--json"):
            assert flag in result.stdout


@pytest.mark.parametrize("kind", ["onnx", "onnx_batch1", "torchscript", "export", "safetensors"])
def test_scan_each_format_matches_model_accuracy(model_files: ModelFiles, tmp_path, kind: str) -> None:
    path = getattr(model_files, kind)
    extra = ("--arch", "robaudit.demo:digits_cnn") if kind == "safetensors" else ()
    before = sha256(path), sha256(model_files.data_npz)
    out = tmp_path / "report.json"
    result = run_cli("scan", path, "--data", model_files.data_npz, "--threat", "linf:0.05", *extra, "--json", out, *FAST)
    assert result.code == 0, result.stderr
    report = load_json(out)
    assert report["summary"]["clean_accuracy"] == pytest.approx(model_files.accuracy, abs=1e-12)
    assert [s["clean_pred"] for s in report["samples"]] == model_files.predictions.tolist()
    assert report["model"]["num_classes"] == 10
    assert (sha256(path), sha256(model_files.data_npz)) == before


def test_json_follows_the_contract(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--threat", "linf:8/255", "--threat", "l2:0.5",
        "--n", "50", "--seed", "3", "--json", out, *FAST,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    r = load_json(out)
    for key in ("schema_version", "robaudit_version", "created", "model", "data", "config", "environment", "summary", "samples"):
        assert key in r
    assert set(r["model"]) >= {"path", "format", "sha256", "input_shape", "num_classes"}
    assert r["model"]["format"] == "onnx" and r["model"]["input_shape"] == [1, 8, 8]
    assert r["model"]["sha256"] == sha256(model_files.onnx)
    assert set(r["data"]) >= {"name", "n", "seed", "indices"}
    assert r["data"]["n"] == 50 == len(r["data"]["indices"]) == len(r["samples"])
    assert set(r["environment"]) >= {"python", "torch", "device"}
    threats = r["summary"]["threats"]
    assert [t["threat"] for t in threats] == ["linf:0.0313725", "l2:0.5"]
    names = set()
    for t in threats:
        assert set(t) >= {"threat", "norm", "eps", "robust_accuracy", "attacks"}
        assert 0 <= t["robust_accuracy"] <= r["summary"]["clean_accuracy"]
        ran = list(t["attacks"])  # the battery, then the trust checks' probes (and adaptive attacks, if any)
        assert ran[:2] == ["fgsm", "apgd-ce"] and all(a.startswith(("probe:", "adapt:")) for a in ran[2:])
        names |= set(ran)
        assert list(t["attacks"].values())[-1] == pytest.approx(t["robust_accuracy"])
        assert sum(a["broke"] for a in t["attack_details"]) == sum(
            1 for s in r["samples"] if s["threats"][t["threat"]]["broken_by"]
        )
    for sample in r["samples"]:
        assert set(sample) == {"index", "label", "clean_pred", "threats", "adversarial_l2", "certified_l2", "certified_method", "indicator"}
        for t in threats:
            entry = sample["threats"][t["threat"]]
            assert set(entry) == {"robust", "broken_by", "distance", "transform"}
            if entry["robust"]:
                assert entry["broken_by"] is None and entry["distance"] is None
            elif sample["clean_pred"] == sample["label"]:
                assert entry["broken_by"] in names and 0 < entry["distance"] <= t["eps"] * (1 + 1e-5)
    robust = [sum(s["threats"][t["threat"]]["robust"] for s in r["samples"]) / 50 for t in threats]
    assert robust == [t["robust_accuracy"] for t in threats]


def test_same_seed_same_json(model_files: ModelFiles, tmp_path) -> None:
    reports = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        args = ("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "60", "--seed", "7", "-t", "linf:0.1", "--json", out)
        assert run_cli(*args, *FAST).code == 0
        report = load_json(out)
        report.pop("created")
        report.pop("timing")
        reports.append(report)
    assert reports[0] == reports[1]
    assert 0 < reports[0]["summary"]["threats"][0]["robust_accuracy"] < reports[0]["summary"]["clean_accuracy"]


def test_saved_adversarial_examples_reverify_independently(model_files: ModelFiles, tmp_path) -> None:
    out, adv = tmp_path / "r.json", tmp_path / "adv.npz"
    result = run_cli(
        "scan", model_files.safetensors, "--arch", "robaudit.demo:digits_cnn", "--data", model_files.data_npz,
        "--threat", "linf:0.08", "--threat", "l2:0.6", "--json", out, "--save-adversarial", adv, *FAST,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    model = digits_cnn()
    model.load_state_dict(load_file(model_files.safetensors))
    model.eval()
    data = np.load(model_files.data_npz)
    x_all = torch.from_numpy(data["x"]).float() / 255
    y_all = torch.from_numpy(data["y"]).long()
    saved = np.load(adv)
    for t in report["summary"]["threats"]:
        key = t["threat"]
        x_adv = torch.from_numpy(saved[f"{key}__x"])
        index = torch.from_numpy(saved[f"{key}__index"])
        assert torch.equal(torch.from_numpy(saved[f"{key}__label"]), y_all[index])
        broken = [s["index"] for s in report["samples"] if s["threats"][key]["broken_by"]]
        assert sorted(index.tolist()) == sorted(broken) and len(broken) > 0
        delta = (x_adv - x_all[index]).flatten(1).double()
        size = delta.abs().amax(1) if t["norm"] == "linf" else delta.norm(dim=1)
        assert bool((size <= t["eps"] * (1 + 1e-5) + 1e-6).all())
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        with torch.no_grad():
            assert bool((model(x_adv).argmax(1) != y_all[index]).all())


def test_gate_pass_and_fail(model_files: ModelFiles, tmp_path) -> None:
    common = ("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "40", "--threat", "linf:0.1", *FAST)
    passed = run_cli(*common, "--fail-under", "robust_accuracy[linf:0.1]=0.0", "--fail-under", "clean_accuracy=0.1")
    assert passed.code == 0, passed.stderr
    failed = run_cli(*common, "--fail-under", "robust_accuracy[linf:1/10]=1.0")
    assert failed.code == 1
    assert "gate failed: robust_accuracy[linf:0.1]" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize(
    ("gate", "fragment"),
    [
        ("robust_accuracy[linf:0.3]=0.5", "not scanned"),
        ("robust_accuracy=0.5", "needs a threat"),
        ("accuracy=0.5", "unknown metric"),
        ("clean_accuracy=1.5", "between 0 and 1"),
        ("clean_accuracy>0.5", "must look like"),
    ],
)
def test_bad_gate_expressions_are_usage_errors(model_files: ModelFiles, gate: str, fragment: str) -> None:
    result = run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--threat", "linf:0.1", "--fail-under", gate)
    assert_one_line_error(result, fragment)


def test_report_command_renders_saved_json(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    assert run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "--json", out, *FAST).code == 0
    shown = run_cli("report", out)
    assert shown.code == 0, shown.stderr
    report = load_json(out)
    assert "clean accuracy" in shown.stdout
    assert f"{math.floor(1000 * report['summary']['clean_accuracy'] + 1e-9) / 10:.1f}%" in shown.stdout
    assert "linf:0.0313725" in shown.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(run_cli("report", bad), "not a JSON file")
    assert_one_line_error(run_cli("report", tmp_path / "missing.json"), "does not exist")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert_one_line_error(run_cli("report", other), "not a robaudit report")


def test_demo_main_job_runs() -> None:
    result = run_cli("scan", demo_path(), "--data", "digits")
    assert result.code == 0, result.stderr
    assert "robust accuracy" in result.stdout and "clean accuracy" in result.stdout


def test_standard_preset_reports_curve_per_class_and_distances(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "-t", "linf:0.1", "-t", "l2:0.5",
        "--json", out, "--quiet",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    r = load_json(out)
    assert r["config"]["preset"] == "standard"
    names = ["fmn", "deepfool", "apgd-ce", "apgd-t", "apgd-ce#2", "apgd-t#2", "apgd-ce#3", "apgd-t#3", "apgd-ce#4", "apgd-t#4",
             "apgd-dlr", "fab-t", "square", "spatial-grid"]  # fmt: skip
    assert [a["name"] for a in r["config"]["attacks"]] == names
    assert [a["near"] for a in r["config"]["attacks"]] == [None, None, None, None, 1.5, *[None] * 9]
    assert [a["close"] for a in r["config"]["attacks"]] == [None, None, None, None, None, 0.3, 0.1, 0.1, 0.03, 0.03, 0.03, None, None, None]
    assert {a["name"]: a["norms"] for a in r["config"]["attacks"] if "norms" in a} == {"deepfool": ["l1"], "fab-t": ["l1"]}
    stalled_too = [a["name"] for a in r["config"]["attacks"] if a["close"] is not None and a["stalled"]]
    assert stalled_too == ["apgd-t#2"], "only AutoAttack's other targets also run where the attacks barely moved the margin"
    assert r["config"]["attacks"][5]["params"]["skip_targets"] == 3
    assert "spatial-grid" not in r["summary"]["threats"][0]["attacks"]  # spatial attacks run only under spatial threats
    assert {m["norm"] for m in r["summary"]["minimal_norm"]} == {"linf", "l2"}
    for curve in r["summary"]["curves"]:
        assert curve["robust_accuracy"][0] == r["summary"]["clean_accuracy"]
        assert all(a >= b for a, b in zip(curve["robust_accuracy"], curve["robust_accuracy"][1:]))
        threat = next(t for t in r["summary"]["threats"] if t["norm"] == curve["norm"])
        # the curve at the threat's radius can never claim more robustness than the battery found
        below = [acc for e, acc in zip(curve["eps"], curve["robust_accuracy"]) if e >= threat["eps"]]
        assert below[0] <= threat["robust_accuracy"] + 1e-12
        # nor more than the verified distances of the samples themselves: a sample falls at its smallest one
        names = [t["threat"] for t in r["summary"]["threats"] if t["norm"] == curve["norm"]]
        fall = [
            min([s["threats"][n]["distance"] for n in names if s["threats"][n]["distance"] is not None], default=math.inf)
            if s["clean_pred"] == s["label"] else 0.0 for s in r["samples"]
        ]
        for e, acc in zip(curve["eps"], curve["robust_accuracy"]):
            assert acc <= sum(f > e for f in fall) / len(fall) + 1e-12, (curve["norm"], e)
    for t in r["summary"]["threats"]:
        assert set(t["per_class"]) == {str(c) for c in range(10)} & {str(s["label"]) for s in r["samples"]}
        for c, value in t["per_class"].items():  # exact fractions (float64), never float32's nearest above
            own = [s["threats"][t["threat"]]["robust"] for s in r["samples"] if str(s["label"]) == c]
            assert value == sum(own) / len(own)
        for s in r["samples"]:
            entry = s["threats"][t["threat"]]
            if s["clean_pred"] == s["label"]:
                assert entry["distance"] is not None  # the minimal-norm stage gives every point a distance
                assert (entry["distance"] > t["eps"] * (1 + 1e-5)) == entry["robust"]
    assert r["summary"]["forward_passes_per_sample"] > 0


def test_config_file_and_preset_flags(model_files: ModelFiles, tmp_path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text('threats = ["l2:0.3"]\n[[attacks]]\nattack = "pgd"\nsteps = 5\n[[attacks]]\nattack = "noise"\n')
    out = tmp_path / "r.json"
    no_certify = "--no-certify"  # the config is under test here; the certificate's own tests are in test_certified_scan.py
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "20", "--config", config, "--json", out, "-q", no_certify
    )  # fmt: skip
    assert result.code == 0, result.stderr
    r = load_json(out)
    assert r["config"]["threats"] == ["l2:0.3"] and [a["name"] for a in r["config"]["attacks"]] == ["pgd", "noise"]
    assert r["config"]["attacks"][0]["params"]["steps"] == 5
    flagged = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "20", "--config", config, "--preset", "quick",
        "--restarts", "2", "--step-sizes", "0.1,0.5", "--steps", "3", "--json", out, "-q", no_certify,
    )  # fmt: skip
    assert flagged.code == 0, flagged.stderr
    r = load_json(out)
    assert [a["name"] for a in r["config"]["attacks"]] == [
        "fgsm", "apgd-ce", "spatial-grid", "pgd[step=0.1eps]", "pgd[step=0.5eps]"
    ]
    assert r["config"]["attacks"][1]["restarts"] == 2 and r["config"]["attacks"][1]["params"]["steps"] == 3
    assert_one_line_error(run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--preset", "fast"), "unknown preset")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[attacks]]\nattack = \"carlini\"\n")
    assert_one_line_error(run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--config", bad), "unknown attack")
    # an entry of the user's own list that would run nothing on this 10-class model: refused, not silently skipped
    empty = tmp_path / "empty.toml"
    empty.write_text("[[attacks]]\nattack = \"apgd-t\"\nn_targets = 3\nskip_targets = 9\n")
    assert_one_line_error(
        run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "5", "--config", empty, no_certify),
        "skip_targets 9 leaves no target class to attack on a 10-class model",
    )


def test_image_folder_report_names_each_file(model_files: ModelFiles, tmp_path) -> None:
    """`data.files[i]` is the image behind `samples[i]`: its true class and clean prediction are the file's."""
    from PIL import Image

    with np.load(model_files.data_npz) as stored:
        x, y = stored["x"][:12], stored["y"][:12]  # uint8 pixels
    for i in range(12):
        folder = tmp_path / "imgs" / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].reshape(8, 8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "r.json"
    result = run_cli("scan", model_files.onnx, "--data", tmp_path / "imgs", "--n", "6", *FAST, "--json", out)
    assert result.code in (0, 1), result.stderr
    report = load_json(out)
    net = digits_cnn()
    net.load_state_dict(load_file(model_files.safetensors))
    assert len(report["data"]["files"]) == 6
    for name, sample in zip(report["data"]["files"], report["samples"], strict=True):
        pixels = torch.from_numpy(np.asarray(Image.open(name), dtype=np.float32) / 255)[None, None]
        assert int(name.split("/")[-2]) == sample["label"]
        assert int(net(pixels).argmax()) == sample["clean_pred"]
