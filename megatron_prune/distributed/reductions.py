"""Reductions of statistics over explicit process groups (plain ``torch.distributed``).

Every helper short-circuits when the group has size 1 (or ``torch.distributed`` is not
initialised), so single-process and TP=1 runs share one code path with parallel runs. Helpers
are collective over ``group``: every rank of it must call them, in the same order.

A statistic's reduction is declared as data (:class:`Reduction` steps, applied in order), e.g. a
per-channel sum over a row-parallel layer's local input channels is
``(Reduction("sum", "dp"), Reduction("concat", "tp", dim=0))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "ProcessGroups",
    "Reduction",
    "group_size",
    "group_rank",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_concat",
    "apply_reductions",
    "local_slice",
]


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and group_size(group) > 1


def group_size(group) -> int:
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


@dataclass(frozen=True)
class ProcessGroups:
    """The groups a statistic may be reduced over. ``None`` means a group of size 1.

    * ``tp``: tensor-parallel group of dense layers; ``sp`` whether sequence parallelism shards
      tokens across it.
    * ``dp``: data-parallel group of dense layers (ranks holding the same dense weights).
    * ``ep``: expert-parallel group; ``etp``: expert tensor-parallel group; ``edp``: expert
      data-parallel group (ranks holding the same experts).
    * ``pp``: pipeline group.
    """

    tp: Optional[object] = None
    dp: Optional[object] = None
    ep: Optional[object] = None
    etp: Optional[object] = None
    edp: Optional[object] = None
    pp: Optional[object] = None
    sp: bool = False

    def get(self, name: str):
        if name not in ("tp", "dp", "ep", "etp", "edp", "pp"):
            raise KeyError(f"unknown process group name {name!r}")
        return getattr(self, name)

    def size(self, name: str) -> int:
        return group_size(self.get(name))

    def rank(self, name: str) -> int:
        return group_rank(self.get(name))


@dataclass(frozen=True)
class Reduction:
    """One step of combining per-rank partial statistics into the global statistic.

    ``op``: ``"sum"`` (all-reduce sum), ``"concat"`` (all-gather and concatenate along ``dim`` in
    group-rank order; also how experts are placed at ``ep_rank * num_local_experts``) or
    ``"none"`` (replicated: nothing to do). ``group``: a :class:`ProcessGroups` field name.
    """

    op: Literal["sum", "concat", "none"]
    group: str
    dim: int = 0


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over ``group`` (a new tensor on every rank)."""
    out = t.clone()
    if _active(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    out = t.clone()
    if _active(group):
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def all_gather_concat(t: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in group-rank order (shapes must match)."""
    if not _active(group):
        return t.clone()
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


def apply_reductions(t: torch.Tensor, steps: Sequence[Reduction], groups: ProcessGroups) -> torch.Tensor:
    """Apply ``steps`` in order; collective over each named group."""
    for step in steps:
        g = groups.get(step.group)
        if step.op == "sum":
            t = all_reduce_sum(t, g)
        elif step.op == "concat":
            t = all_gather_concat(t, g, step.dim)
        elif step.op != "none":
            raise ValueError(f"unknown reduction op {step.op!r}")
    return t


def local_slice(
    global_t: torch.Tensor, steps: Sequence[Reduction], groups: ProcessGroups
) -> torch.Tensor:
    """Inverse of :func:`apply_reductions` for resuming: this rank's share of a global statistic.

    ``concat`` steps take this rank's chunk; ``sum`` steps keep the value on group rank 0 and
    zeros elsewhere, so that reducing again gives back ``global_t``. Not collective.
    """
    t = global_t
    for step in reversed(list(steps)):
        g = groups.get(step.group)
        if step.op == "concat":
            n = group_size(g)
            if t.shape[step.dim] % n:
                raise ValueError(
                    f"cannot split dim {step.dim} of size {t.shape[step.dim]} over {n} ranks"
                )
            t = t.chunk(n, dim=step.dim)[group_rank(g)]
        elif step.op == "sum":
            if group_rank(g) != 0:
                t = torch.zeros_like(t)
    return t.clone()
