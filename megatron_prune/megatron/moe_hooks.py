"""Megatron-Core MoE expert-importance hooks (global expert ids, exact under TP/SP/EP/ETP/DP).

Lifecycle:
    1. construct a hook with the ``MoELayer`` (or, for ranked choice, its ``TopKRouter``) and
       register it on that module: ``layer.register_forward_hook(hook)``; the hook attaches the
       layer's shared :class:`~megatron_prune.megatron.moe_probe.MoEProbe`;
    2. each forward, ``hook(module, args, output)`` adds the probe's per-call float64 sums (this
       rank's tokens) to its accumulators — no host sync, no collective;
    3. ``state_dict()`` (collective over the TP and DP groups: every rank of the stage calls it)
       returns GLOBAL sums, identical at every layout; ``load_state_dict`` accepts such a state at
       any layout (keeps this rank's share);
    4. ``to_dict()`` (collective likewise) returns per-expert vectors ``[E]`` over global expert
       ids (``ep_rank * num_local_experts + local id``), higher = more important, plus for each
       criterion ``expert_ranks_<c>`` (per-expert rank, 0 = least important) and
       ``experts_importance_ascending_<c>`` (id list), and ``score`` (the hook's main criterion).

Module names for the logs: :func:`~megatron_prune.megatron.moe_probe.moe_module_name`.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_prune.distributed.reductions import (
    all_gather_concat,
    apply_reductions,
    group_rank,
    group_size,
    local_slice,
)
from megatron_prune.hooks.base import ForwardHook, check_finite
from megatron_prune.math import moe as mm
from megatron_prune.megatron.moe_probe import MoEProbe, in_extra_pass, moe_module_name

__all__ = [
    "MegatronMoEImportanceHook",
    "MegatronExpertStatsHook",
    "MegatronRemoveExpertsIndependentHook",
    "MegatronRankedChoiceVotingHook",
    "ALL_CRITERIA",
    "criterion_fields",
]

_F64 = torch.float64

#: criterion -> the float64 per-expert sums it is computed from
_SUMS = {
    "frequency": ("frequency",),
    "soft_count": ("soft_count",),
    "ean_sum": ("ean_sum",),
    "reap": ("frequency", "reap_sum"),
    "removal_mse": ("removal_mse",),
    "removal_cosine": ("removal_cosine",),
    "ranked_choice": (),
}
ALL_CRITERIA = tuple(_SUMS)


def criterion_fields(name: str, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: scores, expert_ranks_<name>, experts_importance_ascending_<name>}``."""
    scores = scores.detach().cpu().to(torch.float32)
    ranks = mm.ranks_from_scores(scores)
    return {
        name: scores,
        f"expert_ranks_{name}": ranks,
        f"experts_importance_ascending_{name}": mm.ascending_from_ranks(ranks),
    }


class _BallotBox:
    """Compact ballots of this rank's tokens, their global view and resume (see
    :class:`MegatronRankedChoiceVotingHook`)."""

    def __init__(self, num_experts: int, topk: int, groups, sequence_parallel: bool, device):
        self.num_experts, self.topk = num_experts, topk
        self.groups, self.sp, self.device = groups, sequence_parallel, device
        self.parts: list[torch.Tensor] = []

    def add(self, ballots: torch.Tensor) -> None:
        self.parts.append(ballots)

    def local(self) -> torch.Tensor:
        if not self.parts:
            return torch.zeros(0, self.num_experts, dtype=torch.uint8, device=self.device)
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts, dim=0)]
        return self.parts[0]

    def global_ballots(self) -> torch.Tensor:
        """Collective over TP (SP only) and DP: every token's ballot once."""
        b = self.local()
        if self.sp:
            b = _gather_ragged(b, self.groups.tp)
        return _gather_ragged(b, self.groups.dp)

    def load(self, ballots: torch.Tensor) -> None:
        first = group_rank(self.groups.dp) == 0 and (not self.sp or group_rank(self.groups.tp) == 0)
        self.parts = [(ballots if first else ballots[:0]).to(self.device)]

    def ranked_choice(self) -> torch.Tensor:
        order = mm.instant_runoff(self.global_ballots(), self.num_experts, self.topk)
        return mm.ranks_from_order(order.tolist()).to(torch.float32)


class MegatronMoEImportanceHook(ForwardHook):
    """Every MoE expert criterion of one ``MoELayer`` from its probe; register on the layer.

    ``activation_hooks_kwargs``: ``criteria`` (subset of :data:`ALL_CRITERIA`, default all),
    ``criterion`` (the ``score`` field; default the first criterion), ``module_name``.
    Criteria: ``frequency`` (routed tokens), ``soft_count`` (Σ g), ``ean_sum`` (Σ‖f‖₂), ``reap``
    (mean over routed tokens of ``g·‖f‖₂``), ``removal_mse`` / ``removal_cosine`` (see
    :class:`MegatronRemoveExpertsIndependentHook`), ``ranked_choice`` (see
    :class:`MegatronRankedChoiceVotingHook`).
    """

    CRITERIA: tuple = ALL_CRITERIA

    def __init__(self, moe_layer, activation_hooks_kwargs: Optional[dict] = None):
        kwargs = activation_hooks_kwargs or {}
        self.criteria = tuple(kwargs.get("criteria") or self.CRITERIA)
        unknown = [c for c in self.criteria if c not in _SUMS]
        if unknown:
            raise ValueError(f"unknown MoE criteria {unknown}; known: {list(_SUMS)}")
        self.criterion = kwargs.get("criterion") or self.criteria[0]
        if self.criterion not in self.criteria:
            raise ValueError(f"score criterion {self.criterion!r} is not among {self.criteria}")
        self.probe = MoEProbe.attach(moe_layer)
        self.probe.acquire(self)
        needs_out = any(c in ("ean_sum", "reap") for c in self.criteria)
        removal = any(c.startswith("removal") for c in self.criteria)
        self.probe.require(outputs=needs_out, removal=removal, ballots="ranked_choice" in self.criteria)
        self.num_experts = self.probe.num_experts
        self.module_name = kwargs.get("module_name") or moe_module_name(moe_layer)
        dev = moe_layer.router.weight.device
        names = sorted({s for c in self.criteria for s in _SUMS[c]})
        self.sums = {k: torch.zeros(self.num_experts, dtype=_F64, device=dev) for k in names}
        self.box = (
            _BallotBox(self.num_experts, self.probe.topk, self.probe.groups, self.probe.sequence_parallel, dev)
            if "ranked_choice" in self.criteria else None
        )
        self.calls = 0
        self._seen = self.probe.call_id

    def __call__(self, module, args, output) -> None:
        if in_extra_pass():
            return
        rec = self.probe.record
        if rec is None or rec["call_id"] == self._seen:
            raise RuntimeError(f"{self.module_name}: the MoE probe produced no record for this forward")
        self._seen = rec["call_id"]
        for k in self.sums:
            self.sums[k] += rec[k]
        if self.box is not None:
            self.box.add(rec["ballots"])
        self.calls += 1

    # ------------------------------------------------------------------ global views
    def _global(self) -> dict[str, torch.Tensor]:
        """Collective: GLOBAL sums over TP (sequence parallel only) and DP."""
        return {k: apply_reductions(v, self.probe.steps, self.probe.groups) for k, v in self.sums.items()}

    def state_dict(self) -> dict:
        """Collective (TP and DP groups). Global, layout-independent state."""
        sd = {
            "num_experts": self.num_experts,
            "criteria": list(self.criteria),
            "calls": self.calls,
            "sums": {k: v.cpu() for k, v in self._global().items()},
        }
        if self.box is not None:
            sd["ballots"] = self.box.global_ballots().cpu()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if int(state_dict["num_experts"]) != self.num_experts:
            raise ValueError(
                f"{self.module_name}: state has {state_dict['num_experts']} experts, layer has {self.num_experts}"
            )
        missing = [k for k in self.sums if k not in state_dict["sums"]]
        if missing or (self.box is not None and "ballots" not in state_dict):
            raise ValueError(f"{self.module_name}: state lacks {missing or ['ballots']}")
        for k in self.sums:
            dev = self.sums[k].device
            self.sums[k] = local_slice(state_dict["sums"][k].to(_F64), self.probe.steps, self.probe.groups).to(dev)
        if self.box is not None:
            self.box.load(state_dict["ballots"])
        self.calls = int(state_dict["calls"])

    def get_progress_info(self) -> dict:
        return {"calls": self.calls}

    def close(self) -> None:
        """Stop feeding this hook: the layer's probe removes its router/experts hooks when no
        hook uses it any more (call after removing this hook's own handle)."""
        self.probe.release(self)

    def accumulate(self) -> torch.Tensor:
        return self.to_dict()["score"]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Collective (TP and DP groups); see the module docstring for the fields."""
        if self.calls == 0:
            raise AssertionError(f"hook on {self.module_name!r} has seen no activations yet")
        glob = self._global()
        out: dict[str, torch.Tensor] = {}
        for c in self.criteria:
            if c == "ranked_choice":
                vec = self.box.ranked_choice()
            elif c == "reap":
                f = glob["frequency"]
                vec = torch.where(f > 0, glob["reap_sum"] / f.clamp_min(1), torch.zeros_like(f))
            else:
                vec = glob[c]
            out.update(criterion_fields(c, check_finite(vec, self.module_name)))
        out["score"] = out[self.criterion].clone()
        return out


class MegatronExpertStatsHook(MegatronMoEImportanceHook):
    """REAP (default ``score``), frequency, soft_count and EAN of one ``MoELayer``."""

    CRITERIA = ("reap", "frequency", "soft_count", "ean_sum")


class MegatronRemoveExpertsIndependentHook(MegatronMoEImportanceHook):
    """Removal effect per global expert ``i``: on the tokens that chose ``i``, the routed-experts
    output natively re-routed without ``i`` (group limits and bias included) against the
    original; ``removal_mse`` (mean squared error) and ``removal_cosine`` (``1 - cos``: minus the
    cosine similarity, shifted so that an expert nobody chose scores 0), each weighted by the
    fraction of the call's tokens displaced, summed over calls. The layer is not re-run per
    expert: one extra expert evaluation per token for plain top-k."""

    CRITERIA = ("removal_mse", "removal_cosine")


class MegatronRankedChoiceVotingHook(ForwardHook):
    """Ranked-choice (instant-runoff) expert ranking from each token's full preference order of
    the router's choice scores (expert bias included); register on the ``TopKRouter``.

    Ballots are kept on the device as ``uint8 [tokens, E]`` (E ≤ 256). ``ranked_choice[e]`` is
    the round in which ``e`` was eliminated (0 = first; experts with zero votes go first, lowest
    id first), so it is its own per-expert rank. ``state_dict``/``to_dict`` are collective over
    TP (sequence parallel only) and DP; a loaded global state lives on the first rank of them.
    """

    def __init__(self, router, activation_hooks_kwargs: Optional[dict] = None):
        from megatron.core import parallel_state as ps

        from megatron_prune.distributed.reductions import ProcessGroups

        kwargs = activation_hooks_kwargs or {}
        self.router = router
        cfg = router.config
        self.spec = getattr(router, "routing_spec", None) or mm.RoutingSpec.from_megatron_config(cfg)
        self.num_experts = self.spec.num_experts
        groups = ProcessGroups(tp=router.tp_group, dp=ps.get_data_parallel_group())
        self.box = _BallotBox(self.num_experts, self.spec.topk, groups, bool(cfg.sequence_parallel), router.weight.device)
        layer_number = getattr(router, "layer_number", None)
        self.module_name = kwargs.get("module_name") or (
            f"decoder.layers.{int(layer_number) - 1}.mlp" if layer_number is not None else "<router>"
        )
        self.calls = 0

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        if in_extra_pass():
            return
        logits = module.gating(args[0]).reshape(-1, self.num_experts)
        bias = getattr(module, "expert_bias", None)
        choice, _ = mm.choice_scores(logits, self.spec, None if bias is None else bias.float())
        self.box.add(mm.preference_ballots(choice))
        self.calls += 1

    def state_dict(self) -> dict:
        return {"num_experts": self.num_experts, "calls": self.calls, "ballots": self.box.global_ballots().cpu()}

    def load_state_dict(self, state_dict: dict) -> None:
        if int(state_dict["num_experts"]) != self.num_experts:
            raise ValueError(f"{self.module_name}: state is for {state_dict['num_experts']} experts")
        self.box.load(state_dict["ballots"])
        self.calls = int(state_dict["calls"])

    def get_progress_info(self) -> dict:
        return {"calls": self.calls}

    def accumulate(self) -> torch.Tensor:
        return self.to_dict()["score"]

    def to_dict(self) -> dict[str, torch.Tensor]:
        if self.calls == 0:
            raise AssertionError(f"hook on {self.module_name!r} has seen no activations yet")
        out = criterion_fields("ranked_choice", self.box.ranked_choice())
        out["score"] = out["ranked_choice"].clone()
        return out


def _gather_ragged(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``t [n_r, E]`` (sizes may differ) over ``group`` in rank order."""
    if group_size(group) == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = all_gather_concat(n, group)
    top = int(sizes.max())
    pad = torch.zeros(top, t.shape[1], dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    parts = all_gather_concat(pad.unsqueeze(0), group, dim=0)
    return torch.cat([parts[i, : int(sizes[i])] for i in range(parts.shape[0])], dim=0)
