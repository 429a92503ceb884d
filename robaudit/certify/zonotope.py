"""Gradient enclosures as zonotopes: the interval method's backward pass, with its correlations kept.

The gradient of a margin is ``W_1^T D_1 W_2^T D_2 ... v``, where every D_k is the
(diagonal) activation derivative, known over the ball only as an interval per unit.
The interval backward pass (`interval.py`) forgets, after each layer, that all the
coordinates of the gradient are driven by the same few uncertain derivatives; its
radii grow through |W|^T. Here the gradient at each node is kept as an affine function
of noise symbols e in [-1, 1]^m, ``c + sum_k e_k M_k``:

- an affine op maps c and every M_k through W^T (exactly);
- a unit whose derivative d lies in [d_m - d_r, d_m + d_r] maps its gradient z to
  ``d z = d_m z + (d - d_m) z``; the second term lies in ``[-d_r |z|_max, d_r |z|_max]``,
  so it becomes one new symbol with that coefficient (the best single-symbol affine
  enclosure of {d z}), while ``d_m z`` keeps every old symbol;
- a residual sum adds the states of both branches over one global list of symbols.

At the input, with S = [c, M] and s = (1, e): ``||grad||^2 = s^T S S^T s``, and for any
positive weights w, ``S S^T <= lambda_max(S^T diag(1/w) S) diag(w)`` with every
|s_k| <= 1 gives ``||grad||^2 <= lambda_max(.) sum_k w_k`` (`norm_bound`: diagonal
dominance for the first w, then descent on it, i.e. the SDP relaxation of the maximum).

On the digits CNN this bound is 0.72-0.77x the interval one at the radius the interval
method certifies. The pass runs only on the pairs that decide the radius and gives up
past a size cap (`Budget.zonotope_elems`, `zonotope_pairs`, `zonotope_sdp_steps`).
Max pooling (whose adjoint routes to one undecided position of a window) is not
handled here: graphs with it get no zonotope bound (the interval bound stands).
"""

from __future__ import annotations

import math

import torch

from robaudit.certify.graph import Graph
from robaudit.certify.ops import ActOp, AddOp, AffineOp

SDP_STEP = 0.002  # first multiplicative step on the weights, times the number of (nonzero) symbols
SDP_TEMP = 0.02  # softness of lambda_max in the descent direction (relative to it)
SDP_FLOOR = 1e-12  # smallest weight, relative to the largest
SDP_SIDE = 256  # no SDP steps (diagonal dominance alone) where both sides of the matrix are larger
SDP_RTOL = 1e-9  # outward rounding of the squared bound: float64 errors are below k d eps of it (k symbols, d dims)


def supported(graph: Graph) -> bool:
    """Every op of the graph has a zonotope backward rule."""
    return all(n.op is None or isinstance(n.op, (AffineOp, ActOp, AddOp)) for n in graph.nodes)


def _pad(m: torch.Tensor, width: int) -> torch.Tensor:
    """Generators (b, p, m, *shape) padded with zero columns to `width` symbols."""
    if m.shape[2] == width:
        return m
    extra = m.new_zeros(m.shape[0], m.shape[1], width - m.shape[2], *m.shape[3:])
    return torch.cat([m, extra], dim=2)


def _new_symbols(coef: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """One symbol per free unit: (b, p, u, *shape) with column k of sample s one-hot at its k-th free unit.

    coef (b, p, *shape) holds each unit's coefficient; free (b, *shape) marks the units that
    get a symbol; u is the largest count over the samples (padded with zero columns).
    """
    b, p = coef.shape[:2]
    flat = free.reshape(b, -1)
    n = flat.shape[1]
    u = int(flat.sum(dim=1).max()) if b else 0
    out = coef.new_zeros(b, p, u, n)
    if u:
        rank = flat.long().cumsum(dim=1) - 1
        s, unit = torch.nonzero(flat, as_tuple=True)
        out[s, :, rank[s, unit], unit] = coef.reshape(b, p, n)[s, :, unit]
    return out.reshape(b, p, u, *coef.shape[2:])


def norm_bound(c: torch.Tensor, m: torch.Tensor, steps: int = 0) -> torch.Tensor:
    """Upper bound of max over e in [-1, 1]^m of ||c + sum_k e_k m_k|| (c (b, p, d), m (b, p, m, d)).

    With S = [c, m] (rows = symbols) and s = (1, e), ||.||^2 = s^T H s, H = S S^T. For any
    positive weights w, H <= lambda diag(w) with lambda = lambda_max(S^T diag(1/w) S) (a
    d x d matrix), so ||.||^2 <= lambda sum_k w_k. The weights start at the row sums of
    |H| (where lambda <= 1: the diagonal-dominance bound) and then take `steps` steps of
    multiplicative descent on lambda sum_k w_k (the SDP relaxation of this maximum),
    with lambda from the smaller of the d x d matrix and the k x k one
    diag(w)^-1/2 H diag(w)^-1/2 (same nonzero eigenvalues), while that side is at most
    `SDP_SIDE` (the diagonal-dominance bound alone above it). Every step's value is a
    bound; the smallest is returned, rounded outward by `SDP_RTOL` (the float64 error of a
    sum of k^2 Gram entries or of an eigenvalue of such a matrix is below k d eps of it).
    """
    s = torch.cat([c[:, :, None], m], dim=2)  # (b, p, k, d)
    finite = torch.isfinite(s).all(dim=3).all(dim=2)
    s = torch.where(finite[..., None, None], s, 0.0)  # an infinite enclosure gets an infinite bound below
    k = s.shape[2]
    small_side = k <= s.shape[3]
    tiny = torch.finfo(s.dtype).tiny
    gram = s @ s.mT
    w = gram.abs().sum(dim=3)
    best = w.sum(dim=2)
    base, base_grad = w.clamp_min(tiny).log(), torch.zeros_like(w)
    used = (s != 0).any(dim=3).sum(dim=2).clamp_min(1)  # symbols that are not padding
    step = SDP_STEP * used.to(s.dtype)
    last = torch.full_like(best, torch.inf)
    sweeps = steps + 1 if min(k, s.shape[3]) <= SDP_SIDE else 0  # eigh costs side^3 per pair and step
    for _ in range(sweeps):
        log_w = base - step[..., None] * base_grad
        log_w = log_w - log_w.amax(dim=2, keepdim=True)  # the bound does not change with the scale of w
        w = log_w.exp().clamp_min(SDP_FLOOR)
        if small_side:  # k x k: W^-1/2 H W^-1/2 has the same nonzero eigenvalues
            root = w.rsqrt()
            ev, vec = torch.linalg.eigh(gram * root[..., :, None] * root[..., None, :])
            gv = gram @ (root[..., None] * vec)  # (b, p, k, j); (S_k . v_j)^2 = gv_kj^2 / ev_j
            proj = torch.where(ev[..., None, :] > 0, gv**2 / ev[..., None, :].clamp_min(tiny), 0.0)
        else:  # d x d: S^T W^-1 S
            ev, vec = torch.linalg.eigh((s / w[..., None]).mT @ s)
            proj = (s @ vec) ** 2  # (b, p, k, d): (S_k . v_j)^2
        value = (ev[..., -1] * w.sum(dim=2)).nan_to_num(torch.inf)
        best = torch.minimum(best, value)
        better = value < last
        step = torch.where(better, step * 1.2, step / 2)
        last = torch.where(better, value, last)
        # gradient of log(lambda sum w) in log w, lambda smoothed over the top eigenvalues
        top = ev[..., -1:].clamp_min(tiny)
        soft = torch.softmax((ev - top) / (SDP_TEMP * top), dim=-1)
        lam = (soft * ev).sum(dim=-1, keepdim=True).clamp_min(tiny)
        grad = w / w.sum(dim=2, keepdim=True) - (proj * soft[:, :, None]).sum(dim=3) / (w * lam)
        base = torch.where(better[..., None], log_w, base)
        base_grad = torch.where(better[..., None], grad, base_grad)
    best = torch.where(finite, best, torch.inf)
    return (best * (1 + SDP_RTOL)).sqrt()


def _fresh_at_input(coef: torch.Tensor, free: torch.Tensor, jac_t: torch.Tensor) -> torch.Tensor:
    """`_new_symbols` already mapped to the input through an exact node's Jacobian (n, d): rows of it, scaled."""
    b, p = coef.shape[:2]
    flat = free.reshape(b, -1)
    count = flat.sum(dim=1)
    u = int(count.max()) if b else 0
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :u]  # free units first
    keep = torch.arange(u)[None] < count[:, None]  # (b, u): real symbols, the rest padding
    scale = coef.reshape(b, p, -1).gather(2, order[:, None].expand(b, p, u)) * keep[:, None]
    return scale[..., None] * jac_t[order][:, None]  # (b, p, u, d)


def zonotope_lipschitz(
    graph: Graph,
    rows: torch.Tensor,
    deriv: dict[int, tuple[torch.Tensor, torch.Tensor]],
    max_elems: int,
    sdp_steps: int = 0,
    jacobian: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """(b, p) bounds of the gradient-difference norms over the ball, or None past `max_elems`.

    `rows` (b, p, K) are the margin rows e_c - e_j; `deriv` the derivative interval
    (b, *shape) of every activation node over the ball, from the interval forward pass.
    `max_elems` caps the generator entries (symbols x units) of one node, sample and pair:
    past it (deep nets whose unstable units pile up) the pass gives up and returns None.
    `jacobian` optionally holds the input Jacobians (1, d, *shape) of exact nodes: an
    activation right after one sends its gradient straight to the input through it, and
    its new symbols (one unit each) become rows of the Jacobian instead of one-hot vectors.
    """
    jacobian = jacobian or {}
    g = graph
    b, p = rows.shape[:2]
    last = len(g.nodes) - 1
    state: dict[int, list[torch.Tensor]] = {last: [rows, rows.new_zeros(b, p, 0, *rows.shape[2:])]}
    width = 0  # symbols allocated so far

    def push(j: int, c: torch.Tensor, m: torch.Tensor) -> None:
        if j not in state:
            state[j] = [c, m]
            return
        old_c, old_m = state[j]
        w = max(old_m.shape[2], m.shape[2])
        state[j] = [old_c + c, _pad(old_m, w) + _pad(m, w)]

    for i in range(last, -1, -1):
        if i not in state:
            continue
        c, m = state.pop(i)
        node = g.nodes[i]
        op = node.op
        if op is None:
            flat = c.reshape(b, p, -1)
            return norm_bound(flat, m.reshape(b, p, m.shape[2], flat.shape[2]), sdp_steps)
        shape = node.shape
        if isinstance(op, AffineOp):
            shape_in = g.nodes[node.inputs[0]].shape
            k = m.shape[2]
            c = op.adjoint(c.reshape(b * p, *shape)).reshape(b, p, *shape_in)
            if k * math.prod(shape_in) > max_elems:
                return None
            m = op.adjoint(m.reshape(b * p * k, *shape)).reshape(b, p, k, *shape_in)
            push(node.inputs[0], c, m)
        elif isinstance(op, ActOp):
            d_lo, d_hi = deriv[i]
            mid, half = ((d_lo + d_hi) / 2)[:, None], ((d_hi - d_lo) / 2)[:, None]
            free = d_hi > d_lo
            count = int(free.reshape(b, -1).sum(dim=1).max()) if b else 0
            width = max(width, m.shape[2])
            j = node.inputs[0]
            direct = j in jacobian and len(g.consumers[j]) == 1  # straight to the input: z_j = J x + const
            lands = g.nodes[0].shape if direct else shape  # where the new symbols' generators live
            if (width + count) * math.prod(lands) > max_elems:  # before allocating any of them
                return None
            reach = c.abs() + m.abs().sum(dim=2)  # |z| over the zonotope, per unit
            if direct:
                jac_t = jacobian[j].reshape(jacobian[j].shape[1], -1).T  # (n, d)
                fresh = _fresh_at_input(half * reach, free, jac_t)
                n = jac_t.shape[0]
                c, m = (mid * c).reshape(b, p, n) @ jac_t, (mid[:, :, None] * m).reshape(b, p, m.shape[2], n) @ jac_t
                j = 0
                c, m = c.reshape(b, p, *lands), m.reshape(b, p, m.shape[2], *lands)
                fresh = fresh.reshape(b, p, fresh.shape[2], *lands)
            else:
                fresh = _new_symbols(half * reach, free)
                c, m = mid * c, mid[:, :, None] * m
            m = torch.cat([_pad(m, width), fresh], dim=2)
            width += fresh.shape[2]
            push(j, c, m)
        else:
            assert isinstance(op, AddOp)
            push(node.inputs[0], c, m)
            push(node.inputs[1], op.sign * c, op.sign * m)
    raise AssertionError("the backward pass never reached the input")  # pragma: no cover
