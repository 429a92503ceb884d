"""Turn any loaded network into one uniform pixel-space classifier for the attacks.

Attacks perturb pixels in the user's input range and need logits of shape (B, K) with
gradients. Real model files differ in everything around that: normalization done
outside the graph, flat vs image inputs, graphs that only run at one batch size, outputs
shaped (B, K, 1) or already softmaxed. `wrap_model` probes the net with a few real
samples once, decides how to bridge each difference, and records it in notes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from robaudit.errors import RobauditError
from robaudit.layout import free_channel_last, is_channel_last
from robaudit.models.detect import RawModel, one_line, saved_in_training
from robaudit.models.outputs import output_note, select_output
from robaudit.precision import full_precision

if TYPE_CHECKING:
    from robaudit.models.onnx_reference import OnnxReference

BATCH_RTOL, BATCH_ATOL = 1e-4, 1e-5
PROB_ATOL = 1e-4
SWITCH_RTOL = 1e-4  # of the largest score: runs under robaudit's settings and the model's defaults agree within it
MARGIN_ULPS = 64  # float32 ulps of the scores two engines' margins may differ by beyond `rtol` of their spread
SCORE_FLOOR = 1e-30  # of a score, below any float32 rounding of ordinary scores: rows of zeros agree
REFERENCE_SAMPLES = 8  # probe samples the ONNX translation is checked on, with as many random and noisy inputs
LOG_FLOOR = 1e-30


@dataclass
class WrapInfo:
    """What the wrapper decided, for the report."""

    num_classes: int
    output_kind: str  # 'logits' or 'probabilities'
    batching: str  # 'batched', 'per-sample' or 'fixed-batch' (graph hard-wired to one batch size > 1)
    notes: list[str] = field(default_factory=list)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _select_output(out: object) -> torch.Tensor:
    """The class scores among whatever the net returns (tensor, tuple of outputs, dict with logits)."""
    scores = select_output(out)
    if scores is None:
        raise ValueError(f"the model returned {type(out).__name__}, not a tensor of class scores")
    return scores


def _output_note(model: "AuditModel", x: torch.Tensor) -> str | None:
    """Names the output read where the net returns several tensors (a tuple, a dict), as ONNX files get."""
    n = model.chunk or min(2, x.shape[0])
    try:
        with torch.no_grad():
            return output_note(model.net(model.net_input(x[:n])))
    except Exception:  # noqa: BLE001 - the net ran through `model` already; a second failure says nothing new
        return None


def _saved_mode_differs(model: "AuditModel", saved: dict[str, bool], x: torch.Tensor, eval_out: torch.Tensor) -> str | None:
    """Why the net in the mode it was saved in scores the probe otherwise than in inference mode, or None.

    The class code was read for the mode already (`detect.mode_readers`); this runs a copy in
    the saved mode, so a helper function or a dynamic attribute that reads it is caught too.
    """
    twin = copy.deepcopy(model)
    for name, module in twin.net.named_modules():
        module.training = saved.get(name, False)
    try:
        with torch.no_grad():
            got = twin(x)
    except Exception as exc:  # noqa: BLE001 - e.g. batch norm refusing a batch of 1 in training mode
        return f"in that mode it fails on the first samples ({one_line(exc, 120)})"
    if got.shape == eval_out.shape and within_rounding(got, eval_out, SWITCH_RTOL):
        return None
    return "in that mode it scores the first samples otherwise (dropout or batch statistics)"


def _class_scores(out: object, batch: int) -> torch.Tensor:
    """Reshape the net's output to (batch, K); (B, K, 1), (B, 1, K) and (K,) at batch 1 are fine."""
    scores = _select_output(out)
    rest = tuple(scores.shape[1:]) if scores.dim() >= 1 and scores.shape[0] == batch else tuple(scores.shape)
    if batch == 0 or scores.numel() % batch or sum(d > 1 for d in rest) > 1:
        raise ValueError(f"the model output has shape ({', '.join(map(str, scores.shape))}), not (batch, classes)")
    return scores.reshape(batch, -1)


class AuditModel(torch.nn.Module):
    """Pixel-space classifier: input (B, *sample_shape) in the user's input range -> logits (B, K)."""

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        sample_shape: tuple[int, ...],
        model_shape: tuple[int, ...] | None,
        mean: torch.Tensor | None,
        std: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.sample_shape = tuple(sample_shape)
        self.model_shape = tuple(model_shape) if model_shape is not None else None
        self.channels_last = channels_last  # (C, H, W) samples go to the net as (H, W, C): a permutation, not a reshape
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.dtype = dtype
        self.batching = "batched"
        self.chunk: int | None = None  # samples per net call when not 'batched'
        self.output_kind = "logits"
        self.num_classes: int | None = None
        self.detached = False  # the graph passes no gradient to its input (see forward)
        self.inexact: str | None = None  # why the net may not compute exactly what the file does (no certificate)
        self.half_precision_ops: list[str] = []  # ops the net ran in float16 / bfloat16 (no certificate)
        self._file: tuple[AuditModel, ...] = ()  # (file_twin,): a tuple, so that .to(device) and fx leave it alone
        self.output_dtype = torch.float32  # float64 for the float64 twin of a float64 model: its verdicts unrounded

    @property
    def file_twin(self) -> AuditModel | None:
        """The model as its file computes it, on the CPU behind the same preprocessing.

        For an ONNX file, the file run by its own engine; for a model whose weights are not
        float32, the model in its own precision (`_precision_twin`). The attacks work on
        onnx2torch's translation or the float32 copy; the verdicts that robaudit prints (a
        point misclassified, a point classified correctly) are confirmed on this twin as
        well (`robaudit.attacks.runner.judge`). None for other models and where the
        translation could not be checked against the file.
        """
        return self._file[0] if self._file else None

    def train(self, mode: bool = True) -> AuditModel:
        """Always inference mode: attacks must never update batch-norm statistics or use dropout."""
        return super().train(False)

    def _run(self, z: torch.Tensor) -> torch.Tensor:
        return _class_scores(self.net(z), z.shape[0])

    def _run_padded(self, z: torch.Tensor) -> torch.Tensor:
        """Run a chunk on a graph fixed to `self.chunk` samples, padding with zeros."""
        n = z.shape[0]
        if self.batching == "fixed-batch" and n < self.chunk:
            z = torch.cat([z, z.new_zeros((self.chunk - n, *z.shape[1:]))])
        return self._run(z)[:n]

    def net_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the net itself receives for pixels `x`: normalized (--mean/--std) and reshaped (or, for a
        channel-last net, permuted from (C, H, W) to (H, W, C)).

        Always a new tensor: a net that changes its input in place (`x.clamp_()`,
        `x.data.sub_()`) must not change the caller's clean inputs or candidates.
        """
        z = x.to(self.dtype, copy=self.mean is None)
        if self.mean is not None:
            z = (z - self.mean) / self.std
        if self.channels_last:
            z = z.permute(0, 2, 3, 1).contiguous()
        elif self.model_shape is not None:
            z = z.reshape(x.shape[0], *self.model_shape)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected input of shape (B, {_shape_text(self.sample_shape)}), got {tuple(x.shape)}")
        b = x.shape[0]
        z = self.net_input(x)
        if b == 0 and self.num_classes is not None:
            return x.new_zeros((0, self.num_classes), dtype=torch.float32)
        if self.chunk is None:
            out = self._run(z)
        else:
            out = torch.cat([self._run_padded(z[i : i + self.chunk]) for i in range(0, b, self.chunk)])
        out = out.to(self.output_dtype)
        if self.output_kind == "probabilities":
            out = out.clamp_min(LOG_FLOOR).log()
        if self.detached and x.requires_grad:  # a zero gradient, so gradient attacks run (and fail) instead of crash
            out = out + (x * 0.0).flatten(1).sum(dim=1, keepdim=True).to(out.dtype)
        return out


def _stats(values: Sequence[float] | None, flag: str, sample_shape: tuple[int, ...]) -> torch.Tensor | None:
    """--mean/--std as a tensor broadcasting over channels (dim 1 of image-shaped input)."""
    if values is None:
        return None
    vals = [float(v) for v in values]
    channels = sample_shape[0] if len(sample_shape) >= 2 else 1
    if len(vals) not in (1, channels):
        expect = f"1 or {channels}" if channels > 1 else "1"
        what = f"{channels} channel{'s' if channels > 1 else ''}" if len(sample_shape) >= 2 else "flat samples"
        raise RobauditError(f"{flag} has {len(vals)} values but the data has {what}; pass {expect} value(s)")
    if not all(math.isfinite(v) for v in vals):
        raise RobauditError(f"{flag} values must be finite numbers")
    if flag == "--std" and any(v <= 0 for v in vals):
        raise RobauditError("--std values must all be greater than 0")
    if len(sample_shape) < 2:
        return torch.tensor(vals[0])
    return torch.tensor(vals).reshape(1, len(vals), *([1] * (len(sample_shape) - 1)))


def _try(fn, *args):
    try:
        with torch.no_grad():
            return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - any failure of the user's graph is an answer here
        return None, exc


def _try_channel_last(model: AuditModel, x: torch.Tensor) -> list[str]:
    """Switch `model` to (H, W, C) inputs where it fails on (C, H, W) samples and runs on them; the note, or [].

    A file with a stated input shape is laid out by it (`is_channel_last`); one without
    (TorchScript) is tried on the samples' layout first. Only the unambiguous case is
    tried (more than one channel, other than the height), and only a failure on the
    samples' own layout tries the other: a net that runs on both keeps the samples' layout.
    """
    if len(model.sample_shape) != 3:
        return []
    c, h, w = model.sample_shape
    last = (h, w, c)
    if not is_channel_last(last, model.sample_shape) or _try(model, x)[1] is None:
        return []
    model.model_shape, model.channels_last = last, True
    if _try(model, x)[1] is not None:
        model.model_shape, model.channels_last = None, False
        return []
    return [
        f"the model fails on {_shape_text(model.sample_shape)} images and runs on channel-last "
        f"{_shape_text(last)} ones: samples are permuted to that layout (not reshaped)"
    ]


def _per_sample(model: AuditModel, x: torch.Tensor) -> torch.Tensor:
    model.batching, model.chunk = "per-sample", 1
    return model(x)


def _check_translation(model: AuditModel, raw: RawModel, x: torch.Tensor) -> str:  # raw.reference: OnnxReference
    """Refuse a net that computes something else than the file it was translated from; a note otherwise.

    The file's own evaluator (`raw.reference`) and the net run on the first
    `REFERENCE_SAMPLES` probe samples, as many uniform random inputs within the probe's
    value range and as many noisy copies of the samples (so a branch that the first
    samples leave dead is exercised too), through the same preprocessing and batching;
    scores may differ by rounding (`OnnxReference.rtol` of the largest score), not more.
    A graph whose own evaluator differs from run to run (random ops) cannot be checked. Where onnx2torch itself warned that its translation may
    differ, no sample can prove it exact everywhere, and where no evaluator runs the file
    nothing was checked: certificates are refused then (`AuditModel.inexact`). So are
    they where a node, checked on its own on random inputs (`onnx_nodes.check_nodes`),
    is not translated exactly: a branch the inputs here leave switched off may hide it.
    """
    m = min(REFERENCE_SAMPLES, x.shape[0])
    gen = torch.Generator().manual_seed(0)
    lo, hi = float(x.min()), float(x.max())
    uniform = lo + (hi - lo) * torch.rand(m, *x.shape[1:], generator=gen)
    noisy = (x[:m] + 0.1 * (hi - lo) * torch.randn(m, *x.shape[1:], generator=gen)).clamp(lo, hi)
    z = torch.cat([x[:m], uniform, noisy])
    reference = raw.reference
    twin = _twin(model, reference)
    if reference.batch:
        twin.batching, twin.chunk = "fixed-batch", reference.batch
    hints = reference.hints
    if reference.dtype != np.float32:  # the file rounds every input to its own type first
        model.inexact = model.inexact or (
            f"the ONNX file takes {np.dtype(reference.dtype).name} input: radii would bound float32 inputs, not the file's own"
        )
    from robaudit.models.onnx_nodes import nearest_warnings_only

    warned = _warned(hints)
    if warned and not nearest_warnings_only(hints):  # else settled by the node-by-node check, or not (`_check_nodes`)
        model.inexact = warned
    try:
        with torch.no_grad():
            ref = twin(z).double()
    except Exception as exc:  # noqa: BLE001 - no evaluator can run the graph
        model.inexact = model.inexact or warned or "the ONNX-to-PyTorch translation could not be checked against the file"
        return f"the ONNX-to-PyTorch translation could not be checked against the file ({one_line(exc, 200)})"
    with torch.no_grad():
        got = model(z).double()
    engine, rtol = reference.engine, reference.rtol
    if within_rounding(got, ref, rtol) and margins_agree(got, ref, rtol):
        model._file = (twin,)
        nodes = _check_nodes(model, reference, x)
        return (
            f"ONNX-to-PyTorch translation checked against {engine} on {len(z)} inputs ({m} data samples){nodes}; "
            f"clean predictions, adversarial examples and certificate probes are confirmed in {engine} too"
        )
    with torch.no_grad():
        again = twin(z).double()
    if not within_rounding(again, ref, rtol):  # no radius can hold for every draw of the file's own run
        model.inexact = model.inexact or warned or f"the ONNX graph is randomized ({engine} gives other scores on every run)"
        return f"the ONNX graph is randomized ({engine} gives other scores on every run): its translation was not checked"
    nodes = _check_nodes(model, reference, x)  # a node translated into something else leaves `inexact` set
    if model.inexact is None and _float32_explains(model, twin, z):
        model._file = (twin,)
        return (
            f"ONNX-to-PyTorch translation checked against {engine} on {len(z)} inputs ({m} data samples){nodes}: "
            f"their scores differ by up to {float((got - ref).abs().amax()):.3g}, more than {rtol:g} of the largest "
            "score, but every margin of both is within a rigorous bound of its float32 rounding from the float64 "
            f"graph of the translation; clean predictions, adversarial examples and certificate probes are "
            f"confirmed in {engine} too"
        )
    if ref.shape == got.shape:
        differ = f"class scores differ by up to {float((got - ref).abs().amax()):.3g} from {engine}"
    else:
        differ = f"its scores have shape {tuple(got.shape)}, {engine}'s {tuple(ref.shape)},"
    why = f"; onnx2torch warned: {hints[0]}" if hints else ""
    raise RobauditError(
        f"model {raw.name}: onnx2torch's PyTorch translation does not compute what the ONNX file computes "
        f"({differ} on {len(z)} inputs near the first data samples{why}), so robaudit would audit another "
        "model than the file; re-export it with other op settings or save it as TorchScript or torch.export (.pt2)"
    )


def _float32_explains(model: AuditModel, twin: AuditModel, z: torch.Tensor) -> bool:
    """Whether float32 rounding of one function explains translation and file scores that differ
    by more than the relative tolerance: an ill-conditioned net (scores formed as differences of
    far larger sums; a VNN-COMP generator fed latent values near -150).

    The yardstick is the certificate's (`certify.fidelity.check_graph`): the float64 graph of
    the translation must reproduce every margin to the top class of both the translation and
    the file within a rigorous bound of that margin's float32 rounding at that input
    (`rounding.point_rounding`). A comparison of worst cases relative to the largest score let
    a mistranslation as large as that bound on the worst entry through on every entry
    (red team 69). False wherever the graph cannot be built (an op the bound does not read,
    a translation already known to be inexact): the file is then refused.
    """
    from robaudit.certify.fidelity import check_graph
    from robaudit.certify.graph import build_graph

    try:
        with torch.no_grad():
            graph = build_graph(model, z[:1])
            check_graph(graph, [(model, ""), (twin, "")], z)
    except Exception:  # noqa: BLE001 - CertificateUnavailable, or a graph the bound code cannot walk: no proof
        return False
    return True


def _warned(hints: list[str]) -> str | None:
    """Why the translation is not known to be exact where onnx2torch itself warned (`AuditModel.inexact`)."""
    return f"onnx2torch warned that its translation may differ from the ONNX file ({hints[0]})" if hints else None


def _twin(model: AuditModel, net: torch.nn.Module, dtype: torch.dtype = torch.float32) -> AuditModel:
    """`net` behind `model`'s preprocessing and batching, in `dtype` (`AuditModel.file_twin`)."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731 - normalization in the net's own precision
    twin = AuditModel(net, sample_shape=model.sample_shape, model_shape=model.model_shape,
                      mean=cast(model.mean), std=cast(model.std), dtype=dtype, channels_last=model.channels_last)  # fmt: skip
    twin.batching, twin.chunk = model.batching, model.chunk
    return twin


def _lossy_in_float32(net: torch.nn.Module) -> bool:
    """Whether the float32 copy computes another function: weights in another precision, or constants float32 rounds.

    A float64 buffer whose values float32 holds exactly (a resize scale of 2.0 in an ONNX
    translation) changes nothing; half-precision weights or buffers always do (the model
    computes in half precision), and so do float64 weights.
    """
    for p in net.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            return True
    for b in net.buffers():
        if not b.is_floating_point() or b.dtype == torch.float32:
            continue
        if b.dtype != torch.float64 or not torch.equal(b.float().double(), b):
            return True
    return False


def _half_precision_ops(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The ops that return float16 / bfloat16 tensors when the model runs on `x` (sorted, no repeats).

    torch.fx drops a ``torch.autocast`` block from the graph the certificate reads, and a
    weights check cannot see it either: the ops the model actually runs are the only
    witness. A model that cannot be watched (dispatch modes unsupported) gives none.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    half = (torch.float16, torch.bfloat16)

    class Watch(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype in half for t in tree_leaves(out)):
                self.seen.add(str(getattr(func, "__name__", func)).split(".")[0])
            return out

    watch = Watch()
    try:
        with torch.no_grad(), watch:
            model(x)
    except Exception:  # noqa: BLE001 - a net the mode cannot run: the graph checks stay the guard
        return []
    return sorted(watch.seen)


def _precision_twin(model: AuditModel, native: torch.nn.Module, dtype: torch.dtype, x: torch.Tensor, name: str) -> str:
    """Make the net in its own precision `model`'s twin (verdicts confirmed there); a note.

    The attacks run on the float32 copy. A copy that classifies a data sample differently
    from the model itself (a float64 model whose scores differ below float32's
    resolution) would be audited instead of the model: refused. A net that cannot run in
    its precision on the CPU (half-precision kernels missing) keeps no twin, and says so.
    """
    twin = _twin(model, native, dtype)
    twin.output_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # half scores are exact in float32
    twin.eval()
    twin.requires_grad_(False)
    label = str(dtype).removeprefix("torch.")
    try:
        with torch.no_grad():
            ref, again, got = twin(x), twin(x), model(x)
    except Exception as exc:  # noqa: BLE001 - e.g. a half-precision op without a CPU kernel
        return f"verdicts could not be confirmed in the model's own {label} arithmetic ({one_line(exc, 200)})"
    if not torch.equal(ref, again):
        return f"the model is randomized: its verdicts are not confirmed in its own {label} arithmetic"
    differ = int((ref.argmax(dim=1) != got.argmax(dim=1)).sum())
    if differ:
        raise RobauditError(
            f"model {name} computes in {label}, and its float32 copy, which the attacks need, classifies {differ} of "
            f"the first {len(x)} data samples differently; save the model in float32"
        )
    model._file = (twin,)
    return f"clean predictions and adversarial examples are confirmed in the model's own {label} arithmetic too"


def _check_nodes(model: AuditModel, reference: OnnxReference, x: torch.Tensor) -> str:
    """Each node of the converted graph against onnxruntime on its own (`onnx_nodes`): a node that is not
    translated exactly, or could not be checked, leaves the translation `inexact` (no certificate).
    Returns the clause for the note."""
    from robaudit.models.onnx_nodes import check_nodes, nearest_nodes, nearest_warnings_only

    warned = _warned(reference.hints)  # where set, `inexact` is too unless every warning is about nearest Resize
    if reference.translated is None or reference.convert is None:
        model.inexact = model.inexact or warned
        return ""
    n = reference.batch or (1 if model.batching == "per-sample" else 2)  # a batch size the graph takes
    with torch.no_grad():
        z = model.net_input(x[torch.arange(n) % len(x)].cpu()).numpy().astype(reference.dtype)
    compared: set[str] = set()
    reason = check_nodes(reference.translated, z, reference.convert, reference.rtol, original=reference.model,
                         compared=compared)  # fmt: skip
    if reason is None:
        if warned is None or not nearest_warnings_only(reference.hints):
            return ", and node by node on random inputs"
        unchecked = [n for n in nearest_nodes(reference.translated) if n.output[0] not in compared]
        if unchecked:  # computed from constants alone: never compared, so the warning stands
            node = unchecked[0]
            model.inexact = model.inexact or (
                f"{warned}, and its nearest-neighbour node {node.name or node.output[0]} ({node.op_type}) "
                "could not be checked on its own"
            )
            return ", and node by node on random inputs"
        # every nearest Resize compared exactly on inputs with distinct values: the same pixels on every input
        return (", and node by node on random inputs (onnx2torch's warning that its nearest-neighbour Resize "
                "may pick other pixels is settled: on inputs with distinct values it picks the file's own)")
    model.inexact = model.inexact or f"the ONNX-to-PyTorch translation is not known to be exact: {reason}"
    return f", but not node by node ({reason}: no certificate)"


def _refuse_hidden_switches(model: AuditModel, x: torch.Tensor, base: torch.Tensor, name: str) -> None:
    """Refuse a net whose scores change with a setting robaudit itself chooses (a red team's nets did).

    robaudit runs the net with its parameters frozen (no parameter gradients), judges
    verdicts in full float32 precision (TF32 off) and never in `torch.inference_mode`;
    the net as saved and deployed runs with its parameters requiring gradients, the
    backends' defaults, often under inference mode. A forward that reads any of these
    would be audited (and certified) for a branch its users never run. `base`: the net's
    scores on x as robaudit runs it (a deterministic net).
    """
    runs: dict[str, torch.Tensor | None] = {}
    params = [p for p in model.parameters() if p.is_leaf and p.is_floating_point()]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.no_grad():
            runs["with its parameters requiring gradients (as saved) than frozen (as robaudit runs it)"] = _try(model, x)[0]
    finally:
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad(), full_precision():
        runs["in full float32 precision (TF32 off, as robaudit judges verdicts) than with torch's defaults"] = _try(model, x)[0]
    with torch.inference_mode():
        runs["under torch.inference_mode() than outside it"] = _try(model, x)[0]
    for what, out in runs.items():
        if out is not None and not within_rounding(out.clone(), base, SWITCH_RTOL):
            raise RobauditError(
                f"model {name} returns other scores {what}: its forward reads a setting robaudit chooses, so "
                "robaudit would audit a branch the model's users may not run"
            )


def _refuse_state_changes(
    model: AuditModel, raw: RawModel, x: torch.Tensor, now: torch.Tensor, state: dict[str, torch.Tensor], name: str
) -> None:
    """Refuse a net whose scores depend on how often it ran, or on random values its source draws.

    A forward that updates its own buffers (a gate switched off after the first call) was audited in the
    state robaudit's own calls left it in, while users run it fresh (a red team: every sample another class
    on a fresh load); a cache that changes no score passes. An --arch factory that draws values the weights
    file does not hold (a non-persistent buffer, a plain tensor attribute) gives each load another network.
    `now`: the net's scores on x after robaudit's calls (a deterministic net).
    """
    after = model.net.state_dict()
    changed = [k for k, v in state.items() if k in after and not torch.equal(after[k].detach().cpu(), v)]
    fresh = None
    if changed:
        what = f"changes its own {', '.join(changed[:3])} when it runs"
        try:
            fresh = copy.deepcopy(model.net)
            fresh.load_state_dict(state)
        except Exception:  # noqa: BLE001 - no fresh copy to compare with: the change cannot be shown harmless
            raise RobauditError(f"model {name} {what}") from None
        what += ", and scores otherwise on its first call"
    elif raw.rebuild is not None:
        try:
            fresh = raw.rebuild().float()
        except Exception:  # noqa: BLE001 - the first build worked: a second that fails says nothing of the scores
            fresh = None
        what = "comes out of its --arch factory as another network each time (values drawn at random that the weights file does not hold)"
    if fresh is None:
        return
    with torch.no_grad():
        other = _try(_twin(model, fresh), x)[0]
    if other is not None and not within_rounding(other, now, SWITCH_RTOL):
        raise RobauditError(f"model {name} {what}, so no audit of it holds for the next run")


def within_rounding(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    """Same shape and every score within `rtol` of the sample's largest one (plus `SCORE_FLOOR`)."""
    return got.shape == ref.shape and bool(rounding_agreement(got, ref, rtol).all())


def margins_agree(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    """Every margin to `ref`'s top class within the tolerance of its own size; see `margin_tolerance`.

    `within_rounding` alone scales every score's tolerance by the row's largest: one class of
    huge constant score (-1e6 on a class never predicted) let a 10-logit mistranslation of the
    others through, and so did an offset of 1e5 common to every score (red teams 69 and 70).
    Decisions are margins, so margins are held to their own size.
    """
    if got.shape != ref.shape:
        return False
    if ref.dim() < 2 or ref.shape[1] == 0:
        return True
    top = ref.nan_to_num(-math.inf, math.inf, -math.inf).argmax(dim=1, keepdim=True)
    want, have = ref.gather(1, top) - ref, got.gather(1, top) - got
    same = (have == want) | (have.isnan() & want.isnan())
    return bool((((have - want).abs() <= margin_tolerance(ref, top, want, rtol)) | same).all())


def margin_tolerance(ref: torch.Tensor, top: torch.Tensor, margin: torch.Tensor, rtol: float) -> torch.Tensor:
    """How far two engines' margins may differ: `rtol` of the margin plus the row's typical spread
    (the median absolute deviation of its scores, which neither an offset common to every score
    nor a few huge ones move), plus `MARGIN_ULPS` float32 ulps of the two scores (the rounding of
    an offset that large), and never less than `rtol` of the row's largest score up to 1 (an
    absolute 1e-4 at most, which no offset or huge score widens). The floor keeps probabilities
    at the tolerance they always had: near-tied probabilities over 1000 classes after logits of
    size 30-100 differ by more than 64 ulps between engines (red team 71: ViT and CLIP heads).
    A mistranslation that hides under a common offset of 1e5 must stay within 0.8 of the margins;
    larger gaps go to the rigorous check (`_float32_explains`)."""
    clean = ref.nan_to_num(0.0, 0.0, 0.0)
    spread = (clean - clean.median(dim=1, keepdim=True).values).abs().median(dim=1, keepdim=True).values
    ulps = MARGIN_ULPS * 2.0**-24 * (clean.gather(1, top).abs() + clean.abs())
    floor = rtol * clean.abs().amax(dim=1, keepdim=True).clamp_max(1.0)
    tol = rtol * (margin.nan_to_num(0.0, 0.0, 0.0).abs() + spread) + ulps
    return torch.maximum(tol, floor) + SCORE_FLOOR


def rounding_agreement(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> torch.Tensor:
    """Per row (same shapes): every score within `rtol` of the row's largest one (plus `SCORE_FLOOR`)."""
    if ref.dim() < 2 or ref.shape[1] == 0:  # no scores (an evaluator's empty output): nothing differs
        return (got == ref).reshape(len(ref), -1).all(dim=1)
    # relative only: an absolute floor (once 1e-5) let a translation that picks other classes through on scores of 1e-6
    scale = rtol * ref.nan_to_num(0.0, 0.0, 0.0).abs().amax(dim=1, keepdim=True) + SCORE_FLOOR
    return (((got - ref).abs() <= scale) | (got == ref) | (got.isnan() & ref.isnan())).all(dim=1)


def wrap_model(
    raw: RawModel,
    *,
    sample_shape: tuple[int, ...],
    probe: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[AuditModel, WrapInfo]:
    """Probe `raw.net` with real samples on CPU and return the uniform classifier on `device`."""
    sample_shape = tuple(int(d) for d in sample_shape)
    probe = torch.as_tensor(probe).detach().to("cpu", torch.float32)
    if tuple(probe.shape[1:]) != sample_shape or probe.shape[0] == 0:
        raise ValueError(f"probe must have shape (N>0, {_shape_text(sample_shape)}), got {tuple(probe.shape)}")
    name = raw.name
    notes: list[str] = []

    mean_t, std_t = _stats(mean, "--mean", sample_shape), _stats(std, "--std", sample_shape)
    if mean_t is not None and std_t is None:
        std_t = torch.ones_like(mean_t)
    if std_t is not None and mean_t is None:
        mean_t = torch.zeros_like(std_t)

    model_shape, channels_last = None, False
    # a channel-last graph of any image size takes these images' (H, W, C)
    input_shape = raw.input_shape or free_channel_last(raw.input_dims, sample_shape)
    if input_shape is not None:
        want, have = math.prod(input_shape), math.prod(sample_shape)
        if want != have:
            raise RobauditError(
                f"model {name} expects samples of shape {_shape_text(input_shape)} ({want} values) but the data "
                f"has samples of shape {_shape_text(sample_shape)} ({have} values)"
            )
        if tuple(input_shape) != sample_shape:
            model_shape = tuple(input_shape)
            channels_last = is_channel_last(model_shape, sample_shape)
            if channels_last:
                notes.append(
                    f"the model takes channel-last images {_shape_text(model_shape)}: samples "
                    f"{_shape_text(sample_shape)} are permuted to that layout (not reshaped)"
                )
            else:
                notes.append(
                    f"data samples of shape {_shape_text(sample_shape)} reshaped to the model's input shape "
                    f"{_shape_text(model_shape)}"
                )

    net = raw.net.to("cpu")
    dtypes = {t.dtype for t in [*net.parameters(), *net.buffers()] if t.is_floating_point()}
    lossy = _lossy_in_float32(net)
    native = None  # the net in its own precision, to confirm verdicts in (`_precision_twin`)
    found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    if dtypes and dtypes != {torch.float32}:
        if lossy and len(dtypes) == 1 and raw.reference is None:  # ONNX: the file itself is the twin
            native = copy.deepcopy(net)
        net = net.float()
        notes.append(f"model weights converted from {found} to float32 for gradient attacks")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}  # before any call: `_refuse_state_changes`
    model = AuditModel(
        net, sample_shape=sample_shape, model_shape=model_shape, mean=mean_t, std=std_t, channels_last=channels_last
    )
    if lossy:
        model.inexact = (
            f"the model's weights are {found}: radii would bound its float32 copy, not the model's own arithmetic"
        )
    model.inexact = model.inexact or raw.inexact
    model.eval()
    model.requires_grad_(False)
    if input_shape is None:  # a file that states no input shape (TorchScript) may take channel-last images
        notes += _try_channel_last(model, probe[:1])

    # Batching: batched results must match one-sample-at-a-time results (batch >= 2).
    x = probe if probe.shape[0] >= 2 else probe.repeat(2, *([1] * len(sample_shape)))
    single, single_err = _try(_per_sample, model, x)
    model.batching, model.chunk = "batched", None
    batched, batched_err = _try(model, x)
    same = lambda a, b: a.shape == b.shape and torch.allclose(a, b, rtol=BATCH_RTOL, atol=BATCH_ATOL, equal_nan=True)  # noqa: E731
    if single is not None:
        again = _try(model, x)[0] if batched is not None and not same(batched, single) else None
        if batched is not None and same(batched, single):
            out = batched
        elif again is not None and again.shape == batched.shape and not same(again, batched):
            out = batched  # a randomized model: batches differ from each other too, not just from single samples
        else:
            model.batching, model.chunk = "per-sample", 1
            notes.append(
                "graph only runs at batch size 1: evaluating one sample at a time"
                if batched is None or batched.shape != single.shape else
                "a sample's scores depend on the other samples of its batch (batch statistics): evaluating one "
                "sample at a time"
            )
            out = single
    else:
        if batched is not None and raw.fixed_batch is None:  # runs batched, not alone: batch statistics?
            pair, _ = _try(model, torch.cat([x[:1], x[:1]]))
            if pair is not None and pair.shape[1:] == batched.shape[1:] and not same(pair[:1], batched[:1]):
                raise RobauditError(
                    f"model {name} scores a sample differently depending on the other samples of its batch, and cannot "
                    f"score one sample alone ({one_line(single_err, 120)}): it normalizes over the batch (e.g. BatchNorm "
                    "without running statistics, or saved in training mode); robaudit audits classifiers that score "
                    "each sample on its own"
                )
        fixed = raw.fixed_batch or (x.shape[0] if batched is not None else None)
        out = None
        if fixed and fixed > 1:
            model.batching, model.chunk = "fixed-batch", fixed
            out, _ = _try(model, x)
        if out is None:
            shape = (1, *(model_shape or sample_shape))
            converted = (
                f" after its {found} weights were converted to float32, which gradient attacks need (a cast to {found} "
                "inside the file, fixed when it was traced or exported, would explain it; save the model in float32)"
                if dtypes and dtypes != {torch.float32} else ""
            )
            file_runs = raw.format == "onnx" and raw.reference is not None and _try(_twin(model, raw.reference), x[:1])[1] is None
            if file_runs:  # onnxruntime runs the file on that input: the translation is what fails
                raise RobauditError(
                    f"model {name}: onnxruntime runs the file, but onnx2torch's PyTorch translation of it fails on "
                    f"input of shape ({', '.join(map(str, shape))}): {one_line(single_err)}; robaudit attacks and "
                    "certifies through that translation, so it cannot audit this file (re-export it with other op "
                    "settings, or save it as TorchScript or torch.export (.pt2))"
                )
            raise RobauditError(
                f"model {name} failed on input of shape ({', '.join(map(str, shape))}){converted}: {one_line(single_err)}"
            )
        notes.append(f"graph only runs at batch size {fixed}: evaluating {fixed} samples at a time (zero-padded)")

    k = out.shape[1]
    if k < 2:
        raise RobauditError(
            f"model {name} returns {k} score(s) per sample; robaudit needs one score per class (at least 2): a "
            "binary classifier with one logit z (the input of its sigmoid, if it has one) can be saved returning "
            "torch.cat([-z, z], dim=1), whose classes 0 and 1 are those of z < 0 and z > 0"
        )
    if not torch.isfinite(out).all():
        tensors = [*net.named_parameters(), *net.named_buffers()]
        broken = [key for key, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        if broken:
            raise RobauditError(
                f"model {name} returned NaN or infinite scores: its weights hold NaN or infinite values "
                f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})"
            )
        raise RobauditError(
            f"model {name} returned NaN or infinite scores on the first data samples; check the data range and --mean/--std"
        )
    with torch.no_grad():
        base, again = _try(model, x)[0], _try(model, x)[0]
    deterministic = base is not None and again is not None and within_rounding(again, base, SWITCH_RTOL)
    if deterministic:
        # deterministic: a net whose runs differ anyway (random ops) is left to the checks that see randomness
        _refuse_hidden_switches(model, x, base, name)
        _refuse_state_changes(model, raw, x, base, state, name)
    model.half_precision_ops = _half_precision_ops(model, x[:1])  # the certificate refuses them (`build_graph`)
    if raw.reference is not None:
        notes.append(_check_translation(model, raw, x))
    elif native is not None:
        notes.append(_precision_twin(model, native, next(iter(dtypes)), x, name))
    if out.min() >= 0 and out.max() <= 1 and torch.allclose(out.sum(1), torch.ones(out.shape[0]), atol=PROB_ATOL):
        model.output_kind = "probabilities"
        if model.file_twin is not None:  # the file's verdicts and scores are read the same way
            model.file_twin.output_kind = "probabilities"
        notes.append("model outputs probabilities (rows sum to 1); attacks use log-probabilities")
    model.num_classes = k
    several = _output_note(model, x)
    if several:
        notes.append(several)
    if raw.saved_modes and deterministic:  # a randomized net differs from itself anyway (its own checks)
        mode_note = _saved_mode_differs(model, raw.saved_modes, x, base)
        if mode_note:
            note, inexact = saved_in_training(mode_note)
            notes.append(note)
            model.inexact = model.inexact or inexact
    if raw.num_classes is not None and raw.num_classes != k:
        notes.append(f"the file declares {raw.num_classes} outputs but the model returns {k} class scores")

    # Attacks are gradient-based: make sure the input gets a gradient at all.
    xg = x[: min(2, x.shape[0])].clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            scores = model(xg)
            if scores.requires_grad:
                scores.max(1).values.sum().backward()
    except Exception as exc:  # noqa: BLE001
        raise RobauditError(f"model {name} fails when computing gradients w.r.t. its input: {one_line(exc)}") from None
    if xg.grad is None:
        model.detached = True
        notes.append(
            f"model {name} passes no gradient back to its input (its graph detaches or discretizes it): gradient "
            "attacks see zero gradients; the trust checks add score- and decision-based attacks"
        )

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    batching = model.batching
    return model, WrapInfo(num_classes=k, output_kind=model.output_kind, batching=batching, notes=notes)
