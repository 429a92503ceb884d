"""Is the graph the bounds walk the model itself? Checked at the samples and inside every ball.

A radius is about the float64 graph of `graph.py`; it is the model's radius only if that
graph computes what the model computes. Tracing slips (a branch not taken, an op read
with the wrong argument, a TorchScript alias lost by the converter) show as scores that
differ. The yardstick is float32 rounding: a faithful graph's margins differ from the
float32 model's by at most the rounding `rounding.point_rounding` charges them (the same
charge the certificate reserves inside each ball, at radius 0), whatever the scores'
scale. A fixed tolerance (1e-3 of the margin, at least 1e-3) let slips through on models
with small scores, and any slip under 1e-3 on scores of size 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robaudit.certify.errors import CertificateUnavailable
from robaudit.certify.graph import Graph
from robaudit.certify.rounding import ACT_ULPS, U, point_rounding, score_rounding
from robaudit.models.outputs import select_output

F64 = torch.float64
BALL_PAIRS = 8  # random directions (and their opposites) along which the graph is checked inside each ball ...
BALL_FRACTIONS = (0.5, 0.999)  # ... at these fractions of the radius
TINY_LOG = math.log(1e-25)  # returned probabilities below it may be clamped (wrapper.LOG_FLOOR): not compared
F64_RTOL = 1e-12  # the float64 graph's own rounding, relative to the scores it subtracts


Reference = tuple[nn.Module, str]  # a module the graph must reproduce, and how a failure names it ("": the model)


def references(model: nn.Module) -> list[Reference]:
    """What the graph must reproduce: the model, and the file itself where it has a twin (an ONNX file's engine).

    For an ONNX file the bounds walk the graph of onnx2torch's translation, while the radius
    is printed about the file. Holding the file's own scores to the graph with this
    module's float32-rounding yardstick (not the translation check's tolerance relative to
    the largest score, which an offset common to every score widens) leaves no slip of
    the translation larger than the rounding the radius keeps in hand.
    """
    twin = getattr(model, "file_twin", None)
    if not isinstance(twin, nn.Module):
        return [(model, "")]
    engine = getattr(getattr(twin, "net", None), "engine", "") or "its own precision"
    return [(model, ""), (twin, f"against the file as {engine} runs it, ")]


def check_graph(graph: Graph, models: nn.Module | list[Reference], x: torch.Tensor) -> None:
    """The float64 graph must reproduce each model's margins at x to within float32 rounding."""
    models = models if isinstance(models, list) else [(models, "")]
    x64 = x.detach().to("cpu", F64)
    with torch.no_grad():
        values = graph.forward(x64)
        got = graph.returned(values[-1].reshape(len(x), -1))
    charged: dict[bytes, torch.Tensor] = {}  # point_rounding per top-class choice: the same points for every model
    for model, label in models:
        with torch.no_grad():
            want = select_output(model(x)).detach().to("cpu", F64).reshape(len(x), -1)
        try:
            _compare(graph, want, got, values, x64, charged)
        except CertificateUnavailable as exc:
            raise CertificateUnavailable(label + exc.what) from None


def _compare(
    graph: Graph, want: torch.Tensor, got: torch.Tensor, values: list, x64: torch.Tensor, charged: dict
) -> None:
    """Margins of the graph (`got`, its node `values`) against one model's scores `want` at `x64`."""
    if not bool(torch.isfinite(want).all()):
        raise CertificateUnavailable("the model returns NaN or infinite scores on some of the samples")
    if want.shape != got.shape or not want.numel():
        raise CertificateUnavailable(
            f"the traced graph returns {tuple(got.shape[1:])} scores where the model returns {tuple(want.shape[1:])}"
        )
    # Margins to the model's top class: a constant added to every score changes no decision.
    top = want.argmax(dim=1, keepdim=True)
    want_margin, got_margin = want.gather(1, top) - want, got.gather(1, top) - got
    scores = want.gather(1, top).abs() + want.abs()
    allowed = F64_RTOL * scores + graph.tie_margin
    if graph.returns != "logits":  # a closing softmax (compared as log-probabilities): a few ulps of each
        allowed = allowed + ACT_ULPS * U * (scores + 2)
    if graph.final == "softmax":  # probabilities: tiny ones are clamped or lose digits (a log-softmax keeps them)
        kept = (want > TINY_LOG) | (got > TINY_LOG)
        want_margin, got_margin = torch.where(kept, want_margin, 0.0), torch.where(kept, got_margin, 0.0)
    differ = (got_margin - want_margin).abs()
    own = score_rounding(graph, values)
    if own is not None and bool((differ <= allowed + own.gather(1, top) + own).all()):
        return  # within the last layer's own share of the allowance: no need for the whole (a backward pass per class)
    key = top.numpy().tobytes()
    if key not in charged:
        charged[key] = point_rounding(graph, x64, top, values)
    allowed = allowed + charged[key]
    excess = torch.where(differ == 0, 0.0, differ / allowed)  # equal margins pass, even where nothing rounds
    worst = excess.max().item()
    if not math.isfinite(worst) or worst > 1:
        at = int(excess.flatten().nan_to_num(math.inf).argmax())
        diff = differ.flatten()[at].item()
        raise CertificateUnavailable(
            f"the traced graph does not reproduce the model's outputs (a margin differs by {diff:.3g}, "
            f"{worst:.3g}x what float32 rounding explains); the model probably has batch- or data-dependent "
            "behaviour, or robaudit reads one of its ops wrong"
        )


def check_graph_in_balls(
    graph: Graph, models: nn.Module | list[Reference], x: torch.Tensor, radius: torch.Tensor, seed: int = 0
) -> None:
    """The graph must reproduce the model inside each certified ball too, not only at its centre.

    The bound is about the graph: a translation (TorchScript through torch's converter, an fx
    trace) that agrees with the model at the sample but not off it would be certified in
    the model's name. Points along random directions and their opposites, at half and
    0.999 of the radius and not clipped to any box (the radius covers the whole ball),
    catch a difference that switches on in a half-space near the centre. Sampling, not a proof.
    """
    idx = torch.nonzero(radius > 0).flatten()
    if len(idx) == 0:
        return
    xs, rs = x[idx], radius[idx].view(-1, *([1] * (x.dim() - 1)))
    generator = torch.Generator().manual_seed(seed)
    points = []
    for _ in range(BALL_PAIRS):
        d = torch.randn(xs.shape, generator=generator, dtype=F64)
        d = d / d.flatten(1).norm(dim=1).view_as(rs)
        points += [(xs.double() + sign * fraction * rs * d).float() for sign in (1, -1) for fraction in BALL_FRACTIONS]
    try:
        for batch in points:  # one batch's worth at a time: large images stay within memory
            check_graph(graph, models, batch)
    except CertificateUnavailable as exc:
        raise CertificateUnavailable(f"inside the certified balls (random points within their radii), {exc.what}") from None
    except Exception as exc:  # noqa: BLE001 - the model itself fails off its data: nothing to compare the graph with
        raise CertificateUnavailable(
            f"the model fails on points inside the certified balls ({type(exc).__name__}), so the graph the bound "
            "walks cannot be checked against it there"
        ) from None
