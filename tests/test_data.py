"""Tests for robaudit.data: every source format, sampling, validation and model checks.

All data is made here in tmp_path in the real on-disk formats; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from robaudit.data import BUILTIN_NAMES, Dataset, check_compatible, class_count_note, default_cache_dir, load_data
from robaudit.data.sampling import allocate, stratified_indices
from robaudit.errors import RobauditError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def raises_one_line(match: str | None = None) -> Iterator[pytest.ExceptionInfo[RobauditError]]:
    """Like pytest.raises(RobauditError), also checking the message is one clean line."""
    with pytest.raises(RobauditError, match=match) as info:
        yield info
    message = str(info.value)
    assert message and "\n" not in message and message.strip() == message, message


def labelled(counts: list[int], shape: tuple[int, ...], seed: int = 0,
             dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Random samples whose first value encodes the index, labels grouped by class."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(c, k, dtype=np.int64) for k, c in enumerate(counts)])
    rng.shuffle(y)
    n = len(y)
    if dtype == np.uint8:
        x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    else:
        x = rng.random((n, *shape), dtype=np.float32).astype(dtype)
    return x, y


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------- npz layouts


def test_npz_nchw_float_is_unchanged(tmp_path: Path) -> None:
    x, y = labelled([5, 5, 5], (3, 4, 4))
    path = save_npz(tmp_path / "d.npz", x=x, y=y)
    before = sha256(path)
    data = load_data(str(path), n=None, seed=0)
    assert isinstance(data, Dataset)
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert data.x.shape == (15, 3, 4, 4)
    assert torch.equal(data.x, torch.from_numpy(x))
    assert torch.equal(data.y, torch.from_numpy(y))
    assert data.indices == list(range(15)) and data.source_size == 15
    assert data.name == str(path) and data.notes == [] and data.class_names is None
    assert sha256(path) == before


def test_npz_nhwc_uint8_is_transposed_and_scaled(tmp_path: Path) -> None:
    x, y = labelled([6, 6], (5, 5, 3), dtype=np.uint8)
    path = save_npz(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(path), n=None, seed=0)
    assert data.x.shape == (12, 3, 5, 5)
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(data.x, expected)
    assert any("NHWC" in note for note in data.notes)
    assert any("scaled uint8" in note for note in data.notes)


def test_uint8_scaled_to_custom_input_range(tmp_path: Path) -> None:
    x = np.array([[[[0, 255], [51, 102]]]] * 2, dtype=np.uint8)
    path = save_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    data = load_data(str(path), n=None, seed=0, input_range=(-1.0, 1.0))
    assert data.x[0, 0].flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6, -0.2])
    assert "scaled uint8 0-255 to [-1, 1]" in data.notes


def test_npz_nhw_gets_channel_dim(tmp_path: Path) -> None:
    x, y = labelled([4, 4], (7, 7))
    data = load_data(str(save_npz(tmp_path / "d.npz", x=x, y=y)), n=None, seed=0)
    assert data.x.shape == (8, 1, 7, 7)
    assert any("channel" in note for note in data.notes)


def test_npz_flat_is_left_alone(tmp_path: Path) -> None:
    x, y = labelled([4, 4], (10,))
    data = load_data(str(save_npz(tmp_path / "d.npz", x=x, y=y)), n=None, seed=0)
    assert data.x.shape == (8, 10) and data.notes == []


def test_float64_and_float_labels_are_accepted(tmp_path: Path) -> None:
    x, y = labelled([3, 3], (2, 2), dtype=np.float64)
    path = save_npz(tmp_path / "d.npz", x=x, y=y.astype(np.float32))
    data = load_data(str(path), n=None, seed=0)
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert data.y.tolist() == y.tolist()


def test_float_out_of_range_is_refused_and_input_range_fixes_it(tmp_path: Path) -> None:
    x = np.linspace(-0.5, 2.0, 8 * 4, dtype=np.float32).reshape(8, 1, 2, 2)
    path = save_npz(tmp_path / "d.npz", x=x, y=np.arange(8) % 2)
    with raises_one_line(r"\[-0\.5, 2\].*--input-range"):
        load_data(str(path), n=None, seed=0)
    data = load_data(str(path), n=None, seed=0, input_range=(-0.5, 2.0))
    assert torch.equal(data.x, torch.from_numpy(x))


def test_tiny_range_overshoot_is_tolerated_and_clamped(tmp_path: Path) -> None:
    x = np.full((2, 1, 2, 2), 1.0 + 5e-7, dtype=np.float32)
    x[0, 0, 0, 0] = 0.5
    data = load_data(str(save_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1]))), n=None, seed=0)
    assert float(data.x.max()) == 1.0
    assert any(note.startswith("7 value(s) of the data lie less than 1e-06 outside [0, 1]") for note in data.notes), data.notes
    inside = load_data(str(save_npz(tmp_path / "e.npz", x=np.clip(x, 0, 1), y=np.array([0, 1]))), n=None, seed=0)
    assert not any("clamped" in note for note in inside.notes), inside.notes


# ----------------------------------------------------------------- safetensors and .pt


def test_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    x, y = labelled([5, 5], (6, 6, 1), dtype=np.uint8)
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, str(path))
    before = sha256(path)
    data = load_data(str(path), n=None, seed=0)
    assert data.x.shape == (10, 1, 6, 6)
    assert torch.allclose(data.x, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert sha256(path) == before


@pytest.mark.parametrize("as_tuple", [False, True])
def test_torch_file(tmp_path: Path, as_tuple: bool) -> None:
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    path = tmp_path / "d.pt"
    torch.save((x, y) if as_tuple else {"x": x, "y": y, "extra": torch.zeros(1)}, path)
    before = sha256(path)
    data = load_data(str(path), n=None, seed=0)
    assert torch.equal(data.x, x) and torch.equal(data.y, y)
    assert sha256(path) == before


# ----------------------------------------------------------------- image folders


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_numeric_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = {}
    for label in (0, 3, 7):
        for i in range(2):
            arr = rng.integers(0, 256, (6, 5), dtype=np.uint8)
            write_png(tmp_path / "imgs" / str(label) / f"{i}.png", arr)
            pixels[(label, i)] = arr
    (tmp_path / "imgs" / "3" / "notes.txt").write_text("not an image")
    from PIL import Image

    for name in ("a.gif", "b.gif"):  # not read (an animation has no one image), but said so
        Image.fromarray(pixels[(0, 0)]).save(tmp_path / "imgs" / "7" / name)
    (tmp_path / "imgs" / "7" / ".DS_Store").write_bytes(b"hidden: neither read nor counted")
    data = load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert "skipped 3 files in the class folders that are not read as images (.gif 2, .txt 1;" in " ".join(data.notes)
    assert data.x.shape == (6, 1, 6, 5)
    assert data.y.tolist() == [0, 0, 3, 3, 7, 7]
    assert data.class_names is None
    assert torch.allclose(data.x[2, 0], torch.from_numpy(pixels[(3, 0)]).float() / 255)


def test_image_folder_named_classes_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("dog", "cat"):
        for i in range(2):
            write_png(tmp_path / "imgs" / name / f"{i}.png",
                      rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    data = load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert data.x.shape == (4, 3, 4, 4)
    assert data.class_names == ["cat", "dog"]
    assert data.y.tolist() == [0, 0, 1, 1]
    # The channel hint from the model forces grayscale, by luminance, and the notes say the colour went (a red team:
    # "read as grayscale" alone did not say these were colour files).
    gray = load_data(str(tmp_path / "imgs"), n=None, seed=0, channels=1)
    assert gray.x.shape == (4, 1, 4, 4)
    assert any(n.startswith("converted 4 colour images to grayscale") for n in gray.notes), gray.notes
    assert not any("converted" in n for n in data.notes), data.notes
    from PIL import Image

    rgb = torch.from_numpy(np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png").convert("RGB"))).float()
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    assert torch.allclose(gray.x[0, 0], luma, atol=1 / 255)


def test_image_folder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs" / "0" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(tmp_path / "imgs" / "1" / "b.png", np.full((4, 4, 3), 255, dtype=np.uint8))
    data = load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert data.x.shape == (2, 3, 4, 4)
    assert float(data.x[0].max()) == 0.0 and float(data.x[1].min()) == 1.0


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    with raises_one_line("no class sub-folders"):
        load_data(str(root), n=None, seed=0)
    (root / "0").mkdir()
    with raises_one_line("contains no images"):
        load_data(str(root), n=None, seed=0)
    (root / "0" / "a.gif").write_bytes(b"GIF89a")
    with raises_one_line(r"contains no images .* it has 1 file of other kinds \(\.gif\)"):
        load_data(str(root), n=None, seed=0)
    (root / "0" / "a.gif").unlink()
    write_png(root / "0" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(root / "1" / "b.png", np.zeros((5, 4), dtype=np.uint8))
    with raises_one_line(r"b\.png is 4x5 pixels .*a\.png is 4x4"):
        load_data(str(root), n=None, seed=0)
    (root / "1" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with raises_one_line(r"cannot read image .*b\.png"):
        load_data(str(root), n=None, seed=0)


@pytest.mark.parametrize("kind", ["png16", "tiff-float"])
def test_image_folder_with_deep_pixels_is_refused_not_clipped(tmp_path: Path, kind: str) -> None:
    """PIL's 8-bit conversion clips 16-bit and float images (a 16-bit 300 becomes 255): refuse them."""
    from PIL import Image

    root = tmp_path / "imgs"
    write_png(root / "0" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    (root / "1").mkdir()
    if kind == "png16":
        Image.fromarray(np.full((4, 4), 300, dtype=np.uint16)).save(root / "1" / "b.png")
        fragment = r"b\.png has 16-bit pixels"
    else:
        Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(root / "1" / "b.tiff")
        fragment = r"b\.tiff has 32-bit float pixels"
    with raises_one_line(fragment):
        load_data(str(root), n=None, seed=0)


@pytest.mark.parametrize(
    "shape, channels, want, note",
    [
        ((2, 16, 4, 4), 16, (16, 4, 4), None),  # NCHW already: the last axis of 4 is no channel axis here
        ((2, 4, 4, 3), 3, (3, 4, 4), "converted NHWC to NCHW"),  # NHWC with a height of 4
        ((2, 3, 3, 3), 3, (3, 3, 3), "taken as NCHW"),  # either way: said so
        ((2, 8, 8, 3), None, (3, 8, 8), "converted NHWC to NCHW"),  # no model hint: the usual guess
        ((2, 8, 8, 3), 0, (8, 8, 3), "kept as stored"),  # FLAT_INPUT: a flat model flattens the data as stored
    ],
)
def test_the_models_channel_count_decides_the_layout_of_4d_data(
    tmp_path: Path, shape: tuple[int, ...], channels: int | None, want: tuple[int, ...], note: str | None
) -> None:
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(shape[0], dtype=np.int64))
    data = load_data(str(tmp_path / "d.npz"), n=None, seed=0, channels=channels)
    assert data.sample_shape == want
    nchw = x if want == shape[1:] else x.transpose(0, 3, 1, 2)
    assert np.array_equal(data.x.numpy(), nchw)
    assert (note is None and not any("NCHW" in n for n in data.notes)) or any(note in n for n in data.notes if note)


def test_nhwc_data_for_a_flat_model_is_flattened_as_stored(tmp_path: Path) -> None:
    """A model trained on x.reshape(N, -1) of (N, 8, 8, 3) images: transposing to CHW first scrambled every feature
    (clean accuracy 20% against 100%). Its input is flat, so the data keep their stored order."""
    import onnxruntime

    from conftest import run_cli

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 3, generator=gen)
    x = torch.rand(30, 8, 8, 3, generator=gen)
    y = (x.reshape(30, -1) @ w).argmax(1)
    net = torch.nn.Linear(192, 3)
    with torch.no_grad():
        net.weight.copy_(w.T)
        net.bias.zero_()
    torch.onnx.export(net.eval(), torch.rand(1, 192), str(tmp_path / "flat.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    session = onnxruntime.InferenceSession(str(tmp_path / "flat.onnx"), providers=["CPUExecutionProvider"])
    assert (session.run(None, {"x": x.reshape(30, -1).numpy()})[0].argmax(1) == y.numpy()).all()
    result = run_cli("scan", tmp_path / "flat.onnx", "--data", tmp_path / "d.npz", "--preset", "quick", "--steps", "2",
                     "--no-certify", "--no-indicator", "--json", tmp_path / "r.json", "-q")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["clean_accuracy"] == 1.0


def test_tensor_files_with_wide_unsigned_float8_or_sparse_pixels(tmp_path: Path) -> None:
    """uint16 labels and pixels read as integers (as from .npz); float8 and sparse get one line, not a crash."""
    from safetensors.torch import save_file

    y = torch.tensor([0, 1], dtype=torch.uint16)
    save_file({"x": torch.zeros(2, 1, 4, 4, dtype=torch.uint16), "y": y}, str(tmp_path / "u16.safetensors"))
    data = load_data(str(tmp_path / "u16.safetensors"), n=None, seed=0)
    assert data.y.tolist() == [0, 1] and float(data.x.abs().max()) == 0.0
    save_file({"x": torch.zeros(2, 1, 4, 4).to(torch.float8_e4m3fn), "y": y}, str(tmp_path / "f8.safetensors"))
    with raises_one_line("unsupported dtype torch.float8_e4m3fn"):
        load_data(str(tmp_path / "f8.safetensors"), n=None, seed=0)
    torch.save({"x": torch.zeros(2, 16).to_sparse(), "y": torch.tensor([0, 1])}, tmp_path / "sparse.pt")
    with raises_one_line("sparse_coo tensor; save it dense"):
        load_data(str(tmp_path / "sparse.pt"), n=None, seed=0)


def test_image_folder_mixing_numbered_and_named_classes_is_refused(tmp_path: Path) -> None:
    """Sorted as text, "10" comes before "2": one extra folder would silently renumber the labels."""
    for label in (0, 2, 10):
        write_png(tmp_path / "imgs" / str(label) / "a.png", np.zeros((4, 4), dtype=np.uint8))
    assert sorted(load_data(str(tmp_path / "imgs"), n=None, seed=0).y.tolist()) == [0, 2, 10]
    (tmp_path / "imgs" / "unsorted").mkdir()
    with raises_one_line(r"mixes numbered class folders \(0, 10, 2, \.\.\.\) with others \(unsorted\)"):
        load_data(str(tmp_path / "imgs"), n=None, seed=0)


def test_image_folder_names_each_sampled_file(tmp_path: Path) -> None:
    """`files` names each sample's image; the index alone cannot (numbered folders sort by label here, not as text)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for label in (2, 10):
        for i in range(5):
            write_png(root / str(label) / f"{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    write_png(root / "2" / ".hidden.png", np.zeros((4, 4), dtype=np.uint8))
    data = load_data(str(root), n=4, seed=3)
    from PIL import Image

    assert len(data.files) == 4
    for k, name in enumerate(data.files):
        assert Path(name).parent.name == str(int(data.y[k]))
        assert torch.equal(data.x[k, 0], torch.from_numpy(np.asarray(Image.open(name))).float() / 255)
    assert load_data("digits", n=5, seed=0).files is None


def test_image_folder_walks_a_symlink_loop_once_and_skips_hidden_folders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_png(root / "0" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(root / "1" / "b.png", np.full((4, 4), 255, dtype=np.uint8))
    write_png(root / "1" / ".ipynb_checkpoints" / "b-checkpoint.png", np.zeros((4, 4), dtype=np.uint8))
    (root / "1" / "loop").symlink_to(root)
    data = load_data(str(root), n=None, seed=0)
    assert data.y.tolist() == [0, 1] and float(data.x[1].min()) == 1.0


# ----------------------------------------------------------------- sampling


def test_allocate_largest_remainder() -> None:
    assert allocate(np.array([5, 3, 2]), 4).tolist() == [2, 1, 1]
    assert allocate(np.array([60, 30, 10]), 10).tolist() == [6, 3, 1]
    assert allocate(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]  # ties: lower class


def test_a_stratified_sample_says_which_classes_it_leaves_out(tmp_path: Path) -> None:
    x, y = labelled([300, 200, 2], (1, 3, 3))
    data = load_data(str(save_npz(tmp_path / "d.npz", x=x, y=y)), n=20, seed=0)
    assert torch.bincount(data.y, minlength=3).tolist()[2] == 0
    assert "1 class(es) of the source have no sample in the stratified 20: 2" in data.notes


def test_stratified_sample(tmp_path: Path) -> None:
    x, y = labelled([300, 200, 100], (1, 3, 3))
    path = save_npz(tmp_path / "d.npz", x=x, y=y)
    before = sha256(path)
    data = load_data(str(path), n=60, seed=5)
    assert len(data) == 60 and data.source_size == 600
    assert torch.bincount(data.y).tolist() == [30, 20, 10]
    assert data.indices == sorted(data.indices) and len(set(data.indices)) == 60
    for i, src in enumerate(data.indices):
        assert torch.equal(data.x[i], torch.from_numpy(x[src]))
        assert int(data.y[i]) == y[src]
    torch.manual_seed(123)
    np.random.seed(123)
    again = load_data(str(path), n=60, seed=5)
    assert again.indices == data.indices and torch.equal(again.x, data.x)
    other = load_data(str(path), n=60, seed=6)
    assert other.indices != data.indices
    assert sha256(path) == before


def test_sample_larger_than_source_uses_all(tmp_path: Path) -> None:
    x, y = labelled([3, 2], (4,))
    data = load_data(str(save_npz(tmp_path / "d.npz", x=x, y=y)), n=50, seed=0)
    assert data.indices == list(range(5))
    assert any("only 5" in note for note in data.notes)


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_n(tmp_path: Path, n: int) -> None:
    with raises_one_line("positive"):
        load_data("digits", n=n, seed=0)


def test_stratified_indices_ignore_global_rng() -> None:
    y = np.repeat(np.arange(4), 25)
    torch.manual_seed(0)
    a = stratified_indices(y, 10, seed=1)
    torch.manual_seed(99)
    np.random.seed(99)
    assert stratified_indices(y, 10, seed=1) == a


# ----------------------------------------------------------------- digits


def test_digits_bundled() -> None:
    data = load_data("DIGITS", n=None, seed=0)
    assert data.name == "digits" and data.x.shape == (360, 1, 8, 8)
    assert data.source_size == 360 and float(data.x.min()) >= 0 and float(data.x.max()) <= 1
    counts = torch.bincount(data.y).tolist()
    assert len(counts) == 10 and all(35 <= c <= 37 for c in counts)
    sample = load_data("digits", n=100, seed=0)
    assert len(sample) == 100 and all(c >= 9 for c in torch.bincount(sample.y).tolist())


def test_make_digits_reproduces_shipped_file() -> None:
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("make_digits", REPO / "scripts" / "make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x_train, y_train, x_test, y_test = module.digits_split()
    assert x_test.dtype == np.uint8 and x_test.shape[1:] == (1, 8, 8)
    assert len(x_train) + len(x_test) == 1797 and y_train.dtype == np.int64
    with np.load(REPO / "robaudit" / "data" / "digits_test.npz") as shipped:
        assert np.array_equal(shipped["x"], x_test) and shipped["x"].dtype == np.uint8
        assert np.array_equal(shipped["y"], y_test) and shipped["y"].dtype == np.int64


# ----------------------------------------------------------------- torchvision formats


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("name,folder,compress", [
    ("mnist", "MNIST", False), ("fashion-mnist", "FashionMNIST", True)])
def test_mnist_format(tmp_path: Path, name: str, folder: str, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    raw = tmp_path / folder / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", images, compress)
    write_idx(raw / "t10k-labels-idx1-ubyte", labels, compress)
    data = load_data(name, n=None, seed=0, data_dir=tmp_path)
    assert data.name == name and data.x.shape == (20, 1, 28, 28)
    assert torch.allclose(data.x[:, 0], torch.from_numpy(images).float() / 255)
    assert data.y.tolist() == labels.tolist()
    if name == "fashion-mnist":
        assert data.class_names is not None and len(data.class_names) == 10
    sample = load_data(name, n=10, seed=0, data_dir=tmp_path)
    assert torch.bincount(sample.y).tolist() == [1] * 10


def test_builtin_default_sample_is_1000(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((1200, 2, 2), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(1200) % 10)
    data = load_data("mnist", n=None, seed=0, data_dir=tmp_path)
    assert len(data) == 1000 and data.source_size == 1200
    assert torch.bincount(data.y).tolist() == [100] * 10


def test_builtin_uses_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBAUDIT_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    raw = tmp_path / "cache" / "mnist" / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((4, 3, 3), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3]))
    assert len(load_data("mnist", n=None, seed=0)) == 4


def test_default_cache_dir_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ROBAUDIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "robaudit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "robaudit"
    assert BUILTIN_NAMES == ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")


def test_cifar10_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    labels = [i % 10 for i in range(20)]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": labels,
                     "data": images.reshape(20, 3072), "filenames": ["a"] * 20}, f, protocol=2)
    data = load_data("cifar10", n=None, seed=0, data_dir=tmp_path)
    assert data.x.shape == (20, 3, 32, 32)
    assert torch.allclose(data.x, torch.from_numpy(images).float() / 255)
    assert data.y.tolist() == labels and data.class_names[3] == "cat"


def test_cifar100_format(tmp_path: Path) -> None:
    images = np.zeros((5, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": images, "fine_labels": [0, 1, 2, 3, 99], "coarse_labels": [0] * 5}, f)
    data = load_data("cifar100", n=None, seed=0, data_dir=tmp_path)
    assert data.x.shape == (5, 3, 32, 32) and data.y.tolist() == [0, 1, 2, 3, 99]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": [0]}, f)
    with raises_one_line("cannot read data file .*test_batch.*refusing"):
        load_data("cifar10", n=None, seed=0, data_dir=tmp_path)


def test_svhn_format(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    labels = np.array([[10], [1], [2], [10], [5], [9]], dtype=np.uint8)
    scipy_io.savemat(str(tmp_path / "test_32x32.mat"),
                     {"X": images.transpose(2, 3, 1, 0), "y": labels})
    data = load_data("svhn", n=None, seed=0, data_dir=tmp_path)
    assert data.x.shape == (6, 3, 32, 32)
    assert torch.allclose(data.x, torch.from_numpy(images).float() / 255)
    assert data.y.tolist() == [0, 1, 2, 0, 5, 9]


def test_mnist_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with raises_one_line("cannot download mnist") as info:
        load_data("mnist", n=None, seed=0, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message
    assert not (tmp_path / "empty").exists()  # hunt 14: the failed download left --data-dir/MNIST/raw behind


def test_a_failed_download_leaves_an_existing_data_dir_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    (tmp_path / "data" / "mine").mkdir(parents=True)
    with raises_one_line("cannot download mnist"):
        load_data("mnist", n=None, seed=0, data_dir=tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == ["mine"]


def test_cifar10_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setenv("ROBAUDIT_CACHE", str(tmp_path / "cache"))
    with raises_one_line("cannot download cifar10") as info:
        load_data("cifar10", n=None, seed=0)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "test_batch" in message
    assert str(tmp_path / "cache" / "cifar10") in message and "--data-dir" in message


def test_corrupt_idx_file(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((4, 3, 3), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3]))
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with raises_one_line("cannot read data file .*t10k-images-idx3-ubyte"):
        load_data("mnist", n=None, seed=0, data_dir=tmp_path)


# ----------------------------------------------------------------- input errors


def test_unknown_spec() -> None:
    with raises_one_line("neither an existing file or directory nor a built-in dataset name"):
        load_data("no/such/file.npz", n=None, seed=0)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("1,2\n")
    with raises_one_line(r"unsupported format.*\.npz.*\.safetensors.*\.pt"):
        load_data(str(path), n=None, seed=0)


def test_missing_key_lists_keys(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "d.npz", images=np.zeros((2, 4)), y=np.array([0, 1]))
    with raises_one_line("no x entry.*images, y"):
        load_data(str(path), n=None, seed=0)


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    before = sha256(path)
    with raises_one_line("pickled object arrays"):
        load_data(str(path), n=None, seed=0)
    assert sha256(path) == before


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_corrupt_and_truncated_files(tmp_path: Path, suffix: str) -> None:
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"this is not a data file at all" * 10)
    with raises_one_line(f"cannot read data file .*garbage{suffix}"):
        load_data(str(garbage), n=None, seed=0)
    good = tmp_path / f"good{suffix}"
    x, y = torch.rand(50, 1, 8, 8), torch.arange(50) % 2
    if suffix == ".npz":
        np.savez_compressed(good, x=x.numpy(), y=y.numpy())
    elif suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({"x": x, "y": y}, str(good))
    else:
        torch.save({"x": x, "y": y}, good)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    before = sha256(cut)
    with raises_one_line(f"cannot read data file .*cut{suffix}"):
        load_data(str(cut), n=None, seed=0)
    assert sha256(cut) == before


def test_torch_file_with_wrong_content(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    torch.save([torch.zeros(2)], path)
    with raises_one_line("must hold a dict"):
        load_data(str(path), n=None, seed=0)
    torch.save({"x": "abc", "y": torch.zeros(2)}, path)
    with raises_one_line("x of type str"):
        load_data(str(path), n=None, seed=0)
    torch.save({"x": torch.zeros(2, 2), "y": _Picklable()}, path)
    with raises_one_line("cannot read data file .*not loaded for safety"):
        load_data(str(path), n=None, seed=0)


class _Picklable:
    pass


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((0, 1, 2, 2), np.float32), np.zeros(0, np.int64), "empty"),
    (np.full((2, 4), np.nan, np.float32), np.array([0, 1]), "NaN or infinite"),
    (np.array([[0.0, np.inf], [0, 0]], np.float32), np.array([0, 1]), "NaN or infinite"),
    (np.zeros((2, 4), np.float32), np.array([0.5, 1.0]), "not integer-valued"),
    (np.zeros((2, 4), np.float32), np.array([[0], [1]]), "must be 1-D"),
    (np.zeros((3, 4), np.float32), np.array([0, 1]), "3 samples in x but 2 labels"),
    (np.zeros((2, 4), np.float32), np.array([0, -1]), "negative label"),
    (np.zeros(4, np.float32), np.zeros(4, np.int64), "sample dimension"),
    (np.array(["a", "b"]), np.array([0, 1]), "unsupported dtype"),
])
def test_validation_errors(tmp_path: Path, x: np.ndarray, y: np.ndarray, match: str) -> None:
    path = save_npz(tmp_path / "d.npz", x=x, y=y)
    before = sha256(path)
    with raises_one_line(match):
        load_data(str(path), n=None, seed=0)
    assert sha256(path) == before


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.0, float("nan"))])
def test_bad_input_range(bad: tuple[float, float]) -> None:
    with raises_one_line("input range"):
        load_data("digits", n=None, seed=0, input_range=bad)


# ----------------------------------------------------------------- check_compatible


def make_dataset(shape: tuple[int, ...], labels: list[int]) -> Dataset:
    return Dataset(x=torch.zeros(len(labels), *shape), y=torch.tensor(labels), name="t",
                   indices=list(range(len(labels))), source_size=len(labels), notes=[])


def test_check_compatible() -> None:
    data = make_dataset((1, 28, 28), [0, 9, 3])
    assert check_compatible(data, (1, 28, 28), 10) is None
    assert check_compatible(data, None, 10) is None
    assert check_compatible(data, (-1, 28, 28), 10) is None
    note = check_compatible(data, (784,), 10)
    assert note == "images (1, 28, 28) reshaped to the model's flat input (784,)"
    assert "(28, 28)" in check_compatible(data, (28, 28), 10)
    with raises_one_line(r"shape \(1, 28, 28\) but the model expects \(3, 32, 32\)"):
        check_compatible(data, (3, 32, 32), 10)
    with raises_one_line("label 9 .*out of range for a model with 5 classes"):
        check_compatible(data, (1, 28, 28), 5)


def test_a_model_scoring_classes_the_data_never_uses_gets_a_note() -> None:
    """Not an error (a 1000-class model on a few of its classes is a fair audit), but the report says why it errs."""
    data = make_dataset((1, 4, 4), [0, 9, 3])
    assert class_count_note(data, 10) is None
    assert class_count_note(data, 11).endswith("labels run 0 to 9: a prediction of class 10 counts as a mistake")
    assert "classes 10 to 999" in class_count_note(data, 1000)
    data.class_names = [str(i) for i in range(12)]  # the source names 12 classes, the sample uses 10
    assert class_count_note(data, 12) is None
    data.class_names, data.source_top = None, 11  # the whole source's largest label, not the sample's
    assert class_count_note(data, 12) is None and "run 0 to 11" in class_count_note(data, 13)


def test_a_reshape_that_would_scramble_the_pixels_is_refused() -> None:
    """Only flattening and size-1 dimensions are reshaped; a channel-last model would get scrambled pixels."""
    rgb = make_dataset((3, 32, 32), [0, 1])
    assert check_compatible(rgb, (1, 3, 32, 32), 10) == "images (3, 32, 32) reshaped to the model's input (1, 3, 32, 32)"
    assert "flat input (1, 3072, 1)" in check_compatible(rgb, (1, 3072, 1), 10)
    flat = make_dataset((3072,), [0, 1])
    assert check_compatible(flat, (3, 32, 32), 10) == "flat samples (3072,) reshaped to the model's input (3, 32, 32)"
    assert check_compatible(rgb, (32, 32, 3), 10) is None  # a channel-last net: permuted, not reshaped (`AuditModel`)
    with raises_one_line(r"another arrangement, which a reshape would scramble\. The model takes channel-last"):
        check_compatible(rgb, (1, 32, 32, 3), 10)
    with raises_one_line(r"model expects \(4, 4, 16\): the same number of values in another arrangement"):
        check_compatible(make_dataset((4, 16, 4), [0]), (4, 4, 16), 10)


def test_uint8_pixels_are_the_values_torchvision_to_tensor_gives(tmp_path: Path) -> None:
    """x / 255 correctly rounded, as ToTensor: times float32(1/255) was one float32 step off for 126 of 256
    values, so an adversarial example at exactly eps from robaudit's pixels lay beyond eps from the user's."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 1, 4, 4)
    np.savez(tmp_path / "all_bytes.npz", x=values, y=np.zeros(16, dtype=np.int64))
    data = load_data(str(tmp_path / "all_bytes.npz"), n=None, seed=0)
    to_tensor = torch.from_numpy(values).float().div(255)  # torchvision.transforms.functional.to_tensor's arithmetic
    assert torch.equal(data.x, to_tensor)


def test_gray_images_for_a_three_channel_model_are_refused(tmp_path: Path) -> None:
    """Repeated into 3 channels, a gray change counts sqrt(3) times in L2: radii were up to 1.73x the gray files'."""
    for label in (0, 1):
        write_png(tmp_path / "imgs" / str(label) / "a.png", np.full((4, 4), 60 * label, dtype=np.uint8))
    with pytest.raises(RobauditError, match="holds grayscale images only, but the model takes 3 channels") as info:
        load_data(str(tmp_path / "imgs"), n=None, seed=0, channels=3)
    assert "\n" not in str(info.value)
    assert load_data(str(tmp_path / "imgs"), n=None, seed=0, channels=1).x.shape == (2, 1, 4, 4)
    write_png(tmp_path / "imgs" / "1" / "b.png", np.full((4, 4, 3), 90, dtype=np.uint8))  # one colour image: RGB data
    assert load_data(str(tmp_path / "imgs"), n=None, seed=0, channels=3).x.shape == (3, 3, 4, 4)


def _png_16_bit_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written chunk by chunk (PIL cannot write one)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_sixteen_bit_colour_images_are_refused_as_sixteen_bit_gray_ones_are(tmp_path: Path) -> None:
    """PIL decodes 16-bit RGB as 8-bit 'RGB', keeping the high byte: read silently, though the docs said refused."""
    _png_16_bit_rgb(tmp_path / "imgs" / "0" / "deep.png", np.random.default_rng(0).integers(0, 65536, (4, 4, 3)))
    write_png(tmp_path / "imgs" / "1" / "plain.png", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(RobauditError, match=r"deep\.png has 16-bit colour pixels") as info:
        load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert "\n" not in str(info.value)


def test_two_class_folders_for_one_label_are_refused(tmp_path: Path) -> None:
    """'2' and '02' were both read as label 2: two classes merged without a word."""
    for name in ("0", "2", "02"):
        write_png(tmp_path / "imgs" / name / "a.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(RobauditError, match="has class folders 02, 2 for the same label") as info:
        load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert "\n" not in str(info.value)


def test_images_with_an_alpha_channel_say_it_was_dropped(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10  # nearly transparent red: read as red
    write_png(tmp_path / "imgs" / "0" / "a.png", rgba)
    write_png(tmp_path / "imgs" / "1" / "b.png", np.zeros((4, 4, 3), dtype=np.uint8))
    data = load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert "dropped the alpha (transparency) channel of 1 image:" in " ".join(data.notes)
    assert torch.equal(data.x[0, 0], torch.full((4, 4), 200 / 255))
