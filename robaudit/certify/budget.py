"""How much work a certificate may take: the `budget` argument of `certify_l2`.

Cost is counted in *bound evaluations*: one forward bound pass over the network for a
given ball radius plus one backward pass for all K-1 class pairs at once (about 2 + 2K
network passes; with symbolic bounds the forward pass also carries one row per input
dimension through every layer until `symbolic_cap`). The radius search spends at most
`max_evals` of them per batch of samples.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    name: str
    shells: int  # first shell width = first-order radius / shells; more shells, finer integration
    max_evals: int  # bound evaluations per batch in the radius search
    tol: float  # stop refining once the shell width is below tol * first-order radius
    symbolic_cap: int  # symbolic (linear) pre-activation bounds while input dims x units <= this; 0: plain intervals
    gram_cap: int  # Gram-matrix bound at the first layer while it has at most this many units
    corner_cap: int  # closed form's pairwise corner bound while the hidden layer has at most this many units
    crown_evals: int = 12  # CROWN bound evaluations per batch in its radius bisection (0: no CROWN)
    crown_elems: int = 1 << 18  # CROWN refinement passes carry at most this many coefficients at once
    # (small enough to stay in the CPU cache: 2.8x faster than 1 << 24 on the digits residual net)
    crown_refine: int = 256  # CROWN refines at most this many units per node and sample by backward passes
    crown_refine_unbounded: int = 64  # ... and this many where the node has no forward symbolic bounds
    crown_polish_evals: int = 0  # then this many CROWN evaluations with `crown_polish_refine` units refined,
    # above the bisection's radius, on nets with a relaxation behind two or more others (deep nets)
    crown_polish_refine: int = 4096
    crown_polish_work: int = 1 << 35  # ... while refining every unit of those nets costs at most this many
    # multiply-adds per sample and evaluation (`CrownBound.refine_cost`)
    crown_window_work: int = 1 << 36  # ... or, where the dense passes cost more, while refining the convolutional
    # nodes over their receptive fields (`patches.py`) costs at most this many: that pass runs about 2.5x more
    # multiply-adds per second (cifar_base, 8 convolutions: 5.8e10 in 17 s against 3.8e11 in about 275 s)
    crown_ball: bool = False  # couple each ReLU layer's units through an L2 ball around its input (ball.py)
    alpha_steps: int = 0  # alpha-CROWN: Adam steps on the unstable ReLUs' lower slopes per radius tried
    alpha_lr: float = 0.1
    zonotope_elems: int = 0  # zonotope gradient bound (zonotope.py) while every node has at most this many
    # generator entries (symbols x units) per sample and pair; 0: none
    zonotope_pairs: int = 3  # ... on the pairs of each sample with the smallest margin / interval bound
    zonotope_sdp_steps: int = 0  # ... and this many descent steps on its final norm bound (SDP relaxation)
    bab_evals: int = 0  # branch and bound (bab.py): trials of its bisection above CROWN's radius (0: none)
    bab_domains: int = 0  # ... domains (leaves and inner nodes) evaluated per trial, margin and sample
    bab_batch: int = 64  # ... domains split at once
    bab_steps: int = 8  # ... projected Adam steps on alpha and beta per batch of domains
    bab_beta_lr: float = 0.05
    bab_units: int = 1 << 30  # ... only on networks with at most this many ReLU units in all
    bab_work: int = 1 << 40  # ... and at most this many / (multiply-adds of one network pass) domains per trial


BUDGETS: dict[str, Budget] = {
    "fast": Budget(
        "fast", shells=2, max_evals=10, tol=1 / 32, symbolic_cap=0, gram_cap=512, corner_cap=256,
        crown_evals=8, crown_refine=0, crown_refine_unbounded=0,
    ),
    "default": Budget(
        "default", shells=16, max_evals=45, tol=1 / 512, symbolic_cap=1 << 20, gram_cap=2048, corner_cap=1024,
        crown_evals=10, crown_refine=0, crown_polish_evals=2, crown_ball=True, zonotope_elems=1 << 18, zonotope_sdp_steps=10,
        bab_evals=4, bab_domains=1024, bab_batch=128, bab_steps=2, bab_units=512, bab_work=1 << 25,
    ),
    "tight": Budget(
        "tight", shells=32, max_evals=90, tol=1 / 8192, symbolic_cap=1 << 23, gram_cap=4096, corner_cap=4096,
        crown_evals=20, crown_refine=4096, crown_ball=True, alpha_steps=20,
        zonotope_elems=1 << 19, zonotope_pairs=9, zonotope_sdp_steps=20,
        bab_evals=5, bab_domains=2048, bab_batch=256, bab_steps=4, bab_units=512, bab_work=1 << 27,
    ),
}


def get_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    try:
        return BUDGETS[budget]
    except KeyError:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}") from None
