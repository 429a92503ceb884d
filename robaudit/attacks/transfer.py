"""Transfer attack: APGD run on a surrogate of the model, its candidates checked on the model.

When a model masks its gradients (quantized inputs, saturations, noise, a sharp final
softmax), white-box attacks on it fail without the model being robust. The scan then
builds a BPDA surrogate (`robaudit.models.surrogate`) and sets it on this attack, which
searches on the surrogate's gradients. The candidates go back to the runner, which
re-verifies each one on the real model, so a wrong surrogate can only cost strength,
never soundness. Surrogate passes are counted here (`passes()`), since the runner only
counts passes of the model it is given, and this attack makes none.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.apgd import APGD, APGDTargeted
from robaudit.attacks.base import Attack, AttackContext
from robaudit.attacks.counting import CountingModel
from robaudit.threats import Threat


class Transfer(Attack):
    """APGD (``loss`` "dlr" or "ce", ``steps`` iterations) on ``self.surrogate``; with
    ``targets = k``, APGD-T on the surrogate's k nearest classes by the linear estimate
    instead (the surrogate's logits are the model's before a removed squash, so AutoAttack's
    targeted runs reach on it what they reach on an unmasked model).

    Without a surrogate it proposes the clean points (nothing to search on). ``crossed``
    stays None: a point the surrogate misclassifies is no claim about the model (a removed
    final squash breaks ties differently, a noise-free mean model is not the noisy one).
    """

    name: ClassVar[str] = "transfer"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = True

    def __init__(self, steps: int = 100, loss: str = "dlr", targets: int = 0, surrogate: nn.Module | None = None) -> None:
        if loss not in ("dlr", "ce"):
            raise ValueError(f"the transfer attack supports the losses dlr and ce, not '{loss}'")
        if isinstance(targets, bool) or not isinstance(targets, int) or targets < 0:
            raise ValueError(f"targets must be a whole number of at least 0, not {targets!r}")
        if targets and loss != "dlr":
            raise ValueError(f"with targets the transfer attack runs APGD-T's targeted DLR loss; loss '{loss}' needs targets = 0")
        self.targets = targets
        self._apgd: APGD | APGDTargeted = (
            APGDTargeted(steps=steps, n_targets=targets, ranking="linear") if targets else APGD(loss=loss, steps=steps)
        )
        self._spent = (0, 0)  # passes of surrogates set before the current one
        self._counted: CountingModel | None = None
        self.surrogate = surrogate

    @property
    def steps(self) -> int:
        return self._apgd.steps

    @property
    def loss(self) -> str:
        return "dlr-targeted" if self.targets else self._apgd.loss_name

    @property
    def surrogate(self) -> nn.Module | None:
        """The model APGD runs on; set by the scan before the attack runs."""
        return self._counted.model if self._counted is not None else None

    @surrogate.setter
    def surrogate(self, module: nn.Module | None) -> None:
        self._spent = self.passes()
        self._counted = CountingModel(module) if module is not None else None

    def passes(self) -> tuple[int, int]:
        """Per-sample (forwards, backwards) of the surrogate since construction."""
        forwards, backwards = self._spent
        if self._counted is not None:
            forwards, backwards = forwards + self._counted.forwards, backwards + self._counted.backwards
        return forwards, backwards

    def params(self) -> dict[str, Any]:
        params = {"steps": self.steps, "loss": self._apgd.params()["loss"], "surrogate": self._counted is not None}
        return {**params, "targets": self.targets, "ranking": "linear"} if self.targets else params

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if self._counted is None:
            return x.detach().clone()
        return self._apgd.perturb(self._counted, x, y, threat, ctx)
