"""Decision-surface slices: values, geometry, the terminal heatmap and the PNG files."""

from __future__ import annotations

import importlib.util
import io
import sys

import pytest
import torch
from rich.console import Console
from torch import nn

from robaudit.errors import RobauditError
from robaudit.measures import render_terminal, save_curve_png, save_png, shared_range, surface_slice
from robaudit.measures.decision import decision
from robaudit.measures.plots import MISSING
from robaudit.report.schema import Curve

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(6, 3).double().eval().requires_grad_(False)


def smooth_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double().eval().requires_grad_(False)


def test_slice_values_equal_direct_evaluation() -> None:
    model = smooth_model()
    x, y = torch.randn(1, 6, dtype=torch.float64), torch.tensor([1])
    s = surface_slice(model, x, y, grid=9, span=2.0, seed=3)
    assert len(s.values) == len(s.a) == len(s.b) == 9
    assert s.a[0] == -2.0 and s.a[-1] == 2.0 and s.a[4] == 0.0
    assert s.u_kind == s.v_kind == "random"
    # u and v are orthonormal.
    assert s.u.norm().item() == pytest.approx(1) and s.v.norm().item() == pytest.approx(1)
    assert (s.u * s.v).sum().item() == pytest.approx(0, abs=1e-12)
    for j, i in [(0, 0), (4, 4), (2, 7), (8, 1)]:
        point = x[0] + s.a[i] * s.u + s.b[j] * s.v
        expected = decision(model(point[None]), y).item()
        assert s.values[j][i] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert s.g_center == pytest.approx(decision(model(x), y).item())


def test_adversarial_direction_fixes_u_and_the_boundary_distance() -> None:
    # Two-class linear model: along -grad g, g falls at rate ||grad g|| and crosses 0 at g0 / ||grad g||.
    torch.manual_seed(0)
    model = nn.Linear(6, 2).double().eval().requires_grad_(False)
    x = torch.zeros(1, 6, dtype=torch.float64)
    y = model(x).argmax(1)
    grad = model.weight[y[0]] - model.weight[1 - y[0]]
    g0 = decision(model(x), y).item()
    distance = g0 / grad.norm().item()
    s = surface_slice(model, x, y, direction=-5.0 * grad, grid=41, span=3 * distance)  # any length: normalized
    assert s.u_kind == "adversarial"
    assert torch.allclose(s.u, -grad / grad.norm())
    step = s.a[1] - s.a[0]
    assert s.boundary_distances()["+u"] == pytest.approx(distance, abs=step)
    assert s.boundary_distances()["-u"] is None


def test_terminal_render_shows_the_boundary_and_a_legend() -> None:
    model = linear_model()
    x = torch.zeros(1, 6, dtype=torch.float64)
    y = model(x).argmax(1)
    grad = torch.autograd.functional.jacobian(lambda v: decision(model(v), y).sum(), x)[0]
    s = surface_slice(model, x, y, direction=-grad, grid=21, span=4.0, title="linear")
    console = Console(record=True, width=120, color_system="truecolor", file=io.StringIO())
    render_terminal(s, console)
    text = console.export_text(clear=False)
    assert "▒" in text and "boundary g = 0" in text  # the g = 0 contour and its legend entry
    assert "█" in text and "░" in text and "◆" in text  # both sides and the sample
    assert "the attack direction" in text and "+-4" in text
    assert "linear" in text
    assert "rgb" not in text and "\x1b[38;2;" in console.export_text(styles=True)  # real colours
    rows = [line for line in text.splitlines() if "█" in line or "░" in line][:21]
    assert all(len(line.rstrip()) >= 2 * 21 for line in rows[:-1])  # two characters per cell


def test_narrow_terminal_uses_one_character_per_cell() -> None:
    s = surface_slice(smooth_model(), torch.randn(1, 6, dtype=torch.float64), torch.tensor([0]), grid=41)
    console = Console(record=True, width=60, color_system=None, file=io.StringIO())
    render_terminal(s, console)
    heat = [line for line in console.export_text().splitlines() if line.startswith(("+v", "-v"))]
    assert heat and all(len(line) == 3 + 41 for line in heat)


def test_shared_range_spans_every_slice() -> None:
    x = torch.randn(1, 6, dtype=torch.float64)
    slices = [surface_slice(m, x, torch.tensor([0]), grid=5) for m in (linear_model(0), linear_model(1))]
    lo, hi = shared_range(slices)
    assert lo == min(min(min(r) for r in s.values) for s in slices)
    assert hi == max(max(max(r) for r in s.values) for s in slices)


def test_bad_slice_arguments() -> None:
    model = smooth_model()
    with pytest.raises(RobauditError, match="one sample"):
        surface_slice(model, torch.zeros(2, 6, dtype=torch.float64), torch.tensor([0, 0]))
    with pytest.raises(RobauditError, match="not all zero"):
        surface_slice(model, torch.zeros(1, 6, dtype=torch.float64), 0, direction=torch.zeros(6))
    with pytest.raises(RobauditError, match="grid"):
        surface_slice(model, torch.zeros(1, 6, dtype=torch.float64), 0, grid=1)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (optional extra 'plot')")
def test_png_files_are_written(tmp_path) -> None:
    x = torch.randn(1, 6, dtype=torch.float64)
    models = (linear_model(0), smooth_model())
    slices = [surface_slice(m, x, torch.tensor([0]), grid=11, title=f"m{k}") for k, m in enumerate(models)]
    for shared in (True, False):
        out = save_png(slices, tmp_path / f"slices_{shared}.png", shared_scale=shared)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = Curve(norm="linf", eps=[0.0, 0.05, 0.1], robust_accuracy=[0.9, 0.6, 0.3], median_distance=0.07, attacks=["fmn"])
    other = Curve(norm="l2", eps=[0.0, 0.5], robust_accuracy=[0.9, 0.4], median_distance=0.4, attacks=["fmn"])
    out = save_curve_png({"natural": [curve, other], "robust": [curve]}, tmp_path / "sub" / "curves.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (optional extra 'plot')")
def test_long_titles_and_an_unproven_floor_still_draw(tmp_path) -> None:
    x = torch.randn(1, 6, dtype=torch.float64)
    name = "a_model_with_a_long_file_name.onnx (label 0, predicted 0): "
    slices = [
        surface_slice(smooth_model(), x, 0, grid=11, title=name + "random plane"),
        surface_slice(smooth_model(), x, 0, grid=11, title=name + "attack plane (adversarial example, linf:0.0313725)"),
    ]
    assert save_png(slices, tmp_path / "long.png").read_bytes()[:4] == b"\x89PNG"
    curve = Curve(norm="linf", eps=[0.0, 0.05, 0.1], robust_accuracy=[0.9, 0.6, 0.3], median_distance=0.07, attacks=["fmn"])
    # 0.3 of the samples were never broken: drawn as the curve's hatched floor, by default and when given
    assert save_curve_png([curve], tmp_path / "floor.png").read_bytes()[:4] == b"\x89PNG"
    assert save_curve_png([curve], tmp_path / "given.png", unproven={"linf": 0.3}).read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    s = surface_slice(smooth_model(), torch.zeros(1, 6, dtype=torch.float64), 0, grid=3)
    with pytest.raises(RobauditError) as err:
        save_png([s], tmp_path / "x.png")
    assert str(err.value) == MISSING
    assert MISSING == "PNG plots need matplotlib: pip install 'matplotlib>=3.7' (or pip install '.[plot]' in a robaudit checkout)"
    curve = Curve(norm="linf", eps=[0.0], robust_accuracy=[1.0], median_distance=None, attacks=[])
    with pytest.raises(RobauditError, match="matplotlib"):
        save_curve_png([curve], tmp_path / "c.png")
