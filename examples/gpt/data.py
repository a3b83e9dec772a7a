"""Character-level text from the Python standard library's own source (every install has it).

    trainctl data shard examples.gpt.data:gpt_train --out data/gpt-train

Bytes are the tokens (vocabulary 256), cut into fixed windows of `SEQ + 1` tokens:
a row is one training sequence (inputs = row[:-1], targets = row[1:]).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa

SEQ = 64
VOCAB = 256


def corpus(max_bytes: int = 2_000_000) -> bytes:
    """The first `max_bytes` of the stdlib's top-level modules, in name order (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(stdlib.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def sequences(data: bytes, seq: int = SEQ) -> pa.Table:
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    rows = len(tokens) // (seq + 1)
    flat = tokens[: rows * (seq + 1)]
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(flat), seq + 1)})


def gpt_train() -> pa.Table:
    return sequences(corpus()[:1_800_000])


def gpt_eval() -> pa.Table:
    return sequences(corpus()[1_800_000:])
