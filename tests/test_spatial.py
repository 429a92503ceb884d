"""The spatial threat: transformation geometry, the grid attack on a model with a known answer, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ModelFiles, assert_one_line_error, load_json, run_cli
from robaudit.attacks import AttackRun
from robaudit.attacks.runner import run_spatial, verify_spatial
from robaudit.attacks.spatial import SpatialGrid, spatial_grid, transform_images, within_limits
from robaudit.errors import RobauditError
from robaudit.threats import parse_threat

FAST = ("--preset", "quick", "--quiet")


def test_parse_spatial_threats() -> None:
    threat = parse_threat("spatial:30,3")
    assert (threat.norm, threat.eps, threat.shift, threat.canonical) == ("spatial", 30.0, 3.0, "spatial:30,3")
    assert parse_threat("spatial:30deg,3px").same_as(threat)
    assert parse_threat("spatial:15").shift == 0.0
    assert not parse_threat("spatial:30,2").same_as(threat)
    for bad in ("spatial:", "spatial:0,0", "spatial:-5,1", "spatial:200,1", "spatial:1,2,3", "spatial:x,1"):
        with pytest.raises(RobauditError):
            parse_threat(bad)


def test_transforms_match_exact_pixel_moves() -> None:
    x = torch.rand(3, 2, 6, 6)
    identity = transform_images(x, torch.zeros(3, 3), 0.0)
    assert torch.allclose(identity, x, atol=1e-6)
    ccw = transform_images(x, torch.tensor([[90.0, 0, 0]] * 3), 0.0)
    assert torch.allclose(ccw, torch.rot90(x, 1, (2, 3)), atol=1e-5)  # counter-clockwise as displayed
    right = transform_images(x, torch.tensor([[0.0, 1, 0]] * 3), 0.0)
    assert torch.allclose(right[..., 1:], x[..., :-1], atol=1e-6) and float(right[..., 0].abs().max()) < 1e-6
    down = transform_images(x, torch.tensor([[0.0, 0, 2]] * 3), 0.0)
    assert torch.allclose(down[..., 2:, :], x[..., :-2, :], atol=1e-6)


def test_transforms_stay_in_the_box_and_fill_with_its_lower_end() -> None:
    x = torch.rand(4, 1, 9, 9) * 2 - 1  # input range [-1, 1]
    out = transform_images(x, torch.tensor([[13.0, 1.5, -2.5]] * 4), -1.0)
    assert float(out.min()) >= -1 - 1e-6 and float(out.max()) <= 1 + 1e-6
    up = transform_images(x, torch.tensor([[0.0, 0.0, -2.5]] * 4), -1.0)
    assert torch.allclose(up[..., -2:, :], torch.full_like(up[..., -2:, :], -1.0), atol=1e-6)  # moved in from outside


def test_grid_is_within_limits_mildest_first_without_identity() -> None:
    threat = parse_threat("spatial:30,3")
    grid = spatial_grid(threat, 31, 5)
    assert len(grid) == 31 * 5 * 5 - 1
    assert bool(within_limits(grid, threat).all())
    severity = (grid.abs() / torch.tensor([30.0, 3.0, 3.0], dtype=torch.float64)).amax(dim=1)
    assert bool((severity[1:] >= severity[:-1]).all()) and float(severity[0]) > 0
    assert not bool(within_limits(torch.tensor([[30.5, 0.0, 0.0], [0.0, 0.0, 3.2]]), threat).any())


class Centroid(nn.Module):
    """Class 1 when the image's brightness-weighted column is right of 3.25, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(x.shape[-1], dtype=x.dtype)
        z1 = (x.sum(dim=(1, 2)) * (cols - 3.25)).sum(dim=1)
        return torch.stack([torch.zeros_like(z1), z1], dim=1)


def test_grid_attack_breaks_exactly_the_points_within_reach() -> None:
    """One bright pixel per image at column c: a shift of up to 1 pixel changes the class iff |c - 3.25| <= 1."""
    cols = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    x = torch.zeros(len(cols), 1, 9, 9)
    x[torch.arange(len(cols)), 0, 4, cols] = 1.0
    y = (cols > 3.25).long()
    threat = parse_threat("spatial:0,1")
    outcome = run_spatial(
        Centroid(), x, y, torch.ones(len(x), dtype=torch.bool), threat, [AttackRun(SpatialGrid(rotations=1, shifts=5))],
        lower=0.0, upper=1.0, num_classes=2, batch_size=64, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    assert outcome.broken.tolist() == [False, False, True, True, False, False, False]
    # the mildest breaking shift on the grid {-1, -0.5, 0, 0.5, 1}: column 3 needs +0.5, column 4 needs -1
    assert outcome.transform[2].tolist() == [0.0, 0.5, 0.0] and outcome.transform[3].tolist() == [0.0, -1.0, 0.0]
    assert outcome.records[0].forwards > 0 and outcome.records[0].backwards == 0


def test_verification_rejects_tampered_examples() -> None:
    cols = torch.tensor([3, 4])
    x = torch.zeros(2, 1, 9, 9)
    x[torch.arange(2), 0, 4, cols] = 1.0
    y = torch.tensor([0, 1])
    threat = parse_threat("spatial:0,1")
    params = torch.tensor([[0.0, 0.5, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    good = transform_images(x, params, 0.0)
    check = dict(lower=0.0, upper=1.0, batch_size=8, device=torch.device("cpu"))
    assert verify_spatial(Centroid(), good, x, y, params, threat, **check).tolist() == [True, True]
    too_far = params.clone()
    too_far[:, 1] *= 3
    assert not verify_spatial(Centroid(), transform_images(x, too_far, 0.0), x, y, too_far, threat, **check).any()
    lied = good.clone()
    lied[0, 0, 0, 0] = 0.5  # pixels that the stated transformation does not produce
    assert verify_spatial(Centroid(), lied, x, y, params, threat, **check).tolist() == [False, True]


def test_cli_spatial_threat_reports_verified_transforms(model_files: ModelFiles, tmp_path) -> None:
    out, adv = tmp_path / "r.json", tmp_path / "adv.npz"
    result = run_cli(
        "scan", model_files.onnx, "--data", model_files.data_npz, "--n", "60", "-t", "spatial:20,1", "-t", "linf:0.05",
        "--json", out, "--save-adversarial", adv, "--fail-under", "robust_accuracy[spatial:20deg,1px]=0.0", *FAST,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = load_json(out)
    spatial = report["summary"]["threats"][0]
    assert (spatial["threat"], spatial["norm"], spatial["eps"], spatial["shift"]) == ("spatial:20,1", "spatial", 20.0, 1.0)
    assert [a["name"] for a in spatial["attack_details"]] == ["spatial-grid"]
    assert "spatial-grid" not in [a["name"] for a in report["summary"]["threats"][1]["attack_details"]]
    assert report["gate"][0]["passed"]
    data = np.load(model_files.data_npz)
    x_all = torch.from_numpy(data["x"]).float() / 255
    saved = np.load(adv)
    by_index = {s["index"]: s["threats"]["spatial:20,1"] for s in report["samples"]}
    index = saved["spatial:20,1__index"]
    assert len(index) > 0
    for row, i in enumerate(index.tolist()):
        t = by_index[i]["transform"]
        assert abs(t["rotation"]) <= 20 and abs(t["dx"]) <= 1 and abs(t["dy"]) <= 1
        params = torch.tensor([[t["rotation"], t["dx"], t["dy"]]])
        rebuilt = transform_images(x_all[i : i + 1], params, 0.0)
        assert torch.allclose(rebuilt[0], torch.from_numpy(saved["spatial:20,1__x"][row]), atol=1e-5)
        assert model_files.predictions[i] == data["y"][i]  # was correct before the transformation


def test_spatial_threat_needs_image_data(model_files: ModelFiles, tmp_path) -> None:
    data = np.load(model_files.data_npz)
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=data["x"].reshape(len(data["x"]), -1), y=data["y"])
    result = run_cli("scan", model_files.onnx, "--data", flat, "-t", "spatial:10,1", *FAST)
    assert_one_line_error(result, "spatial threats need image data")
