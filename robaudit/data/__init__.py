"""Evaluation data for an audit: built-in datasets, user files and image folders.

`load_data` is the one entry point the scan uses: it reads a source, validates it,
draws a reproducible stratified sample and returns a Dataset whose `take` yields float
pixels in the model's range, a chunk at a time (image folders decode per chunk).
"""

from __future__ import annotations

import math
from pathlib import Path

from robaudit.data.builtin import BUILTIN_NAMES, default_cache_dir, load_builtin
from robaudit.data.checks import check_compatible, class_count_note
from robaudit.data.dataset import (
    Dataset,
    PixelReader,
    RawData,
    check_range,
    pixel_note,
    validate,
)
from robaudit.data.digits import load_digits
from robaudit.data.files import load_path
from robaudit.data.sampling import stratified_indices
from robaudit.errors import RobauditError

BUILTIN_DEFAULT_N = 1000

__all__ = [
    "BUILTIN_NAMES",
    "Dataset",
    "check_compatible",
    "class_count_note",
    "default_cache_dir",
    "load_data",
]


def load_data(
    spec: str | tuple,
    *,
    n: int | None,
    seed: int,
    data_dir: Path | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    channels: int | None = None,
    first: int | None = None,
) -> Dataset:
    """Load `spec` (a built-in name or a path) as a validated, sampled Dataset.

    Built-in names win over a same-named relative path; write `./mnist` for the path.
    `n=None` means every sample of a file/digits and 1000 for torchvision datasets.
    """
    lo, hi = _check_input_range(input_range)
    if n is not None and n <= 0:
        raise RobauditError(f"the number of samples must be positive, got {n}.")
    raw, name, default_n = _read(spec, data_dir, channels)
    labels = validate(raw, name)
    clamped = check_range(raw.x, name, lo, hi)
    total = int(raw.x.shape[0])
    notes = list(raw.notes) + ([clamped] if clamped else [])
    want = default_n if n is None else n
    if first is not None:  # the first N of the source, in its own order (RobustBench / AutoAttack evaluations)
        if first <= 0:
            raise RobauditError(f"--first must be positive, got {first}.")
        indices = list(range(min(first, total)))
        notes.append(f"the first {len(indices)} of the {total} samples, in the source's order")
    elif want is None or want >= total:
        indices = list(range(total))
        if n is not None and n > total:
            notes.append(f"requested {n} samples but {name} has only {total}; using all of them")
    else:
        indices = stratified_indices(labels.numpy(), want, seed)
        if n is None:
            notes.append(f"using a stratified sample of {want} of the {total} test samples "
                         f"(seed {seed}); pass --n to change it")
        missing = sorted(set(labels.tolist()) - set(labels[indices].tolist()))
        if missing:  # too rare for their share of the sample to round up to one
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            notes.append(f"{len(missing)} class(es) of the source have no sample in the stratified {want}: {shown}")
    note = pixel_note(raw.x.dtype, lo, hi)
    if note:
        notes.append(note)
    # Pixels stay in the source's own form (uint8, or an image folder's file list)
    # until the scan takes them a chunk at a time.
    return Dataset(
        y=labels[indices],
        name=name,
        indices=indices,
        source_size=total,
        notes=notes,
        class_names=raw.class_names,
        reader=PixelReader(raw.x, indices, lo, hi),
        source_top=int(labels.max()) if len(labels) else None,  # every label must fit the model, sampled or not
    )


def _in_memory(pair: tuple | list) -> RawData:
    """(x, y) arrays or tensors handed to the Python API; copied, so the caller's stay as they are."""
    import numpy as np
    import torch

    if len(pair) != 2:
        raise RobauditError(f"in-memory data must be a pair (x, y), not {len(pair)} items.")
    try:
        x, y = (torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).detach().cpu().clone() for v in pair)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RobauditError(f"in-memory data (x, y) cannot be read as arrays: {exc}.") from exc
    return RawData(x=x, y=y, notes=["in-memory tensors"])


def _check_input_range(input_range: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError) as exc:
        raise RobauditError(f"the input range must be two numbers, got {input_range!r}.") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise RobauditError(
            f"the input range must be finite with low < high, got [{lo:g}, {hi:g}]."
        )
    return lo, hi


def _read(spec: str | tuple, data_dir: Path | None, channels: int | None) -> tuple[RawData, str, int | None]:
    """The raw source, its display name, and its default sample size (None = all)."""
    if isinstance(spec, (tuple, list)):
        return _in_memory(spec), "tensors", None
    key = spec.strip().lower()
    if key == "digits":
        return load_digits(), "digits", None
    if key in BUILTIN_NAMES:
        return load_builtin(key, data_dir), key, BUILTIN_DEFAULT_N
    path = Path(spec).expanduser()
    if not key or not path.exists():
        raise RobauditError(
            f"data {spec!r} is neither an existing file or directory nor a built-in "
            f"dataset name ({', '.join(BUILTIN_NAMES)})."
        )
    return load_path(path, spec, channels), spec, None
