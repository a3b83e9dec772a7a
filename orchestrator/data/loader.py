"""ShardedDataset: one rank's stream of batches, prefetched in background threads, resumable.

    ds = ShardedDataset("data/digits", batch_size=64, shuffle=True, rank=r, world_size=w)
    for epoch in range(ds.epoch, epochs):
        for batch in ds:          # dict of tensors; the rest of the current epoch
            ...
    ds.state_dict()               # a few numbers; load_state_dict() continues exactly

With `device=` (e.g. ctx.device) batches come on that device: on CUDA, copied from pinned
memory by the reader thread on a side stream while the step runs (see device.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .batches import BatchBuilder
from .device import ToDevice, checked_device
from .fs import read_manifest, resolve
from .manifest import DatasetError
from .order import Cursor, EpochOrder, after_consumed, split
from .reader import ShardReader

_DONE = object()


class ShardedDataset:
    def __init__(self, path: str, *, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                 prefetch: int = 4, num_threads: int = 1, columns: list[str] | None = None,
                 drop_last: bool = True, remainder: str = "drop", ragged: str = "pad",
                 pad_value: float = 0, shuffle_window: int = 16384, block_rows: int = 1024,
                 transform: Callable[[dict], dict] | None = None, rank: int = 0, world_size: int = 1,
                 verify_checksums: bool = False, device=None):
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
        self.device = device
        self.cursor = Cursor(epoch=0, world_size=world_size, seed=seed)
        # data-loader wait: time the consumer spent blocked on the next batch
        self.wait_seconds = 0.0
        self.batches_served = 0

    @property
    def device(self):
        """Where batches are delivered (None: the CPU, where they are made); a change applies
        from the next iteration."""
        return self._device

    @device.setter
    def device(self, device) -> None:
        self._device = checked_device(device, self.path)

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
    def _builder(self) -> tuple[BatchBuilder, Iterator[list[tuple[int, int]]]]:
        """What builds this epoch's batches, and the chunks of positions still to come."""
        remaining = self._remaining()  # may re-split the cursor: read it after this
        c = self.cursor
        order = EpochOrder([s.rows for s in self.manifest.shards], c.epoch, c.seed, self.shuffle,
                           self.block_rows, self.shuffle_window)
        builder = BatchBuilder(self.reader, order, self.batch_size, self.ragged, self.pad_value, self.transform)
        return builder, self._chunks(remaining, self._batches_per_chunk(builder) * self.batch_size)

    def _batches_per_chunk(self, builder: BatchBuilder) -> int:
        if self.transform is None:
            return builder.batches_per_chunk()
        # A transform's output is the user's (its size unknown): build no more than the
        # `prefetch` batches the queue may hold, half of them at a time.
        return max(1, self.prefetch // 2)

    def _chunks(self, remaining: list[tuple[int, int]], chunk_rows: int) -> Iterator[list[tuple[int, int]]]:
        """Runs of epoch positions still to come for this rank, up to `chunk_rows` (a whole
        number of batches) at a time; the last chunk may be shorter. The first chunk is one
        batch and they double from there, so that training starts at once."""
        c = self.cursor
        share = split(remaining, self.world_size, self.rank, self.remainder == "drop")
        left = share.num_samples - c.consumed
        n = left // self.batch_size if self.drop_last else -(-left // self.batch_size)
        todo = min(left, n * self.batch_size)
        chunk: list[tuple[int, int]] = []
        have, size = 0, min(self.batch_size, chunk_rows)
        for a, b in share.runs(skip=c.consumed):
            while a < b and todo > 0:
                take = min(b - a, size - have, todo)
                chunk.append((a, a + take))
                a, have, todo = a + take, have + take, todo - take
                if have == size or todo == 0:
                    yield chunk
                    chunk, have, size = [], 0, min(2 * size, chunk_rows)

    def _next_epoch(self) -> None:
        c = self.cursor
        self.cursor = Cursor(c.epoch + 1, None, self.world_size, 0, c.seed)

    def _iter_inline(self, builder: BatchBuilder, chunks: Iterator[list[tuple[int, int]]],
                     to_device: ToDevice | None, timed: bool) -> Iterator[dict]:
        """The epoch's batches built in this thread; `timed`: the building counts as waiting
        for data (it stands for a prefetch thread)."""
        for chunk in chunks:
            started = time.perf_counter() if timed else 0.0
            built = builder.build(chunk)
            if timed:
                self.wait_seconds += time.perf_counter() - started
            for samples, batch in to_device.receive(to_device.send(built)) if to_device else built:
                self.cursor.consumed += samples
                self.batches_served += 1
                yield batch
        self._next_epoch()

    def __iter__(self) -> Iterator[dict]:
        builder, chunks = self._builder()
        to_device = ToDevice.for_device(self._device)  # made here: it reads this thread's CUDA device
        # Zero-copy batches (views of the mapped shards, see BatchBuilder.zero_copy) read no
        # data when built: a chunk is a few views, far cheaper than handing it over from a
        # prefetch thread (a wake-up under the GIL, milliseconds on busy cores). The pages
        # are read when training touches them, with the kernel's readahead, either way.
        zero_copy = to_device is None and builder.zero_copy()
        if self.prefetch == 0 or zero_copy:
            yield from self._iter_inline(builder, chunks, to_device, timed=self.prefetch > 0)
            return
        build = (lambda chunk: to_device.send(builder.build(chunk))) if to_device else builder.build
        # One queue item is a chunk's batches: every hand-over between the threads costs a
        # wake-up under the GIL (tens of microseconds, more on busy cores), far more than
        # slicing a batch.
        # The queue holds `prefetch` batches, or two chunks if that is more (two, so that a
        # reader thread scheduled late does not stall training; a transform's chunks are
        # already sized to `prefetch`), and at least a chunk per reader thread.
        per_item = self._batches_per_chunk(builder)
        least = 1 if self.transform else 2
        out: queue.Queue = queue.Queue(maxsize=max(least, self.num_threads, self.prefetch // per_item))
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
            try:
                for chunk in chunks:
                    if not put(pool.submit(build, chunk) if pool else build(chunk)):
                        return
                put(_DONE)
            except BaseException as exc:  # hand it to the consumer: a bad shard fails the job, not hangs it
                put(exc)

        producer = threading.Thread(target=produce, name="trainctl-data-producer", daemon=True)
        producer.start()
        try:
            while True:
                started = time.perf_counter()
                item = out.get()
                if isinstance(item, Future):
                    item = item.result()  # raises what the reader thread raised
                self.wait_seconds += time.perf_counter() - started
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                for samples, batch in to_device.receive(item) if to_device else item:
                    self.cursor.consumed += samples
                    self.batches_served += 1
                    yield batch
            self._next_epoch()
        finally:
            stop.set()
            producer.join(timeout=5)
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

