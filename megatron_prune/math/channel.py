"""Pure per-channel statistics for dense importance hooks (no distributed, no Megatron).

Conventions: activations arrive in Megatron's sequence-first order ``[s, b, h]``; a 2-D
``[tokens, h]`` input is treated as ``[tokens, 1, h]``. Linear weights are ``[out, in]``.
Statistics are computed in ``float32`` (``compute_dtype``) from activations of any dtype and
returned in that dtype; callers accumulate them in float64.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "as_sbh",
    "seq_abs_sum",
    "l2_norm_update",
    "channel_abs_mean",
    "channel_abs_sum",
    "column_norms",
    "column_sq_norms",
    "iterative_schedule",
    "contribution_residual",
    "channel_contributions",
    "select_smallest",
    "kv_group_contributions",
    "norm_forward",
]


def as_sbh(x: torch.Tensor) -> torch.Tensor:
    """``[s, b, h]`` view of ``x`` (``[tokens, h]`` becomes ``[tokens, 1, h]``)."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"expected [s, b, h] or [tokens, h] activations, got shape {tuple(x.shape)}")
    return x


def seq_abs_sum(x: torch.Tensor, compute_dtype=torch.float32) -> torch.Tensor:
    """``Σ_s |x|`` per (batch, channel): ``[s, b, h] -> [b, h]``."""
    return as_sbh(x).to(compute_dtype).abs().sum(dim=0)


def l2_norm_update(x: torch.Tensor, compute_dtype=torch.float32) -> torch.Tensor:
    """One call's L2-norm statistic ``Σ_b (mean_s |x|)²``: ``[s, b, h] -> [h]``."""
    x = as_sbh(x)
    if x.shape[0] == 0:  # e.g. an expert no token was routed to in this call
        return torch.zeros(x.shape[-1], dtype=compute_dtype, device=x.device)
    return (seq_abs_sum(x, compute_dtype) / x.shape[0]).square().sum(dim=0)


def channel_abs_sum(x: torch.Tensor, compute_dtype=torch.float32) -> torch.Tensor:
    """``Σ |x_c|`` over every leading dim: ``[..., C] -> [C]``."""
    return x.to(compute_dtype).abs().reshape(-1, x.shape[-1]).sum(dim=0)


def channel_abs_mean(x: torch.Tensor, compute_dtype=torch.float32) -> torch.Tensor:
    """Mean over every leading dim of ``|x_c|``: ``[..., C] -> [C]``."""
    n = x.numel() // x.shape[-1]
    return channel_abs_sum(x, compute_dtype) / max(n, 1)


def column_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W[:, c]‖²`` in float64: ``[out, in] -> [in]``."""
    return weight.detach().to(torch.float64).square().sum(dim=0)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W[:, c]‖₂`` in float64: ``[out, in] -> [in]``."""
    return column_sq_norms(weight).sqrt()


def iterative_schedule(num_channels: int, num_calls: int) -> list[int]:
    """How many channels call ``i`` (0-based) removes; sums to ``num_channels``.

    If ``C >= N`` every call removes ``C // N`` and the first ``C % N`` calls one more; otherwise
    call ``(i * N) // C - 1`` removes one channel, for ``i = 1..C``.
    """
    if num_calls < 1 or num_channels < 1:
        raise ValueError(f"need at least one channel and one call, got C={num_channels}, N={num_calls}")
    c, n = num_channels, num_calls
    if c >= n:
        return [c // n + (1 if i < c % n else 0) for i in range(n)]
    counts = [0] * n
    for i in range(1, c + 1):
        counts[(i * n) // c - 1] += 1
    return counts


def contribution_residual(
    y: torch.Tensor, y_cur: torch.Tensor, calibration_method: Optional[str]
) -> torch.Tensor:
    """``α·y − y_cur`` per token; ``α = 1`` or ``‖y_cur‖/(‖y‖+1e-8)`` ("scale_by_magnitude").

    ``y``, ``y_cur``: ``[T, out]`` full (reduced) outputs with all and with the remaining channels.
    """
    if calibration_method is None:
        return y - y_cur
    if calibration_method != "scale_by_magnitude":
        raise ValueError(f"unknown calibration_method {calibration_method!r}")
    alpha = y_cur.norm(dim=-1, keepdim=True) / (y.norm(dim=-1, keepdim=True) + 1e-8)
    return alpha * y - y_cur


def channel_contributions(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """Mean over tokens of ``sqrt(‖r + x_i·W[:, i]‖² + 1e-8)`` for each channel ``i``.

    ``x``: ``[T, C]`` inputs of the channels; ``weight``: ``[out, C]`` their columns;
    ``residual``: ``[T, out]`` from :func:`contribution_residual`; ``removed``: ``[C]`` bool,
    removed channels get ``+inf``. Expands ``‖r + x_i w_i‖² = ‖r‖² + 2 x_i (r·w_i) + x_i² ‖w_i‖²``
    so the cost is one ``[T, out] x [out, C]`` product.
    """
    w = weight.to(residual.dtype)
    x = x.to(residual.dtype)
    r_sq = residual.square().sum(dim=-1, keepdim=True)  # [T, 1]
    rw = residual @ w  # [T, C]
    w_sq = w.square().sum(dim=0)  # [C]
    sq = (r_sq + 2 * x * rw + x.square() * w_sq).clamp_min(0)
    contrib = (sq + 1e-8).sqrt().mean(dim=0)
    return torch.where(removed, torch.full_like(contrib, float("inf")), contrib)


def select_smallest(agg: torch.Tensor, removed: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest ``agg`` among channels not yet removed (ties: lowest index).

    Returns the indices in removal order (ascending value, then index).
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=agg.device)
    vals = agg.to(torch.float64).nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float64).max)
    vals = torch.where(removed, torch.full_like(vals, float("inf")), vals)
    # A stable sort keeps equal values in index order; removed channels (+inf) sort last, so
    # the first k entries are live channels whenever k <= the number of live channels. No
    # boolean indexing: nothing here waits for the device.
    return torch.sort(vals, stable=True).indices[:k]


def kv_group_contributions(
    a: torch.Tensor,
    weight: torch.Tensor,
    num_groups: int,
    optimize_for: str = "memory",
    compute_dtype=torch.float32,
) -> torch.Tensor:
    """Mean over tokens of ``‖a_g W_gᵀ‖₂`` per KV group: ``[T, G·k], [out, G·k] -> [G]``.

    ``a`` is the attention-output-projection input; query heads of one group are contiguous,
    so group ``g`` owns columns ``g·k .. (g+1)·k`` (``k`` = heads per group × head dim).
    ``optimize_for="latency"`` batches the groups in one einsum, ``"memory"`` loops over them;
    both give the same result.
    """
    t, width = a.shape
    if width % num_groups:
        raise ValueError(f"input width {width} does not split into {num_groups} groups")
    k = width // num_groups
    a = a.to(compute_dtype)
    w = weight.detach().to(compute_dtype)
    if optimize_for == "latency":
        out = torch.einsum("tgk,ogk->tgo", a.view(t, num_groups, k), w.view(w.shape[0], num_groups, k))
        return out.norm(dim=-1).mean(dim=0)
    if optimize_for != "memory":
        raise ValueError(f"optimize_for must be 'latency' or 'memory', got {optimize_for!r}")
    res = []
    for g in range(num_groups):
        sl = slice(g * k, (g + 1) * k)
        res.append((a[:, sl] @ w[:, sl].T).norm(dim=-1).mean())
    return torch.stack(res)


def norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    normalization: str,
    zero_centered_gamma: bool = False,
    compute_dtype=torch.float32,
) -> torch.Tensor:
    """Recompute a LayerNorm/RMSNorm output from its input (for norms fused into a linear)."""
    x = x.to(compute_dtype)
    w = weight.detach().to(compute_dtype)
    if zero_centered_gamma:
        w = w + 1
    if normalization == "RMSNorm":
        y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    elif normalization == "LayerNorm":
        y = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    else:
        raise ValueError(f"unsupported normalization {normalization!r}")
    y = y * w
    if bias is not None:
        y = y + bias.detach().to(compute_dtype)
    return y
