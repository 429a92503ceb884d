"""Whether a dataset fits a model, checked before any attack runs.

Catching a shape or label mismatch here gives the user one clear sentence instead of a
matmul error deep inside an attack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from robaudit.data.dataset import Dataset
from robaudit.errors import RobauditError
from robaudit.layout import is_channel_last


def _known(dim: object) -> bool:
    """Dynamic dims (None, -1, 0 as some ONNX exports write them) match anything."""
    return isinstance(dim, int) and dim > 0


def _shape_str(shape: Sequence[object]) -> str:
    return str(tuple(d if _known(d) else "?" for d in shape))


def check_compatible(
    data: Dataset, input_shape: tuple[int, ...] | None, num_classes: int
) -> str | None:
    """None if the data fits the model as is, a note if it fits after a reshape.

    Raises RobauditError when the sample size or a label cannot fit the model.
    """
    note = _check_shape(data, input_shape)
    if len(data) and data.y.numel():
        top = int(data.y.max()) if data.source_top is None else data.source_top  # the source's: sampled rows or not
        if top >= num_classes:
            raise RobauditError(
                f"label {top} in data {data.name} is out of range for a model with "
                f"{num_classes} classes (labels 0 to {num_classes - 1})."
            )
    return note


def class_count_note(data: Dataset, num_classes: int) -> str | None:
    """A note where the model scores more classes than the data can name, else None.

    Not an error (an ImageNet model on a folder of a few of its classes is a fair audit),
    but a prediction of a class the data never uses counts as a mistake, and a user who
    pointed robaudit at the wrong model or data should see why accuracy is low.
    """
    if data.class_names:
        known = len(data.class_names)
    elif data.source_top is not None:
        known = data.source_top + 1
    elif len(data) and data.y.numel():
        known = int(data.y.max()) + 1
    else:
        return None
    if num_classes <= known:
        return None
    extra = f"class {known}" if num_classes == known + 1 else f"classes {known} to {num_classes - 1}"
    return (
        f"the model scores {num_classes} classes and the data's labels run 0 to {known - 1}: "
        f"a prediction of {extra} counts as a mistake"
    )


def _check_shape(data: Dataset, input_shape: tuple[int, ...] | None) -> str | None:
    if input_shape is None:
        return None
    sample = tuple(int(d) for d in data.sample_shape)
    model = tuple(input_shape)
    if len(sample) == len(model) and all(
        not _known(m) or m == s for m, s in zip(model, sample, strict=True)
    ):
        return None
    if all(_known(d) for d in model) and math.prod(model) == math.prod(sample):
        kind = "images" if len(sample) == 3 else "samples"
        if sum(d > 1 for d in model) <= 1:  # a flat input: the samples flattened in their (C, H, W) order
            return f"{kind} {sample} reshaped to the model's flat input {model}"
        if sum(d > 1 for d in sample) <= 1:  # flat samples: images flattened in (C, H, W) order, unflattened
            return f"flat samples {sample} reshaped to the model's input {model}"
        if [d for d in model if d != 1] == [d for d in sample if d != 1]:  # only size-1 dimensions differ
            return f"{kind} {sample} reshaped to the model's input {model}"
        if is_channel_last(model, sample):  # permuted, not reshaped (`AuditModel.channels_last`)
            return None
        hint = ""
        if len(sample) == 3 and tuple(model[-3:]) == (sample[1], sample[2], sample[0]):
            hint = (" The model takes channel-last (H, W, C) images and robaudit feeds channel-first (C, H, W) "
                    "ones; export the model with a channel-first input.")
        raise RobauditError(
            f"data samples have shape {sample} but the model expects {_shape_str(model)}: the same number of "
            f"values in another arrangement, which a reshape would scramble.{hint}"
        )
    raise RobauditError(
        f"data samples have shape {sample} but the model expects {_shape_str(model)}."
    )
