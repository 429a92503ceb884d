"""`certify_l2`: certified L2 radii for a saved classifier, the library's entry point.

For each correctly classified sample every applicable sound method runs and the largest
radius wins (ties go to the earlier method in `METHODS`):

- ``linear``: no nonlinearity between pixels and logits; the exact distance to the
  decision boundary, min_j margin_j / ||w_c - w_j||;
- ``closed-form``: one hidden layer; the C_lm bound of `closed_form.py` plus shells;
- ``interval``: the Fast-Lip style bound of `interval.py` plus shells;
- ``global-lipschitz``: margin / (product of spectral-norm upper bounds).
The cross-Lipschitz methods are skipped on later batches when ``crown`` outclassed them on the
first (`outclassed`).
A misclassified sample gets radius 0 and method ``none``.

The radius is in pixel space (the model's own input units, before any normalization)
and certifies the deployed float32 evaluation of the network at every float32 input in
the ball: each method keeps a radius only where the margin's lower bound over the ball
exceeds a rigorous bound on the float32 rounding of the two logits there (`rounding.py`).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from robaudit.certify.affine import AffinePrefix, exact_magnitudes
from robaudit.certify.budget import Budget, get_budget
from robaudit.certify.closed_form import ClosedFormBound, hidden_layer
from robaudit.certify.global_lipschitz import GlobalLipschitz
from robaudit.certify.graph import Graph, build_graph
from robaudit.certify.fidelity import check_graph, check_graph_in_balls, references
from robaudit.certify.interval import Batch, IntervalBound
from robaudit.certify.crown import CrownBound, first_order_radius
from robaudit.certify.radius import RADIUS_CAP, ErrorFn, ratio_radius, search_radius
from robaudit.certify.rounding import BallError, overflow_possible

METHODS = ("linear", "closed-form", "interval", "global-lipschitz", "crown")
MARGIN_RTOL = 1e-10  # margins are deflated by this fraction of |f_c| + |f_j| for rounding
LINEAR_RTOL = 1e-9  # the exact linear distance is computed in float64 up to ~1e-14
OUTCLASSED = 1.25  # a cross-Lipschitz method whose radius crown beats by this factor everywhere ...
OUTCLASSED_MIN = 16  # ... on at least this many samples of the first batch is skipped on the others
FIRST_BATCH = 32  # the first batch, which decides that, is at most this large (it runs every method)


@dataclass
class Certificate:
    """Certified L2 radii, one per sample."""

    radius: torch.Tensor  # (N,) float64, pixel space; 0 for misclassified samples
    method: list[str]  # per sample: which bound gave the radius ("none" when misclassified)
    seconds: float
    notes: list[str] = field(default_factory=list)


class LinearExact:
    """Exact certificate of an affine classifier: the distance to the nearest pairwise boundary."""

    name = "linear"

    def __init__(self, graph: Graph) -> None:
        prefix = AffinePrefix(graph, graph.input_dim * graph.num_classes, None)
        weight = prefix.jacobian[len(graph.nodes) - 1][0].T  # (K, d)
        self.pair = (weight[:, None, :] - weight[None, :, :]).norm(dim=2) * (1 + LINEAR_RTOL)

    def radius(
        self, margins: torch.Tensor, labels: torch.Tensor, others: torch.Tensor, error: ErrorFn | None = None
    ) -> torch.Tensor:
        """min_j (margin_j - E_j) / ||w_c - w_j||, E the float32 error over the ball (`ratio_radius`)."""
        return ratio_radius(margins, self.pair[labels[:, None], others], error)


def default_methods(graph: Graph, budget: Budget) -> list:
    """Every sound method that applies to the graph, in `METHODS` order."""
    if graph.is_linear:
        return [LinearExact(graph)]
    methods: list = []
    hidden = hidden_layer(graph, budget.gram_cap)
    if hidden is not None:
        methods.append(ClosedFormBound(graph, budget, hidden))
    glob = GlobalLipschitz(graph)
    methods.append(IntervalBound(graph, budget, lipschitz=glob))
    methods.append(glob)
    if budget.crown_evals:
        methods.append(CrownBound(graph, budget, lipschitz=glob))
    return methods


def _batch(graph: Graph, x: torch.Tensor, labels: torch.Tensor) -> Batch:
    values = graph.forward(x)
    logits = values[-1]
    k = graph.num_classes
    order = torch.arange(k).expand(len(labels), k)
    others = order[order != labels[:, None]].reshape(len(labels), k - 1)
    rows = torch.nn.functional.one_hot(labels, k).to(torch.float64)[:, None, :] - torch.nn.functional.one_hot(
        others, k
    ).to(torch.float64)
    f_c = logits.gather(1, labels[:, None])
    f_j = logits.gather(1, others)
    margins = (f_c - f_j) - MARGIN_RTOL * (f_c.abs() + f_j.abs())
    mags = exact_magnitudes(graph, x)
    return Batch(values, labels, others, rows, margins, mags, BallError(graph, x, values, mags, labels, others))


def certify_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 64,
    budget: str = "default",
    progress: Callable[[int], None] | None = None,
    step: Callable[[str], None] | None = None,
) -> Certificate:
    """Certified L2 radius of every sample of `x` (pixel space) under `model`.

    `model` is an AuditModel or any module mapping (B, *sample_shape) to (B, K) logits.
    Raises CertificateUnavailable (naming the layer) when no sound bound exists for it.
    `progress` is called with the number of samples finished after each batch, and `step`
    with the name of each method as it starts on a batch: on a large network one batch can
    take an hour, and a progress label can show what it is doing meanwhile.
    """
    return certify_with(
        model, x, y, default_methods, batch_size=batch_size, budget=budget, progress=progress, step=step
    )


def certify_with(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    make_methods: Callable[[Graph, Budget], list],
    *,
    batch_size: int = 64,
    budget: str | Budget = "default",
    progress: Callable[[int], None] | None = None,
    step: Callable[[str], None] | None = None,
) -> Certificate:
    """`certify_l2` with a chosen set of methods (tests compare methods one by one)."""
    with torch.no_grad():
        return _certify(model, x, y, make_methods, batch_size, budget, progress, step)


def _certify(model, x, y, make_methods, batch_size, budget, progress, step) -> Certificate:
    start = time.perf_counter()
    plan = get_budget(budget)
    x = torch.as_tensor(x).detach().cpu()
    y = torch.as_tensor(y).detach().cpu().long().reshape(-1)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} samples but y has {len(y)} labels")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    radius = torch.zeros(n, dtype=torch.float64)
    method = ["none"] * n
    if n == 0:
        return Certificate(radius, method, time.perf_counter() - start, [])

    model = _on_cpu(model)
    modes = {m: m.training for m in model.modules()}  # restored one by one: the caller's module as it was
    training = sorted(name for name, m in model.named_modules() if m.training)
    model.eval()
    try:
        graph = build_graph(model, x[:1])
        k = graph.num_classes
        if k < 2 or bool(((y < 0) | (y >= k)).any()):
            raise ValueError(f"labels must be class indices in [0, {k})")
        methods = make_methods(graph, plan)
        models = references(model)  # the model, and an ONNX file's own engine: both must match the graph
        tried = [m.name for m in methods]  # every method, including one later skipped
        wins = {name: 0 for name in tried}
        dropped: list[str] = []
        unproved = rounding_bound = 0  # correctly classified samples at radius 0; of them, ruled out by rounding
        first = min(batch_size, FIRST_BATCH) if n > batch_size else n
        for s, e in _batches(n, first, batch_size):
            xb, yb = x[s:e], y[s:e]
            check_graph(graph, models, xb)  # on every sample certified, before any bound: no branch left unseen
            best, chosen, per_method, zero, swamped = _certify_batch(model, graph, methods, xb, yb, plan, step)
            unproved += int(zero.sum())
            rounding_bound += int(swamped.sum())
            check_graph_in_balls(graph, models, xb, best, seed=s)
            radius[s:e] = best
            method[s:e] = chosen
            for name in chosen:
                if name in wins:
                    wins[name] += 1
            if s == 0 and n > len(xb):
                dropped = outclassed(per_method)
                methods = [m for m in methods if m.name not in dropped]
            if progress is not None:
                progress(len(xb))
    finally:
        for m, mode in modes.items():
            m.training = mode

    notes = [
        f"budget {plan.name}: at most {plan.max_evals} bound evaluations per batch of {batch_size} samples",
        "methods tried: " + ", ".join(tried),
        "largest radius from: " + ", ".join(f"{name} {count}" for name, count in wins.items()),
        *[
            f"{name} skipped after the first batch: crown's radius was at least {OUTCLASSED:g}x its own on every "
            f"sample there (a faster certificate, never a larger radius)" for name in dropped
        ],
        "radii certify the float32 model in pixel space: every margin must exceed a rigorous bound on its "
        "float32 rounding error over the ball (Winograd/FFT convolutions and TF32 are outside that bound)",
    ]
    if unproved:
        notes.append(radius_zero_note(unproved, rounding_bound))
    if training:
        notes.append(
            f"the model was passed in training mode ({_named(training)}): radii certify it in eval mode "
            "(dropout off, batch norm on its running statistics), the mode a saved model is audited in; "
            "in training mode its output is random or depends on the batch, and no radius holds for it"
        )
    if graph.final is not None:
        notes.append(
            f"the network ends in a {graph.final.replace('_', '-')}, which picks the class its input scores pick: "
            f"radii bound those scores, each margin kept {graph.tie_margin:.1g} above a float32 tie"
        )
    return Certificate(radius, method, time.perf_counter() - start, notes)


_ZERO = re.compile(r"(\d+) of the correctly classified samples got radius 0: no bound proved a larger one(?:; on (\d+) of)?")


def radius_zero_note(unproved: int, rounding_bound: int) -> str:
    """Why `unproved` correctly classified samples got radius 0 (`rounding_bound` of them: rounding at x alone)."""
    why = (
        f"; on {rounding_bound} of them the margin at the sample itself is below the interval bound's rigorous "
        "float32 rounding allowance, which compounds layer by layer through |W| and on deep networks can be "
        "orders of magnitude above the rounding seen (docs/certify.md#known-limitations)"
        if rounding_bound
        else " (bounds loosen with depth and width; --certify-budget tight refines more units)"
    )
    return f"{unproved} of the correctly classified samples got radius 0: no bound proved a larger one{why}"


def radius_zero_counts(note: str) -> tuple[int, int] | None:
    """The two counts of a `radius_zero_note` (None for another note): a scan in chunks sums them."""
    found = _ZERO.match(note)
    return None if found is None else (int(found.group(1)), int(found.group(2) or 0))


def _named(modules: list[str]) -> str:
    """'the whole model' or the first few submodules in training mode."""
    if "" in modules:
        return "the whole model"
    return ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")


def _batches(n: int, first: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch: a first one of `first` samples, then `size` at a time."""
    return [(0, first)] + [(s, min(s + size, n)) for s in range(first, n, size)]


def _on_cpu(model: nn.Module) -> nn.Module:
    """The bounds run on the CPU in float64: a model on another device is copied there."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


def outclassed(per_method: dict[str, torch.Tensor]) -> list[str]:
    """The costly methods to drop for the remaining batches: crown beat them by `OUTCLASSED`x on every sample.

    Only the cross-Lipschitz methods (`interval`, `closed-form`) are dropped, and only after at
    least `OUTCLASSED_MIN` certified samples: on deep nets (a residual net with BatchNorm) their
    radius is a small fraction of CROWN's while they take most of the time. Dropping a sound
    method can only lower a radius, never make one unsound.
    """
    crown = per_method.get("crown")
    if crown is None or len(crown) < OUTCLASSED_MIN or not bool((crown > 0).all()):
        return []
    lipschitz = ("interval", "closed-form")
    return [name for name, r in per_method.items() if name in lipschitz and bool((OUTCLASSED * r <= crown).all())]


def _certify_batch(
    model: nn.Module, graph: Graph, methods: list, x: torch.Tensor, y: torch.Tensor, plan: Budget,
    step: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Best radius and its method for one batch (0 and "none" where misclassified), each method's radii,
    the correctly classified samples left at radius 0, and those of them whose margin at x itself
    is below the interval bound's float32 rounding allowance there (for the notes: why)."""
    radius = torch.zeros(len(x), dtype=torch.float64)
    chosen = ["none"] * len(x)
    per_method: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        pred = model(x).reshape(len(x), -1).argmax(dim=1).cpu()
    x64 = x.to(torch.float64)
    correct = (pred == y) & (graph.logits(x64).argmax(dim=1) == y)
    idx = torch.nonzero(correct).flatten()
    swamped = torch.zeros(len(x), dtype=torch.bool)  # the rounding allowance at x alone reaches a margin
    if len(idx) == 0:
        return radius, chosen, per_method, correct, swamped
    batch = _batch(graph, x64[idx], y[idx])
    positive = batch.margins.amin(dim=1) > 0  # a tie (after deflation) certifies nothing
    if not positive.all():
        idx = idx[positive]
        if len(idx) == 0:
            return radius, chosen, per_method, correct, swamped
        batch = _batch(graph, x64[idx], y[idx])
    best = torch.zeros(len(idx), dtype=torch.float64)
    for m in methods:
        if step is not None:
            step(m.name)
        if isinstance(m, (LinearExact, GlobalLipschitz)):
            r = m.radius(batch.margins, batch.labels, batch.others, batch.error)
        elif isinstance(m, CrownBound):  # bisects above what the others proved, from the first-order radius
            r = m.radius(batch, torch.arange(len(idx)), best, first_order_radius(graph, batch))
        else:
            error = (lambda i, a, m=m: m.ball_error(batch, i, a)) if hasattr(m, "ball_error") else batch.error
            r = search_radius(lambda i, a, m=m: m.lipschitz(batch, i, a), batch.margins, plan, error)
        r = r.clamp(0, RADIUS_CAP)  # beyond it a clamp's ReLUs cancel in the float64 graph (x - lo at |x| ~ 1e16)
        per_method[m.name] = r
        for t in torch.nonzero(r > best).flatten().tolist():
            chosen[int(idx[t])] = m.name
        best = torch.maximum(best, r)
    certified = torch.nonzero(best > 0).flatten()
    if len(certified):  # a ball where float32 could overflow certifies nothing (`rounding.overflow_possible`)
        void = certified[overflow_possible(graph, *batch.error.bounds(certified, best[certified]))]
        best[void] = 0.0
        for t in void.tolist():
            chosen[int(idx[t])] = "none"
    radius[idx] = best
    none = torch.nonzero(best == 0).flatten()
    if len(none):  # why: a note says how often the rounding allowance alone rules out every radius
        at_x = batch.margins[none] - batch.error(none, torch.zeros(len(none), dtype=torch.float64))
        swamped[idx[none]] = (at_x <= 0).any(dim=1)
    return radius, chosen, per_method, correct & (radius == 0), swamped
