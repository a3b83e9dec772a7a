"""ShardedDataset: one rank's stream of batches, prefetched in background threads, resumable.

    ds = ShardedDataset("data/digits", batch_size=64, shuffle=True, rank=r, world_size=w)
    for epoch in range(ds.epoch, epochs):
        for batch in ds:          # dict of tensors; the rest of the current epoch
            ...
    ds.state_dict()               # a few numbers; load_state_dict() continues exactly
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .fs import read_manifest, resolve
from .manifest import DatasetError
from .order import Cursor, EpochOrder, after_consumed, split
from .reader import ShardReader
from .tensors import table_to_batch

_DONE = object()


class ShardedDataset:
    def __init__(self, path: str, *, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                 prefetch: int = 4, num_threads: int = 1, columns: list[str] | None = None,
                 drop_last: bool = True, remainder: str = "drop", ragged: str = "pad",
                 pad_value: float = 0, shuffle_window: int = 16384, block_rows: int = 1024,
                 transform: Callable[[dict], dict] | None = None, rank: int = 0, world_size: int = 1,
                 verify_checksums: bool = False):
        if batch_size < 1:
            raise DatasetError(f"{path}: batch_size must be at least 1")
        if remainder not in ("drop", "pad"):
            raise DatasetError(f"{path}: remainder must be 'drop' or 'pad', not {remainder!r}")
        self.path = path
        fs, base = resolve(path)
        self.manifest = read_manifest(fs, base)
        if self.manifest.num_rows == 0:
            raise DatasetError(f"{path}: the dataset is empty; re-create it from non-empty sources")
        self.reader = ShardReader(fs, base, self.manifest, columns, where=path, verify=verify_checksums)
        # prefetch 0: read in the training thread, no background thread (fastest when reading
        # is cheap and the step is not: there is nothing to overlap, and no GIL hand-overs)
        self.batch_size, self.shuffle, self.prefetch = batch_size, shuffle, max(0, prefetch)
        self.num_threads, self.drop_last, self.remainder = max(1, num_threads), drop_last, remainder
        self.ragged, self.pad_value, self.transform = ragged, pad_value, transform
        self.shuffle_window, self.block_rows = shuffle_window, block_rows
        self.rank, self.world_size = rank, world_size
        self.cursor = Cursor(epoch=0, world_size=world_size, seed=seed)
        # data-loader wait: time the consumer spent blocked on the next batch
        self.wait_seconds = 0.0
        self.batches_served = 0

    # ---- position ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def state_dict(self) -> dict:
        return self.cursor.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor = Cursor.from_dict(state)

    def _remaining(self) -> list[tuple[int, int]]:
        """The epoch positions left; re-split once if the world size changed since the save."""
        c = self.cursor
        remaining = c.remaining if c.remaining is not None else [(0, self.num_rows)]
        if c.world_size != self.world_size:
            remaining = after_consumed(remaining, c.world_size, c.consumed, self.remainder == "drop")
            self.cursor = Cursor(c.epoch, remaining, self.world_size, 0, c.seed)
        return remaining

    def __len__(self) -> int:
        """Batches left in the current epoch for this rank (the same on every rank)."""
        remaining = self._remaining()
        share = split(remaining, self.world_size, self.rank, self.remainder == "drop")
        left = share.num_samples - self.cursor.consumed
        return left // self.batch_size if self.drop_last else -(-left // self.batch_size)

    # ---- batches -----------------------------------------------------------------------
    def _plan(self) -> Iterator[np.ndarray]:
        """Global rows of each batch still to come this epoch, computed a chunk at a time
        (so the first batch is quick and memory does not grow with the dataset)."""
        remaining = self._remaining()  # may re-split the cursor: read it after this
        c = self.cursor
        order = EpochOrder([s.rows for s in self.manifest.shards], c.epoch, c.seed, self.shuffle,
                           self.block_rows, self.shuffle_window)
        share = split(remaining, self.world_size, self.rank, self.remainder == "drop")
        left = share.num_samples - c.consumed
        n = left // self.batch_size if self.drop_last else -(-left // self.batch_size)
        wanted = min(left, n * self.batch_size)
        chunk = self.batch_size * 64
        pending = np.empty(0, dtype=np.int64)
        served = 0
        for a, b in share.runs(skip=c.consumed):
            for lo in range(a, b, chunk):
                hi = min(b, lo + chunk)
                pending = np.concatenate([pending, order.rows(lo, hi)])
                while len(pending) >= self.batch_size and served < wanted:
                    yield pending[:self.batch_size]
                    pending = pending[self.batch_size:]
                    served += self.batch_size
        if len(pending) and served < wanted:  # the last, partial batch (drop_last=False)
            yield pending[:wanted - served]

    def _iter_inline(self) -> Iterator[dict]:
        for rows in self._plan():
            samples, batch = self._build(rows)
            self.cursor.consumed += samples
            self.batches_served += 1
            yield batch
        c = self.cursor
        self.cursor = Cursor(c.epoch + 1, None, self.world_size, 0, c.seed)

    def _build(self, rows: np.ndarray) -> tuple[int, dict]:
        batch = table_to_batch(self.reader.rows(rows), self.ragged, self.pad_value)
        return len(rows), (self.transform(batch) if self.transform else batch)

    def __iter__(self) -> Iterator[dict]:
        if self.prefetch == 0:
            yield from self._iter_inline()
            return
        plan = self._plan()
        # Batches travel in groups: every hand-over between the threads costs a wake-up
        # (tens of microseconds under the GIL), more than slicing a batch. Only the first
        # batch goes alone, so training can start at once.
        group = max(1, min(8, self.prefetch // 2))
        out: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch // group))
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="trainctl-data") if self.num_threads > 1 else None

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            pending: list = []
            first = True
            try:
                for rows in plan:
                    pending.append(pool.submit(self._build, rows) if pool else self._build(rows))
                    if len(pending) >= group or first:
                        first = False
                        if not put(pending):
                            return
                        pending = []
                if pending and not put(pending):
                    return
                put(_DONE)
            except BaseException as exc:  # hand it to the consumer: a bad shard fails the job, not hangs it
                put(pending)
                put(exc)

        producer = threading.Thread(target=produce, name="trainctl-data-producer", daemon=True)
        producer.start()
        try:
            while True:
                started = time.perf_counter()
                item = out.get()
                if item is _DONE:
                    self.wait_seconds += time.perf_counter() - started
                    break
                if isinstance(item, BaseException):
                    raise item
                for built in item:
                    if isinstance(built, Future):
                        built = built.result()
                    self.wait_seconds += time.perf_counter() - started
                    samples, batch = built
                    self.cursor.consumed += samples
                    self.batches_served += 1
                    yield batch
                    started = time.perf_counter()
            c = self.cursor
            self.cursor = Cursor(c.epoch + 1, None, self.world_size, 0, c.seed)
        finally:
            stop.set()
            producer.join(timeout=5)
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)


