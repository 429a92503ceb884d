"""The scan's certificate stage: radii in the report, checked against the scan's own evidence."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ModelFiles, load_json, run_cli
from robaudit.stages.certify import check_radii

CPU = torch.device("cpu")
CHECK = dict(lower=-10.0, upper=10.0, batch_size=64, device=CPU, seed=0)


def two_class_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (0, w.x): the exact L2 distance to the boundary is |w.x| / ||w||."""
    w = torch.tensor([3.0, -4.0])
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(2), w]))
    x = torch.tensor([[1.0, -1.0], [2.0, 0.5], [-1.0, 1.0]])
    with torch.no_grad():
        y = model(x).argmax(1)
    exact = (x @ w).abs().double() / 5.0
    return model, x, y, exact


def test_check_accepts_the_exact_radius() -> None:
    model, x, y, exact = two_class_linear()
    far = torch.full((len(x),), math.inf, dtype=torch.float64)
    assert check_radii(model, x, y, exact * (1 - 1e-6), far, x.clone(), **CHECK) is None


def test_check_refuses_a_radius_beyond_a_verified_adversarial_example() -> None:
    model, x, y, exact = two_class_linear()
    reason = check_radii(model, x, y, exact, exact * 0.9, x.clone(), **CHECK)
    assert reason.startswith("a certified L2 radius exceeds an adversarial distance this scan verified (samples [0, 1, 2])")
    assert "no radius is printed; this is a robaudit bug" in reason


def test_check_refuses_a_radius_that_a_probe_inside_the_ball_breaks() -> None:
    model, x, y, exact = two_class_linear()
    far = torch.full((len(x),), math.inf, dtype=torch.float64)
    towards = x - (x @ torch.tensor([3.0, -4.0]))[:, None] * torch.tensor([3.0, -4.0]) / 25 * 2  # across the boundary
    reason = check_radii(model, x, y, exact * 1.5, far, towards, **CHECK)
    assert reason.startswith("a point inside a certified L2 ball changes the decision (samples [")


class _ClampedPixels(nn.Module):
    """Scores min(x, c) of two pixels: at x = (0.5 - 2^-25, 0.5 + 2^-24), class 1 wins by 2^-25 + 2^-24
    and one float32 step in x0 (to 0.5) ties the scores at c = 0.5 (argmax: class 0)."""

    def __init__(self, c: torch.Tensor | float) -> None:
        super().__init__()
        self.register_buffer("c", torch.as_tensor(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x.flatten(1), max=self.c)


ULP_BELOW_HALF = 2.0**-25  # float32 spacing just below 0.5


def _near_the_clamp() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three samples below 0.5, their labels (1) and, for each, the float32 point x0 = 0.5 that ties."""
    x = torch.tensor([[[[0.5 - k * ULP_BELOW_HALF, 0.5 + 2.0**-24]]] for k in (1, 2, 3)], dtype=torch.float32)
    tie = x.clone()
    tie[:, 0, 0, 0] = 0.5
    return x, torch.ones(3, dtype=torch.long), tie


def test_a_clamp_at_a_float64_bound_is_certified_where_float32_clips() -> None:
    """A red team's break: torch clamps float32 scores at float32(c) for a bound c held as a 0-dim float64
    buffer (0-dim tensors do not promote), while the bound's graph held c. With the clamp's steps
    charged no rounding, radii of 6e-8 to 1e-7 covered float32 points one ulp away whose scores tie."""
    from robaudit.certify import certify_l2

    net = _ClampedPixels(torch.tensor(0.5 + 2.0**-25 - 2.0**-45, dtype=torch.float64)).eval()
    x, y, tie = _near_the_clamp()
    assert net(x).dtype == torch.float32 and torch.equal(net(x).argmax(1), y)
    assert torch.equal(net(tie).argmax(1), torch.zeros(3, dtype=torch.long))  # (0.5, 0.5): a tie, class 0
    distance = (tie - x).flatten(1).norm(dim=1).double()
    for budget in ("fast", "default"):
        radius = certify_l2(net, x, y, budget=budget).radius
        assert (radius < distance).all(), (budget, radius, distance)


def test_the_check_ignores_a_probe_that_float32_rounds_out_of_the_ball() -> None:
    """Probes at 0.999 of a radius of under one ulp round to the data's float32 grid, maybe outside the
    ball: a misclassified point there contradicts nothing (it withdrew sound radii as a robaudit bug)."""
    net = _ClampedPixels(0.5).eval()
    x, y, tie = _near_the_clamp()
    x, y, tie = x[:1], y[:1], tie[:1]
    radius = torch.tensor([0.9 * ULP_BELOW_HALF], dtype=torch.float64)  # no float32 point but x in the ball
    far = torch.tensor([ULP_BELOW_HALF], dtype=torch.float64)
    assert check_radii(net, x, y, radius, far, tie, **CHECK) is None
    assert check_radii(net, x, y, radius * 1.2, far * 2, tie, **CHECK) is not None  # the tie inside: caught


def test_scan_reports_sound_radii_beside_attack_distances(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "30", "-t", "l2:0.3", "-t", "linf:0.05",
        "--preset", "quick", "--certify", "--certify-budget", "fast", "--json", out, "--quiet",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    cert = report["summary"]["certificate"]
    assert cert["available"], cert["reason"]
    assert "the ONNX file and its PyTorch translation agree at 51 points inside every certified ball" in cert["notes"]
    assert any(n.startswith("no minimal-norm L2 attack ran") for n in cert["notes"])  # quick: PGD at eps only
    l2 = next(t for t in report["summary"]["threats"] if t["threat"] == "l2:0.3")
    assert 0 <= cert["certified_accuracy"]["l2:0.3"] <= l2["robust_accuracy"]
    assert list(cert["certified_accuracy"]) == ["l2:0.3"]  # only L2 threats get a certified accuracy
    assert cert["median_ratio"] is None or 0 < cert["median_ratio"] <= 1
    ratios = [
        s["certified_l2"] / s["adversarial_l2"] for s in report["samples"]
        if s["clean_pred"] == s["label"] and s["adversarial_l2"]
    ]  # fmt: skip
    assert cert["ratio_samples"] == len(ratios)
    assert cert["median_ratio"] == (pytest.approx(statistics.median(ratios), rel=1e-12) if ratios else None)
    assert sum(cert["methods"].values()) == sum(s["clean_pred"] == s["label"] for s in report["samples"])
    for s in report["samples"]:
        if s["clean_pred"] != s["label"]:
            assert s["certified_l2"] == 0 and s["certified_method"] == "none"
            continue
        assert s["certified_l2"] > 0 and s["certified_method"] in cert["methods"]
        if s["adversarial_l2"] is not None:
            assert s["certified_l2"] <= s["adversarial_l2"]
        if not s["threats"]["l2:0.3"]["robust"]:
            assert s["certified_l2"] < 0.3


def test_no_certify_leaves_it_out(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "10", "--preset", "quick", "--no-certify",
        "--json", out, "--quiet",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    assert report["summary"]["certificate"] is None
    assert all(s["certified_l2"] is None for s in report["samples"])


def test_unsupported_layer_reports_unavailable_not_a_number(model_files: ModelFiles, tmp_path) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)).eval()
    path = tmp_path / "gelu.onnx"
    torch.onnx.export(net, (torch.rand(2, 1, 8, 8),), str(path), input_names=["x"], dynamo=False, opset_version=17,
                      dynamic_axes={"x": {0: "batch"}})
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", path, "--data", model_files.data_npz, "--n", "10", "-t", "l2:0.3", "--preset", "quick", "--certify",
        "--json", out, "--quiet",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    cert = report["summary"]["certificate"]
    assert not cert["available"] and cert["reason"].startswith("certificate unavailable:")
    assert any(name in cert["reason"].lower() for name in ("gelu", "erf")), cert["reason"]  # names the layer
    assert all(s["certified_l2"] is None for s in report["samples"])


def test_a_model_computing_in_half_precision_inside_its_forward_gets_no_certificate(model_files: ModelFiles, tmp_path) -> None:
    """Hunt 15: `with torch.autocast("cpu", dtype=torch.float16)` in forward is dropped by torch.fx, so the radii
    bounded a float32 graph; 38 of 58 radii of a linear classifier were broken by the model itself (1e-4 inside)."""
    from safetensors.torch import save_file

    import model_zoo

    torch.manual_seed(0)
    path = tmp_path / "autocast.safetensors"
    save_file(model_zoo.autocast_mlp().state_dict(), str(path))
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", path, "--arch", "model_zoo:autocast_mlp", "--data", model_files.data_npz, "--n", "10", "-t", "l2:0.3",
        "--preset", "quick", "--certify", "--json", out, "--quiet", env={"PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    assert result.code == 0, result.stderr
    cert = load_json(out)["summary"]["certificate"]
    assert not cert["available"] and "half precision inside its forward" in cert["reason"], cert


class CountingMLP(nn.Module):
    """A small ReLU MLP that counts the batches it is run on (the certificate checks its prediction per batch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def _auto_pilot(attack_seconds: float, correct: int) -> tuple[str | None, int]:
    from robaudit.stages.certify import certify_skip_reason

    model = CountingMLP().eval()
    x = torch.rand(12, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.net(x).argmax(1)
    model.calls = 0
    reason = certify_skip_reason(
        model, x, y, budget="fast", correct=correct, attack_seconds=attack_seconds, device=CPU
    )
    return reason, model.calls


def test_auto_mode_certifies_when_the_pilot_projects_within_the_attack_time() -> None:
    reason, calls = _auto_pilot(attack_seconds=3600.0, correct=12)
    assert reason is None
    assert calls >= 8  # the whole pilot ran: eight samples, one at a time


def test_auto_mode_pilot_stops_after_one_sample_when_the_run_is_hopeless() -> None:
    """A billion samples at any measurable time per sample project far past the 10 s minimum budget: the
    pilot stops after its first sample (on a large network that saves minutes per sample) and says why."""
    reason, calls = _auto_pilot(attack_seconds=0.0, correct=10**9)
    assert reason is not None and reason.startswith("certificate skipped: projected"), reason
    assert "exceeds the automatic budget of 10 s" in reason
    _, whole = _auto_pilot(attack_seconds=3600.0, correct=12)
    assert whole - calls >= 7, (calls, whole)  # at least one model call per sample of the pilot left out


def test_the_median_ratio_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    """A CLI review: median_ratio was torch.median's lower middle value (0.6156 where the median is 0.6351)."""
    from robaudit.stages.certify import _summary_of

    radius = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    summary = _summary_of(radius, ["crown"] * 4, torch.ones(4, dtype=torch.bool), torch.full((4,), 2.0, dtype=torch.float64),
                          [("l2:1", 1.0)], "fast", [])  # fmt: skip
    assert summary.median_ratio == 1.25 and summary.ratio_samples == 4


class _FarOffScores(nn.Module):
    """Scores 0.01 x a trained CNN's, plus 1e5: margins of about 0.01 where float32 steps by 2^-7."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 0.01 + 1e5


def test_a_scan_where_no_radius_is_proved_says_why(model_files: ModelFiles, tmp_path) -> None:
    """Radius 0 on every sample, with nothing said, reads like a fragile model. The notes count the
    correctly classified samples left at 0 and those whose margin is below the float32 rounding
    allowance at the sample itself, over every chunk of the scan, and claim no check 'inside every
    certified ball' when none was."""
    from conftest import demo_classifier

    path = tmp_path / "far_off.onnx"
    torch.onnx.export(_FarOffScores(demo_classifier()), (torch.rand(2, 1, 8, 8),), str(path), input_names=["x"],
                      dynamo=False, opset_version=17, dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", path, "--data", model_files.data_npz, "--n", "12", "-t", "l2:0.3", "--preset", "quick", "--certify",
        "--certify-budget", "fast", "--no-indicator", "--chunk-size", "5", "--json", out, "--quiet",
    )  # fmt: skip  (3 chunks: the counts cover all of them)
    assert result.code == 0, result.stderr
    report = load_json(out)
    cert = report["summary"]["certificate"]
    correct = sum(s["clean_pred"] == s["label"] for s in report["samples"])
    assert correct >= 8 and all(s["certified_l2"] == 0 for s in report["samples"])
    assert (
        f"{correct} of the correctly classified samples got radius 0: no bound proved a larger one; on {correct} "
        "of them the margin at the sample itself is below the interval bound's rigorous float32 rounding allowance"
    ) in " ".join(cert["notes"]), cert["notes"]
    assert not any("inside every certified ball" in note for note in cert["notes"]), cert["notes"]
