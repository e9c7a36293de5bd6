"""Apply a :class:`~megatron_prune.convert.planner.TensorItem` to one global tensor (pure torch).

Memory: a :class:`Take` makes one copy of the (shrinking) tensor; a :class:`PerIndex` holds the
slices and their stack, so the peak is a few times the size of the tensor being converted.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_prune.convert.planner import PerIndex, Take, TensorItem

__all__ = ["apply_ops", "apply_item"]


def apply_ops(t: torch.Tensor, ops: tuple) -> torch.Tensor:
    """Apply ``ops`` in order; a ``PerIndex`` recurses into each slice along its axis."""
    for op in ops:
        if isinstance(op, Take):
            if len(op.index) == t.shape[op.axis] and op.index == tuple(range(t.shape[op.axis])):
                continue
            t = t.index_select(op.axis, torch.as_tensor(op.index, dtype=torch.long))
        elif isinstance(op, PerIndex):
            if len(op.parts) != t.shape[op.axis]:
                raise ValueError(f"PerIndex over {len(op.parts)} slices of an axis of {t.shape[op.axis]}")
            t = torch.stack([apply_ops(t.select(op.axis, j), p) for j, p in enumerate(op.parts)], dim=op.axis)
        else:
            raise TypeError(f"unknown plan op {op!r}")
    return t


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
