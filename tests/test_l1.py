"""L1 threats: the projection and the sparse step the fixed-radius attacks use, and a real scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robaudit.attacks.base import AttackContext, normalized_step, project, random_start
from robaudit.threats import Threat, perturbation_norms
from tests.conftest import REPO, run_cli

DEMO = REPO / "robaudit" / "demo" / "digits_cnn.onnx"


@pytest.mark.parametrize("seed", range(5))
def test_l1_projection_and_start_stay_in_the_ball_and_the_box(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    threat = Threat(norm="l1", eps=3.0)
    far = x + 4 * torch.randn(x.shape, generator=gen)
    inside = project(far, x, threat, 0.0, 1.0)
    assert bool((perturbation_norms(inside - x, "l1") <= 3.0 + 1e-5).all())
    assert float(inside.min()) >= 0.0 and float(inside.max()) <= 1.0
    near = x + 1e-3 * torch.randn(x.shape, generator=gen)  # already inside: unchanged (up to the box)
    assert torch.allclose(project(near, x, threat, -1.0, 2.0), near)
    ctx = AttackContext(lower=0.0, upper=1.0, num_classes=10, generator=gen)
    start = random_start(x, threat, ctx)
    assert bool((perturbation_norms(start - x, "l1") <= 3.0 + 1e-5).all())


def test_the_l1_step_is_sparse_with_unit_l1_norm() -> None:
    grad = torch.randn(4, 1, 20, 20)
    step = normalized_step(grad, "l1")
    assert torch.allclose(step.flatten(1).abs().sum(dim=1), torch.ones(4))
    assert int((step[0] != 0).sum()) == 20  # 5% of 400 coordinates
    assert bool((step.sign() * grad.sign() >= 0).all())


def test_an_l1_scan_runs_end_to_end_and_gradient_attacks_break_points(tmp_path: Path) -> None:
    config = tmp_path / "l1.toml"
    config.write_text('threats = ["l1:2"]\n[[attacks]]\nattack = "apgd-ce"\nsteps = 100\n[[attacks]]\nattack = "apgd-t"\nsteps = 100\n')
    out = tmp_path / "r.json"
    result = run_cli("scan", DEMO, "--n", "24", "--config", config, "-q", "--json", out)
    assert result.code == 0, result.stderr
    report = json.loads(out.read_text())
    threat = report["summary"]["threats"][0]
    assert threat["threat"] == "l1:2" and threat["robust_accuracy"] < 0.5 * report["summary"]["clean_accuracy"]
    broken = [s["threats"]["l1:2"] for s in report["samples"] if s["threats"]["l1:2"]["broken_by"]]
    assert broken and all(0 < b["distance"] <= 2.0 + 1e-6 for b in broken)
    checks = {c["name"]: c["verdict"] for c in report["summary"]["diagnostics"]["checks"]}
    assert checks["unbounded"] == "pass"
