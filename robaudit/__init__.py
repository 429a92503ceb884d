"""robaudit: audit the adversarial robustness of a saved image classifier.

    import robaudit
    report = robaudit.audit("model.onnx", "cifar10", threats=["linf:8/255"], n=500)

`audit` is imported on first use, so `import robaudit` stays light (and the CLI can set
OpenMP's environment before torch loads).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "audit"]


def __getattr__(name: str) -> Any:
    if name == "audit":
        from robaudit.api import audit

        return audit
    raise AttributeError(f"module 'robaudit' has no attribute {name!r}")
