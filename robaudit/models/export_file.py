"""torch.export programs (.pt2, torch.export.save): the format PyTorch now recommends.

An exported program is a fixed graph: its train/eval behaviour was baked in when it was
exported (and `.eval()` on it raises), and unless the author marked dimensions dynamic,
its batch size is fixed to the example's. Both are handled here or in the wrapper.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from robaudit.errors import RobauditError
from robaudit.models.detect import RawModel, freeze, one_line

# Ops whose "training" flag sits at this positional index; flipping it to False gives
# exactly the inference behaviour (running statistics, no dropout).
_TRAINING_ARG = {
    "batch_norm.default": 5,
    "native_batch_norm.default": 5,
    "_native_batch_norm_legit.default": 5,
    "_native_batch_norm_legit_functional.default": 5,
    "dropout.default": 2,
    "native_dropout.default": 2,
    "feature_dropout.default": 2,
    "alpha_dropout.default": 2,
    "feature_alpha_dropout.default": 2,
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export.load logs whole tracebacks on bad files; the CLI must print one line.

    Its loggers are children of "torch.export" with their own levels, so only a global
    (and brief) logging.disable silences them all.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _overload_name(target: object) -> str | None:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"{target._opname}.{target._overloadname}"
    return None


def _to_inference(module: torch.fx.GraphModule) -> int:
    """Switch batch-norm/dropout nodes recorded in training mode to inference; returns how many."""
    flipped = 0
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        index = _TRAINING_ARG.get(_overload_name(node.target) or "")
        if index is None:
            continue
        if "batch_norm" in (_overload_name(node.target) or "") and len(node.args) > 3 and node.args[3] is None:
            continue  # no running statistics to switch to: it normalizes over the batch (`wrap_model` refuses that)
        if len(node.args) > index and node.args[index] is True:
            node.args = (*node.args[:index], False, *node.args[index + 1 :])
            flipped += 1
        for key in ("training", "train"):
            if node.kwargs.get(key) is True:
                node.kwargs = {**node.kwargs, key: False}
                flipped += 1
    if flipped:
        module.recompile()
    return flipped


def _class_dim(val: object) -> int | None:
    """K from an output of shape (batch, K) (or (batch, K, 1)...), the batch dim may be symbolic."""
    rest = tuple(getattr(val, "shape", ()))[1:]
    if not rest or not all(type(d) is int for d in rest):
        return None
    big = [d for d in rest if d > 1]
    return big[0] if len(big) == 1 else None


def load_export(path: Path) -> RawModel:
    """Load an ExportedProgram and unlift it to a callable module on CPU."""
    try:
        with _quiet():
            program = torch.export.load(str(path))
            module = program.module()
    except Exception as exc:  # noqa: BLE001 - zip, JSON or deserialization errors
        reason = one_line(exc)
        if "check the warnings above" in reason:  # torch's message points at the logs silenced above
            reason = "it is not an archive written by torch.export.save"
        raise RobauditError(f"cannot read torch.export file {path}: {reason}") from None

    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise RobauditError(
            f"torch.export file {path} takes {len(user_inputs)} inputs; "
            "robaudit audits classifiers with exactly one image input"
        )
    input_shape = fixed_batch = num_classes = None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            shape = tuple(getattr(val, "shape", ()))
            if len(shape) >= 2 and all(type(d) is int for d in shape[1:]):
                input_shape = tuple(shape[1:])
            if shape and type(shape[0]) is int and shape[0] > 1:
                fixed_batch = shape[0]
        elif node.op == "output" and node.args and isinstance(node.args[0], (tuple, list)) and node.args[0]:
            first = node.args[0][0]
            num_classes = _class_dim(first.meta.get("val")) if isinstance(first, torch.fx.Node) else None

    # The unlifted module refuses .train()/.eval(); restore nn.Module's versions, which only
    # set flags (the graph's behaviour is fixed), so freezing and wrapping work normally.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    notes = []
    flipped = _to_inference(module)
    inexact = None
    if flipped:
        # exported in training mode, or calling F.batch_norm / F.dropout with training=True: the
        # graph cannot tell which, only that the file's program uses batch statistics or drops units
        notes.append(
            f"the torch.export graph runs {flipped} batch-norm/dropout op(s) in training mode (exported in "
            "training mode, or called with training=True); robaudit switched them to inference behaviour "
            "(running statistics, no dropout) and audits that rewrite"
        )
        # radii of the rewrite would not be about the program the file holds
        inexact = (
            f"the torch.export program runs {flipped} batch-norm/dropout op(s) in training mode (batch "
            "statistics, random dropout), and robaudit switched them to inference: radii would be about that "
            "rewrite, not the program in the file"
        )
    module = module.to("cpu")
    return RawModel(
        net=freeze(module),
        format="torch-export",
        input_shape=input_shape,
        num_classes=num_classes,
        notes=notes,
        fixed_batch=fixed_batch,
        name=str(path),
        inexact=inexact,
    )
