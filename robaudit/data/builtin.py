"""Test splits of the torchvision datasets, read straight from torchvision's on-disk layout.

Downloading goes through the real torchvision classes, but reading uses small readers
of our own: torchvision's CIFAR/SVHN classes verify md5 sums, which would reject any
file but the official one (and make tests with tiny files impossible). Offline users
get told exactly which files to put where.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robaudit.data.dataset import RawData
from robaudit.data.files import read_error, short_reason
from robaudit.errors import RobauditError

BUILTIN_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
MNIST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Globals a CIFAR pickle may reference: numpy array reconstruction, nothing executable.
SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("codecs", "encode"),
}


def default_cache_dir() -> Path:
    """Where built-in datasets live: $ROBAUDIT_CACHE, else the XDG cache directory."""
    env = os.environ.get("ROBAUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "robaudit"


def load_builtin(name: str, data_dir: Path | None) -> RawData:
    """The full test split of a torchvision dataset (`name` is lower-case, not 'digits')."""
    root = data_dir if data_dir is not None else default_cache_dir() / name
    if root.exists() and not root.is_dir():
        raise RobauditError(f"--data-dir {root} is a file, not a folder")
    hint = "" if data_dir is not None else ", or pass --data-dir"
    readers: dict[str, Callable[[Path, str], RawData]] = {
        "mnist": lambda r, h: _mnist(r, h, "mnist", "MNIST", None),
        "fashion-mnist": lambda r, h: _mnist(r, h, "fashion-mnist", "FashionMNIST", "classes"),
        "cifar10": _cifar10,
        "cifar100": _cifar100,
        "svhn": _svhn,
    }
    made, inside = _missing_folders(root), _folders_within(root)
    try:
        return readers[name](root, hint)
    except RobauditError:  # a failed download leaves no empty folders behind (--data-dir/MNIST/raw, ...)
        _remove_empty([*(_folders_within(root) - inside), *made])
        raise


def _missing_folders(root: Path) -> list[Path]:
    """`root` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], root.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _folders_within(root: Path) -> set[Path]:
    """Folders up to two levels below `root` (where torchvision puts <Name>/raw)."""
    if not root.is_dir():
        return set()
    return {p.absolute() for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_dir()}


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download created, deepest first, where it left them empty."""
    for path in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()


def _download(name: str, fetch: Callable[[], object], where: str, hint: str) -> None:
    """Run a torchvision download; on failure say which files to place where."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for reports
            fetch()
    except Exception as exc:
        # torchvision stacks "Tried <mirror>, got:" lines; the last one is the cause.
        lines = [line for line in str(exc).splitlines() if line.strip()]
        cause = short_reason(Exception(lines[-1]) if lines else exc, 120)
        raise RobauditError(
            f"cannot download {name} (offline?): {where}{hint} (download error: {cause})."
        ) from exc


def _first_existing(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist(root: Path, hint: str, name: str, cls_name: str, names_attr: str | None) -> RawData:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    raw = root / cls_name / "raw"
    paths = [_first_existing(raw, base) for base in MNIST_FILES]
    if None in paths:
        where = (f"place {MNIST_FILES[0]} and {MNIST_FILES[1]} (or their .gz files from "
                 f"{cls.mirrors[0]}) in {raw}")
        _download(name, lambda: cls(str(root), train=False, download=True), where, hint)
        paths = [_first_existing(raw, base) for base in MNIST_FILES]
        if None in paths:
            raise RobauditError(f"the {name} download left no test files; {where}{hint}.")
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    names = list(getattr(cls, names_attr)) if names_attr else None
    return RawData(x=torch.from_numpy(images.copy()).unsqueeze(1),
                   y=torch.from_numpy(labels.astype(np.int64)), class_names=names)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (the MNIST format), gzipped or not."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except Exception as exc:
        raise read_error(str(path), exc) from exc
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise read_error(str(path), f"it is not an unsigned-byte IDX file with {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise read_error(str(path), f"it is truncated or padded (expected {math.prod(dims)} "
                         f"bytes of data for shape {dims}, found {len(body)})")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow numpy arrays but never arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise read_error(str(path), exc) from exc
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise read_error(str(path), f"it is not a CIFAR batch with keys {', '.join(keys)}")
    return obj


def _cifar_arrays(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path, ("data", label_key))
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except Exception as exc:
        raise read_error(str(path), f"its data is not uint8 rows of 3072 pixels "
                         f"({short_reason(exc)})") from exc
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _cifar_file(root: Path, hint: str, name: str, cls_name: str) -> Path:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    test_file = cls.test_list[0][0]
    path = root / cls.base_folder / test_file
    if not path.is_file():
        where = (f"place {cls.filename} (from {cls.url}) in {root}, or its extracted "
                 f"{test_file} in {root / cls.base_folder}")
        _download(name, lambda: cls(str(root), train=False, download=True), where, hint)
        if not path.is_file():
            raise RobauditError(f"the {name} download left no {path}; {where}{hint}.")
    return path


def _cifar10(root: Path, hint: str) -> RawData:
    x, y = _cifar_arrays(_cifar_file(root, hint, "cifar10", "CIFAR10"), "labels")
    return RawData(x=x, y=y, class_names=list(CIFAR10_CLASSES))


def _cifar100(root: Path, hint: str) -> RawData:
    path = _cifar_file(root, hint, "cifar100", "CIFAR100")
    x, y = _cifar_arrays(path, "fine_labels")
    meta = path.parent / "meta"
    names = None
    if meta.is_file():
        with contextlib.suppress(RobauditError):
            names = [str(n) for n in _unpickle(meta, ("fine_label_names",))["fine_label_names"]]
    return RawData(x=x, y=y, class_names=names)


def _svhn(root: Path, hint: str) -> RawData:
    try:
        import scipy.io
    except ImportError as exc:
        raise RobauditError("svhn needs scipy: pip install scipy.") from exc
    from torchvision import datasets

    url, filename, _ = datasets.SVHN.split_list["test"]
    path = root / filename
    if not path.is_file():
        where = f"place {filename} (from {url}) in {root}"
        _download("svhn", lambda: datasets.SVHN(str(root), split="test", download=True),
                  where, hint)
        if not path.is_file():
            raise RobauditError(f"the svhn download left no {path}; {where}{hint}.")
    try:
        mat = scipy.io.loadmat(str(path))
        if "X" not in mat or "y" not in mat:
            raise ValueError("it has no X and y arrays")
        images = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except Exception as exc:
        raise read_error(str(path), exc) from exc
    labels[labels == 10] = 0  # SVHN stores digit 0 as class 10
    return RawData(x=torch.from_numpy(np.ascontiguousarray(images)),
                   y=torch.from_numpy(labels), class_names=None)
