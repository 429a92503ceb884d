"""Which of a network's outputs holds the class scores: one rule for the attacks, the certificate and BPDA.

A model may return a tensor, a dict, a (named) tuple or an object with `.logits`. The
wrapper classifies with what `select_output` picks; the certificate and the BPDA
surrogate read their traced graphs' outputs with the same function (`graph_output`),
so that the network they bound or differentiate is the one the verdicts are about.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_unflatten


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


class OutputStructureError(ValueError):
    """A traced graph's output does not fit the structure its program says it rebuilds."""


def graph_output(graph: fx.Graph, out: Any, is_tensor: Callable[[Any], bool]) -> Any:
    """`select_output` on a traced graph's output `out` (its output node's argument, or that mapped).

    torch.export programs and converted TorchScript return a flat list from the graph and
    rebuild the user's dict or nested tuple around it (`pytree_info.out_spec`): the rule
    is applied to the rebuilt structure, as the model's caller sees it.
    """
    spec = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is not None:
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        try:
            out = tree_unflatten(flat, spec)
        except Exception as exc:  # noqa: BLE001 - any mismatch: no structure to read
            raise OutputStructureError(f"the output's structure cannot be rebuilt ({type(exc).__name__})") from None
    return select_output(out, is_tensor)
