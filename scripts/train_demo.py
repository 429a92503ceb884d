"""Train the demo model on the bundled digits and write it as ONNX and safetensors.

Run from the repository root:  python scripts/train_demo.py
Needs the dev extra (scikit-learn for the digits split, onnxscript for the exporter).
Deterministic on the CPU: the same torch version writes the same weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "robaudit" / "demo"


def _digits_split():
    spec = importlib.util.spec_from_file_location("make_digits", ROOT / "scripts" / "make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits_split()


def train(epochs: int = 40, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """Adam on the training split; returns the model and its test accuracy."""
    from robaudit.demo import digits_cnn

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _digits_split()
    x_train = torch.from_numpy(x_train).float() / 255
    y_train = torch.from_numpy(y_train).long()
    x_test = torch.from_numpy(x_test).float() / 255
    y_test = torch.from_numpy(y_test).long()
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def main() -> None:
    model, accuracy = train()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, OUT / "digits_cnn.safetensors")
    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model,
        (example,),
        str(OUT / "digits_cnn.onnx"),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    meta = {"test_accuracy": round(accuracy, 4), "torch": torch.__version__, "arch": "robaudit.demo:digits_cnn"}
    (OUT / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"demo model written to {OUT} (test accuracy {accuracy:.4f})")


if __name__ == "__main__":
    main()
