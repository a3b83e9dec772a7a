"""scikit-learn's bundled 8x8 digits (no download) as Arrow tables, for `trainctl data shard`.

    trainctl data shard examples.digits.data:digits_train --out data/digits-train

or both splits in one go, as `make demo` does (one interpreter, one import of scikit-learn):

    python -m examples.digits.data data      # data/digits-train and data/digits-eval
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def _split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split((X / 16.0).astype(np.float32), y.astype(np.int64), test_size=0.2,
                            random_state=seed, stratify=y)


def _table(X: np.ndarray, y: np.ndarray) -> pa.Table:
    image = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 64)  # (n, 64) float32 tensors
    return pa.table({"image": image, "label": pa.array(y)})


def digits_train() -> pa.Table:
    X_train, _, y_train, _ = _split()
    return _table(X_train, y_train)


def digits_eval() -> pa.Table:
    _, X_test, _, y_test = _split()
    return _table(X_test, y_test)


def write_both(root: str) -> None:
    """`trainctl data shard` for the train and eval splits, into ROOT/digits-train and ROOT/digits-eval."""
    from orchestrator.data.writer import shard_dataset

    for split in ("train", "eval"):
        out = f"{root}/digits-{split}"
        manifest = shard_dataset([f"examples.digits.data:digits_{split}"], out, overwrite=True)
        print(f"wrote {manifest.num_rows} rows to {out}")


if __name__ == "__main__":
    import sys

    write_both(sys.argv[1] if len(sys.argv) > 1 else "data")
