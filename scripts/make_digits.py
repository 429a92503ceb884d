"""Regenerate robaudit/data/digits_test.npz from scikit-learn's 8x8 digits.

The package ships only the resulting file, so scikit-learn stays a dev-only
dependency; `digits_split()` is importable so tests (and training scripts for demo
models) can reproduce exactly the same split.

Usage: python scripts/make_digits.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parents[1] / "robaudit" / "data" / "digits_test.npz"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x is uint8 NCHW (N, 1, 8, 8) in 0-255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return x_train, y_train, x_test, y_test


def main() -> None:
    _, _, x_test, y_test = digits_split()
    np.savez_compressed(OUTPUT, x=x_test, y=y_test)
    print(f"wrote {len(y_test)} digits test samples {x_test.shape[1:]} to {OUTPUT}")


if __name__ == "__main__":
    main()
