"""Megatron-Core MoE layer utilities: calibrate every expert on every token, and in-memory
structural expert pruning.

* :func:`calibrate_all_experts` (context manager) / :class:`CalibrateAllExpertsMoE` (wrapper with
  ``restore()``): inside it, after the normal expert computation of each ``MoELayer`` (whose
  output is therefore bit-identical to normal routing), every local expert also runs on the
  tokens of this EP rank that were *not* routed to it (the allgather dispatcher's gathered
  ``[N, h]`` tokens), with routing weight 1 (no weight exists for an unrouted token) and outputs
  discarded. Forward hooks on the experts' linear layers therefore see every token exactly once.
  Probe hooks (:mod:`megatron_prune.megatron.moe_probe`) ignore that extra pass.
* :func:`prune_moe_layer`: keep ``retained`` global experts of one ``MoELayer``: local experts,
  router ``weight``/``bias``/``expert_bias`` rows, expert counts, local indices, a rebuilt token
  dispatcher. Group-limited routing keeps Megatron's routing when every group keeps the same
  number of experts, otherwise the router routes over the remaining (unequal) groups with
  :func:`megatron_prune.math.moe.route`. The pruned layer's output equals native re-routing
  without the dropped experts.

Megatron is imported lazily (this module sits outside :mod:`megatron_prune.megatron`).
"""

from __future__ import annotations

import contextlib
import copy
import types
from typing import Iterable, Optional, Sequence

import torch

from megatron_prune.math import moe as mm
from megatron_prune.math.moe import MoeModelAttrs

__all__ = ["calibrate_all_experts", "CalibrateAllExpertsMoE", "prune_moe_layer", "MoeModelAttrs", "moe_layers"]


def _modules(model) -> Iterable[tuple[str, torch.nn.Module]]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for c in chunks:
        yield from c.named_modules()


def moe_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name, MoELayer)`` pairs of a model or list of model chunks."""
    from megatron_prune.megatron.moe_probe import is_moe_layer

    return [(n, m) for n, m in _modules(model) if is_moe_layer(m)]


class CalibrateAllExpertsMoE:
    """Calibration wrapper of one Megatron ``MoELayer`` (allgather dispatcher).

    Wraps the layer's ``routed_experts_compute`` in place; :meth:`restore` puts it back and
    returns the original layer. EP-aware: each rank runs its local experts on the tokens it holds
    after dispatch (the tokens of its ``tp_ep`` group).
    """

    def __init__(self, moe_layer, calibrate_all_experts: bool = True):
        name = type(moe_layer.token_dispatcher).__name__
        if name != "MoEAllGatherTokenDispatcher":
            raise NotImplementedError(f"calibrate_all_experts supports the allgather dispatcher, not {name}")
        self.layer = moe_layer
        self.calibrate_all_experts = calibrate_all_experts
        self._had_attr = "routed_experts_compute" in vars(moe_layer)
        self._saved = vars(moe_layer).get("routed_experts_compute")
        self._inner = moe_layer.routed_experts_compute
        moe_layer.routed_experts_compute = self._routed_experts_compute

    def _routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        out = self._inner(hidden_states, probs)
        if self.calibrate_all_experts:
            self._unrouted_pass(hidden_states)
        return out

    @torch.no_grad()
    def _unrouted_pass(self, hidden_states: torch.Tensor) -> None:
        from megatron_prune.megatron.moe_probe import extra_pass

        local_map = self.layer.token_dispatcher.local_map  # [N, num_local] bool, set by dispatch
        unrouted = ~local_map.bool()
        counts = unrouted.sum(dim=0).long().cpu()
        tokens = unrouted.t().nonzero()[:, 1]  # expert-major, tokens ascending (Megatron's order)
        ones = torch.ones(tokens.numel(), dtype=torch.float32, device=hidden_states.device)
        with extra_pass():
            self.layer.experts(hidden_states[tokens], counts, ones)

    def restore(self):
        if self._had_attr:
            self.layer.routed_experts_compute = self._saved
        else:
            vars(self.layer).pop("routed_experts_compute", None)
        return self.layer


@contextlib.contextmanager
def calibrate_all_experts(model, calibrate: bool = True):
    """Context manager: every ``MoELayer`` of ``model`` (a module or a list of chunks) wrapped
    by :class:`CalibrateAllExpertsMoE`; restored on exit, exceptions included."""
    wrappers = []
    try:
        for _, layer in moe_layers(model):
            wrappers.append(CalibrateAllExpertsMoE(layer, calibrate))
        yield wrappers
    finally:
        for w in reversed(wrappers):
            w.restore()


# ---------------------------------------------------------------------------- pruning
def _shrink_rows(t: Optional[torch.Tensor], keep: torch.Tensor):
    if t is None:
        return None
    return t.detach()[keep.to(t.device)].clone()


def prune_moe_layer(model, layer_name: str, retained: Sequence[int], moe_attrs: Optional[MoeModelAttrs] = None) -> list[int]:
    """Structurally prune the ``MoELayer`` ``layer_name`` of ``model`` to the global experts
    ``retained`` (sorted; new global id = position in that list). Not collective; every rank of
    the layer's groups must call it with the same ``retained``. Under EP each rank must keep its
    own experts only (``E_new % ep == 0`` and new rank of each kept expert == old rank), else
    :class:`ValueError` (redistributing experts is the converter's job). Returns ``retained``.
    """
    from megatron.core import utils as mcore_utils

    layer = model.get_submodule(layer_name)
    attrs = moe_attrs or MoeModelAttrs()
    router = getattr(layer, attrs.router_attr)
    experts = getattr(layer, attrs.experts_attr)
    cfg = layer.config
    e_old = int(cfg.num_moe_experts)
    kept = sorted(int(i) for i in retained)
    if len(set(kept)) != len(kept) or not kept or kept[0] < 0 or kept[-1] >= e_old:
        raise ValueError(f"retained experts {retained} are not distinct ids in [0, {e_old})")
    e_new = len(kept)
    if e_new < int(cfg.moe_router_topk):
        raise ValueError(f"{e_new} experts left for top-{cfg.moe_router_topk} routing")
    ep_size = mcore_utils.get_pg_size(layer.ep_group)
    ep_rank = mcore_utils.get_pg_rank(layer.ep_group)
    if e_new % ep_size:
        raise ValueError(f"{e_new} retained experts do not split over EP={ep_size}")
    n_loc_old, n_loc_new = e_old // ep_size, e_new // ep_size
    for p, old in enumerate(kept):
        if p // n_loc_new != old // n_loc_old:
            raise ValueError(
                f"expert {old} would move from EP rank {old // n_loc_old} to {p // n_loc_new}; "
                "in-memory pruning keeps experts on their rank"
            )
    mine = kept[ep_rank * n_loc_new : (ep_rank + 1) * n_loc_new]
    local_keep = [old - ep_rank * n_loc_old for old in mine]

    new_cfg = copy.copy(cfg)
    new_cfg.num_moe_experts = e_new
    spec = mm.RoutingSpec.from_megatron_config(cfg)
    ragged = None
    if spec.grouped:
        size = e_old // spec.num_groups
        members: list[list[int]] = [[] for _ in range(spec.num_groups)]
        for p, old in enumerate(kept):
            members[old // size].append(p)
        if len({len(m) for m in members}) != 1:
            ragged = spec.replace(num_experts=e_new, group_members=tuple(tuple(m) for m in members if m),
                                  group_score_topk=spec.m_per_group)
            if ragged.group_topk > len(ragged.group_members):
                ragged = ragged.replace(group_topk=len(ragged.group_members))

    keep_t = torch.tensor(kept, dtype=torch.long)
    with torch.no_grad():
        router.weight = torch.nn.Parameter(_shrink_rows(router.weight, keep_t), requires_grad=router.weight.requires_grad)
        if getattr(router, "bias", None) is not None:
            router.bias = torch.nn.Parameter(_shrink_rows(router.bias, keep_t))
        for buf in ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert"):
            if getattr(router, buf, None) is not None and router._buffers.get(buf) is not None:
                router._buffers[buf] = _shrink_rows(router._buffers[buf], keep_t)
    setattr(router.weight, "sequence_parallel", bool(cfg.sequence_parallel))
    router.config = new_cfg
    router.num_experts = e_new
    if ragged is not None:
        router.routing = types.MethodType(_ragged_routing(ragged), router)
        router.routing_spec = ragged  # read by the MoE probe and ranked-choice hook

    if not hasattr(experts, "local_experts"):
        raise NotImplementedError(f"pruning {type(experts).__name__} (grouped GEMM weights) is not supported")
    experts.local_experts = torch.nn.ModuleList([experts.local_experts[i] for i in local_keep])
    experts.num_local_experts = n_loc_new
    layer.config = new_cfg
    layer.num_local_experts = n_loc_new
    layer.local_expert_indices = [ep_rank * n_loc_new + i for i in range(n_loc_new)]
    old = layer.token_dispatcher
    pgs = types.SimpleNamespace(
        ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group, tp=layer.attn_tp_group,
        cp=getattr(router, "cp_group", None), tp_cp=getattr(router, "tp_cp_group", None),
        expt_dp=getattr(experts, "dp_group", None),
    )
    layer.token_dispatcher = type(old)(n_loc_new, layer.local_expert_indices, config=new_cfg, pg_collection=pgs)
    if getattr(old, "shared_experts", None) is not None:
        layer.token_dispatcher.set_shared_experts(old.shared_experts)
    return kept


def _ragged_routing(spec: mm.RoutingSpec):
    def routing(self, logits: torch.Tensor, padding_mask=None):
        logits = logits.reshape(-1, spec.num_experts)
        bias = getattr(self, "expert_bias", None)
        return mm.route_dense(logits, spec, bias)

    return routing
