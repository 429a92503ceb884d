"""CROWN's backward pass for the units of a convolutional layer, over their receptive fields only.

Refining every unit of a feature map (true CROWN's intermediate bounds) runs one backward
pass per unit and sign. On the dense layout each pass carries coefficients over every
earlier feature map, although a unit at position (y, x) depends only on a window of each
map: its receptive field. This module carries, per unit, only that window ("patches",
as in auto_LiRPA): the coefficients on a (C, H, W) node are a tensor (rows, L, C, kh, kw)
where L runs over the refined node's positions and position (y, x) owns the window whose
top-left corner sits at (y * sh - ph, x * sw - pw) of the node. Going back through a
convolution (stride s, padding p, kernel k) is a transposed convolution of each window:
the window grows to (kh - 1) s + k, the stride to sh s, the offset to ph s + p. On the
first layers of a CIFAR-10 network this is tens to hundreds of times less work.

Every bound is the dense pass's bound, term for term: coefficients that fall outside a
node (its padding) are zeroed on entering it; per-unit parameters (relaxation lines,
rounding allowances, scales and biases) are read through the same windows (`_windows`),
zero outside the node. The one thing left out is the L2-ball coupling of ReLU layers
(`ball.py`), which needs a whole layer at once: the dense pass takes the better of it
and CROWN's intercepts, so leaving it out gives CROWN's intercepts, still sound.

Only nodes whose every ancestor is a convolution (any groups, dilation and stride), an
average pooling that is one (`_pool_as_conv`), a constant padding of the height and width
(`_shift`: a pad node, or a selection that only pads), a map of whole channels
(`_channels`: a concatenation, chunk or shuffle of channels), a max pooling (its CROWN
relaxation read through the same windows), an elementwise scale, an activation, a
residual sum or a reshape that keeps (C, H, W) are handled (`PatchPlan.covers`);
anything else (a crop, a transpose, a replicate padding) keeps the dense pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from robaudit.certify.graph import Graph
from robaudit.certify.ops import ActOp, AddOp, AffineOp, AvgPoolOp, ConvOp, MaxPoolOp, PadOp, ReshapeOp, ScaleOp, SelectOp

PATCH_ELEMS = 1 << 22  # coefficients one chunk of refined positions may carry at its widest node


@dataclass(frozen=True)
class Geometry:
    """Where each refined position's window sits on a node: stride, top-left padding, window size.

    Stride (0, 0) means every position shares one window: with padding (0, 0) and the
    node's (H, W) as its size, the whole node (`whole`), the dense layout of each row.
    """

    stride: tuple[int, int]
    pad: tuple[int, int]
    kernel: tuple[int, int]

    @staticmethod
    def whole(h: int, w: int) -> Geometry:
        return Geometry((0, 0), (0, 0), (h, w))

    @property
    def shared(self) -> bool:
        return self.stride == (0, 0)

    def through_conv(self, op: ConvOp | MaxPoolOp) -> Geometry:
        """The windows on the input of a convolution or a max pooling (window size, stride, padding, dilation)."""
        (sh, sw), (ph, pw), (kh, kw) = self.stride, self.pad, self.kernel
        (s0, s1), (p0, p1), (d0, d1) = op.stride, op.padding, op.dilation
        k0, k1 = op.kernel if isinstance(op, MaxPoolOp) else op.weight.shape[-2:]
        kernel = ((kh - 1) * s0 + d0 * (k0 - 1) + 1, (kw - 1) * s1 + d1 * (k1 - 1) + 1)
        return Geometry((sh * s0, sw * s1), (ph * s0 + p0, pw * s1 + p1), kernel)

    def through_pad(self, top: int, left: int) -> Geometry:
        """The same windows on the input of a padding by (top, left): a shift, the border falls outside it."""
        return Geometry(self.stride, (self.pad[0] + top, self.pad[1] + left), self.kernel)

    def union(self, other: Geometry) -> Geometry | None:
        """The smallest geometry holding both windows (None where the strides differ or one is shared)."""
        if self.stride != other.stride or self.shared:
            return None
        pad = tuple(max(a, b) for a, b in zip(self.pad, other.pad))
        end = tuple(max(k - p, ko - po) for k, p, ko, po in zip(self.kernel, self.pad, other.kernel, other.pad))
        return Geometry(self.stride, pad, tuple(e + p for e, p in zip(end, pad)))


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(C, H, W) of a per-sample shape whose leading dims are all 1, else None."""
    if len(shape) < 3 or any(d != 1 for d in shape[:-3]):
        return None
    return tuple(shape[-3:])  # type: ignore[return-value]


def _read_once(op: object, attr: str, find: Callable[[Any], Any]) -> Any:
    """find(op), computed on the first call and kept on the op: the pass asks every chunk of every refinement."""
    if not hasattr(op, attr):
        setattr(op, attr, find(op))
    return getattr(op, attr)


def _shift(op: object) -> tuple[int, int] | None:
    """(top, left) where op pads the height and width of a (C, H, W) node with constants, else None."""
    return _read_once(op, "_patches_shift", _find_shift) if isinstance(op, (PadOp, SelectOp)) else None


def _find_shift(op: PadOp | SelectOp) -> tuple[int, int] | None:
    """A pad node (`PadOp`) says so in its pads; a selection (`SelectOp`, how ONNX Pad and
    F.pad are read) must place every input value at its own position shifted by (top,
    left) and fill the rest: its first moved value gives the shift, its whole index is
    then compared. Negative pads (crops) are not a shift this pass knows.
    """
    src, dst = _chw(op.in_shape), _chw(op.out_shape)
    if src is None or dst is None or src[0] != dst[0] or dst[1] < src[1] or dst[2] < src[2]:
        return None
    c, h, w = src
    if isinstance(op, PadOp):
        pads = tuple(op.pads) + (0,) * 4  # (left, right[, top, bottom, ...]), the missing ones 0
        if min(pads[:4]) < 0 or any(pads[4:]):
            return None
        left, right, top, bottom = pads[:4]
        return (top, left) if dst == (c, h + top + bottom, w + left + right) else None
    n = c * h * w
    moved = torch.nonzero(op.index != n)
    if len(moved) != n:
        return None
    first = int(moved[0])
    top, left = (first // dst[2]) % dst[1], first % dst[2]
    if top + h > dst[1] or left + w > dst[2]:
        return None
    want = torch.full(dst, n, dtype=op.index.dtype)
    want[:, top : top + h, left : left + w] = torch.arange(n).reshape(c, h, w)
    return (top, left) if torch.equal(op.index, want.flatten()) else None


def _channels(op: object) -> torch.Tensor | None:
    """(C_out,) input channel of each output channel (-1: a constant) where op only moves channels, else None."""
    return _read_once(op, "_patches_channels", _find_channels) if isinstance(op, (PadOp, SelectOp)) else None


def _find_channels(op: PadOp | SelectOp) -> torch.Tensor | None:
    """A channel map keeps every pixel where it is: a pad node padding the channels only (each
    part of a concatenation along them), or a selection whose every output channel is a whole
    input channel or a constant (a chunk, a channel shuffle, a repeat)."""
    src, dst = _chw(op.in_shape), _chw(op.out_shape)
    if src is None or dst is None or src[1:] != dst[1:]:
        return None
    (c, h, w), c_out = src, dst[0]
    if isinstance(op, PadOp):
        pads = tuple(op.pads) + (0,) * 6
        front, back = pads[4:6]
        if any(pads[:4]) or any(pads[6:]) or min(front, back) < 0 or front + c + back != c_out:
            return None
        source = torch.arange(c_out) - front
        return torch.where((source >= 0) & (source < c), source, -1)
    n, plane = c * h * w, h * w
    rows = op.index.reshape(c_out, plane)
    fill = (rows == n).all(dim=1)
    source = torch.where(fill, -1, rows[:, 0] // plane)
    want = torch.where(fill[:, None], n, source[:, None] * plane + torch.arange(plane))
    return source if torch.equal(rows, want) else None


def _pool_as_conv(op: AvgPoolOp) -> ConvOp | None:
    """The depthwise convolution an average pooling is, where it is one; else None.

    Every window must divide by the same number: no padding left out of the count, and
    no window that ceil mode adds beyond the padded map (torch divides those by less).
    """
    src, dst = _chw(op.in_shape), _chw(op.out_shape)
    if src is None or dst is None or (not op.count_include_pad and max(op.padding) > 0):
        return None
    c, h, w = src
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    if dst != (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1):
        return None
    weight = torch.full((c, 1, kh, kw), 1.0 / (op.divisor_override or kh * kw), dtype=torch.float64)
    return ConvOp(op.name, op.in_shape, op.out_shape, None, True, weight, op.stride, op.padding, (1, 1), c)


def _as_conv(op: object) -> ConvOp | None:
    """The convolution op is, for this pass: itself, or an average pooling's."""
    if isinstance(op, ConvOp):
        return op
    return _read_once(op, "_patches_conv", _pool_as_conv) if isinstance(op, AvgPoolOp) else None


def _handled(graph: Graph, j: int) -> bool:
    node = graph.nodes[j]
    op = node.op
    if _chw(node.shape) is None:
        return False
    if op is None or isinstance(op, (ActOp, AddOp, ScaleOp)):
        return True
    if isinstance(op, ReshapeOp):
        return _chw(op.in_shape) == _chw(node.shape)
    conv = _as_conv(op)
    if conv is not None or isinstance(op, MaxPoolOp):
        return min((conv or op).padding) >= 0
    return _shift(op) is not None or _channels(op) is not None


def _moved(geo: Geometry, op: object) -> Geometry:
    """Geometry of a node's windows on its (first) input."""
    conv = _as_conv(op)
    if conv is not None or isinstance(op, MaxPoolOp):
        return geo.through_conv(conv or op)
    shift = _shift(op)
    return geo if shift is None else geo.through_pad(*shift)


class PatchPlan:
    """Which nodes the patches pass can refine, the windows it uses, and what it costs."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.geometry: dict[int, dict[int, Geometry] | None] = {}

    def plan(self, i: int) -> dict[int, Geometry] | None:
        """node -> geometry of node i's windows there, for every ancestor; None if not covered.

        A node whose windows would be as large as the node itself, or that its consumers
        reach with different strides, takes the whole-node layout instead.
        """
        if i in self.geometry:
            return self.geometry[i]
        g = self.graph
        incoming: dict[int, list[Geometry]] = {i: [Geometry((1, 1), (0, 0), (1, 1))]}
        out: dict[int, Geometry] | None = {}
        refined = isinstance(g.nodes[i].op, (ScaleOp, AddOp)) or _as_conv(g.nodes[i].op) is not None
        if not refined or not _handled(g, i):
            out = None
        for j in range(i, -1, -1):
            if out is None or j not in incoming:
                continue
            if not _handled(g, j):
                out = None
                break
            node = g.nodes[j]
            _, h, w = _chw(node.shape)
            geo = incoming.pop(j)[0] if j == i else _resolve(incoming.pop(j), h, w)
            out[j] = geo
            moved = _moved(geo, node.op)
            for k in node.inputs:
                incoming.setdefault(k, []).append(moved)
        self.geometry[i] = out
        return out

    def covers(self, i: int) -> bool:
        return self.plan(i) is not None

    def widest(self, i: int) -> int:
        """Coefficients per refined unit (one sign) at the widest node of the pass."""
        plan = self.plan(i)
        return max(_chw(self.graph.nodes[j].shape)[0] * math.prod(geo.kernel) for j, geo in plan.items())

    def cost(self, i: int) -> int:
        """Multiply-adds per sample of refining every unit of node i, both signs (transposed convolutions)."""
        plan = self.plan(i)
        units = math.prod(self.graph.nodes[i].shape)
        per_row = 0
        for j, geo in plan.items():
            op = self.graph.nodes[j].op
            conv = _as_conv(op)
            c, _, _ = _chw(self.graph.nodes[j].shape)
            per_row += c * math.prod(geo.kernel)
            if conv is not None:
                per_row += math.prod(geo.kernel) * conv.weight[0].numel() * c
            elif isinstance(op, MaxPoolOp):  # its relaxation's window entries, each a transposed convolution
                per_row += 3 * math.prod(geo.kernel) * math.prod(op.kernel) * c
        return 2 * units * per_row


def _resolve(geos: list[Geometry], h: int, w: int) -> Geometry:
    """One layout for the windows a node's consumers reach it with."""
    merged: Geometry | None = geos[0]
    for other in geos[1:]:
        merged = merged.union(other) if merged is not None else None
    if merged is None or merged.shared or merged.kernel[0] * merged.kernel[1] >= h * w:
        return Geometry.whole(h, w)
    return merged


def _windows(t: torch.Tensor, shape: tuple[int, ...], geo: Geometry, grid: tuple[int, int], pos: torch.Tensor) -> torch.Tensor:
    """(n, R, C, kh, kw): for each sample's R grid positions `pos` (n, R), its window on t (n or 1, *shape).

    t is read as (C, H, W) per sample; outside the node (its padding) the windows read 0.
    Only the windows asked for are gathered (a pass runs in many chunks of positions).
    """
    c, h, w = _chw(shape)
    m = t.shape[0]
    t = t.reshape(m, c, h, w)
    if geo.shared:  # the whole node (`_resolve`): the same window for every position
        return t[:, None]
    (sh, sw), (ph, pw), (kh, kw) = geo.stride, geo.pad, geo.kernel
    gh, gw = grid
    bottom = max(0, (gh - 1) * sh - ph + kh - h)
    right = max(0, (gw - 1) * sw - pw + kw - w)
    padded = F.pad(t, (pw, right, ph, bottom))
    width = padded.shape[3]
    corner = (pos // gw) * (sh * width) + (pos % gw) * sw  # (n, R) top-left of each window in the padded plane
    offsets = (torch.arange(kh)[:, None] * width + torch.arange(kw)[None, :]).flatten()
    index = (corner[..., None] + offsets).flatten(1)  # (n, R kh kw)
    flat = padded.flatten(2)  # (m, C, Hp Wp)
    n, r = pos.shape
    if m == 1:
        out = flat[0][:, index]  # (C, n, R kh kw)
        return out.reshape(c, n, r, kh, kw).permute(1, 2, 0, 3, 4)
    out = flat.gather(2, index[:, None].expand(m, c, -1))  # (n, C, R kh kw)
    return out.reshape(m, c, r, kh, kw).permute(0, 2, 1, 3, 4)


def _inside(geo: Geometry, grid: tuple[int, int], shape: tuple[int, ...]) -> bool:
    """Every position's window lies inside the node (no padding to mask)."""
    if geo.shared:
        return True
    _, h, w = _chw(shape)
    return min(geo.pad) == 0 and (grid[0] - 1) * geo.stride[0] + geo.kernel[0] <= h and (
        grid[1] - 1) * geo.stride[1] + geo.kernel[1] <= w


def _fit(coef: torch.Tensor, have: Geometry, want: Geometry, grid: tuple[int, int], pos: torch.Tensor) -> torch.Tensor:
    """The coefficients coef (n, 2, R, C, kh, kw), laid out by `have`, in the layout `want` of the same node.

    Onto a larger strided window: zeros around. Onto the whole node: a shared window is
    cut (or padded) to the node; per-position windows are placed by a gather per row.
    """
    if not want.shared:
        top, left = want.pad[0] - have.pad[0], want.pad[1] - have.pad[1]
        bottom = want.kernel[0] - have.kernel[0] - top
        right = want.kernel[1] - have.kernel[1] - left
        return F.pad(coef, (left, right, top, bottom)) if (top, left, bottom, right) != (0, 0, 0, 0) else coef
    h, w = want.kernel
    if have.shared:  # the window covers [-pad, kernel - pad) of the node: crop (negative pads) or pad to [0, size)
        (ph, pw), (kh, kw) = have.pad, have.kernel
        return F.pad(coef, (-pw, w - (kw - pw), -ph, h - (kh - ph)))
    n, two, r, c, kh, kw = coef.shape
    y, x = pos // grid[1], pos % grid[1]  # (n, R)
    # node coordinate u sits at window index u + pad - y * stride, where that lies inside the window
    rows = torch.arange(h)[None, None, :] + have.pad[0] - y[..., None] * have.stride[0]  # (n, R, h)
    cols = torch.arange(w)[None, None, :] + have.pad[1] - x[..., None] * have.stride[1]  # (n, R, w)
    keep = ((rows >= 0) & (rows < kh))[..., :, None] & ((cols >= 0) & (cols < kw))[..., None, :]  # (n, R, h, w)
    ri = rows.clamp(0, kh - 1)[:, None, :, None, :, None].expand(n, two, r, c, h, kw)
    out = coef.gather(4, ri)
    ci = cols.clamp(0, kw - 1)[:, None, :, None, None, :].expand(n, two, r, c, h, w)
    return out.gather(5, ci) * keep[:, None, :, None]


def _full(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A constant broadcastable to the node (a scale's weight, a bias) as (1, *shape)."""
    return (torch.zeros((1, *shape), dtype=torch.float64) + t).reshape(1, *shape)


def backward_windows(
    plan: PatchPlan, values0: torch.Tensor, eps: torch.Tensor, i: int, units: torch.Tensor,
    relaxed: dict, noise: dict[int, torch.Tensor], rtol: float,
) -> torch.Tensor:
    """(n, 2, R) lower bounds of +z_u and -z_u over the ball for each sample's units `units` (n, R) of node i.

    units: flat indices into node i's (C, H, W); values0: (n, *sample shape) the samples;
    eps: (n,) radii; `relaxed` / `noise`: the relaxations and float32 rounding allowances
    of the ball (`crown._Context`). The same bound, term for term, as the dense backward
    pass on one-hot objectives (without the ball coupling of ReLU layers), with the same
    outward rounding.
    """
    g = plan.graph
    geometry = plan.plan(i)
    c0, gh, gw = _chw(g.nodes[i].shape)
    grid = (gh, gw)
    n, r = units.shape
    pos = units % (gh * gw)
    onehot = F.one_hot(units // (gh * gw), c0).to(torch.float64)  # (n, R, C)
    start = torch.stack([onehot, -onehot], 1).reshape(n, 2, r, c0, 1, 1)
    state: dict[int, torch.Tensor] = {i: start}
    const = torch.zeros(n, 2, r, dtype=torch.float64)
    scale = torch.zeros(n, 2, r, dtype=torch.float64)

    def win(t: torch.Tensor, j: int) -> torch.Tensor:  # (n, 1, R, C, kh, kw)
        return _windows(t, g.nodes[j].shape, geometry[j], grid, pos)[:, None]

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum((3, 4, 5))

    def inside_node(j: int) -> torch.Tensor:  # (1, 1, R, 1 or C, kh, kw): 1 on the node, 0 on its padding
        return win(torch.ones((1, *g.nodes[j].shape), dtype=torch.float64), j)

    for j in range(i, -1, -1):
        if j not in state:
            continue
        node = g.nodes[j]
        op = node.op
        lam = state.pop(j)
        conv, shift, channels = _as_conv(op), _shift(op), _channels(op)
        masked = op is None or isinstance(op, MaxPoolOp) or any(t is not None for t in (conv, shift, channels))
        if masked and not _inside(geometry[j], grid, node.shape):
            # coefficients on the node's padding multiply no unit (elsewhere every per-unit
            # factor read through `win` is 0 there, and the next convolution or the input masks)
            lam = lam * inside_node(j)
        size = lam.abs() if j in noise or (isinstance(op, AffineOp) and op.bias is not None) else None
        if j in noise:
            term = total(size * win(noise[j], j))
            const, scale = const - term, scale + term
        if op is None:
            x = win(values0, j)
            dot = total(lam * x)
            norm = lam.flatten(3).norm(dim=3)
            offset = const + dot - rtol * (scale + norm * values0.flatten(1).norm(dim=1)[:, None, None])
            return offset - eps[:, None, None] * norm * (1 + rtol)
        if isinstance(op, AffineOp) and op.bias is not None:
            bias = _full(op.bias, node.shape)
            c = bias.shape[-3]
            per_channel = bias.reshape(c, -1)
            if bool((per_channel == per_channel[:, :1]).all()):  # one bias per channel: sum the windows first
                b = per_channel[:, 0]
                inside = conv is not None or geometry[j].shared or _inside(geometry[j], grid, node.shape)
                if not inside:  # (a scale's coefficients are not masked: the padding must not add its bias)
                    mask = inside_node(j)
                    lam_in, size_in = lam * mask, size * mask
                else:
                    lam_in, size_in = lam, size
                const = const + lam_in.sum((4, 5)) @ b
                scale = scale + size_in.sum((4, 5)) @ b.abs()
            else:
                b = lam * win(bias, j)
                const, scale = const + total(b), scale + total(b.abs())
        if conv is not None:
            rows = lam.reshape(-1, *lam.shape[3:])
            moved = geometry[j].through_conv(conv)
            # the transposed convolution, by the input-gradient kernel: 1.1-2.4x faster in float64 on the CPU
            in_size = (len(rows), conv.weight.shape[1] * conv.groups, *moved.kernel)
            back = torch.nn.grad.conv2d_input(in_size, conv.weight, rows, conv.stride, 0, conv.dilation, conv.groups)
            _push(state, geometry, node.inputs[0], back.reshape(n, 2, r, *back.shape[1:]), moved, grid, pos)
        elif shift is not None:  # the border's fill is the bias (above); the rest moves by the shift
            _push(state, geometry, node.inputs[0], lam, geometry[j].through_pad(*shift), grid, pos)
        elif channels is not None:  # constant channels are the bias (above); each other one goes to its source
            moved = channels >= 0
            in_size = (*lam.shape[:3], _chw(g.nodes[node.inputs[0]].shape)[0], *lam.shape[4:])
            back = lam.new_zeros(in_size).index_add_(3, channels[moved], lam[:, :, :, moved])
            _push(state, geometry, node.inputs[0], back, geometry[j], grid, pos)
        elif isinstance(op, ScaleOp):
            _push(state, geometry, node.inputs[0], lam * win(_full(op.weight, node.shape), j), geometry[j], grid, pos)
        elif isinstance(op, ReshapeOp):
            _push(state, geometry, node.inputs[0], lam, geometry[j], grid, pos)
        elif isinstance(op, AddOp):
            _push(state, geometry, node.inputs[0], lam, geometry[j], grid, pos)
            _push(state, geometry, node.inputs[1], op.sign * lam, geometry[j], grid, pos)
        elif isinstance(op, MaxPoolOp):
            # CROWN's relaxation (`crown._relax`): below, the entry with the largest lower bound;
            # above, that entry where it surely wins, else the window's largest upper bound
            parts, (c, ho, wo), k = relaxed[j].parts, _chw(node.shape), math.prod(op.kernel)
            sure = win(parts["sure"].reshape(-1, c, ho, wo).to(lam.dtype), j) > 0
            term = torch.where(sure, 0.0, lam.clamp_max(0)) * win(parts["top"].reshape(-1, c, ho, wo), j)
            const, scale = const + total(term), scale + total(term.abs())
            picks = _windows(parts["onehot"].reshape(-1, c * k, ho, wo), (c * k, ho, wo), geometry[j], grid, pos)
            coef = torch.where(sure, lam, lam.clamp_min(0)).unsqueeze(4)
            picks = picks.reshape(picks.shape[0], 1, picks.shape[1], c, k, *picks.shape[-2:])  # R is 1 where shared
            rows = (coef * picks).reshape(n * 2 * r, c * k, *picks.shape[-2:])
            moved = geometry[j].through_conv(op)
            # each window entry back to its pixel: a transposed convolution per channel and entry, summed over entries
            back = torch.nn.grad.conv2d_input(
                (len(rows), c, *moved.kernel), _entry_kernel(op, c), rows, op.stride, 0, op.dilation, c
            )
            _push(state, geometry, node.inputs[0], back.reshape(n, 2, r, *back.shape[1:]), moved, grid, pos)
        else:
            assert isinstance(op, ActOp)
            rel = relaxed[j]
            used = ("a_l", "a_u", "b_u") if rel.kind == "relu" else ("a_l", "a_u", "b_l", "b_u")  # a ReLU's b_l is 0
            lines = {key: win(rel.parts[key], j) for key in used}
            neg = lam.clamp_max(0)
            g_in = lam * lines["a_l"] + neg * (lines["a_u"] - lines["a_l"])
            _push(state, geometry, node.inputs[0], g_in, geometry[j], grid, pos)
            term = total(neg * lines["b_u"])
            if rel.kind == "relu":
                const, scale = const + term, scale - term
            else:
                low = (lam - neg) * lines["b_l"]
                const = const + term + total(low)
                scale = scale + total((neg * lines["b_u"]).abs()) + total(low.abs())
    raise AssertionError("the backward pass never reached the input")  # pragma: no cover


def _entry_kernel(op: MaxPoolOp, channels: int) -> torch.Tensor:
    """(C k, 1, kh, kw): for each channel and window entry (unfold's order), a kernel that is 1 at that entry."""
    k = math.prod(op.kernel)
    eye = torch.eye(k, dtype=torch.float64).reshape(k, 1, *op.kernel)
    return eye.repeat(channels, 1, 1, 1)


def _push(state: dict, geometry: dict[int, Geometry], k: int, coef: torch.Tensor, have: Geometry, grid, pos) -> None:
    """Add coefficients on node k, laid out by `have`, into its state (laid out by its plan)."""
    coef = _fit(coef, have, geometry[k], grid, pos)
    state[k] = coef if k not in state else state[k] + coef
