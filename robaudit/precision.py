"""Full float32 precision for the checks a claim rests on.

On CUDA, TF32 convolutions and matrix products (and fp16/bf16 reduced-precision
reductions) round to about 10 mantissa bits, so whether a candidate adversarial example
is misclassified, or whether a point inside a certified ball keeps its label, would
depend on the GPU and on torch's defaults. `full_precision` turns all of that off for
the duration of a block and restores the caller's settings afterwards. The flags exist
on CPU-only builds too, where they are simply inert.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

NOTE = (
    "re-verification and certificate checks ran in full float32 precision "
    "(TF32 and reduced-precision reductions disabled)"
)

_MATMUL_FLAGS = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")


@contextmanager
def full_precision() -> Iterator[None]:
    """Disable TF32 and reduced-precision reductions inside the block; restore the previous flags after."""
    matmul = torch.backends.cuda.matmul
    saved_matmul = {name: getattr(matmul, name) for name in _MATMUL_FLAGS if hasattr(matmul, name)}
    saved_cudnn = torch.backends.cudnn.allow_tf32
    saved_precision = torch.get_float32_matmul_precision()
    try:
        for name in saved_matmul:
            setattr(matmul, name, False)
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision)  # first: it also sets matmul.allow_tf32
        for name, value in saved_matmul.items():
            setattr(matmul, name, value)
        torch.backends.cudnn.allow_tf32 = saved_cudnn
