"""A small, deterministic zoo of 8x8-digits classifiers for the attack benchmarks.

Five models, each trained in well under a minute on two CPU cores from robaudit's own
digits training split (``scripts/make_digits.py: digits_split()``, the split the bundled
``robaudit/data/digits_test.npz`` was cut from):

    cnn          natural training, the ``robaudit.demo.digits_cnn`` architecture
    mlp          natural training, 64-128-128-10 ReLU MLP
    cnn_linf_at  ``digits_cnn`` PGD-adversarially trained under Linf (eps 0.1)
    cnn_l2_at    ``digits_cnn`` PGD-adversarially trained under L2 (eps 0.75)
    resnet       a small residual CNN (BatchNorm, two stages), natural training

Weights are cached as safetensors (plus a JSON with the training recipe and test
accuracy) in a folder, ``benchmarks/.zoo/`` by default; a cached model is reused
only while its recipe and its architecture (layers, parameter shapes) are unchanged.
The factories below are what robaudit's ``--arch`` takes:

    robaudit scan benchmarks/.zoo/mlp.safetensors --arch benchmarks/zoo.py:digits_mlp

Usage:
    python benchmarks/zoo.py                  # train what is missing, print the table
    python benchmarks/zoo.py --force          # retrain everything
    python benchmarks/zoo.py --zoo /tmp/zoo --only mlp cnn

Needs scikit-learn (the dev extra) for the training split.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark the robaudit of this checkout, installed or not
    sys.path.insert(0, str(ROOT))
DEFAULT_ZOO = ROOT / "benchmarks" / ".zoo"
ZOO_FILE = Path(__file__).resolve()
RECIPE_VERSION = 1  # bump when training code changes in a way the recipe fields do not show


# --------------------------------------------------------------------------- architectures
# Every top-level class name starts with "Zoo" so a benchmark can recognise the root
# network among all modules (see vs_autoattack.py, which counts passes of any tool).


class ZooCNN(nn.Sequential):
    """Exactly the layers (and state-dict keys) of `robaudit.demo.digits_cnn`."""

    def __init__(self, num_classes: int = 10) -> None:
        from robaudit.demo import digits_cnn

        super().__init__(*digits_cnn(num_classes).children())


class ZooMLP(nn.Sequential):
    """64-128-128-10, ReLU."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )


class _Block(nn.Module):
    """A pre-activation-free basic residual block: conv-BN-ReLU-conv-BN plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ZooResNet(nn.Module):
    """Stem 1->16, a 16-channel block at 8x8, a 32-channel block at 4x4, global average pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = _Block(16, 16)
        self.layer2 = _Block(16, 32, stride=2)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(self.stem(x)))
        return self.head(out.mean(dim=(2, 3)))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    return ZooCNN(num_classes)


def digits_mlp(num_classes: int = 10) -> nn.Module:
    return ZooMLP(num_classes)


def digits_resnet(num_classes: int = 10) -> nn.Module:
    return ZooResNet(num_classes)


FACTORIES = {"digits_cnn": digits_cnn, "digits_mlp": digits_mlp, "digits_resnet": digits_resnet}


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    name: str
    factory: str  # a key of FACTORIES
    epochs: int
    lr: float
    adv_norm: str | None = None  # None: natural training; "linf" / "l2": PGD adversarial training
    adv_eps: float = 0.0
    adv_steps: int = 7
    warmup_epochs: int = 0  # linear eps ramp for adversarial training
    seed: int = 0
    batch_size: int = 64
    recipe_version: int = RECIPE_VERSION

    @property
    def arch(self) -> str:
        """The ``--arch`` value robaudit needs to rebuild this network."""
        return f"{ZOO_FILE}:{self.factory}"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("cnn", "digits_cnn", epochs=40, lr=2e-3),
        Recipe("mlp", "digits_mlp", epochs=40, lr=2e-3),
        Recipe("cnn_linf_at", "digits_cnn", epochs=40, lr=2e-3, adv_norm="linf", adv_eps=0.1, warmup_epochs=10),
        Recipe("cnn_l2_at", "digits_cnn", epochs=40, lr=2e-3, adv_norm="l2", adv_eps=0.75, warmup_epochs=10),
        Recipe("resnet", "digits_resnet", epochs=30, lr=2e-3),
    )
}


# --------------------------------------------------------------------------- data


def _digits_split():
    spec = importlib.util.spec_from_file_location("make_digits", ROOT / "scripts" / "make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits_split()


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as float tensors in [0, 1] and int64 labels."""
    x_train, y_train, x_test, y_test = _digits_split()
    to_x = lambda a: torch.from_numpy(a).float() / 255  # noqa: E731
    return to_x(x_train), torch.from_numpy(y_train).long(), to_x(x_test), torch.from_numpy(y_test).long()


# --------------------------------------------------------------------------- training


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, steps: int, gen: torch.Generator):
    """Madry et al. PGD with a random start (training-time attack; step 2.5 eps / steps)."""
    step = 2.5 * eps / steps
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    else:
        delta = torch.randn(x.shape, generator=gen)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1, generator=gen)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                delta += step * grad.sign()
                delta.clamp_(-eps, eps)
            else:
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta += step * g
                factor = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                delta *= factor.view(-1, 1, 1, 1)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()


def train(recipe: Recipe, data=None) -> tuple[nn.Module, dict]:
    """Train one zoo model deterministically; returns the eval-mode model and its metadata."""
    torch.manual_seed(recipe.seed)
    x_train, y_train, x_test, y_test = data if data is not None else load_split()
    model = FACTORIES[recipe.factory]()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    steps_per_epoch = (len(x_train) + recipe.batch_size - 1) // recipe.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.25
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    started = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        ramp = min(1.0, (epoch + 1) / recipe.warmup_epochs) if recipe.warmup_epochs else 1.0
        for batch in order.split(recipe.batch_size):
            xb, yb = x_train[batch], y_train[batch]
            if recipe.adv_norm is not None:
                model.eval()  # attack the current weights without touching BatchNorm statistics
                xb = _pgd(model, xb, yb, recipe.adv_norm, recipe.adv_eps * ramp, recipe.adv_steps, gen)
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            scheduler.step()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    meta = {
        "recipe": asdict(recipe),
        "arch": recipe.arch,
        "signature": signature(recipe.factory),
        "test_accuracy": round(accuracy, 4),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model, meta


# --------------------------------------------------------------------------- cache


def signature(factory: str) -> str:
    """A fingerprint of the architecture (layers and parameter shapes): `digits_cnn` follows
    `robaudit.demo.digits_cnn`, so a change there must invalidate the cached weights."""
    net = FACTORIES[factory]()
    text = repr(net) + repr([(k, tuple(v.shape)) for k, v in net.state_dict().items()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def paths(zoo: Path, name: str) -> tuple[Path, Path]:
    return zoo / f"{name}.safetensors", zoo / f"{name}.json"


def ensure(name: str, zoo: Path = DEFAULT_ZOO, force: bool = False, data=None, log=print) -> tuple[Path, dict]:
    """The cached weights file for `name`, training it first when missing or stale."""
    from safetensors.torch import save_file

    recipe = RECIPES[name]
    weights, meta_path = paths(zoo, name)
    if not force and weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == asdict(recipe) and meta.get("signature") == signature(recipe.factory):
            return weights, meta
    zoo.mkdir(parents=True, exist_ok=True)
    log(f"training {name} ...")
    model, meta = train(recipe, data)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"  {name}: test accuracy {meta['test_accuracy']:.4f} in {meta['train_seconds']} s -> {weights}")
    return weights, meta


def load(name: str, zoo: Path = DEFAULT_ZOO, force: bool = False, log=print) -> tuple[nn.Module, Path, dict]:
    """An eval-mode torch model of the zoo (trained on demand), its weights file, its metadata."""
    from safetensors.torch import load_file

    weights, meta = ensure(name, zoo, force=force, log=log)
    model = FACTORIES[RECIPES[name].factory]()
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, weights, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="cache folder (default benchmarks/.zoo/)")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train only these models")
    parser.add_argument("--force", action="store_true", help="retrain even when a matching cached model exists")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; the cached weights were made with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_split()
    print("| model | arch | training | test accuracy | train s |\n|---|---|---|---|---|")
    rows = []
    for name in args.only or list(RECIPES):
        _, meta = ensure(name, args.zoo, force=args.force, data=data, log=lambda *_: None)
        r = RECIPES[name]
        how = "natural" if r.adv_norm is None else f"PGD-{r.adv_steps} AT, {r.adv_norm} eps {r.adv_eps:g}"
        rows.append(f"| {name} | {r.factory} | {how} | {meta['test_accuracy']:.4f} | {meta['train_seconds']} |")
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
