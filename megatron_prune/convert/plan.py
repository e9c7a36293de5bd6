"""Turn activation-log scores and size targets into masks (pure: tensors in, bool tensors out).

Score fields read (module names with global layer numbers, higher = more important):

* experts: ``decoder.layers.{i}.mlp`` field ``expert_ranks_<criterion>`` (int64 ``[E]``, 0 = least
  important), falling back to the criterion's score vector ``<criterion>`` ``[E]``;
* dense FFN channels: ``decoder.layers.{i}.mlp.linear_fc2`` field ``score`` ``[F]``;
* expert FFN channels: ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2`` ``score``
  ``[F_moe]`` (``e`` the global expert id);
* query groups: ``decoder.layers.{i}.self_attention.linear_proj`` ``score`` ``[G]``;
* hidden channels: the mean of ``score`` ``[h]`` over every norm module (``input_layernorm``,
  ``pre_mlp_layernorm``, ``final_layernorm``).

The same count is kept in every layer (Megatron needs uniform sizes); ties keep the lower index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_prune.errors import UserError
from megatron_prune.model_config import ModelConfig

__all__ = ["EXPERT_CRITERIA", "PlanTargets", "plan_masks", "top_k_mask", "describe_masks"]

EXPERT_CRITERIA = ("frequency", "soft_count", "ean_sum", "reap", "removal_mse", "removal_cosine",
                   "ranked_choice")


@dataclass(frozen=True)
class PlanTargets:
    keep_experts: Optional[int] = None
    drop_experts_ratio: Optional[float] = None
    drop_per_group: bool = False
    expert_criterion: str = "reap"
    ffn_hidden_size: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    hidden_size: Optional[int] = None
    target_tp: Optional[int] = None
    target_ep: Optional[int] = None
    target_etp: Optional[int] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[n]``: True for the ``k`` highest scores (ties keep the lower index)."""
    order = torch.sort(score.double(), descending=True, stable=True).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def _score(logs: dict, module: str, fieldname: str, n: int, what: str) -> torch.Tensor:
    entry = logs.get(module)
    if entry is None or fieldname not in entry:
        have = sorted(entry) if entry else []
        raise UserError(f"activation logs lack {module}/{fieldname} (needed for {what})"
                        + (f"; it has {', '.join(have)}" if have else ""))
    s = entry[fieldname].reshape(-1)
    if s.numel() != n:
        raise UserError(f"{module}/{fieldname} has {s.numel()} entries, the model has {n} {what}")
    if s.is_floating_point() and not bool(torch.isfinite(s).all()):
        raise UserError(f"{module}/{fieldname} holds NaN or infinite scores")
    return s


def _check_target(what: str, value: int, full: int, by: Optional[int], by_name: str, minimum: int = 1):
    if not minimum <= value <= full:
        raise UserError(f"{what} {value} is outside [{minimum}, {full}]")
    if by and value % by:
        raise UserError(f"{what} {value} is not divisible by the target {by_name} size {by}")


def _expert_count(cfg: ModelConfig, t: PlanTargets) -> Optional[int]:
    E = cfg.num_moe_experts or 0
    if t.keep_experts is not None and t.drop_experts_ratio is not None:
        raise UserError("give either --keep-experts or --drop-experts-ratio, not both")
    if t.keep_experts is None and t.drop_experts_ratio is None:
        return None
    if not E:
        raise UserError("the model has no MoE layers; expert targets do not apply")
    if t.drop_experts_ratio is not None:
        if not 0.0 <= t.drop_experts_ratio < 1.0:
            raise UserError(f"--drop-experts-ratio {t.drop_experts_ratio} is outside [0, 1)")
        n = E - int(round(t.drop_experts_ratio * E))
    else:
        n = int(t.keep_experts)
    if n < cfg.moe_router_topk:
        raise UserError(f"keeping {n} experts, fewer than the router top-k {cfg.moe_router_topk}")
    _check_target("kept experts", n, E, t.target_ep, "EP")
    if t.drop_per_group:
        ng = cfg.moe_router_num_groups
        if not ng:
            raise UserError("--drop-per-group needs a group-limited router (moe_router_num_groups)")
        if n % ng:
            raise UserError(f"kept experts {n} do not split evenly over {ng} router groups")
    elif cfg.moe_router_num_groups:
        raise UserError("the router is group-limited: pass --drop-per-group to keep the groups even")
    return n


def _expert_mask(logs, cfg, t: PlanTargets, i: int, n: int) -> torch.Tensor:
    E = cfg.num_moe_experts
    module = f"decoder.layers.{i}.mlp"
    crit = t.expert_criterion
    entry = logs.get(module, {})
    if f"expert_ranks_{crit}" in entry:
        score = _score(logs, module, f"expert_ranks_{crit}", E, "experts").double()
        if sorted(score.long().tolist()) != list(range(E)):
            raise UserError(f"{module}/expert_ranks_{crit} is not a ranking of {E} experts")
    else:
        score = _score(logs, module, crit, E, f"experts (criterion {crit!r})").double()
    if not t.drop_per_group:
        return top_k_mask(score, n)
    ng = cfg.moe_router_num_groups
    size, per = E // ng, n // ng
    return torch.cat([top_k_mask(score[g * size:(g + 1) * size], per) for g in range(ng)])


def plan_masks(logs: dict, cfg: ModelConfig, targets: PlanTargets) -> dict:
    """Masks (``megatron_prune.masks`` keys) meeting ``targets`` from activation-log ``logs``."""
    t = targets
    if t.expert_criterion not in EXPERT_CRITERIA:
        raise UserError(f"unknown expert criterion {t.expert_criterion!r}; choose from {', '.join(EXPERT_CRITERIA)}")
    pattern = cfg.moe_layer_pattern()
    masks: dict = {}
    n_exp = _expert_count(cfg, t)
    if t.ffn_hidden_size is not None:
        if all(pattern):
            raise UserError("the model has no dense MLP layers; --ffn-hidden-size does not apply")
        _check_target("--ffn-hidden-size", t.ffn_hidden_size, cfg.ffn_hidden_size, t.target_tp, "TP")
    if t.moe_ffn_hidden_size is not None:
        if not any(pattern):
            raise UserError("the model has no MoE layers; --moe-ffn-hidden-size does not apply")
        _check_target("--moe-ffn-hidden-size", t.moe_ffn_hidden_size, cfg.moe_ffn_hidden_size,
                      t.target_etp or t.target_tp, "expert TP")
    if t.num_query_groups is not None:
        _check_target("--num-query-groups", t.num_query_groups, cfg.num_query_groups, t.target_tp, "TP")
    if t.hidden_size is not None:
        _check_target("--hidden-size", t.hidden_size, cfg.hidden_size, None, "")
    for i, moe in enumerate(pattern):
        pre = f"decoder.layers.{i}"
        if moe and n_exp is not None and n_exp < cfg.num_moe_experts:
            masks[f"{pre}.mlp.experts"] = _expert_mask(logs, cfg, t, i, n_exp)
        if moe and t.moe_ffn_hidden_size is not None and t.moe_ffn_hidden_size < cfg.moe_ffn_hidden_size:
            kept = masks.get(f"{pre}.mlp.experts", torch.ones(cfg.num_moe_experts, dtype=torch.bool))
            rows = []
            for e in range(cfg.num_moe_experts):
                module = f"{pre}.mlp.experts.local_experts.{e}.linear_fc2"
                if not kept[e] and module not in logs:  # a dropped expert: any channels will do
                    rows.append(torch.arange(cfg.moe_ffn_hidden_size) < t.moe_ffn_hidden_size)
                    continue
                s = _score(logs, module, "score", cfg.moe_ffn_hidden_size, "expert FFN channels")
                rows.append(top_k_mask(s, t.moe_ffn_hidden_size))
            masks[f"{pre}.mlp.experts.ffn"] = torch.stack(rows)
        if not moe and t.ffn_hidden_size is not None and t.ffn_hidden_size < cfg.ffn_hidden_size:
            s = _score(logs, f"{pre}.mlp.linear_fc2", "score", cfg.ffn_hidden_size, "FFN channels")
            masks[f"{pre}.mlp.ffn"] = top_k_mask(s, t.ffn_hidden_size)
        if t.num_query_groups is not None and t.num_query_groups < cfg.num_query_groups:
            s = _score(logs, f"{pre}.self_attention.linear_proj", "score", cfg.num_query_groups, "query groups")
            masks[f"{pre}.self_attention.query_groups"] = top_k_mask(s, t.num_query_groups)
    if t.hidden_size is not None and t.hidden_size < cfg.hidden_size:
        norms = sorted(m for m, f in logs.items() if m.endswith("layernorm") and "score" in f)
        if not norms:
            raise UserError("activation logs hold no norm-module scores (needed for --hidden-size)")
        total = torch.zeros(cfg.hidden_size, dtype=torch.float64)
        for m in norms:
            total += _score(logs, m, "score", cfg.hidden_size, "hidden channels").double()
        masks["hidden"] = top_k_mask(total / len(norms), t.hidden_size)
    if not masks:
        raise UserError("the targets keep everything: give at least one size below the model's")
    return masks


def describe_masks(masks: dict, cfg: ModelConfig) -> list:
    """Lines saying per layer what is kept (for ``--dry-run``)."""
    def ids(m):
        return [int(x) for x in torch.nonzero(m).flatten()]

    lines = []
    for i, moe in enumerate(cfg.moe_layer_pattern()):
        pre, parts = f"decoder.layers.{i}", []
        if f"{pre}.self_attention.query_groups" in masks:
            parts.append(f"query groups {ids(masks[f'{pre}.self_attention.query_groups'])} of {cfg.num_query_groups}")
        if f"{pre}.mlp.experts" in masks:
            parts.append(f"experts {ids(masks[f'{pre}.mlp.experts'])} of {cfg.num_moe_experts}")
        if f"{pre}.mlp.experts.ffn" in masks:
            parts.append(f"expert FFN {int(masks[f'{pre}.mlp.experts.ffn'][0].sum())} of {cfg.moe_ffn_hidden_size}")
        if f"{pre}.mlp.ffn" in masks:
            parts.append(f"FFN {int(masks[f'{pre}.mlp.ffn'].sum())} of {cfg.ffn_hidden_size}")
        lines.append(f"layer {i} ({'MoE' if moe else 'dense'}): " + ("; ".join(parts) or "unchanged"))
    if "hidden" in masks:
        drop = [int(x) for x in torch.nonzero(~masks["hidden"]).flatten()]
        lines.append(f"hidden: {int(masks['hidden'].sum())} of {cfg.hidden_size} kept, dropped {drop[:16]}"
                     + (" ..." if len(drop) > 16 else ""))
    return lines
