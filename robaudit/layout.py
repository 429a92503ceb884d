"""Image layouts: which axis of a model's input holds the channels.

robaudit reads images channel-first, (C, H, W), as torch does. Models exported from
TensorFlow take them channel-last, (H, W, C); for those the samples are permuted (never
reshaped, which would scramble them) on their way into the net (`AuditModel.channels_last`).
"""

from __future__ import annotations

from collections.abc import Sequence

CHANNEL_AXIS_SIZES = {1, 3, 4}  # channel counts of grey, RGB and RGBA images


def is_channel_last(model_shape: Sequence[int], sample_shape: Sequence[int]) -> bool:
    """Whether a net taking `model_shape` wants (C, H, W) samples as (H, W, C) images (TensorFlow's layout).

    Only an unambiguous case counts: the model's shape is the sample's with its channel
    axis moved last, the channels are more than one (one channel moves no value) and
    differ from the height (else the two layouts cannot be told apart).
    """
    model_shape, sample_shape = tuple(model_shape), tuple(sample_shape)
    if len(model_shape) != 3 or len(sample_shape) != 3:
        return False
    c, h, w = sample_shape
    return model_shape == (h, w, c) and 1 < c != h


def image_channels(input_shape: Sequence[int | None] | None) -> int | None:
    """The channel count of a model taking images, which decides the layout of 4-D data files; None otherwise.

    (C, H, W) nets have it first. A net whose last axis is 1, 3 or 4 and whose first is
    not (an (H, W, C) net, TensorFlow's layout) has it last: its data are still read as
    channel-first images and permuted for it (`AuditModel.channels_last`).
    """
    if not input_shape or len(input_shape) != 3:
        return None
    first, last = input_shape[0], input_shape[-1]
    if last in CHANNEL_AXIS_SIZES and first not in CHANNEL_AXIS_SIZES:
        return int(last)
    return first


def free_channel_last(dims: Sequence[int | None] | None, sample_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(H, W, C) for a channel-last net whose stated dims leave the image size free ((None, None, 3)), else None.

    The last stated dim must be the samples' channel count (1, 3 or 4); the others free or
    equal to the samples' height and width.
    """
    if dims is None or len(dims) != 3 or len(sample_shape) != 3:
        return None
    c, h, w = (int(d) for d in sample_shape)
    if dims[2] != c or c not in CHANNEL_AXIS_SIZES or dims[0] not in (None, h) or dims[1] not in (None, w):
        return None
    return (h, w, c)
