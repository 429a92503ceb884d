"""Which of a network's outputs holds the class scores: one rule for the attacks, the certificate and BPDA.

A model may return a tensor, a dict, a (named) tuple or an object with `.logits`. The
wrapper classifies with what `select_output` picks; `models.fx_graph.to_fx` cuts every
traced graph down to that very output (found by identity in what the model returns), so
the network the certificate and the BPDA surrogate bound or differentiate is the one the
verdicts are about.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def select_output(out: Any, is_tensor: Callable[[Any], bool] = torch.is_tensor) -> Any:
    """The class scores among whatever the net returns, or None.

    A tensor; a dict's (or an object's) `logits`, else a dict's first tensor value; a
    tuple's or list's first tensor item (a nested tuple is skipped, not entered).
    `is_tensor` says what counts as a tensor in `out` (graph nodes, bound variables).
    """
    if is_tensor(out):
        return out
    if isinstance(out, dict) or hasattr(out, "logits"):
        logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
        if is_tensor(logits):
            return logits
        out = list(out.values()) if isinstance(out, dict) else []
    if isinstance(out, (tuple, list)):
        return next((item for item in out if is_tensor(item)), None)
    return None


def output_note(out: Any) -> str | None:
    """Which of several returned tensors holds the class scores, for the report (None: a single tensor).

    The same choice as `select_output`; an ONNX file's several outputs are named by its loader.
    """
    if torch.is_tensor(out):
        return None
    if isinstance(out, dict) or hasattr(out, "logits"):
        items = list(out.items()) if isinstance(out, dict) else [("logits", getattr(out, "logits", None))]
        named = [(k, v) for k, v in items if torch.is_tensor(v)]
        if len(named) < 2:
            return None
        chosen = select_output(out)
        key = next(k for k, v in named if v is chosen)
        why = "" if key == "logits" else ", the first (none is named 'logits')"
        return (f"the model returns a dict of {len(named)} tensors ({_listed([k for k, _ in named])}): classes are read "
                f"from {key!r}{why} of shape {_shape(chosen)}")  # fmt: skip
    if isinstance(out, (tuple, list)):
        tensors = [(i, v) for i, v in enumerate(out) if torch.is_tensor(v)]
        if len(tensors) < 2:
            return None
        index, chosen = tensors[0]
        shapes = ", ".join(f"{_shape(v)}" for _, v in tensors[:4]) + (", ..." if len(tensors) > 4 else "")
        return (f"the model returns a {type(out).__name__} of {len(tensors)} tensors (shapes {shapes}): classes are read "
                f"from item {index}, the first")  # fmt: skip
    return None


def _listed(names: list) -> str:
    return ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "")


def _shape(t: torch.Tensor) -> str:
    """A returned tensor's shape with its batch dimension as N."""
    return "(" + ", ".join(["N", *map(str, t.shape[1:])] if t.dim() else []) + ")"
