"""Wanda importance and per-row weight selection (pure tensors; optional explicit process group).

Wanda (Sun et al., 2023) scores weight ``W[r, c]`` of a linear layer ``y = x Wᵀ`` by
``|W[r, c]| · ‖X_c‖₂`` where ``X_c`` is input channel ``c`` over the calibration tokens, and
zeroes, in every output row, the weights of lowest importance. MoE-Pruner (Xie et al., 2024)
weights each token by its router gate ``g`` (``‖g · X_c‖₂``) for the linears of an expert.

Shapes: weights are ``[out, in]`` (rows = outputs); activations ``[tokens, in]`` or ``[s, b, in]``.

Selection rules (exact and deterministic, identical at every parallel layout):

* ``unstructured``: every row prunes exactly ``k = floor(sparsity_ratio · in)`` weights (the ratio
  read as the decimal it prints as, so ``0.29 · 100`` gives 29): the ``k`` smallest in the total
  order (importance, global column index) -- on ties the lowest column index is pruned first.
* ``n:m`` (``semistructured``): every block of ``m`` consecutive input weights of a row prunes
  exactly ``n`` weights, the ``n`` smallest in the same order within the block.

Rows sharded along the input dimension over a group (a row-parallel ``linear_fc2`` under TP or
expert-TP, rank ``i`` holding global columns ``[i·C, (i+1)·C)``) are handled by
:func:`distributed_row_prune_mask`: an exact k-th value search per row, bisecting on the bit
pattern of the float64 importance with one all-reduce of per-row counts per step (63 steps,
no data-dependent loop, one host synchronisation: the input validity check), then a tie split by
global column order with one all-gather of per-row tie counts. Only ``[rows]``-sized integer
tensors cross ranks.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch

__all__ = [
    "input_sq_sum_update",
    "wanda_importance",
    "prune_count",
    "unstructured_prune_mask",
    "distributed_row_prune_mask",
    "nm_prune_mask",
    "check_nm_shards",
    "dense_wanda_keep_mask",
]

#: bit pattern of +inf as int64: every finite non-negative float64 lies below it
_INF_BITS = 0x7FF0000000000000


def _tokens_2d(x: torch.Tensor) -> torch.Tensor:
    """``[..., C] -> [tokens, C]`` view."""
    if x.dim() < 2:
        raise ValueError(f"expected activations [tokens, C] or [s, b, C], got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def input_sq_sum_update(
    x: torch.Tensor, token_weight: Optional[torch.Tensor] = None, dtype=torch.float64
) -> torch.Tensor:
    """One call's ``Σ_t (w_t · x[t, c])²`` per input channel: ``[tokens, C] (or [s, b, C]) -> [C]``.

    ``token_weight`` ``[tokens]`` (e.g. the router gate of each token for this expert) multiplies
    each token before squaring; ``None`` means 1. Computed in ``dtype`` (float64 by default, where
    squares of float32 values are exact) on the data's device.
    """
    x2 = _tokens_2d(x).to(dtype)
    if token_weight is not None:
        w = token_weight.reshape(-1).to(dtype)
        if w.numel() != x2.shape[0]:
            raise ValueError(f"{w.numel()} token weights for {x2.shape[0]} tokens")
        x2 = x2 * w[:, None]
    return x2.square().sum(dim=0)


def wanda_importance(weight: torch.Tensor, sq_sum: torch.Tensor, count=None) -> torch.Tensor:
    """``|W[r, c]| · sqrt(sq_sum[c] / count)`` in float64: ``[out, in], [in] -> [out, in]``.

    ``count`` (tokens seen; scalar or 0-d tensor) only rescales every entry of a row alike, so it
    does not change the selection; it makes the statistic a mean (Wanda's ``scaler_row``) that
    is the same however often a token was duplicated across ranks.
    """
    if sq_sum.dim() != 1 or sq_sum.numel() != weight.shape[-1]:
        raise ValueError(f"statistic of shape {tuple(sq_sum.shape)} for weight {tuple(weight.shape)}")
    s = sq_sum.to(torch.float64)
    if count is not None:
        s = s / torch.as_tensor(count, dtype=torch.float64, device=s.device).clamp_min(1)
    imp = weight.detach().to(torch.float64).abs() * s.clamp_min(0).sqrt()[None, :]
    return imp + 0.0  # -0.0 -> +0.0, so bit patterns order like values


def prune_count(sparsity_ratio: float, in_features: int) -> int:
    """Weights pruned per row: ``floor(ratio · in)`` with the ratio taken as its shortest decimal."""
    if not 0.0 <= float(sparsity_ratio) <= 1.0:
        raise ValueError(f"sparsity_ratio must lie in [0, 1], got {sparsity_ratio}")
    return math.floor(Fraction(repr(float(sparsity_ratio))) * int(in_features))


def unstructured_prune_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Single-process selection: True where pruned, exactly ``k`` per row, ties -> lowest index.

    ``[rows, C] -> bool [rows, C]``.
    """
    if importance.dim() != 2:
        raise ValueError(f"expected importance [rows, C], got shape {tuple(importance.shape)}")
    rows, cols = importance.shape
    if not 0 <= k <= cols:
        raise ValueError(f"cannot prune {k} of {cols} weights per row")
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=importance.device)
    if k:
        order = torch.sort(importance, dim=1, stable=True).indices[:, :k]
        prune.scatter_(1, order, True)
    return prune


def _group_active(group) -> bool:
    import torch.distributed as dist

    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    if _group_active(group):
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def distributed_row_prune_mask(importance_local: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """Row-sharded selection: True where pruned, exactly what :func:`unstructured_prune_mask`
    selects on the gathered ``[rows, P·C]`` importance. Collective over ``group``.

    ``importance_local``: ``[rows, C]`` non-negative finite float64, this rank's contiguous block
    of columns (group rank ``i`` holds global columns ``[i·C, (i+1)·C)``; every rank the same
    ``C``). ``k``: weights pruned per GLOBAL row. Returns ``bool [rows, C]``.
    Every rank of ``group`` must call it with the same ``rows`` and ``k``; with a group of size 1
    (or ``None``) it is a local computation (same result as the sort).
    """
    import torch.distributed as dist

    imp = importance_local.to(torch.float64) + 0.0  # -0.0 -> +0.0
    if imp.dim() != 2:
        raise ValueError(f"expected importance [rows, C], got shape {tuple(imp.shape)}")
    rows, cols = imp.shape
    world = dist.get_world_size(group) if _group_active(group) else 1
    rank = dist.get_rank(group) if _group_active(group) else 0
    if not 0 <= k <= cols * world:
        raise ValueError(f"cannot prune {k} of {cols * world} weights per row")
    # the bit-pattern search orders non-negative finite values only (NaN would silently prune < k);
    # the check is reduced over the group so that every rank raises, none waits in a collective
    bad = (~((imp >= 0) & torch.isfinite(imp))).sum().reshape(1)
    if bool(_all_reduce_sum_(bad, group)[0]):
        raise ValueError("distributed_row_prune_mask needs non-negative finite importance on every rank "
                         "(NaN, inf or negative values given)")
    bits = imp.contiguous().view(torch.int64)  # monotone in value for non-negative floats
    device = imp.device
    # smallest T per row with count(bits <= T) >= k; invariant count(<= lo) < k <= count(<= hi)
    lo = torch.full((rows,), -1, dtype=torch.int64, device=device)
    hi = torch.full((rows,), _INF_BITS, dtype=torch.int64, device=device)
    kk = torch.full((rows,), k, dtype=torch.int64, device=device)
    for _ in range(63):  # hi - lo < 2**63: 63 halvings reach hi - lo == 1
        mid = lo + (hi - lo) // 2
        cnt = (bits <= mid[:, None]).sum(dim=1)
        _all_reduce_sum_(cnt, group)
        ok = cnt >= kk
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    thr = hi[:, None]
    less = bits < thr
    eq = bits == thr
    n_less = less.sum(dim=1)
    _all_reduce_sum_(n_less, group)
    take = kk - n_less  # ties to prune in this row, taken in global column order
    n_eq = eq.sum(dim=1)
    if world > 1:
        parts = [torch.empty_like(n_eq) for _ in range(world)]
        dist.all_gather(parts, n_eq.contiguous(), group=group)
        before = torch.stack(parts).cumsum(dim=0)[rank] - n_eq
    else:
        before = torch.zeros_like(n_eq)
    mine = (take - before).clamp(min=0)
    mine = torch.minimum(mine, n_eq)
    prune = less | (eq & (eq.to(torch.int64).cumsum(dim=1) <= mine[:, None]))
    if k == 0:
        prune.zero_()
    return prune


def nm_prune_mask(importance: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: ``n`` lowest of every ``m`` consecutive columns (ties -> lowest index).

    ``[rows, C] -> bool [rows, C]``; ``C`` must be a multiple of ``m``. Blocks are local to the
    tensor given: a shard must start on a block boundary (see :func:`check_nm_shards`).
    """
    rows, cols = importance.shape
    if not (0 <= n <= m and m >= 1):
        raise ValueError(f"invalid n:m = {n}:{m}")
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of m={m}")
    blocks = importance.reshape(rows, cols // m, m)
    prune = torch.zeros(blocks.shape, dtype=torch.bool, device=importance.device)
    if n:
        order = torch.sort(blocks, dim=2, stable=True).indices[..., :n]
        prune.scatter_(2, order, True)
    return prune.reshape(rows, cols)


def check_nm_shards(local_in_features: int, m: int, where: str = "weight") -> None:
    """Raise ``ValueError`` if n:m blocks of ``m`` columns would straddle shards of
    ``local_in_features`` columns (shard ``i`` starts at column ``i · local_in_features``)."""
    if local_in_features % m:
        raise ValueError(
            f"{where}: {local_in_features} local input columns per shard are not a multiple of "
            f"m={m}, so n:m blocks would straddle tensor-parallel shards"
        )


def dense_wanda_keep_mask(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    prune_type: str = "unstructured",
    sparsity_ratio: float = 0.5,
    n: int = 2,
    m: int = 4,
    token_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference Wanda on one unsharded weight ``[out, in]`` and its inputs ``[tokens, in]``:
    the keep-mask (True = keep), straight from the definition (sort per row)."""
    imp = wanda_importance(weight, input_sq_sum_update(inputs, token_weight))
    if prune_type == "unstructured":
        return ~unstructured_prune_mask(imp, prune_count(sparsity_ratio, weight.shape[1]))
    if prune_type == "semistructured":
        return ~nm_prune_mask(imp, n, m)
    raise ValueError(f"unknown prune_type {prune_type!r}")
