"""The decision-surface stage in real CLI runs: indicator in the report, --plots, and `robaudit surface`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ModelFiles, assert_one_line_error, load_json, run_cli

FAST = ("--preset", "quick", "--quiet", "--no-certify")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_indicator_in_the_report(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "20", "-t", "linf:0.05", "-t", "l2:0.3",
        "--indicator", "--json", out, *FAST,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    ind = report["summary"]["indicator"]
    assert ind["higher_is_more_robust"] is True and ind["score"] > 0 and "seconds" not in ind
    assert ind["formula"] and ind["hvp_per_sample"] >= 1
    assert "score[linf:0.05]" in ind["parts"] and "score[l2:0.3]" in ind["parts"]
    for sample in report["samples"]:
        entry = sample["indicator"]
        assert set(entry["predicted_drop"]) == {"linf:0.05", "l2:0.3"}
        assert entry["predicted_holds"]["l2:0.3"] == (entry["predicted_drop"]["l2:0.3"] < entry["g"])
        assert entry["piecewise_linear"] is True  # the test CNN is ReLU: curvature instead of a zero Hessian
        assert entry["curvature"] is not None and entry["jacobian_l2"] > 0
    assert report["timing"]["indicator_s"] >= 0


class HardsigmoidCNN(torch.nn.Module):
    """Hardsigmoid has no second derivative in torch (hunt 28: the scan crashed in the Hessian products)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.hardsigmoid(self.conv(x)).flatten(1))


def test_a_model_without_second_derivatives_gets_the_indicator_without_a_hessian(model_files: ModelFiles, tmp_path) -> None:
    path, out = tmp_path / "hsig.pt", tmp_path / "r.json"
    torch.jit.trace(HardsigmoidCNN().eval(), torch.rand(2, 1, 8, 8)).save(str(path))
    md = tmp_path / "r.md"
    args = ("--indicator", "--json", out, "--markdown", md, "--preset", "quick", "--no-certify")
    result = run_cli("scan", path, "--data", model_files.data_npz, "--n", "8", "-t", "l2:0.3", *args)
    assert result.code == 0, result.stderr
    assert "note: Hessian not measured" in result.stdout and "note: Hessian not measured" in md.read_text()
    ind = load_json(out)["summary"]["indicator"]
    assert any("hardsigmoid_backward" in note for note in ind["notes"]), ind["notes"]
    for sample in load_json(out)["samples"]:
        entry = sample["indicator"]
        assert entry["hessian_max_abs"] is None and entry["piecewise_linear"] is False
        assert entry["predicted_drop"]["l2:0.3"] > 0 and entry["curvature"] is not None  # the curvature alone


def test_no_indicator(model_files: ModelFiles, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "8", "--no-indicator", "--json", out, *FAST)
    assert result.code == 0, result.stderr
    report = load_json(out)
    assert report["summary"]["indicator"] is None and all(s["indicator"] is None for s in report["samples"])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (robaudit[plot]) is not installed")
def test_plots_are_written(model_files: ModelFiles, tmp_path) -> None:
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "10", "-t", "l2:0.5",
        "--config", _minimal_config(tmp_path), "--plots", plots, "--json", out, "--quiet", "--no-certify",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    names = sorted(p.split("/")[-1] for p in report["plots"])
    assert "accuracy_vs_eps.png" in names and sum(n.startswith("surface_") for n in names) == 3
    for path in report["plots"]:
        assert open(path, "rb").read(8) == PNG_MAGIC


def _minimal_config(tmp_path) -> str:
    path = tmp_path / "audit.toml"
    path.write_text('[[attacks]]\nattack = "fmn"\nsteps = 10\n\n[[attacks]]\nattack = "fgsm"\n')  # FMN gives the curve
    return str(path)


def test_plots_folder_problems_are_usage_errors(model_files: ModelFiles, tmp_path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--plots", a_file, *FAST)
    assert_one_line_error(result, "matplotlib" if not HAS_MATPLOTLIB else "not a folder")
    assert a_file.read_text() == "x"


def test_surface_compares_models_on_one_grid(model_files: ModelFiles, tmp_path) -> None:
    png = tmp_path / "s.png"
    args = ["surface", model_files.onnx, model_files.torchscript, "--data", model_files.data_npz, "--index", "2", "--grid", "11"]
    if HAS_MATPLOTLIB:
        args += ["--png", png]
    result = run_cli(*args)
    assert result.code == 0, result.stderr
    assert result.stdout.count("random plane") == 2 and result.stdout.count("attack plane") == 2
    assert "distance to the boundary" in result.stdout
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_surface_bad_index(model_files: ModelFiles) -> None:
    result = run_cli("surface", model_files.onnx, "--data", model_files.data_npz, "--index", "100000")
    assert_one_line_error(result, "--index")


def test_surface_refuses_an_even_grid(model_files: ModelFiles) -> None:
    """An even grid has no centre point: the boundary distances were read from a point off x (3.6 with --span 3)."""
    result = run_cli("surface", model_files.onnx, "--data", model_files.data_npz, "--index", "0", "--grid", "6", "--span", "3")
    assert_one_line_error(result, "--grid must be odd")


def test_a_model_with_infinite_input_gradients_gets_an_indicator_not_a_crash(tmp_path) -> None:
    """The hunt's case: sqrt at the zero pixels of digits made the scan exit 3 (linalg.eigh failed to converge)."""
    import torch

    class SqrtNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Softplus(), torch.nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(torch.sqrt(x.flatten(1)))

    model = tmp_path / "sqrt.pt"
    torch.jit.save(torch.jit.trace(SqrtNet().eval(), torch.rand(1, 1, 8, 8)), str(model))
    out = tmp_path / "r.json"
    result = run_cli("scan", model, "--data", "digits", "--n", "16", "--threat", "l2:0.5", "--preset", "quick",
                     "--indicator", "--no-certify", "--threads", "1", "--json", out)  # fmt: skip
    assert result.code == 0, result.stderr
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    indicator = load_json(out)["summary"]["indicator"]
    assert any("not finite" in note for note in indicator["notes"]), indicator["notes"]
