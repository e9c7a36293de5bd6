"""Plain-torch channel importance hooks (reference semantics, float64 accumulation).

Each hook picks its tensor and calls a pure function of :mod:`megatron_prune.math.channel`.
The Megatron variants (:mod:`megatron_prune.megatron.hooks`) subclass these and override the
parallel seams: the local channel count, ``_share`` (the fraction of a call's tokens this rank
sees), ``_reduce`` (local partial statistic -> global) and ``_localize`` (global -> this rank's
share, for resuming). In this module those are the identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_prune.hooks.base import (
    ForwardHook,
    NonFiniteActivationError,
    check_finite,
    hook_input,
    hook_output,
)
from megatron_prune.logs import atomic_write_json
from megatron_prune.math import channel as cm

__all__ = [
    "NoActivationsError",
    "L2NormHook",
    "IndependentChannelContributionHook",
    "IterativeChannelContributionHook",
    "IndependentKvHeadContributionHook",
    "LayerNormContributionHook",
    "linear_in_features",
    "attention_shape",
]

_F64 = torch.float64


class NoActivationsError(AssertionError):
    """Scores were asked for before any forward reached the hook."""


def linear_in_features(layer: torch.nn.Module) -> int:
    """Input channel count of ``nn.Linear`` (``in_features``) or Megatron (``input_size``)."""
    for name in ("in_features", "input_size"):
        if hasattr(layer, name):
            return int(getattr(layer, name))
    raise TypeError(f"{type(layer).__name__} has neither in_features nor input_size")


def attention_shape(kwargs: Optional[dict]) -> tuple[int, int, int]:
    """``(num_attention_heads, num_kv_groups, head_dim)`` from ``kwargs['model'|'config']``.

    Accepts Megatron ``TransformerConfig`` names (``num_query_groups``, ``kv_channels``) and
    Hugging Face names (``num_key_value_heads``, ``head_dim``), or the three numbers given
    directly in ``kwargs``.
    """
    kwargs = kwargs or {}
    cfg = kwargs.get("config")
    if cfg is None and kwargs.get("model") is not None:
        cfg = getattr(kwargs["model"], "config", None)

    def pick(*names):
        for n in names:
            if n in kwargs and kwargs[n] is not None:
                return kwargs[n]
            if cfg is not None and getattr(cfg, n, None) is not None:
                return getattr(cfg, n)
        return None

    heads = pick("num_attention_heads")
    groups = pick("num_query_groups", "num_key_value_heads", "num_kv_groups") or heads
    hidden = pick("hidden_size")
    head_dim = pick("kv_channels", "head_dim")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    if not heads or not head_dim:
        raise ValueError(
            "KV-head hook needs num_attention_heads and a head dim (kv_channels/head_dim) from "
            "activation_hooks_kwargs['model'|'config'] or given directly"
        )
    if heads % groups:
        raise ValueError(f"{heads} attention heads do not split into {groups} KV groups")
    return int(heads), int(groups), int(head_dim)


class _StatHook(ForwardHook):
    """Shared plumbing: float64 accumulators, call/token counters, parallel seams."""

    def __init__(self):
        self.calls = 0
        self.tokens = 0

    # parallel seams (identity for plain torch) --------------------------------------------
    def _share(self, x: torch.Tensor) -> float:
        """Fraction of the global call's tokens that ``x`` holds."""
        return 1.0

    def _reduce(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def _localize(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def _global_tokens(self) -> int:
        return self.tokens

    # --------------------------------------------------------------------------------------
    def _require_data(self):
        if self.calls == 0:
            raise NoActivationsError(f"hook on {self.module_name!r} has seen no activations yet")

    def get_progress_info(self) -> dict:
        return {"calls": self.calls, "tokens_seen": self._global_tokens()}

    def _counters(self) -> dict:
        return {"calls": self.calls, "tokens": self._global_tokens()}

    def _load_counters(self, sd: dict) -> None:
        self.calls = int(sd["calls"])
        self.tokens = int(sd["tokens"])


class L2NormHook(_StatHook):
    """Per call ``acc += Σ_b (mean_s |x|)²``; ``accumulate() = sqrt(acc)``. Input ``[s, b, h]``."""

    def __init__(self):
        super().__init__()
        self.acc: Optional[torch.Tensor] = None

    def _update(self, x: torch.Tensor) -> None:
        u = cm.l2_norm_update(x).to(_F64)
        self.acc = u if self.acc is None else self.acc + u

    def __call__(self, module, args, output) -> None:
        x = cm.as_sbh(hook_input(args))
        self._update(x)
        self.calls += 1
        self.tokens += x.shape[0] * x.shape[1]

    def _global_acc(self) -> torch.Tensor:
        self._require_data()
        return self._reduce("acc", self.acc)

    def accumulate(self) -> torch.Tensor:
        return check_finite(self._global_acc(), self.module_name).sqrt()

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"score": self.accumulate()}

    def state_dict(self) -> dict:
        acc = self._global_acc() if self.calls else None
        return {"acc": acc, **self._counters()}

    def load_state_dict(self, state_dict: dict) -> None:
        acc = state_dict["acc"]
        self.acc = None if acc is None else self._localize("acc", acc.to(_F64))
        self._load_counters(state_dict)


class IndependentChannelContributionHook(_StatHook):
    """``score[c] = ‖W[:, c]‖₂ · Σ_calls mean_tokens |x_c|`` for a linear layer's inputs."""

    def __init__(self, linear_layer: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        super().__init__()
        self.num_channels = self._channels(linear_layer)
        self.weight_norm = self._weight_norm(linear_layer)
        if self.weight_norm.numel() != self.num_channels:
            raise ValueError(
                f"weight has {self.weight_norm.numel()} input columns, layer says {self.num_channels}"
            )
        self.agg = torch.zeros(self.num_channels, dtype=_F64, device=self.weight_norm.device)

    def _channels(self, layer) -> int:
        return linear_in_features(layer)

    def _weight_norm(self, layer) -> torch.Tensor:
        return cm.column_norms(layer.weight)

    def __call__(self, module, args, output) -> None:
        x = hook_input(args)
        self.agg += cm.channel_abs_mean(x).to(_F64) * self._share(x)
        self.calls += 1
        self.tokens += x.numel() // x.shape[-1]

    def _globals(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        return self._reduce("agg", self.agg), self._reduce("weight_norm", self.weight_norm)

    def accumulate(self) -> torch.Tensor:
        agg, wn = self._globals()
        return check_finite(wn * agg, self.module_name)

    def to_dict(self) -> dict[str, torch.Tensor]:
        agg, wn = self._globals()
        return {
            "score": check_finite(wn * agg, self.module_name),
            "weight_norm": wn,
            "agg_channel_activations": agg,
        }

    def state_dict(self) -> dict:
        agg = self._reduce("agg", self.agg)
        return {"agg": agg, "weight_norm": self._reduce("weight_norm", self.weight_norm), **self._counters()}

    def load_state_dict(self, state_dict: dict) -> None:
        wn = self._localize("weight_norm", state_dict["weight_norm"].to(_F64))
        if wn.shape != self.weight_norm.shape or not torch.allclose(
            wn.to(self.weight_norm.device), self.weight_norm, rtol=1e-6, atol=1e-12
        ):
            raise ValueError(
                f"saved state for {self.module_name!r} was computed with different weights "
                "(weight norms differ); refusing to resume"
            )
        self.agg = self._localize("agg", state_dict["agg"].to(_F64)).to(self.agg.device)
        self._load_counters(state_dict)


class IterativeChannelContributionHook(_StatHook):
    """Iterative removal of a linear layer's least contributing input channels.

    ``activation_hooks_kwargs``: ``validation_full_iters`` (N, the number of calls),
    ``calibration_method`` (None or ``"scale_by_magnitude"``), ``clear_gpu_memory``.
    The schedule (:func:`~megatron_prune.math.channel.iterative_schedule`) says how many channels
    each call removes; after the last call every channel has a removal position.
    """

    def __init__(self, linear_layer: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        super().__init__()
        kw = dict(activation_hooks_kwargs or {})
        if "validation_full_iters" not in kw:
            raise ValueError("IterativeChannelContributionHook needs activation_hooks_kwargs['validation_full_iters']")
        self.num_iters = int(kw["validation_full_iters"])
        self.calibration_method = kw.get("calibration_method")
        if self.calibration_method not in (None, "scale_by_magnitude"):
            raise ValueError(f"unknown calibration_method {self.calibration_method!r}")
        self.clear_gpu_memory = bool(kw.get("clear_gpu_memory", False))
        self.num_channels = self._global_channels(linear_layer)
        self.offset, self.num_local = self._local_range(linear_layer)
        self.schedule = cm.iterative_schedule(self.num_channels, self.num_iters)
        dev = linear_layer.weight.device
        self.agg = torch.zeros(self.num_local, dtype=_F64, device=dev)
        self.removed = torch.zeros(self.num_channels, dtype=torch.bool, device=dev)
        self.order = torch.full((self.num_channels,), -1, dtype=torch.long, device=dev)
        self.num_removed = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)

    # overridable layout facts
    def _global_channels(self, layer) -> int:
        return linear_in_features(layer)

    def _local_range(self, layer) -> tuple[int, int]:
        return 0, self._global_channels(layer)

    def _full_outputs(self, y: torch.Tensor, y_cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum partial outputs over the layer's input shards (identity here)."""
        return y, y_cur

    def _combine_call(self, contrib: torch.Tensor, num_tokens: int, x: torch.Tensor) -> torch.Tensor:
        """This call's mean contribution per channel, as added to the accumulator."""
        return contrib * self._share(x)

    def __call__(self, module, args, output) -> None:
        if self.calls >= self.num_iters:
            raise RuntimeError(
                f"iterative hook on {self.module_name!r} called {self.calls + 1} times, beyond its "
                f"schedule of validation_full_iters={self.num_iters} calls"
            )
        x = hook_input(args)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        w = module.weight.detach().to(torch.float32)
        live = ~self.removed[self.offset : self.offset + self.num_local]
        y, y_cur = self._full_outputs(x2 @ w.T, (x2 * live) @ w.T)
        residual = cm.contribution_residual(y, y_cur, self.calibration_method)
        if x2.shape[0]:
            contrib = cm.channel_contributions(x2, w, residual, ~live)
        else:  # an expert no token reached this call contributes nothing
            contrib = torch.where(~live, torch.full_like(live, float("inf"), dtype=torch.float32), 0.0)
        self.nonfinite |= torch.isnan(contrib).any()
        self.agg += self._combine_call(contrib.to(_F64), x2.shape[0], x)
        k = self.schedule[self.calls]
        self.calls += 1
        self.tokens += x2.shape[0]
        if k:
            agg = self._reduce("agg", self.agg)
            idx = cm.select_smallest(agg, self.removed, k)
            self.order[self.num_removed : self.num_removed + k] = idx
            self.removed[idx] = True
            self.num_removed += k
            self.agg.zero_()
        if self.clear_gpu_memory:
            del y, y_cur, residual, contrib
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _check_done(self):
        self._require_data()
        if self.calls < self.num_iters:
            raise RuntimeError(
                f"iterative hook on {self.module_name!r} has run {self.calls} of its "
                f"{self.num_iters} scheduled calls; scores exist only after the last one"
            )
        if bool(self.nonfinite):
            raise NonFiniteActivationError(
                f"non-finite activation statistics in module {self.module_name!r}: the activations "
                "seen by this hook contained NaN or inf"
            )

    def accumulate(self) -> torch.Tensor:
        self._check_done()
        score = torch.empty(self.num_channels, dtype=_F64, device=self.order.device)
        score[self.order] = torch.arange(self.num_channels, dtype=_F64, device=self.order.device)
        return score

    def to_dict(self) -> dict[str, torch.Tensor]:
        score = self.accumulate()
        return {"score": score, "channels_importance_ascending": self.order.clone()}

    def get_progress_info(self) -> dict:
        return {**super().get_progress_info(), "total_iters": self.num_iters, "pruned_channels": self.num_removed}

    def state_dict(self) -> dict:
        return {
            "agg": self._reduce("agg", self.agg),
            "removed": self.removed.clone(),
            "order": self.order.clone(),
            "num_removed": self.num_removed,
            "nonfinite": bool(self.nonfinite),
            "num_iters": self.num_iters,
            "num_channels": self.num_channels,
            "calibration_method": self.calibration_method,
            **self._counters(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key, mine in (("num_iters", self.num_iters), ("num_channels", self.num_channels),
                          ("calibration_method", self.calibration_method)):
            if state_dict[key] != mine:
                raise ValueError(
                    f"saved state for {self.module_name!r} has {key}={state_dict[key]!r}, this hook {mine!r}"
                )
        dev = self.agg.device
        self.agg = self._localize("agg", state_dict["agg"].to(_F64)).to(dev)
        self.removed = state_dict["removed"].to(dev).clone()
        self.order = state_dict["order"].to(dev).clone()
        self.num_removed = int(state_dict["num_removed"])
        self.nonfinite = torch.tensor(bool(state_dict["nonfinite"]), device=dev)
        self._load_counters(state_dict)


class IndependentKvHeadContributionHook(_StatHook):
    """``score[g] += mean_tokens ‖a_g W_gᵀ‖₂`` on the attention output projection.

    ``activation_hooks_kwargs``: ``model`` or ``config`` (head counts, see
    :func:`attention_shape`), ``optimize_for`` ("latency" | "memory", same result).
    """

    def __init__(self, linear_layer: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        super().__init__()
        kw = dict(activation_hooks_kwargs or {})
        self.num_heads, self.num_groups, self.head_dim = attention_shape(kw)
        self.optimize_for = kw.get("optimize_for", "memory")
        if self.optimize_for not in ("latency", "memory"):
            raise ValueError(f"optimize_for must be 'latency' or 'memory', got {self.optimize_for!r}")
        self.num_local_groups = self._local_groups(linear_layer)
        width = self.num_local_groups * (self.num_heads // self.num_groups) * self.head_dim
        if linear_layer.weight.shape[1] != width:
            raise ValueError(
                f"projection weight has {linear_layer.weight.shape[1]} input columns, expected "
                f"{width} for {self.num_local_groups} groups"
            )
        self.agg = torch.zeros(self.num_local_groups, dtype=_F64, device=linear_layer.weight.device)

    def _local_groups(self, layer) -> int:
        return self.num_groups

    def __call__(self, module, args, output) -> None:
        a = hook_input(args)
        a2 = a.reshape(-1, a.shape[-1])
        c = cm.kv_group_contributions(a2, module.weight, self.num_local_groups, self.optimize_for)
        self.agg += c.to(_F64) * self._share(a)
        self.calls += 1
        self.tokens += a2.shape[0]

    def accumulate(self) -> torch.Tensor:
        self._require_data()
        return check_finite(self._reduce("agg", self.agg), self.module_name)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"score": self.accumulate()}

    def state_dict(self) -> dict:
        return {"agg": self._reduce("agg", self.agg), "num_groups": self.num_groups, **self._counters()}

    def load_state_dict(self, state_dict: dict) -> None:
        if int(state_dict["num_groups"]) != self.num_groups:
            raise ValueError(f"saved state for {self.module_name!r} has {state_dict['num_groups']} groups")
        self.agg = self._localize("agg", state_dict["agg"].to(_F64)).to(self.agg.device)
        self._load_counters(state_dict)


class LayerNormContributionHook(_StatHook):
    """``score[c] = Σ_calls mean_tokens |norm output_c|`` for a normalisation layer."""

    def __init__(self, layernorm_layer: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        super().__init__()
        w = getattr(layernorm_layer, "weight", None)
        if w is None:
            w = getattr(layernorm_layer, "layer_norm_weight", None)
        if w is None:
            raise TypeError(f"{type(layernorm_layer).__name__} has no norm weight")
        self.agg = torch.zeros(w.shape[-1], dtype=_F64, device=w.device)

    def _norm_output(self, module, args, output) -> torch.Tensor:
        return hook_output(output)

    def __call__(self, module, args, output) -> None:
        y = self._norm_output(module, args, output)
        self.agg += cm.channel_abs_mean(y).to(_F64) * self._share(y)
        self.calls += 1
        self.tokens += y.numel() // y.shape[-1]

    def accumulate(self) -> torch.Tensor:
        self._require_data()
        return check_finite(self._reduce("agg", self.agg), self.module_name)

    def to_dict(self) -> dict[str, torch.Tensor]:
        score = self.accumulate()
        return {"score": score, "channels_importance_ascending": torch.sort(score, stable=True).indices}

    def state_dict(self) -> dict:
        return {"agg": self._reduce("agg", self.agg), **self._counters()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["agg"].shape != self.agg.shape:
            raise ValueError(f"saved state for {self.module_name!r} has shape {tuple(state_dict['agg'].shape)}")
        self.agg = self._localize("agg", state_dict["agg"].to(_F64)).to(self.agg.device)
        self._load_counters(state_dict)

    @classmethod
    def after_dump(cls, activation_hooks: dict, activations_log_dir, args, is_writer: bool) -> None:
        """Write ``hidden_channel_ranking.json``: the score averaged over every hooked norm
        (over pipeline stages too when ``args`` gives ``pp_group``). Collective over ``pp_group``."""
        norms = [h for h in activation_hooks.values() if isinstance(h, LayerNormContributionHook)]
        if not norms:
            return
        total = torch.stack([h.accumulate() for h in norms]).sum(0)
        count = torch.tensor([float(len(norms))], dtype=_F64, device=total.device)
        pp_group = args.get("pp_group") if isinstance(args, dict) else getattr(args, "pp_group", None)
        if pp_group is not None:
            from megatron_prune.distributed.reductions import all_reduce_sum

            total, count = all_reduce_sum(total, pp_group), all_reduce_sum(count, pp_group)
        if is_writer and (pp_group is None or _pp_rank(args) == 0):
            mean = (total / count).cpu()
            atomic_write_json(
                Path(activations_log_dir) / "hidden_channel_ranking.json",
                {
                    "num_norms": int(count.item()),
                    "mean_score": mean.tolist(),
                    "channels_importance_ascending": torch.sort(mean, stable=True).indices.tolist(),
                },
            )


def _pp_rank(args) -> int:
    if isinstance(args, dict):
        return int(args.get("pp_rank", 0))
    return int(getattr(args, "pp_rank", 0))
