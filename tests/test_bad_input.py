"""Bad input through the real CLI: exit 2, one line, no traceback, and the user's files untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ModelFiles, assert_one_line_error, bundled_digits, run_cli, sha256


def _scan_expect_error(model: Path, data: Path | str, *extra: str, fragment: str | None = None) -> None:
    owned = [p for p in (model, Path(str(data))) if p.exists() and p.is_file()]
    before = {p: sha256(p) for p in owned}
    listing = {p.parent: sorted(q.name for q in p.parent.iterdir()) for p in owned}
    result = run_cli("scan", model, "--data", data, "--preset", "quick", "--steps", "2", *extra)
    assert_one_line_error(result, fragment)
    assert {p: sha256(p) for p in owned} == before
    assert {d: sorted(q.name for q in d.iterdir()) for d in listing} == listing


def test_missing_model(tmp_path, model_files: ModelFiles) -> None:
    _scan_expect_error(tmp_path / "nope.onnx", model_files.data_npz, fragment="does not exist")


@pytest.mark.parametrize("kind", ["onnx", "torchscript", "export", "safetensors"])
def test_truncated_model_files(tmp_path, model_files: ModelFiles, kind: str) -> None:
    source = getattr(model_files, kind)
    broken = tmp_path / f"truncated{source.suffix}"
    payload = source.read_bytes()
    broken.write_bytes(payload[: len(payload) // 2])
    extra = ("--arch", "robaudit.demo:digits_cnn") if kind == "safetensors" else ()
    _scan_expect_error(broken, model_files.data_npz, *extra)


@pytest.mark.parametrize("name", ["garbage.onnx", "garbage.pt", "garbage.bin", "empty.onnx"])
def test_corrupt_model_files(tmp_path, model_files: ModelFiles, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else np.random.default_rng(0).bytes(4096))
    _scan_expect_error(path, model_files.data_npz)


def test_unknown_arch(model_files: ModelFiles) -> None:
    _scan_expect_error(model_files.safetensors, model_files.data_npz, "--arch", "resnet9000", fragment="resnet9000")


def test_weights_without_arch(model_files: ModelFiles) -> None:
    _scan_expect_error(model_files.safetensors, model_files.data_npz, fragment="--arch")


def test_pickle_needs_trust(tmp_path, model_files: ModelFiles) -> None:
    from robaudit.demo import digits_cnn

    path = tmp_path / "whole.pt"
    torch.save(digits_cnn(), path)
    _scan_expect_error(path, model_files.data_npz, fragment="--trust-pickle")
    trusted = run_cli("scan", path, "--data", model_files.data_npz, "--trust-pickle", "--preset", "quick", "--steps", "2", "--n", "20", "--quiet")
    assert trusted.code == 0, trusted.stderr


def _npz(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, x=x, y=y)
    return path


def test_wrong_data_shape(tmp_path, model_files: ModelFiles) -> None:
    x = np.random.default_rng(0).random((10, 3, 32, 32), dtype=np.float32)
    path = _npz(tmp_path, "cifar_like.npz", x, np.zeros(10, dtype=np.int64))
    _scan_expect_error(model_files.onnx, path, fragment="shape")


def test_nan_in_data(tmp_path, model_files: ModelFiles) -> None:
    x, y = bundled_digits()
    xf = x.astype(np.float32) / 255
    xf[3, 0, 2, 2] = np.nan
    _scan_expect_error(model_files.onnx, _npz(tmp_path, "nan.npz", xf, y), fragment="nan")


def test_labels_out_of_range(tmp_path, model_files: ModelFiles) -> None:
    x, y = bundled_digits()
    y = y.copy()
    y[0] = 12
    _scan_expect_error(model_files.onnx, _npz(tmp_path, "labels.npz", x, y), fragment="12")
    # also where --n leaves that row out: the labels are wrong, whichever rows are audited
    _scan_expect_error(model_files.onnx, _npz(tmp_path, "labels.npz", x, y), "--n", "10", fragment="12")


def test_empty_data(tmp_path, model_files: ModelFiles) -> None:
    path = _npz(tmp_path, "empty.npz", np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    _scan_expect_error(model_files.onnx, path, fragment="empty")


def test_unknown_dataset_name(model_files: ModelFiles) -> None:
    _scan_expect_error(model_files.onnx, "imagenet-21k")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--threat", "linf"), "NORM:EPS"),
        (("--threat", "l3:0.1"), "unknown norm"),
        (("--threat", "linf:-1"), "positive"),
        (("--threat", "linf:abc"), "not a number"),
        (("--threat", "linf:8/255/2"), "more than one '/'"),
        (("--input-range", "1,0"), "lower end"),
        (("--mean", "0.5,0.5,0.5"), "mean"),
        (("--device", "tpu"), "--device"),
        (("--format", "keras"), "keras"),
        # hunt 14: parsed as 3 and 10, an empty preset meant standard, a % minimum named no flag
        (("--threat", "linf:\u0663"), "ASCII digits"),
        (("--threat", "linf:1_0"), "not a number"),
        (("--preset", ""), "unknown preset"),
        (("--fail-under", "clean_accuracy=90%"), "--fail-under 'clean_accuracy=90%': write the minimum as a fraction"),
        # ignored without a word: the report said 10 classes under --num-classes 5
        (("--num-classes", "5"), "applies to weights-only files"),
        (("--arch", "resnet18"), "applies to weights-only files"),
        (("--force-baseline",), "--force-baseline needs a baseline report"),
        (("--no-certify", "--certify-budget", "tight"), "--no-certify turns the certificate off"),
        # a CLI review: an empty budget was read as default, and one without an L2 threat was ignored in silence
        (("--certify", "--certify-budget", ""), "--certify-budget must be one of fast, default, tight, not ''"),
        (("--threat", "linf:0.1", "--certify-budget", "tight"), "without an L2 threat the certificate runs only with --certify"),
    ],
)
def test_bad_flags(model_files: ModelFiles, flags: tuple[str, ...], fragment: str) -> None:
    _scan_expect_error(model_files.onnx, model_files.data_npz, *flags, fragment=fragment)


def test_refuses_to_overwrite_an_input(model_files: ModelFiles) -> None:
    _scan_expect_error(model_files.onnx, model_files.data_npz, "--json", str(model_files.data_npz), fragment="refusing")


def _external_data_copy(source: Path, folder: Path) -> Path:
    """The ONNX model with its weights in a separate `m.onnx.data` file (torch's exporter does this for big models)."""
    import onnx

    folder.mkdir()
    model = onnx.load(str(source))
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (folder / "m.onnx.data").is_file()
    return folder / "m.onnx"


def test_outputs_never_write_through_to_an_input(tmp_path, model_files: ModelFiles) -> None:
    """A hard link to the model, or an ONNX file's external weights, are inputs; other hard links keep their data."""
    model = tmp_path / "model.onnx"
    model.write_bytes(model_files.onnx.read_bytes())
    (tmp_path / "adv.npz").hardlink_to(model)
    _scan_expect_error(model, model_files.data_npz, "--save-adversarial", str(tmp_path / "adv.npz"), fragment="refusing")
    (tmp_path / "summary.md").hardlink_to(model)
    _scan_expect_error(model, model_files.data_npz, "--markdown", str(tmp_path / "summary.md"), fragment="refusing")
    external = _external_data_copy(model_files.onnx, tmp_path / "ext")
    weights = external.with_name("m.onnx.data")
    before = sha256(weights)
    _scan_expect_error(external, model_files.data_npz, "--json", str(weights), fragment="refusing")
    assert sha256(weights) == before

    keep = tmp_path / "notes.txt"  # not an input: the output replaces the name, the other link keeps its text
    keep.write_text("mine")
    (tmp_path / "out.md").hardlink_to(keep)
    result = run_cli("scan", model, "--data", model_files.data_npz, "--preset", "quick", "--steps", "2", "--n", "10",
                     "--no-certify", "--no-indicator", "--markdown", tmp_path / "out.md", "--save-adversarial", tmp_path / "a.npz")
    assert result.code == 0, result.stderr
    assert keep.read_text() == "mine" and (tmp_path / "out.md").read_text().startswith("## robaudit")


def test_model_hash_covers_onnx_external_data(tmp_path, model_files: ModelFiles) -> None:
    """Two ONNX files that differ only in their external weights are two models: their reports' hashes differ."""
    from robaudit.scan import model_digest

    first = _external_data_copy(model_files.onnx, tmp_path / "a")
    second = _external_data_copy(model_files.onnx, tmp_path / "b")
    assert model_digest(first) == model_digest(second) != model_digest(model_files.onnx)
    weights = bytearray(second.with_name("m.onnx.data").read_bytes())
    weights[-1] ^= 1
    second.with_name("m.onnx.data").write_bytes(bytes(weights))
    assert sha256(first) == sha256(second) and model_digest(first) != model_digest(second)


@pytest.mark.parametrize("second", ["linf:0.0313725", "linf:8/255", "LINF:0.031372549"])
def test_two_threats_with_one_report_name_are_refused(model_files: ModelFiles, second: str) -> None:
    """8/255 and 0.0313725 are both `linf:0.0313725` in the report: their results would share one key."""
    _scan_expect_error(model_files.onnx, model_files.data_npz, "-t", "linf:8/255", "-t", second,
                       fragment="give each threat once")


# --------------------------------------------------------------------------- hunt 14


@pytest.mark.parametrize("seed", ["18446744073709551616", "4294967296"])
def test_seeds_beyond_the_range_are_refused_before_any_attack(model_files: ModelFiles, seed: str) -> None:
    """2^64 crashed inside torch (exit 3), 2^64 - 6 only after the attacks (the probes add offsets)."""
    _scan_expect_error(model_files.onnx, model_files.data_npz, "--seed", seed, fragment="--seed must be an integer")


def test_outputs_inside_the_checkpoint_folder_are_refused(tmp_path, model_files: ModelFiles) -> None:
    """--json CK/manifest.json replaced the checkpoint's manifest, and the next resume failed."""
    ck = tmp_path / "ck"
    ck.mkdir()
    _scan_expect_error(model_files.onnx, model_files.data_npz, "--checkpoint", str(ck), "--json", str(ck / "manifest.json"),
                       fragment="inside the --checkpoint folder")  # fmt: skip
    assert list(ck.iterdir()) == []


def test_plots_are_not_written_into_an_image_folder_dataset(tmp_path, model_files: ModelFiles) -> None:
    from PIL import Image

    data = tmp_path / "imgs"
    for label in ("0", "1"):
        (data / label).mkdir(parents=True)
        Image.new("L", (8, 8), 40 * int(label)).save(data / label / "a.png")
    before = sorted(p.name for p in data.rglob("*"))
    _scan_expect_error(model_files.onnx, str(data), "--plots", str(data), fragment="lies inside the input folder")
    assert sorted(p.name for p in data.rglob("*")) == before


def test_a_checkpoint_manifest_that_is_not_an_object_is_a_clear_error(tmp_path, model_files: ModelFiles) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "manifest.json").write_text("[1, 2]")
    _scan_expect_error(model_files.onnx, model_files.data_npz, "--checkpoint", str(ck), fragment="not a robaudit checkpoint")
    (ck / "manifest.json").write_text('{"name": "another tool"}')  # it said "written by an older robaudit"
    _scan_expect_error(model_files.onnx, model_files.data_npz, "--checkpoint", str(ck), fragment="not a robaudit checkpoint")


def test_surface_refuses_an_infinite_span(model_files: ModelFiles) -> None:
    result = run_cli("surface", model_files.onnx, "--data", model_files.data_npz, "--span", "inf")
    assert_one_line_error(result, "--span must be a positive finite number")
    result = run_cli("surface", model_files.onnx, "--data", model_files.data_npz, "-t", "linf:1e308")
    assert_one_line_error(result, "positive finite number")


def test_an_edited_indicator_score_is_refused_by_every_reader(tmp_path, model_files: ModelFiles) -> None:
    """A string score passed the report check and crashed the renderers (exit 3); compare accepted it."""
    out = tmp_path / "r.json"
    result = run_cli("scan", model_files.onnx, "--data", model_files.data_npz, "--n", "8", "--preset", "quick",
                     "--indicator", "--no-certify", "--json", out, "--quiet")  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads(out.read_text())
    report["summary"]["indicator"]["score"] = "x"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(report))
    assert_one_line_error(run_cli("report", edited), "summary.indicator.score")
    assert_one_line_error(run_cli("compare", edited, out), "summary.indicator.score")


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path, model_files: ModelFiles) -> None:
    """It said "cannot download mnist (offline?)"."""
    path = tmp_path / "cache"
    path.write_text("not a folder")
    _scan_expect_error(model_files.onnx, "mnist", "--data-dir", str(path), fragment="is a file, not a folder")


@pytest.mark.parametrize("save", ["script", "trace"])
def test_torchscript_wrong_channels_names_the_error(tmp_path, save: str) -> None:
    """A TorchScript failure is cut down to torch's own error line, not the serialized code's traceback."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10)).eval()
    path = tmp_path / f"rgb_{save}.pt"
    saved = torch.jit.script(net) if save == "script" else torch.jit.trace(net, torch.zeros(1, 3, 8, 8))
    torch.jit.save(saved, path)
    _scan_expect_error(path, "digits", fragment="expected input[1, 1, 8, 8] to have 3 channels, but got 1")


def test_a_single_logit_binary_classifier_is_refused_saying_how_to_save_it(tmp_path) -> None:
    """One score per sample has no class to compare with: the error says how to save two."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    path = tmp_path / "one_logit.pt"
    torch.jit.trace(net.eval(), torch.rand(1, 1, 8, 8)).save(str(path))
    x, y = bundled_digits()
    np.savez(tmp_path / "d.npz", x=x[:8], y=(y[:8] >= 5).astype(np.int64))
    _scan_expect_error(path, tmp_path / "d.npz", fragment="returns 1 score(s) per sample")
    result = run_cli("scan", path, "--data", tmp_path / "d.npz", "-t", "l2:0.3", "--preset", "quick")
    assert "torch.cat([-z, z], dim=1)" in result.stderr
