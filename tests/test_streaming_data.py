"""Tests for lazy, chunked data: `Dataset.take` and image folders decoded per chunk.

The scan reads pixels a chunk at a time through `take`; these tests check that the
chunks add up to exactly the eager pixels, and that an image folder is validated from
file headers at load time but decoded only when a chunk asks for it. All data is made
here in tmp_path in the real on-disk formats; nothing is mocked.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from robaudit.data import Dataset, load_data
from robaudit.data.dataset import to_pixels
from robaudit.errors import RobauditError


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def eager(x: np.ndarray | torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """All pixels converted at once, as load_data did before it read in chunks."""
    return to_pixels(torch.as_tensor(x), lo, hi, [])


def chunked(data: Dataset, size: int) -> torch.Tensor:
    """All of `data` read through `take`, `size` samples at a time."""
    parts = [data.take(start, start + size) for start in range(0, len(data), size)]
    return torch.cat(parts)


def make_folder(root: Path, counts: dict[str, int], shape: tuple[int, ...],
                seed: int = 0) -> dict[Path, np.ndarray]:
    """PNGs of random pixels in class folders; returns each file's pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for cls, count in counts.items():
        for i in range(count):
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            path = root / cls / f"{i:03d}.png"
            write_png(path, arr)
            pixels[path] = arr
    return pixels


def corrupt_pixel_data(path: Path) -> None:
    """Zero the start of the PNG's IDAT chunk: the header still parses, decoding fails."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 4
    data[at : at + 16] = bytes(16)
    path.write_bytes(bytes(data))


def one_line_error(info: pytest.ExceptionInfo[RobauditError]) -> str:
    message = str(info.value)
    assert message and "\n" not in message and message.strip() == message, message
    return message


# ----------------------------------------------------------------- chunks == eager


@pytest.mark.parametrize("shape,channels", [((6, 5, 3), 3), ((6, 5), 1)])
def test_image_folder_chunks_equal_eager(tmp_path: Path, shape: tuple[int, ...],
                                         channels: int) -> None:
    pixels = make_folder(tmp_path / "imgs", {"cat": 9, "dog": 7, "eel": 7}, shape)
    data = load_data(str(tmp_path / "imgs"), n=15, seed=3)
    assert data.sample_shape == (channels, 6, 5) and len(data) == 15
    files = sorted(pixels)  # class folders sorted, then files sorted: the source order
    expected = eager(torch.stack([
        torch.from_numpy(pixels[files[i]]).reshape(6, 5, channels).permute(2, 0, 1)
        for i in data.indices
    ]))
    for size in (1, 4, 15, 100):
        assert torch.equal(chunked(data, size), expected)
    assert torch.equal(data.x, expected)


def test_uint8_npz_chunks_equal_eager(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 5, 5, 3), dtype=np.uint8)  # NHWC, converted to NCHW
    y = np.arange(40) % 4
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    data = load_data(str(path), n=25, seed=1, input_range=(-1.0, 1.0))
    expected = eager(torch.from_numpy(x[data.indices]).permute(0, 3, 1, 2), -1.0, 1.0)
    for size in (1, 7, 25):
        assert torch.equal(chunked(data, size), expected)
    assert torch.equal(data.x, expected)
    assert data.notes[-1] == "scaled uint8 0-255 to [-1, 1]"


def test_float_npz_chunks_equal_eager(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((30, 2, 4, 5), dtype=np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(30) % 3)
    data = load_data(str(path), n=None, seed=0)
    assert torch.equal(chunked(data, 8), torch.from_numpy(x))
    assert data.notes == []


def test_builtin_cifar10_format_chunks_equal_eager(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 3, 32, 32), dtype=np.uint8)
    labels = [i % 10 for i in range(30)]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": labels,
                     "data": images.reshape(30, 3072), "filenames": ["a"] * 30}, f, protocol=2)
    data = load_data("cifar10", n=20, seed=0, data_dir=tmp_path)
    assert data.sample_shape == (3, 32, 32) and len(data) == 20
    expected = eager(images[data.indices])
    for size in (3, 20):
        assert torch.equal(chunked(data, size), expected)
    assert data.y.tolist() == [labels[i] for i in data.indices]


def test_take_edges(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", {"0": 3, "1": 3}, (4, 4, 3))
    data = load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert data.take(2, 2).shape == (0, 3, 4, 4)
    assert data.take(4, 99).shape == (2, 3, 4, 4)  # like slicing: stops at the end
    assert data.take(0, 6).dtype == torch.float32


# ----------------------------------------------------------------- lazy decoding


def test_image_folder_decodes_nothing_before_take(tmp_path: Path) -> None:
    """A file with a valid header but broken pixels loads, and fails only in `take`."""
    make_folder(tmp_path / "imgs", {"0": 4, "1": 4}, (6, 6, 3))
    bad = tmp_path / "imgs" / "1" / "002.png"
    corrupt_pixel_data(bad)
    data = load_data(str(tmp_path / "imgs"), n=None, seed=0)  # headers only: no error
    assert data.sample_shape == (3, 6, 6) and len(data) == 8
    position = data.indices.index(6)  # 1/002.png is the 7th file of the source
    assert data.take(0, position).shape == (position, 3, 6, 6)  # chunks before it decode
    with pytest.raises(RobauditError) as info:
        data.take(position - 1, position + 1)
    message = one_line_error(info)
    assert message.startswith("cannot read image ") and "1/002.png" in message
    with pytest.raises(RobauditError):
        data.x  # noqa: B018  (materializing everything decodes it too)


def test_bad_header_fails_whatever_the_seed(tmp_path: Path) -> None:
    """Header problems are found in the whole folder at load time, not just the sample."""
    make_folder(tmp_path / "imgs", {"0": 5, "1": 5}, (4, 4))
    (tmp_path / "imgs" / "1" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for seed in range(4):
        with pytest.raises(RobauditError, match=r"cannot read image .*004\.png") as info:
            load_data(str(tmp_path / "imgs"), n=2, seed=seed)
        one_line_error(info)
    write_png(tmp_path / "imgs" / "1" / "004.png", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(RobauditError, match=r"004\.png is 5x4 pixels") as info:
        load_data(str(tmp_path / "imgs"), n=2, seed=0)
    one_line_error(info)


def test_mixed_modes_and_channel_hint_are_decided_from_headers(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs" / "0" / "a.png", np.full((4, 4), 10, dtype=np.uint8))
    write_png(tmp_path / "imgs" / "1" / "b.png", np.full((4, 4, 3), 200, dtype=np.uint8))
    rgb = load_data(str(tmp_path / "imgs"), n=None, seed=0)
    assert rgb.sample_shape == (3, 4, 4) and "RGB (3 channels)" in rgb.notes[0]
    assert torch.equal(rgb.take(0, 1), eager(np.full((1, 3, 4, 4), 10, dtype=np.uint8)))
    gray = load_data(str(tmp_path / "imgs"), n=None, seed=0, channels=1)
    assert gray.sample_shape == (1, 4, 4) and "grayscale" in gray.notes[0]
    assert gray.take(0, 2).shape == (2, 1, 4, 4)
