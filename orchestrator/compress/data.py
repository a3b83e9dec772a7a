"""The job's data splits, read whole by one process (rank 0 of 1)."""

from __future__ import annotations

from itertools import islice


def open_split(spec, name: str):
    from ..data.loader import ShardedDataset

    split = spec.data[name]
    # read inline: the passes take a few batches at a time, nothing to overlap
    return ShardedDataset(**{**split.model_dump(), "prefetch": 0}, rank=0, world_size=1)


def take(spec, name: str, limit: int | None) -> list[dict]:
    """Up to `limit` batches of one pass over the split (epochs repeat if it is shorter)."""
    ds = open_split(spec, name)
    out: list[dict] = []
    while limit is None or len(out) < limit:
        got = list(islice(ds, None if limit is None else limit - len(out)))
        if not got:
            break
        out += got
        if limit is None:
            break
    return out


def endless(spec, name: str):
    """Batches of the split, epoch after epoch (for fine-tuning)."""
    ds = open_split(spec, name)
    while True:
        empty = True
        for batch in ds:
            empty = False
            yield batch
        if empty:
            return
