"""Apply a :class:`~megatron_prune.convert.planner.TensorItem` to one global tensor (pure torch).

Memory: a :class:`Take` makes one copy of the (shrinking) tensor; a :class:`PerIndex` holds the
slices and their stack, so the peak is a few times the size of the tensor being converted.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_prune.convert.planner import PerIndex, Take, TensorItem

__all__ = ["apply_ops", "apply_item", "apply_layer"]


def apply_ops(t: torch.Tensor, ops: tuple) -> torch.Tensor:
    """Apply ``ops`` in order; a ``PerIndex`` recurses into each slice along its axis."""
    for op in ops:
        if isinstance(op, Take):
            if len(op.index) == t.shape[op.axis] and op.index == tuple(range(t.shape[op.axis])):
                continue
            # advanced indexing: several times faster than index_select on an inner axis (CPU)
            t = t[(slice(None),) * op.axis + (torch.as_tensor(op.index, dtype=torch.long),)]
        elif isinstance(op, PerIndex) and _adjacent_takes(op):
            # slice j keeps rows idx_j of the next axis: one gather over the two axes merged
            a, n = op.axis, t.shape[op.axis + 1]
            flat = torch.as_tensor([j * n + i for j, p in enumerate(op.parts) for i in p[0].index], dtype=torch.long)
            merged = t.reshape(t.shape[:a] + (-1,) + t.shape[a + 2:])
            t = merged[(slice(None),) * a + (flat,)].reshape(
                t.shape[:a] + (len(op.parts), len(op.parts[0][0].index)) + t.shape[a + 2:])
        elif isinstance(op, PerIndex):
            if len(op.parts) != t.shape[op.axis]:
                raise ValueError(f"PerIndex over {len(op.parts)} slices of an axis of {t.shape[op.axis]}")
            t = torch.stack([apply_ops(t.select(op.axis, j), p) for j, p in enumerate(op.parts)], dim=op.axis)
        else:
            raise TypeError(f"unknown plan op {op!r}")
    return t


def _adjacent_takes(op: PerIndex) -> bool:
    """Every part is one ``Take`` on the axis right after ``op.axis``, all of one length."""
    parts = op.parts
    return bool(parts) and all(len(p) == 1 and isinstance(p[0], Take) and p[0].axis == op.axis for p in parts) \
        and len({len(p[0].index) for p in parts}) == 1


def apply_item(item: TensorItem, t: torch.Tensor, keep_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The converted global tensor for ``item`` from the source tensor ``t`` (shape
    ``item.src_shape``); ``keep_mask`` (bool, same shape) zeroes dropped weights first."""
    if tuple(t.shape) != tuple(item.src_shape):
        raise ValueError(f"{item.key}: got a tensor of shape {list(t.shape)}, planned {list(item.src_shape)}")
    if keep_mask is not None:
        t = t.masked_fill(~keep_mask, 0)
    out = apply_ops(t, item.ops)
    if tuple(out.shape) != tuple(item.dst_shape):
        raise ValueError(f"{item.key}: produced shape {list(out.shape)}, planned {list(item.dst_shape)}")
    return out.contiguous()


def apply_layer(item: TensorItem, layer: int, t: torch.Tensor, keep_mask: Optional[torch.Tensor] = None):
    """Slice ``layer`` ``[1, ...]`` of a layer-stacked ``item`` converted: ``[1, *dst_shape[1:]]``."""
    if not item.layer_stacked:
        raise ValueError(f"{item.key} is not layer-stacked")
    if tuple(t.shape) != (1,) + tuple(item.src_shape[1:]):
        raise ValueError(f"{item.key}: layer slice of shape {list(t.shape)}, planned {list(item.src_shape[1:])}")
    t = t[0]
    if keep_mask is not None:
        t = t.masked_fill(~keep_mask.reshape(t.shape), 0)
    out = apply_ops(t, item.layer_ops(layer))
    if tuple(out.shape) != tuple(item.dst_shape[1:]):
        raise ValueError(f"{item.key}: produced shape {list(out.shape)}, planned {list(item.dst_shape[1:])}")
    return out.unsqueeze(0).contiguous()
