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
    crown_elems: int = 1 << 24  # CROWN backward passes carry at most this many coefficients at once
    crown_refine: int = 256  # CROWN refines at most this many units per node and sample by backward passes
    crown_refine_unbounded: int = 64  # ... and this many where the node has no forward symbolic bounds
    alpha_steps: int = 0  # alpha-CROWN: Adam steps on the unstable ReLUs' lower slopes per radius tried
    alpha_lr: float = 0.1


BUDGETS: dict[str, Budget] = {
    "fast": Budget(
        "fast", shells=2, max_evals=10, tol=1 / 32, symbolic_cap=0, gram_cap=512, corner_cap=256,
        crown_evals=8, crown_refine=0, crown_refine_unbounded=0,
    ),
    "default": Budget(
        "default", shells=8, max_evals=30, tol=1 / 512, symbolic_cap=1 << 20, gram_cap=2048, corner_cap=1024,
        crown_evals=10, crown_refine=0,
    ),
    "tight": Budget(
        "tight", shells=32, max_evals=90, tol=1 / 8192, symbolic_cap=1 << 23, gram_cap=4096, corner_cap=4096,
        crown_evals=20, crown_refine=4096, alpha_steps=20,
    ),
}


def get_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    try:
        return BUDGETS[budget]
    except KeyError:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}") from None
