"""Pure MoE routing and expert-importance math (no distributed, no Megatron).

Shapes: router logits ``[tokens, E]``; chosen experts ``idx [tokens, k]`` with their combine
weights ``g [tokens, k]`` (``g_j`` = the factor the model multiplies expert ``j``'s output by);
expert outputs ``f [tokens, k, h]`` *before* that factor.

Routing reproduces Megatron-Core 0.16.1 ``topk_routing_with_score_function`` /
``group_limited_topk`` (and the Hugging Face NemotronH / Qwen3-VL routers, which are special cases
of the same :class:`RoutingSpec`):

* ``softmax`` after top-k: choose on logits, ``g = softmax(chosen logits)``;
* ``softmax`` with ``pre_softmax``: ``p = softmax(logits)``, choose on ``p``, ``g = chosen p``
  (renormalised only when ``normalize``, e.g. Qwen3-VL);
* ``sigmoid``: ``s = sigmoid(logits)``, choose on ``s + expert_bias`` (bias for choice only),
  ``g = chosen s / (Σ chosen s + 1e-20)`` when ``normalize`` (Megatron: ``topk > 1``);
* group-limited: experts in ``num_groups`` groups, a group's score is the sum of its top
  ``group_score_topk`` choice scores (Megatron: ``topk // group_topk``; NemotronH: 2), the best
  ``group_topk`` groups are kept, top-k is taken inside them;
* ``scaling_factor`` multiplies ``g`` last.

*Exclusion* (an expert that does not exist): its choice score is ``-inf`` and, for
``pre_softmax``, its logit too, so the softmax runs over the remaining experts; that is exactly
what a router without that expert computes. A group then scores the sum of its top
``group_score_topk`` *remaining* experts (all of them if fewer remain; ``-inf`` if none), which is
also how :func:`route` treats the ragged groups (``group_members``) of a structurally pruned layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_prune.math.voting import instant_runoff_order

__all__ = [
    "RoutingSpec",
    "MoeModelAttrs",
    "choice_scores",
    "route",
    "route_dense",
    "reroute_without_each",
    "extra_experts",
    "preference_ballots",
    "accumulate_routed",
    "removal_effect",
    "instant_runoff",
    "ranks_from_scores",
    "ascending_from_ranks",
]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class RoutingSpec:
    """How a router turns logits into ``(idx, g)``; see the module docstring."""

    num_experts: int
    topk: int
    score_function: str = "softmax"
    pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    group_score_topk: Optional[int] = None
    scaling_factor: Optional[float] = None
    normalize: Optional[bool] = None
    #: explicit (possibly unequal) groups of expert ids; default: contiguous equal groups
    group_members: Optional[tuple] = None

    def __post_init__(self):
        if self.score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported score function {self.score_function!r}")
        if not 0 < self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} with {self.num_experts} experts")
        if self.group_topk and self.group_members is None:
            if not self.num_groups or self.num_experts % self.num_groups:
                raise ValueError(f"{self.num_experts} experts do not split into {self.num_groups} groups")

    @property
    def grouped(self) -> bool:
        return bool(self.group_topk)

    @property
    def m_per_group(self) -> int:
        return int(self.group_score_topk or max(self.topk // self.group_topk, 1))

    @property
    def renormalize(self) -> bool:
        if self.normalize is not None:
            return bool(self.normalize)
        return self.score_function == "sigmoid" and self.topk > 1

    def groups(self) -> list[list[int]]:
        if self.group_members is not None:
            return [list(g) for g in self.group_members]
        size = self.num_experts // self.num_groups
        return [list(range(g * size, (g + 1) * size)) for g in range(self.num_groups)]

    def max_extra(self) -> int:
        """Upper bound of distinct experts, not chosen originally, that the re-routings of one
        token (one per chosen expert removed) bring in: 1 for plain top-k; for group-limited
        routing ``1 + group_topk * topk`` (a removal either keeps the groups, adding the same next
        expert, or swaps the removed expert's group for the best unselected one)."""
        bound = 1 + (self.group_topk * self.topk if self.grouped else 0)
        return max(0, min(self.num_experts - self.topk, bound))

    def replace(self, **kw) -> "RoutingSpec":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_megatron_config(cls, config) -> "RoutingSpec":
        return cls(
            num_experts=int(config.num_moe_experts),
            topk=int(config.moe_router_topk),
            score_function=config.moe_router_score_function,
            pre_softmax=bool(config.moe_router_pre_softmax),
            num_groups=config.moe_router_num_groups,
            group_topk=config.moe_router_group_topk,
            scaling_factor=config.moe_router_topk_scaling_factor,
        )


@dataclass(frozen=True)
class MoeModelAttrs:
    """Where a MoE block keeps its parts, and its expert groups (for per-group dropping)."""

    router_attr: str = "router"
    experts_attr: str = "experts"
    n_group: int = 1
    group_size: Optional[int] = None


def choice_scores(
    logits: torch.Tensor, spec: RoutingSpec, expert_bias: Optional[torch.Tensor] = None,
    excluded: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(choice [T, E], values [T, E])``: scores top-k is taken on, and the scores ``g`` is read
    from (logits for softmax after top-k). ``excluded [T, E]`` bool marks absent experts."""
    if spec.score_function == "softmax":
        if spec.pre_softmax:
            lg = logits if excluded is None else logits.masked_fill(excluded, _NEG_INF)
            values = torch.softmax(lg, dim=-1, dtype=torch.float32).type_as(logits)
            choice = values
        else:
            values = logits
            choice = logits
    else:
        values = torch.sigmoid(logits.float()).type_as(logits)
        choice = values + expert_bias if expert_bias is not None else values
    if excluded is not None:
        choice = choice.masked_fill(excluded, _NEG_INF)
    return choice, values


def _group_scores(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    m = spec.m_per_group
    if spec.group_members is None:
        g = spec.num_groups
        vals = choice.view(choice.shape[0], g, -1).topk(min(m, spec.num_experts // g), dim=-1)[0]
        cols = [vals]
    else:
        cols = []
        for members in spec.groups():
            sub = choice[:, members]
            cols.append(sub.topk(min(m, len(members)), dim=-1)[0].unsqueeze(1))
    out = []
    for v in cols:  # [T, G_part, m]: sum of the remaining (finite) ones
        finite = torch.isfinite(v)
        s = torch.where(finite, v, torch.zeros_like(v)).sum(dim=-1)
        out.append(torch.where(finite.any(dim=-1), s, torch.full_like(s, _NEG_INF)))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def _topk_choice(choice: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if not spec.grouped:
        return torch.topk(choice, k=spec.topk, dim=1)
    gs = _group_scores(choice, spec)
    gidx = torch.topk(gs, k=spec.group_topk, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()
    if spec.group_members is None:
        size = spec.num_experts // spec.num_groups
        emask = gmask.unsqueeze(-1).expand(-1, spec.num_groups, size).reshape(choice.shape[0], -1)
    else:
        owner = torch.empty(spec.num_experts, dtype=torch.long)
        for gi, members in enumerate(spec.groups()):
            owner[members] = gi
        emask = gmask[:, owner.to(choice.device)]
    return torch.topk(choice.masked_fill(~emask, _NEG_INF), k=spec.topk, dim=-1)


def route(
    logits: torch.Tensor, spec: RoutingSpec, expert_bias: Optional[torch.Tensor] = None,
    excluded: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [T, k] long, g [T, k])`` for ``logits [T, E]`` as the native router computes them."""
    choice, values = choice_scores(logits, spec, expert_bias, excluded)
    top, idx = _topk_choice(choice, spec)
    if spec.score_function == "softmax" and not spec.pre_softmax:
        g = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
    else:
        g = torch.gather(values, 1, idx).type_as(logits)
        if spec.renormalize:
            eps = 1e-20 if spec.score_function == "sigmoid" else 0.0
            g = g / (g.sum(dim=-1, keepdim=True) + eps)
    if spec.scaling_factor:
        g = g * spec.scaling_factor
    return idx, g


def route_dense(logits, spec, expert_bias=None, excluded=None):
    """Megatron's ``(routing_probs [T, E], routing_map [T, E] bool)`` form of :func:`route`."""
    idx, g = route(logits, spec, expert_bias, excluded)
    probs = torch.zeros_like(logits).scatter(1, idx, g)
    rmap = torch.zeros_like(logits, dtype=torch.int32).scatter(1, idx, 1).bool()
    return probs, rmap


def reroute_without_each(
    logits: torch.Tensor, idx: torch.Tensor, spec: RoutingSpec,
    expert_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native re-routing with each chosen expert removed in turn.

    ``logits [T, E]``, ``idx [T, k]`` -> ``(new_idx [T, k, k], new_g [T, k, k])``: row ``s`` is
    the routing of the token as if expert ``idx[:, s]`` did not exist.
    """
    t, e = logits.shape
    k = idx.shape[1]
    excl = torch.zeros(t, k, e, dtype=torch.bool, device=logits.device)
    excl.scatter_(2, idx.unsqueeze(-1), True)
    rep = logits.unsqueeze(1).expand(t, k, e).reshape(t * k, e)
    ni, ng = route(rep, spec, expert_bias, excl.reshape(t * k, e))
    return ni.view(t, k, spec.topk), ng.view(t, k, spec.topk)


def extra_experts(idx: torch.Tensor, new_idx: torch.Tensor, num_experts: int, max_extra: int) -> torch.Tensor:
    """Distinct experts the re-routings need beyond the chosen ones: ``[T, max_extra]`` long,
    padded with ``num_experts`` (no expert). ``idx [T, k]``, ``new_idx [T, k, k]``."""
    t = idx.shape[0]
    cand = new_idx.reshape(t, -1)
    known = (cand.unsqueeze(-1) == idx.unsqueeze(1)).any(-1)
    cand = torch.where(known, torch.full_like(cand, num_experts), cand)
    cand = cand.sort(dim=1)[0]
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    cand = torch.where(dup, torch.full_like(cand, num_experts), cand).sort(dim=1)[0]
    if cand.shape[1] < max_extra:
        pad = torch.full((t, max_extra - cand.shape[1]), num_experts, dtype=cand.dtype, device=cand.device)
        cand = torch.cat([cand, pad], dim=1)
    return cand[:, :max_extra]


def preference_ballots(choice: torch.Tensor) -> torch.Tensor:
    """Each token's full preference order (best first, ties: lower id first) as compact ballots:
    ``choice [T, E]`` -> ``uint8 [T, E]`` when ``E <= 256`` (else ``int16``/``int32``)."""
    e = choice.shape[-1]
    dtype = torch.uint8 if e <= 256 else (torch.int16 if e <= 32767 else torch.int32)
    order = torch.sort(choice.float(), dim=-1, descending=True, stable=True)[1]
    return order.to(dtype)


def accumulate_routed(values: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``Σ`` over (token, slot) of ``values [T, k]`` per expert ``idx [T, k]``: float64 ``[E]``."""
    out = torch.zeros(num_experts, dtype=torch.float64, device=values.device)
    return out.index_add_(0, idx.reshape(-1), values.reshape(-1).to(torch.float64))


def removal_effect(f: torch.Tensor, g: torch.Tensor, y_without: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (token, chosen slot) effect of removing that slot's expert.

    ``f [T, k, h]`` chosen experts' outputs before weighting, ``g [T, k]``, ``y_without [T, k, h]``
    the routed-experts output with slot ``s``'s expert removed (natively re-routed).
    Returns ``(mse [T, k], cos_distance [T, k])`` in float64, with ``y = Σ_s g_s f_s``,
    ``mse = mean_h (y - y_without)²`` and ``cos_distance = 1 - cos(y, y_without)``.
    """
    f64, yw = f.to(torch.float64), y_without.to(torch.float64)
    y = torch.einsum("tk,tkh->th", g.to(torch.float64), f64).unsqueeze(1)  # [T, 1, h]
    d = yw - y
    mse = torch.einsum("tkh,tkh->tk", d, d) / d.shape[-1]
    dot = torch.einsum("tkh,tkh->tk", yw, y.expand_as(yw))
    norms = y.squeeze(1).norm(dim=-1, keepdim=True).clamp_min(1e-30) * yw.norm(dim=-1).clamp_min(1e-30)
    return mse, 1.0 - dot / norms


def instant_runoff(ballots: torch.Tensor, num_experts: int, topk: int) -> torch.Tensor:
    """Instant-runoff elimination order over preference ballots.

    ``ballots [T, E]`` (expert ids, best first). Each round every ballot votes for its ``topk``
    best experts still standing; the expert with the fewest votes is eliminated (ties: lowest id).
    Experts nobody votes for are therefore eliminated first (lowest id first). Returns the
    eliminated ids ``[E]`` int64, least important first (the last one is the winner).
    Runs on the ballots' device; one host read per round (never called inside a hook).
    """
    return instant_runoff_order(ballots, num_experts, topk)


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-expert ranks ``[E]`` int64, 0 = least important (lowest score; ties: lower id lower)."""
    order = torch.sort(scores.double().cpu(), stable=True)[1]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def ascending_from_ranks(ranks: torch.Tensor) -> torch.Tensor:
    """Expert ids least important first (the inverse permutation of ``ranks``)."""
    out = torch.empty_like(ranks)
    out[ranks] = torch.arange(ranks.numel())
    return out


def ranks_from_order(order: Sequence[int]) -> torch.Tensor:
    order = torch.as_tensor(list(order), dtype=torch.int64)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


__all__.append("ranks_from_order")
