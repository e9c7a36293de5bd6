"""MoE expert-importance hooks for Hugging Face-style MoE blocks (plain torch, one process).

* :class:`REAPSaliencyTracker`: REAP saliency ``S_j = mean over routed tokens of g_j·‖f_j‖₂``
  with float64 sum + count on the data's device.
* :class:`RemoveExpertsIndependentHook` (abstract): removal effect per expert, the block's
  routed-experts output natively re-routed without expert ``i`` (logit ``-inf``; choice score
  ``-inf`` for biased routers) against the original, on the tokens that chose ``i``;
  ``removal_mse`` / ``removal_cosine`` (``1 - cos``) weighted by the fraction of tokens displaced,
  summed over calls. Reference implementation: re-runs the experts once per expert on the
  displaced tokens (the Megatron hook does not).
  Subclasses: :class:`NemotronHRemoveExpertsIndependentHook` (sigmoid + ``e_score_correction_bias``
  + group-limited top-k, ``norm_topk_prob``, ``routed_scaling_factor``; shared experts excluded)
  and :class:`Qwen3VLRemoveExpertsIndependentHook` (softmax, top-k, renormalise).
* :class:`RankedChoiceVotingHook` (on the router, logits = first output) and
  :class:`RankedChoiceVotingHookNemotronH` (choice scores rebuilt from the router input).

Hooks take ``(module, activation_hooks_kwargs)``; the block's layout is read from the module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_prune.hooks.base import ForwardHook, check_finite, hook_input
from megatron_prune.math import moe as mm
from megatron_prune.math.moe import MoeModelAttrs

__all__ = [
    "REAPSaliencyTracker",
    "RemoveExpertsIndependentHook",
    "NemotronHRemoveExpertsIndependentHook",
    "Qwen3VLRemoveExpertsIndependentHook",
    "RankedChoiceVotingHook",
    "RankedChoiceVotingHookNemotronH",
    "MoeModelAttrs",
    "nemotron_h_spec",
    "qwen3_vl_spec",
]

_F64 = torch.float64


class REAPSaliencyTracker:
    """Accumulates ``S_j = mean(g_j·‖f_j‖₂)`` per expert over the tokens routed to ``j``."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.sum_saliency: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def _ensure(self, device) -> None:
        if self.sum_saliency is None:
            self.sum_saliency = torch.zeros(self.num_experts, dtype=_F64, device=device)
            self.count = torch.zeros(self.num_experts, dtype=_F64, device=device)

    @torch.no_grad()
    def update(self, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
               expert_norms_dict: dict[int, torch.Tensor], all_tokens: Optional[bool] = None) -> None:
        """``topk_indices``/``topk_weights [T, k]``; ``expert_norms_dict[j]``: norms of expert
        ``j``'s outputs for the tokens routed to it, in (slot, token) order (slot 0 all tokens,
        then slot 1, ...), or for all ``T`` tokens when ``all_tokens`` (calibrate-all-experts;
        inferred when every expert reports ``T`` norms). No host sync."""
        if not expert_norms_dict:
            return
        self._ensure(next(iter(expert_norms_dict.values())).device)
        t = topk_indices.shape[0]
        idx = topk_indices.to(torch.long)
        if all_tokens is None:
            all_tokens = len(expert_norms_dict) == self.num_experts and all(
                v.numel() == t for v in expert_norms_dict.values()
            )
        if all_tokens:
            stacked = torch.stack([expert_norms_dict[i] for i in range(self.num_experts)], dim=1)
            norms = stacked.gather(1, idx).to(_F64)
            flat_idx, flat_w, flat_n = idx.reshape(-1), topk_weights.reshape(-1).to(_F64), norms.reshape(-1)
        else:
            flat_idx = idx.t().reshape(-1)
            flat_w = topk_weights.t().reshape(-1).to(_F64)
            flat_n = torch.zeros_like(flat_w)
            total = 0
            for j, v in expert_norms_dict.items():
                mask = flat_idx == j
                flat_n[mask] = v.to(_F64)
                total += v.numel()
            if total != flat_idx.numel():
                raise ValueError(f"REAP tracker: {total} expert norms for {flat_idx.numel()} routed slots")
        self.sum_saliency.index_add_(0, flat_idx, flat_w * flat_n)
        self.count.index_add_(0, flat_idx, torch.ones_like(flat_w))

    @property
    def mean_saliency(self) -> torch.Tensor:
        if self.sum_saliency is None:
            return torch.zeros(self.num_experts, dtype=_F64)
        s, c = self.sum_saliency.cpu(), self.count.cpu()
        return torch.where(c > 0, s / c.clamp_min(1), torch.zeros_like(s))

    def compute_retained_experts(self, n_experts_to_drop: int, n_experts_to_drop_per_group: Optional[int],
                                 moe_attrs: MoeModelAttrs) -> list[int]:
        """Experts to keep, dropping the lowest-saliency ones (globally, or the same number in
        every group so groups stay contiguous and equal). Ties: lower id dropped first."""
        ranks = mm.ranks_from_scores(self.mean_saliency)
        if n_experts_to_drop_per_group is None:
            return [i for i in range(self.num_experts) if int(ranks[i]) >= n_experts_to_drop]
        size = moe_attrs.group_size or self.num_experts // moe_attrs.n_group
        retained = []
        for g in range(moe_attrs.n_group):
            lo = g * size
            r = mm.ranks_from_scores(self.mean_saliency[lo : lo + size])
            retained.extend(lo + i for i in range(size) if int(r[i]) >= n_experts_to_drop_per_group)
        return retained


def nemotron_h_spec(gate) -> mm.RoutingSpec:
    return mm.RoutingSpec(
        num_experts=gate.num_experts, topk=gate.top_k, score_function="sigmoid",
        num_groups=gate.num_group, group_topk=gate.topk_group, group_score_topk=2,
        scaling_factor=float(gate.routed_scaling_factor), normalize=bool(gate.norm_topk_prob),
    )


def qwen3_vl_spec(gate) -> mm.RoutingSpec:
    return mm.RoutingSpec(num_experts=gate.num_experts, topk=gate.top_k, pre_softmax=True, normalize=True)


def _ranks_fields(name: str, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    ranks = mm.ranks_from_scores(scores)
    return {name: scores.float().cpu(), f"expert_ranks_{name}": ranks,
            f"experts_importance_ascending_{name}": mm.ascending_from_ranks(ranks)}


class RemoveExpertsIndependentHook(ForwardHook, ABC):
    """Base removal-effect hook; register on the MoE block. See the module docstring."""

    def __init__(self, moe: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        kwargs = activation_hooks_kwargs or {}
        self.moe = moe
        self.spec = self.routing_spec()
        self.num_experts = self.spec.num_experts
        self.criterion = kwargs.get("criterion", "removal_mse")
        self.mse = torch.zeros(self.num_experts, dtype=_F64)
        self.cos = torch.zeros(self.num_experts, dtype=_F64)
        self.calls = 0
        self.tokens = 0

    @abstractmethod
    def routing_spec(self) -> mm.RoutingSpec: ...

    def expert_bias(self) -> Optional[torch.Tensor]:
        return None

    @abstractmethod
    def get_router_logits_and_routed_experts(self, hidden_states: torch.Tensor,
                                             router_logits: Optional[torch.Tensor] = None):
        """``(router_logits [T, E], routed_experts [T, h])``; with ``router_logits`` given, the
        routing is recomputed from them (``-inf`` = expert absent)."""

    def _route(self, logits):
        return mm.route(logits, self.spec, self.expert_bias(), torch.isneginf(logits))

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        x = hook_input(args)
        x2 = x.reshape(-1, x.shape[-1])
        logits, y = self.get_router_logits_and_routed_experts(x2)
        idx, _ = self._route(logits)
        n = x2.shape[0]
        if self.mse.device != x.device:
            self.mse, self.cos = self.mse.to(x.device), self.cos.to(x.device)
        for i in range(self.num_experts):
            chose = (idx == i).any(dim=1)
            lg = logits[chose].clone()
            lg[:, i] = float("-inf")
            _, yi = self.get_router_logits_and_routed_experts(x2[chose], lg)
            a, b = y[chose].to(_F64), yi.to(_F64)
            self.mse[i] += (a - b).square().mean(dim=-1).sum() / n
            self.cos[i] += (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-30)).sum() / n
        self.calls += 1
        self.tokens += n

    def accumulate(self) -> torch.Tensor:
        return self.to_dict()["score"]

    def to_dict(self) -> dict[str, torch.Tensor]:
        if not self.calls:
            raise AssertionError("removal hook has seen no activations yet")
        out = {**_ranks_fields("removal_mse", check_finite(self.mse, self.module_name)),
               **_ranks_fields("removal_cosine", check_finite(self.cos, self.module_name))}
        out["score"] = out[self.criterion].clone()
        return out

    def state_dict(self) -> dict:
        return {"mse": self.mse.cpu(), "cos": self.cos.cpu(), "calls": self.calls, "tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["mse"].numel() != self.num_experts:
            raise ValueError("state is for another number of experts")
        self.mse, self.cos = state_dict["mse"].to(_F64), state_dict["cos"].to(_F64)
        self.calls, self.tokens = int(state_dict["calls"]), int(state_dict["tokens"])

    def get_progress_info(self) -> dict:
        return {"calls": self.calls, "tokens_seen": self.tokens}


class NemotronHRemoveExpertsIndependentHook(RemoveExpertsIndependentHook):
    """Removal effect on a ``NemotronHMoE`` block (routed experts only, shared expert excluded)."""

    def routing_spec(self):
        return nemotron_h_spec(self.moe.gate)

    def expert_bias(self):
        return self.moe.gate.e_score_correction_bias.float()

    def get_router_logits_and_routed_experts(self, hidden_states, router_logits=None):
        gate = self.moe.gate
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        if router_logits is None:
            router_logits = F.linear(h.float(), gate.weight.float())
        idx, w = self._route(router_logits)
        z = self.moe.fc1_latent_proj(h)
        z = self.moe.experts(z, idx, w)
        return router_logits, self.moe.fc2_latent_proj(z)


class Qwen3VLRemoveExpertsIndependentHook(RemoveExpertsIndependentHook):
    """Removal effect on a ``Qwen3VLMoeTextSparseMoeBlock``."""

    def routing_spec(self):
        return qwen3_vl_spec(self.moe.gate)

    def get_router_logits_and_routed_experts(self, hidden_states, router_logits=None):
        gate = self.moe.gate
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        if router_logits is None:
            router_logits = F.linear(h, gate.weight)
        idx, w = self._route(router_logits)
        return router_logits, self.moe.experts(h, idx, w.to(h.dtype))


class RankedChoiceVotingHook(ForwardHook):
    """Instant-runoff expert ranking over each token's full preference order; register on the
    router (``gate``) whose first output is the router logits ``[T, E]``. Ballots kept on the
    device as ``uint8`` (E ≤ 256). ``ranked_choice[e]`` = elimination round (0 = first; zero-vote
    experts first, lowest id first), which is also its per-expert rank."""

    def __init__(self, router: torch.nn.Module, activation_hooks_kwargs: Optional[dict] = None):
        kwargs = activation_hooks_kwargs or {}
        self.router = router
        self.num_experts = int(kwargs.get("num_experts") or router.num_experts)
        self.topk = int(kwargs.get("topk") or router.top_k)
        self.ballots: list[torch.Tensor] = []
        self.calls = 0

    def choice_scores(self, args, output) -> torch.Tensor:
        return output[0] if isinstance(output, (tuple, list)) else output

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        self.ballots.append(mm.preference_ballots(self.choice_scores(args, output).reshape(-1, self.num_experts)))
        self.calls += 1

    def _all(self) -> torch.Tensor:
        if len(self.ballots) > 1:
            self.ballots = [torch.cat(self.ballots)]
        return self.ballots[0] if self.ballots else torch.zeros(0, self.num_experts, dtype=torch.uint8)

    def accumulate(self) -> torch.Tensor:
        """Per-expert ranks from instant runoff (0 = least important)."""
        order = mm.instant_runoff(self._all(), self.num_experts, self.topk)
        return mm.ranks_from_order(order.tolist())

    def to_dict(self) -> dict[str, torch.Tensor]:
        if not self.calls:
            raise AssertionError("ranked-choice hook has seen no activations yet")
        out = _ranks_fields("ranked_choice", self.accumulate().float())
        out["score"] = out["ranked_choice"].clone()
        return out

    def state_dict(self) -> dict:
        return {"ballots": self._all().cpu(), "calls": self.calls}

    def load_state_dict(self, state_dict: dict) -> None:
        b = state_dict["ballots"]
        if b.dim() != 2 or b.shape[1] != self.num_experts:
            raise ValueError("ballots do not fit this router")
        self.ballots, self.calls = [b], int(state_dict["calls"])

    def get_progress_info(self) -> dict:
        return {"calls": self.calls}


class RankedChoiceVotingHookNemotronH(RankedChoiceVotingHook):
    """NemotronH: choice scores ``sigmoid(logits) + e_score_correction_bias`` rebuilt from the
    router's input hidden states."""

    def choice_scores(self, args, output) -> torch.Tensor:
        h = hook_input(args)
        h = h.reshape(-1, h.shape[-1])
        logits = F.linear(h.float(), self.router.weight.float())
        spec = nemotron_h_spec(self.router)
        return mm.choice_scores(logits, spec, self.router.e_score_correction_bias.float())[0]
