"""Batches onto the training device, from the prefetch thread, overlapping the step.

On a CUDA device each tensor of a chunk's batches is copied to pinned (page-locked)
host memory and from there with a non-blocking copy on a side stream, in the reader
thread; an event recorded after the chunk's copies is what the training thread waits
on (on its own stream: the GPU waits, not the CPU) before it is handed the first of
those batches. Each tensor is then recorded on the training stream, so that the
caching allocator does not give its memory to the next copy while the step still
reads it. On the CPU nothing happens: the batches are handed over as they are.

The CUDA calls are a small class of their own (`CudaCopies`), so that the order of
the steps is testable without a GPU (with a stand-in) and with one (for real).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .batches import Batch, handed_out
from .manifest import DatasetError


class CudaCopies:
    """The CUDA side of a transfer: a side stream, pinned copies on it, events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device, its copy enqueued on the side stream (pinned first: a
        copy from pageable memory would block the reader thread until it is done)."""
        with torch.cuda.stream(self.stream):
            return tensor.pin_memory().to(self.device, non_blocking=True)

    def record(self) -> torch.cuda.Event:
        """An event after every copy enqueued so far."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, event: torch.cuda.Event) -> torch.cuda.Stream:
        """The calling thread's stream waits for `event` (on the GPU; the CPU goes on)."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        return stream

    def hold(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """`tensor`'s memory is not reused until `stream` is done with what it has queued."""
        tensor.record_stream(stream)


@dataclass
class Moved:
    """A chunk's batches on their way to the device: `ready` is what to wait for first."""

    batches: list[Batch]
    ready: Any = None  # an event of `CudaCopies`; None: nothing to wait for


class ToDevice:
    """Puts batches' tensors on `device`: `send` in the reader thread, `receive` in the
    training thread. Other values (lists of strings, ...) are left as they are."""

    def __init__(self, device: torch.device | str, cuda: CudaCopies | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and cuda is None:
            # the current device is per thread: read it here, in the training thread
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.cuda = cuda if cuda is not None else (CudaCopies(device) if device.type == "cuda" else None)

    @classmethod
    def for_device(cls, device: torch.device | str | None) -> ToDevice | None:
        """The transfer for `device`, None for the CPU (batches are made there)."""
        if device is None or torch.device(device).type == "cpu":
            return None
        return cls(device)

    def send(self, batches: Iterable[Batch]) -> Moved:
        """The batches with their tensors on the device (on CUDA: copies enqueued)."""
        if self.cuda is None:  # another device: a plain copy, here in the reader thread
            return Moved([(n, self._map(batch, lambda t: t.to(self.device))) for n, batch in batches])
        moved = [(n, self._map(batch, self.cuda.copy)) for n, batch in batches]
        return Moved(moved, self.cuda.record())

    def receive(self, moved: Moved) -> Iterator[Batch]:
        """The batches, safe to use on the training thread's current stream, each let go of
        as it is handed out (device memory is freed batch by batch, not by the chunk)."""
        if moved.ready is not None:
            stream = self.cuda.wait(moved.ready)
            for _, batch in moved.batches:
                self._map(batch, lambda t: self.cuda.hold(t, stream))
        batches, moved.batches = moved.batches, []
        return handed_out(batches)

    @staticmethod
    def _map(batch, move):
        """`batch` with `move` applied to its tensors (a transform may return a lone tensor)."""
        if isinstance(batch, torch.Tensor):
            return move(batch)
        if isinstance(batch, dict):
            return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch


def checked_device(device: torch.device | str | None, where: str) -> torch.device | None:
    """`device` as a torch.device, or one line saying why batches cannot go there."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DatasetError(f"{where}: {device!r} is not a device; pass e.g. ctx.device, 'cpu' or 'cuda:0'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DatasetError(f"{where}: batches cannot go to {device}: this process sees no CUDA device; "
                           "pass ctx.device (the strategy's device) or 'cpu'")
    return device
