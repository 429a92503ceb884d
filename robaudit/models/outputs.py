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
