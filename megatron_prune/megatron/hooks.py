"""Dense importance hooks on Megatron-Core modules, exact at every parallel layout.

Each class subclasses its plain-torch twin (:mod:`megatron_prune.hooks.channel`) and fills in
the parallel seams from the module itself and its groups:

* local state is sized by the local shard (``input_size_per_partition`` of a row-parallel
  layer: ``weight.shape[1]``);
* forwards issue **no collective** for additive statistics (the iterative hook all-reduces the
  layer output it needs, and agrees on removals at its scheduled calls);
* partial statistics (never activations) are reduced when read: summed over data parallelism
  and over sequence-parallel token shards, concatenated over the TP group in rank order for
  channel-sharded inputs.

A per-call mean over a call's tokens is accumulated as ``local_mean / token_shards``; summing
over the shards gives the global call's mean exactly, since Megatron's micro-batches give every
shard the same number of tokens. Expert linears are the exception: data-parallel replicas of an
expert receive different numbers of routed tokens, so for them each call's ``(Σ, count)`` pair
is buffered (``[calls, C]``, not activations) and summed over the expert data-parallel group
every ``flush_every`` calls and when read; the per-call means are formed after that sum. Every
local expert is called on every forward (also with no tokens), so the buffers stay aligned.

Collective methods (every rank of the module's TP and DP groups must call them, in the same
order): ``accumulate``, ``to_dict``, ``state_dict`` (returns global, layout-independent state),
and the constructor of :class:`MegatronIndependentChannelContributionHook` on a
column-parallel layer. ``load_state_dict`` is local: it keeps this rank's share of a global
state saved at any layout.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_prune.distributed.reductions import (
    ProcessGroups,
    Reduction,
    all_reduce_sum,
    apply_reductions,
    group_rank,
    group_size,
    local_slice,
)
from megatron_prune.hooks.channel import (
    IndependentChannelContributionHook,
    IndependentKvHeadContributionHook,
    IterativeChannelContributionHook,
    L2NormHook,
    LayerNormContributionHook,
)
from megatron_prune.math import channel as cm

__all__ = [
    "MegatronL2NormHook",
    "MegatronIndependentChannelContributionHook",
    "MegatronIterativeChannelContributionHook",
    "MegatronIndependentKvHeadContributionHook",
    "MegatronLayerNormContributionHook",
    "is_row_parallel",
    "is_fused_norm_linear",
]


def is_row_parallel(module: torch.nn.Module) -> bool:
    """Whether ``module``'s input channels are sharded over its TP group (row-parallel)."""
    if hasattr(module, "input_size_per_partition"):
        return True
    return getattr(module, "parallel_mode", None) == "row"  # Transformer Engine linears


def is_fused_norm_linear(module: torch.nn.Module) -> bool:
    """``TELayerNormColumnParallelLinear``-like: a norm fused in front of a column-parallel linear."""
    return hasattr(module, "layer_norm_weight") and hasattr(module, "weight")


def _default_groups(kwargs: dict) -> ProcessGroups:
    groups = kwargs.get("process_groups")
    if groups is None:
        from megatron_prune.megatron.groups import process_groups

        groups = process_groups()
    return groups


class _Parallel:
    """Mixin holding one hook's layout facts and its declared reductions."""

    def _setup(self, module, kwargs: Optional[dict], *, channel_sharded: bool, tokens_sharded: bool):
        kwargs = dict(kwargs or {})
        groups = _default_groups(kwargs)
        expert = bool(getattr(module, "is_expert", False))
        tp = getattr(module, "tp_group", None) if module is not None else None
        if tp is None:
            tp = groups.etp if expert else groups.tp
        self._groups = ProcessGroups(tp=tp, dp=groups.edp if expert else groups.dp)
        self._tp_size, self._tp_rank = group_size(tp), group_rank(tp)
        self._dp_size = group_size(self._groups.dp)
        self._tokens_sharded = bool(tokens_sharded) and self._tp_size > 1
        self._token_shards = self._dp_size * (self._tp_size if self._tokens_sharded else 1)
        dp_sum = Reduction("sum", "dp")
        tp_step = Reduction("concat", "tp") if channel_sharded else (
            Reduction("sum", "tp") if self._tokens_sharded else Reduction("none", "tp")
        )
        self._steps = {"tokens": (dp_sum, tp_step)}
        # routed-token counts differ between data-parallel replicas of an expert
        self._ragged = expert and self._dp_size > 1
        self._replicated_steps = (tp_step,)  # a statistic already summed over DP
        self._flush_every = int(kwargs.get("flush_every", 64))
        self._calls_pending: list[tuple[torch.Tensor, int]] = []
        return kwargs

    def _ragged_add(self, local_sum: torch.Tensor, num_tokens: int) -> bool:
        """Buffer one call's per-channel sum and token count; True when it is time to flush."""
        self._calls_pending.append((local_sum, num_tokens))
        return len(self._calls_pending) >= self._flush_every

    def _ragged_means(self) -> Optional[torch.Tensor]:
        """Collective over DP: the buffered calls' global per-call means ``[calls, C]`` (float64)."""
        if not self._calls_pending:
            return None
        sums = torch.stack([s for s, _ in self._calls_pending]).to(torch.float64)
        counts = torch.tensor([float(n) for _, n in self._calls_pending], dtype=torch.float64, device=sums.device)
        both = all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1), self._groups.dp)
        self._calls_pending = []
        total = both[:, -1:]
        return torch.where(total > 0, both[:, :-1] / total.clamp_min(1.0), torch.zeros_like(both[:, :-1]))

    def _share(self, x: torch.Tensor) -> float:
        return 1.0 / self._token_shards

    def _reduce(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return apply_reductions(t, self._steps.get(name, self._steps["tokens"]), self._groups)

    def _localize(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return local_slice(t, self._steps.get(name, self._steps["tokens"]), self._groups)

    def _global_tokens(self) -> int:
        return self.tokens * self._token_shards


def _sp_tokens(module, kwargs: Optional[dict]) -> bool:
    """Whether a column-parallel/norm module's input tokens are sharded by sequence parallelism."""
    if kwargs and kwargs.get("sequence_parallel") is not None:
        return bool(kwargs["sequence_parallel"])
    if getattr(module, "is_expert", False):  # the token dispatcher hands experts whole tokens
        return False
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "sequence_parallel", False):
        return True
    weight = getattr(module, "weight", None)
    return bool(getattr(weight, "sequence_parallel", False))


class MegatronL2NormHook(_Parallel, L2NormHook):
    """:class:`~megatron_prune.hooks.channel.L2NormHook` on a Megatron linear or norm.

    Row-parallel input ``[s, b, h/tp]``: per-channel sums concatenated over TP. Replicated input
    ``[s, b, h]``: nothing to reduce over TP. Sequence-parallel input ``[s/tp, b, h]``: the
    per-call ``Σ_s |x|`` (``[b, h]``, not the activations) is buffered and summed over TP every
    ``flush_every`` calls (default 64) and when read, since the mean must be taken before squaring.
    Always summed over data parallelism (``Σ_b``).
    """

    def __init__(self, module: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        L2NormHook.__init__(self)
        row = is_row_parallel(module)
        kw = self._setup(module, activation_hooks_kwargs, channel_sharded=row,
                         tokens_sharded=not row and _sp_tokens(module, activation_hooks_kwargs))
        if self._tokens_sharded:  # flushed sums are already complete over TP
            self._steps["acc"] = (Reduction("sum", "dp"),)
        if self._ragged:  # flushed per-call means are already complete over DP
            self._steps["acc"] = self._replicated_steps
        self._pending: list[torch.Tensor] = []
        self._pending_seq = 0

    def _update(self, x: torch.Tensor) -> None:
        if self._ragged:  # expert input [tokens, 1, h]: (mean over routed tokens)^2
            if self._ragged_add(cm.channel_abs_sum(x), x.shape[0] * x.shape[1]):
                self._flush()
            return
        if not self._tokens_sharded:
            return L2NormHook._update(self, x)
        self._pending.append(cm.seq_abs_sum(x))
        self._pending_seq = x.shape[0] * self._tp_size
        if len(self._pending) >= self._flush_every:
            self._flush()

    def _flush(self) -> None:
        """Collective over TP (sequence-parallel inputs) or DP (expert inputs)."""
        if self._ragged:
            means = self._ragged_means()
            if means is not None:
                u = means.square().sum(dim=0)
                self.acc = u if self.acc is None else self.acc + u
            return
        if not self._pending:
            return
        sums = all_reduce_sum(torch.stack(self._pending), self._groups.tp)  # [calls, b, h]
        u = (sums.to(torch.float64) / self._pending_seq).square().sum(dim=(0, 1))
        self.acc = u if self.acc is None else self.acc + u
        self._pending = []

    def _global_acc(self) -> torch.Tensor:
        self._flush()
        return L2NormHook._global_acc(self)


class MegatronIndependentChannelContributionHook(_Parallel, IndependentChannelContributionHook):
    """:class:`~megatron_prune.hooks.channel.IndependentChannelContributionHook` on a Megatron linear.

    Row-parallel (``linear_proj``, ``linear_fc2``): local state of ``input_size_per_partition``
    channels, concatenated over TP into ``input_size``. Column-parallel (input = hidden
    channels): the column norms of the output-sharded weight are combined over TP once, in the
    constructor (collective), and token shards under sequence parallelism are summed.
    """

    def __init__(self, module: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        row = is_row_parallel(module)
        self._setup(module, activation_hooks_kwargs, channel_sharded=row,
                    tokens_sharded=not row and _sp_tokens(module, activation_hooks_kwargs))
        self._steps["weight_norm"] = (Reduction("concat", "tp"),) if row else ()
        if self._ragged:
            self._steps["agg"] = self._replicated_steps
        IndependentChannelContributionHook.__init__(self, module, activation_hooks_kwargs)

    def __call__(self, module, args, output) -> None:
        if not self._ragged:
            return IndependentChannelContributionHook.__call__(self, module, args, output)
        x = args[0]
        n = x.numel() // x.shape[-1]
        if self._ragged_add(cm.channel_abs_sum(x), n):
            self._flush()
        self.calls += 1
        self.tokens += n

    def _flush(self) -> None:
        """Collective over the expert data-parallel group (expert linears only)."""
        means = self._ragged_means()
        if means is not None:
            self.agg += means.sum(dim=0)

    def _globals(self):
        self._flush()
        return IndependentChannelContributionHook._globals(self)

    def state_dict(self) -> dict:
        self._flush()
        return IndependentChannelContributionHook.state_dict(self)

    def _channels(self, layer) -> int:
        return int(layer.weight.shape[1])

    def _weight_norm(self, layer) -> torch.Tensor:
        if is_row_parallel(layer):
            return cm.column_norms(layer.weight)
        return all_reduce_sum(cm.column_sq_norms(layer.weight), self._groups.tp).sqrt()


class MegatronIterativeChannelContributionHook(_Parallel, IterativeChannelContributionHook):
    """:class:`~megatron_prune.hooks.channel.IterativeChannelContributionHook` on a row-parallel layer.

    Each forward all-reduces the bias-free outputs ``x Wᵀ`` with all and with the remaining
    channels (``[2, tokens, out]``) over TP; each rank scores its own channels. At the calls the
    schedule names, the contributions are reduced (DP sum, TP concat) and every rank removes
    the same channels (ties: lowest global index).
    """

    def __init__(self, module: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        if not is_row_parallel(module):
            raise TypeError(
                f"the iterative channel hook needs a row-parallel layer (channel-sharded input), "
                f"got {type(module).__name__}"
            )
        self._setup(module, activation_hooks_kwargs, channel_sharded=True, tokens_sharded=False)
        if self._ragged:
            self._steps["agg"] = self._replicated_steps
        IterativeChannelContributionHook.__init__(self, module, activation_hooks_kwargs)

    def _combine_call(self, contrib, num_tokens, x):
        if not self._ragged:
            return contrib * self._share(x)
        # expert replicas see different token counts: sum over the expert data-parallel group
        live = torch.isfinite(contrib)
        part = torch.cat([torch.where(live, contrib * num_tokens, 0.0),
                          torch.tensor([float(num_tokens)], dtype=contrib.dtype, device=contrib.device)])
        part = all_reduce_sum(part, self._groups.dp)
        total = part[-1]
        mean = torch.where(total > 0, part[:-1] / total.clamp_min(1.0), torch.zeros_like(part[:-1]))
        return torch.where(live, mean, contrib)

    def _global_channels(self, layer) -> int:
        return int(layer.weight.shape[1]) * self._tp_size

    def _local_range(self, layer) -> tuple[int, int]:
        n = int(layer.weight.shape[1])
        return self._tp_rank * n, n

    def _full_outputs(self, y, y_cur):
        both = all_reduce_sum(torch.stack([y, y_cur]), self._groups.tp)
        return both[0], both[1]


class MegatronIndependentKvHeadContributionHook(_Parallel, IndependentKvHeadContributionHook):
    """:class:`~megatron_prune.hooks.channel.IndependentKvHeadContributionHook` on ``linear_proj``.

    Head counts come from ``module.config`` unless given; each TP rank holds
    ``num_query_groups / tp`` whole groups, so per-group scores are complete locally and are
    concatenated over TP.
    """

    def __init__(self, module: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        kw = dict(activation_hooks_kwargs or {})
        if kw.get("config") is None and kw.get("model") is None:
            kw["config"] = module.config
        self._setup(module, kw, channel_sharded=True, tokens_sharded=False)
        IndependentKvHeadContributionHook.__init__(self, module, kw)

    def _local_groups(self, layer) -> int:
        if self.num_groups % self._tp_size:
            raise ValueError(f"{self.num_groups} query groups do not split over TP={self._tp_size}")
        return self.num_groups // self._tp_size


class MegatronLayerNormContributionHook(_Parallel, LayerNormContributionHook):
    """:class:`~megatron_prune.hooks.channel.LayerNormContributionHook` on a Megatron norm.

    Works on ``WrappedTorchNorm``'s torch norms, Apex ``FusedLayerNorm``, ``TENorm`` and the norm
    fused into ``TELayerNormColumnParallelLinear`` (its hook input is the pre-norm tensor, so the
    norm output is recomputed from ``layer_norm_weight``/``layer_norm_bias`` and the config).
    Token shards under sequence parallelism are summed over TP.
    """

    def __init__(self, module: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        self._fused = is_fused_norm_linear(module)
        self._setup(module, activation_hooks_kwargs, channel_sharded=False,
                    tokens_sharded=_sp_tokens(module, activation_hooks_kwargs))
        LayerNormContributionHook.__init__(self, module, activation_hooks_kwargs)
        if self._fused:
            cfg = module.config
            self._norm_kind = cfg.normalization
            self._eps = float(getattr(cfg, "layernorm_epsilon", 1e-5))
            self._zero_centered = bool(
                getattr(module, "zero_centered_gamma", getattr(cfg, "layernorm_zero_centered_gamma", False))
            )

    def _norm_output(self, module, args, output) -> torch.Tensor:
        if not self._fused:
            return LayerNormContributionHook._norm_output(self, module, args, output)
        x = args[0]
        return cm.norm_forward(
            x, module.layer_norm_weight, getattr(module, "layer_norm_bias", None),
            self._eps, self._norm_kind, self._zero_centered,
        )
