"""Readers for user data files: .npz, .safetensors, .pt/.pth and image folders.

Files are only ever opened for reading. Every low-level failure is turned into a
RobauditError that names the file, since a traceback tells the user nothing useful.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robaudit.data.dataset import RawData
from robaudit.layout import CHANNEL_AXIS_SIZES
from robaudit.errors import RobauditError

SUPPORTED_FORMATS = (
    ".npz or .safetensors (arrays x and y), .pt/.pth (a dict with tensors x and y), "
    "or a directory of images in one sub-folder per class"
)
FLAT_INPUT = 0  # `channels` for a model whose input is a flat vector: keep 4-D data as stored (`_to_nchw`)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# 16-bit, 32-bit integer and float images: PIL's conversion to 8 bits clips them instead of scaling
DEEP_MODES = {"I": "32-bit integer", "I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit",
              "F": "32-bit float", "RGB;16": "16-bit colour"}  # fmt: skip


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """One line of an exception, so the CLI can print the error on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_error(spec: str, exc: BaseException | str) -> RobauditError:
    reason = exc if isinstance(exc, str) else short_reason(exc)
    return RobauditError(f"cannot read data file {spec}: {reason}.")


def load_path(path: Path, spec: str, channels: int | None) -> RawData:
    """Dispatch on the path type; `spec` is the user's spelling, used in messages."""
    if path.is_dir():
        return load_image_folder(path, spec, channels)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path, spec)
    elif suffix == ".safetensors":
        x, y = _read_safetensors(path, spec)
    elif suffix in (".pt", ".pth"):
        x, y = _read_torch(path, spec)
    else:
        raise RobauditError(
            f"data file {spec} has an unsupported format; use {SUPPORTED_FORMATS}."
        )
    notes: list[str] = []
    return RawData(x=_to_nchw(x, notes, channels), y=y, notes=notes)


def _pick(found: dict[str, Any], spec: str) -> tuple[Any, Any]:
    missing = [k for k in ("x", "y") if k not in found]
    if missing:
        keys = ", ".join(sorted(str(k) for k in found)) or "none"
        raise RobauditError(
            f"data file {spec} has no {' or '.join(missing)} entry; it must hold x "
            f"(samples) and y (labels), but its keys are: {keys}."
        )
    return found["x"], found["y"]


def _numpy_to_tensor(arr: np.ndarray, key: str, spec: str) -> torch.Tensor:
    if arr.dtype.kind not in "biuf":
        raise RobauditError(
            f"data file {spec} has {key} of unsupported dtype {arr.dtype}; "
            "use numeric arrays."
        )
    if arr.dtype.kind == "u" and arr.dtype != np.uint8:
        arr = arr.astype(np.int64)
    elif arr.dtype.byteorder not in "=|":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_npz(path: Path, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        # numpy falls back to unpickling unknown bytes, so garbage reports "pickled data".
        detail = "" if "pickle" in str(exc).lower() else f" ({short_reason(exc)})"
        raise read_error(spec, f"it is not a valid .npz archive{detail}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise RobauditError(f"data file {spec} is a single array, not an .npz archive "
                            "with arrays x and y.")
    with archive:
        _pick(dict.fromkeys(archive.files), spec)
        try:
            x, y = archive["x"], archive["y"]
        except ValueError as exc:
            if "pickle" not in str(exc).lower():
                raise read_error(spec, exc) from exc
            raise read_error(spec, "it contains pickled object arrays, which are not "
                             "loaded for safety; save plain numeric arrays") from exc
        except Exception as exc:
            raise read_error(spec, exc) from exc
    return _numpy_to_tensor(x, "x", spec), _numpy_to_tensor(y, "y", spec)


def _read_safetensors(path: Path, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise read_error(spec, exc) from exc
    x, y = _pick(tensors, spec)
    return _plain_tensor(x, "x", spec), _plain_tensor(y, "y", spec)


def _read_torch(path: Path, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise read_error(spec, _unpickling_reason(exc)) from exc
    except Exception as exc:
        raise read_error(spec, exc) from exc
    if isinstance(obj, dict):
        x, y = _pick(obj, spec)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise RobauditError(
            f"data file {spec} holds a {type(obj).__name__}, but it must hold a dict "
            "{'x': tensor, 'y': tensor} or a pair (x, y)."
        )
    out = []
    for key, value in (("x", x), ("y", y)):
        if isinstance(value, np.ndarray):
            value = _numpy_to_tensor(value, key, spec)
        if not isinstance(value, torch.Tensor):
            raise RobauditError(
                f"data file {spec} has {key} of type {type(value).__name__}, "
                "but x and y must be tensors."
            )
        out.append(_plain_tensor(value.detach().cpu(), key, spec))
    return out[0], out[1]


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _plain_tensor(value: torch.Tensor, key: str, spec: str) -> torch.Tensor:
    """A dense tensor of a dtype the checks can read: wide unsigned integers become int64 (as from .npz)."""
    if value.layout != torch.strided:
        raise RobauditError(f"data file {spec} has {key} as a {value.layout} tensor; save it dense (tensor.to_dense()).")
    if value.dtype in _WIDE_UNSIGNED:
        return value.to(torch.int64)
    if value.dtype.is_complex or (value.dtype.is_floating_point and value.dtype.itemsize == 1):  # complex, float8
        raise RobauditError(f"data file {spec} has {key} of unsupported dtype {value.dtype}; use numeric arrays.")
    return value


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """torch's weights-only errors are paragraphs; keep the part that names the cause."""
    text = str(exc)
    if "Unsupported global" in text:
        return ("it contains objects other than tensors, which are not loaded for safety; "
                "save a dict {'x': tensor, 'y': tensor}")
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = match.group(1).strip() if match else short_reason(exc)
    return f"it is not a valid PyTorch tensor file ({detail})"


def _to_nchw(x: torch.Tensor, notes: list[str], channels: int | None = None) -> torch.Tensor:
    """Bring common image layouts to NCHW; flat (N, D) data is left alone.

    `channels`, the model's channel count where its input is an image, decides the
    layout of 4-D data: a channel axis first is NCHW already, last is NHWC. Without it,
    a last axis of 1, 3 or 4 with another size at axis 1 is taken as NHWC. `FLAT_INPUT`
    (a model taking flat vectors) keeps 4-D data as stored: the model flattens it in the
    order it is stored, as `x.reshape(N, -1)` did when the model was trained on it.
    """
    if x.dim() == 4 and channels == FLAT_INPUT:
        notes.append(f"samples {tuple(x.shape[1:])} kept as stored and flattened in that order (the model takes flat input)")
        return x
    if x.dim() == 3:
        notes.append(f"added a channel dimension: samples {tuple(x.shape[1:])} -> "
                     f"{(1, *x.shape[1:])}")
        return x.unsqueeze(1)
    if x.dim() == 4 and channels is not None and channels in (x.shape[1], x.shape[-1]):
        nhwc = x.shape[1] != channels
        if not nhwc and x.shape[-1] == channels:  # either axis could be the channels: say which one was taken
            notes.append(f"samples {tuple(x.shape[1:])} taken as NCHW (the model has {channels} channels)")
    else:
        nhwc = x.dim() == 4 and x.shape[-1] in CHANNEL_AXIS_SIZES and x.shape[1] not in CHANNEL_AXIS_SIZES
    if nhwc:
        out = x.permute(0, 3, 1, 2).contiguous()
        notes.append(f"converted NHWC to NCHW: samples {tuple(x.shape[1:])} -> "
                     f"{tuple(out.shape[1:])}")
        return out
    return x


def _image_files(root: Path, classes: list[str], numeric: bool) -> tuple[list[tuple[Path, int]], Counter[str]]:
    """(file, label) in ImageFolder order: class folders sorted, then files sorted; and the other files' suffixes.

    Hidden files are neither read nor counted; every other file that is not an image
    (by its suffix: .gif, .txt, ...) is counted, so the report can say what was left out.
    """
    files: list[tuple[Path, int]] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()  # real paths of the folders walked: a symlink loop is walked once
    for index, cls in enumerate(classes):
        label = int(cls) if numeric else index
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames.clear()
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .ipynb_checkpoints and friends
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((Path(dirpath) / fname, label))
                else:
                    skipped[Path(fname).suffix.lower() or "no suffix"] += 1
    return files, skipped


def _files(count: int) -> str:
    return f"{count} file{'s' if count != 1 else ''}"


def _skipped_note(skipped: Counter[str]) -> str:
    """'skipped 3 files that are not read as images (.gif 2, .txt 1)'."""
    kinds = ", ".join(f"{suffix} {count}" for suffix, count in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"skipped {_files(sum(skipped.values()))} in the class folders that are not read as images "
            f"({kinds}; images are {' '.join(IMAGE_EXTENSIONS)})")


def load_image_folder(root: Path, spec: str, channels: int | None) -> RawData:
    """An ImageFolder-style tree (class sub-folders) as a lazy uint8 NCHW source.

    Every file's header is read now (size and mode, no decoding), so a bad file or a
    size mismatch anywhere in the folder fails before sampling, whatever the seed;
    pixels are decoded only when the scan takes a chunk.
    """
    try:
        classes = sorted(d.name for d in root.iterdir()
                         if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise read_error(spec, exc) from exc
    if not classes:
        raise RobauditError(
            f"image folder {spec} has no class sub-folders; put the images of each "
            f"class in its own sub-folder, e.g. {Path(spec) / '0' / 'img.png'}."
        )
    # Integer folder names are the labels themselves (e.g. 0..9); otherwise sorted index.
    numbered = [c for c in classes if re.fullmatch(r"[0-9]+", c)]
    numeric = len(numbered) == len(classes)
    same = [c for c in numbered if any(d != c and int(d) == int(c) for d in numbered)]
    if numeric and same:  # "2" and "02" would both be label 2: two classes merged silently
        raise RobauditError(
            f"image folder {spec} has class folders {', '.join(sorted(same, key=lambda c: (int(c), c))[:2])} for the same "
            "label; rename them so that each number names one folder."
        )
    if numbered and not numeric:  # sorted as text, "10" would come before "2": labels would move silently
        others = [c for c in classes if c not in numbered]
        raise RobauditError(
            f"image folder {spec} mixes numbered class folders ({', '.join(numbered[:3])}, ...) with others "
            f"({', '.join(others[:3])}); name every class folder by its label, or none of them."
        )
    files, skipped = _image_files(root, classes, numeric)
    if not files:
        raise RobauditError(
            f"image folder {spec} contains no images ({', '.join(IMAGE_EXTENSIONS)}) "
            "in its class sub-folders" + (f"; it has {_files(sum(skipped.values()))} of other kinds ({', '.join(sorted(skipped))})" if skipped else "") + "."
        )
    paths = [file for file, _ in files]
    shown = [Path(spec) / file.relative_to(root) for file in paths]
    size, colour, with_alpha = _check_headers(paths, shown)
    all_gray = colour == 0
    if all_gray and channels == 3:
        raise RobauditError(
            f"image folder {spec} holds grayscale images only, but the model takes 3 channels: repeating each gray "
            "level into 3 channels would measure L2 sizes sqrt(3) times (L1 sizes 3 times) those of the gray images, "
            "so radii and L2 robust accuracy would not be about these files; convert the images to RGB first "
            "(every figure is then about the RGB files), or audit a model that takes 1 channel."
        )
    mode = {1: "L", 3: "RGB"}.get(channels or 0)
    # Grayscale converted to RGB repeats the channel: keep one copy.
    one_channel = mode == "L" or (mode is None and all_gray)
    images = FolderImages(paths, shown, size, mode or "RGB", one_channel)
    kind = "grayscale (1 channel)" if one_channel else "RGB (3 channels)"
    notes = [f"read {len(files)} images from {len(classes)} class folders as {kind}"]
    if mode == "L" and colour:  # the model takes 1 channel: PIL's luminance, the figures are about the gray images
        notes.append(
            f"converted {colour} colour image{'s' if colour != 1 else ''} to grayscale, as the model takes 1 channel "
            "(PIL's luminance L = 0.299 R + 0.587 G + 0.114 B): every figure is about those gray images, not the "
            "colour files"
        )
    if with_alpha:
        notes.append(
            f"dropped the alpha (transparency) channel of {with_alpha} image{'s' if with_alpha != 1 else ''}: pixels are "
            "read as stored, not blended over a background"
        )
    if skipped:
        notes.append(_skipped_note(skipped))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return RawData(x=images, y=labels, notes=notes, class_names=None if numeric else classes)


def _decoded_from_16_bits(img) -> bool:
    """Whether PIL decodes the image from 16 bits per channel (its tiles' raw mode, e.g. 'RGB;16B')."""
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else ""
        if ";16" in raw:
            return True
    return False


def _check_headers(files: list[Path], shown: list[Path]) -> tuple[tuple[int, int], int, int]:
    """The common (width, height), how many images are in colour and how many have an alpha channel, from headers only.

    PIL's `Image.open` parses the header and defers decoding, so this stays cheap for
    thousands of files; errors come in file order, as a full read would give them.
    """
    from PIL import Image

    colour = 0
    with_alpha = 0
    first: tuple[Path, tuple[int, int]] | None = None
    for file, name in zip(files, shown, strict=True):
        try:
            with Image.open(file) as img:
                colour += img.mode not in GRAY_MODES
                with_alpha += img.mode in ALPHA_MODES or "transparency" in img.info
                size, mode = img.size, img.mode
                if mode not in DEEP_MODES and _decoded_from_16_bits(img):
                    mode = "RGB;16"  # PIL reads 16-bit colour as 8-bit "RGB", dropping the low byte
        except Exception as exc:
            raise RobauditError(f"cannot read image {name}: {short_reason(exc)}.") from exc
        if mode in DEEP_MODES:
            raise RobauditError(
                f"image {name} has {DEEP_MODES[mode]} pixels (PIL mode {mode}); image folders are read as 8-bit "
                "images: convert the images to 8 bits, or pass the data as .npz, .safetensors or .pt with values in the input range."
            )
        if first is None:
            first = (name, size)
        elif size != first[1]:
            raise RobauditError(
                f"image {name} is {size[0]}x{size[1]} pixels but {first[0]} is "
                f"{first[1][0]}x{first[1][1]}; all images in a folder must have the same size."
            )
    assert first is not None  # the caller checked that there are files
    return first[1], colour, with_alpha


class FolderImages:
    """The images of a folder as a lazy uint8 (N, C, H, W) source: decoded per request."""

    dtype = torch.uint8

    def __init__(self, files: list[Path], shown: list[Path], size: tuple[int, int],
                 mode: str, one_channel: bool) -> None:
        self.files, self.shown, self.mode, self.one_channel = files, shown, mode, one_channel
        width, height = size
        self.shape = (len(files), 1 if one_channel else 3, height, width)

    def rows(self, positions: Sequence[int]) -> torch.Tensor:
        """Decode the images at `positions` (only those) into uint8 NCHW."""
        out = np.empty((len(positions), *self.shape[1:]), dtype=np.uint8)
        for row, position in enumerate(positions):
            out[row] = self._decode(int(position))
        return torch.from_numpy(out)

    def _decode(self, position: int) -> np.ndarray:
        """One image as CHW uint8, in the mode and channel count fixed at load time."""
        from PIL import Image

        name = self.shown[position]
        try:
            with Image.open(self.files[position]) as img:
                arr = np.asarray(img.convert(self.mode), dtype=np.uint8)
        except Exception as exc:
            raise RobauditError(f"cannot read image {name}: {short_reason(exc)}.") from exc
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if self.one_channel:
            arr = arr[:1]
        if arr.shape != self.shape[1:]:  # the file changed since its header was read
            raise RobauditError(
                f"cannot read image {name}: it decodes to shape {arr.shape}, "
                f"not {self.shape[1:]} as its header said."
            )
        return arr
