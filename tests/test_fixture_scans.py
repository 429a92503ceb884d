"""End-to-end scans of the third-party ONNX models in ../shared/fixtures (slow marker).

CI runs these with few PGD steps, and the verified instances at two radii per model
(those with most instances); `ROBAUDIT_FIXTURE_STEPS=100 ROBAUDIT_FIXTURE_ALL_EPS=1 pytest -m slow`
runs them as a stronger check. They skip cleanly when the fixtures folder is absent.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import fixtures_dir, load_json, run_cli, sha256

STEPS = os.environ.get("ROBAUDIT_FIXTURE_STEPS", "5")
ALL_EPS = bool(os.environ.get("ROBAUDIT_FIXTURE_ALL_EPS"))  # one scan per radius
MODELS = [
    "mnistfc_256x2",
    "verivital_convnet_maxpool",
    "verivital_convnet_avgpool",
    "eran_mnist_relu_9_200",
    "colt_mnist_0.1",
    "oval21_cifar_base_kw",
    "cifar10_resnet_2b",
]


def _manifest() -> dict:
    return json.loads((fixtures_dir() / "manifest.json").read_text())["models"]


def _norm_flags(entry: dict) -> list[str]:
    if entry["mean"] == [0.0] and entry["std"] == [1.0]:
        return []
    return ["--mean", ",".join(map(str, entry["mean"])), "--std", ",".join(map(str, entry["std"]))]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fixture_model_scans_with_its_images(name: str, tmp_path) -> None:
    root = fixtures_dir()
    entry = _manifest()[name]
    model = root / entry["file"]
    data = root / "data" / ("mnist_test_first100.npz" if entry["dataset"] == "MNIST" else "cifar10_test_first100.npz")
    before = sha256(model), sha256(data)
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model, "--data", data, "--threat", "linf:1/255", "--preset", "quick", "--steps", STEPS, "--json", out, "--quiet",
        *_norm_flags(entry),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    assert report["summary"]["clean_accuracy"] == pytest.approx(entry["clean_accuracy_first100"])
    assert report["model"]["input_shape"] == entry["input_shape"][1:]
    assert report["data"]["n"] == 100
    assert (sha256(model), sha256(data)) == before
    if entry["layout"] == "flat":
        assert any("reshape" in note for note in report["model"]["notes"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnistfc_256x2", "verivital_convnet_maxpool", "oval21_cifar_base_kw"])
def test_no_attack_breaks_a_verified_instance(name: str, tmp_path) -> None:
    """Instances proved robust by verifiers (`holds`) must never be reported broken."""
    root = fixtures_dir()
    entry = _manifest()[name]
    instances = np.load(root / "vnncomp" / f"{name}.npz")
    holds = instances["verdict"] == "holds"
    radii = instances["eps"][holds]
    order = sorted(set(radii.tolist()), key=lambda e: ((radii == e).sum(), e))  # most instances, then largest, last
    for eps in order if ALL_EPS else order[-2:]:
        pick = holds & (instances["eps"] == eps)
        data = tmp_path / f"holds_{eps}.npz"
        np.savez(data, x=instances["x"][pick], y=instances["y"][pick])
        out = tmp_path / f"r_{eps}.json"
        result = run_cli(
            "scan", root / entry["file"], "--data", data, "--threat", f"linf:{eps!r}", "--preset", "quick", "--steps", STEPS,
            "--restarts", "2", "--json", out, "--quiet", *_norm_flags(entry),
        )  # fmt: skip
        assert result.code == 0, result.stderr
        report = load_json(out)
        assert report["summary"]["clean_accuracy"] == 1.0
        assert report["summary"]["threats"][0]["robust_accuracy"] == 1.0
