"""Arrow columns to torch tensors of their own (training may change them in place), ragged
lists padded or packed; read-only numpy views of fixed-width columns for the batch builder."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def _fixed_shape(t: pa.DataType) -> tuple[list[int], pa.DataType]:
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return shape, t


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _flat_values(arr: pa.Array) -> pa.Array:
    while pa.types.is_fixed_size_list(arr.type):
        # a view of the child buffer, the parent's slice of it (what flatten() gives, at a
        # quarter of its cost: this runs for every record batch a loader opens)
        size = arr.type.list_size
        arr = arr.values.slice(arr.offset * size, len(arr) * size)
    return arr


def fixed_width(t: pa.DataType) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape of one row, numpy dtype) of a fixed-width numeric column, else None."""
    shape, leaf = _fixed_shape(t)
    return (tuple(shape), np.dtype(leaf.to_pandas_dtype())) if _numeric(leaf) else None


def numpy_view(arr: pa.Array, shape: tuple[int, ...]) -> np.ndarray | None:
    """A fixed-width column as an (n, *shape) numpy view of the Arrow buffer (no copy),
    or None when it has nulls (those go the Arrow way, batch by batch)."""
    values = _flat_values(arr)
    if arr.null_count or values.null_count:
        return None
    return values.to_numpy(zero_copy_only=True).reshape(len(arr), *shape)


def _own(arr: pa.Array) -> np.ndarray:
    """A numpy copy of `arr`: an Arrow buffer may be a read-only map or a cached decoded row group."""
    return arr.to_numpy(zero_copy_only=False, writable=True)


def column_to_tensor(name: str, column: pa.ChunkedArray | pa.Array, ragged: str = "pad",
                     pad_value: float = 0) -> dict[str, object]:
    """Tensors that own their memory (this is the batch-by-batch path, a copy is cheap beside it)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    shape, leaf = _fixed_shape(t)
    if _numeric(leaf) and arr.null_count == 0:
        values = _own(_flat_values(arr))
        return {name: torch.from_numpy(values.reshape([len(arr), *shape]) if shape else values)}
    if pa.types.is_boolean(leaf) and not shape:
        return {name: torch.from_numpy(_own(arr))}
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _numeric(t.value_type):
        # views, only read: the tensors below are new arrays
        offsets, values = arr.offsets.to_numpy(), arr.flatten().to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        if ragged == "pack":  # one flat tensor plus where each row starts
            return {name: torch.from_numpy(values.copy()), f"{name}_offsets": torch.from_numpy(offsets - offsets[0])}
        width = int(lengths.max()) if len(lengths) else 0
        padded = np.full((len(arr), width), pad_value, dtype=values.dtype)
        mask = np.arange(width) < lengths[:, None]
        padded[mask] = values
        return {name: torch.from_numpy(padded), f"{name}_lengths": torch.from_numpy(lengths)}
    return {name: arr.to_pylist()}  # strings and anything else: plain Python values


def table_to_batch(table: pa.Table, ragged: str = "pad", pad_value: float = 0) -> dict[str, object]:
    batch: dict[str, object] = {}
    for name in table.column_names:
        batch.update(column_to_tensor(name, table.column(name), ragged, pad_value))
    return batch
