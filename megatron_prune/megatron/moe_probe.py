"""One routing probe per Megatron-Core ``MoELayer`` feeding every MoE expert criterion.

Lifecycle:
    1. ``probe = MoEProbe.attach(moe_layer)`` (one per layer, shared by the hooks of
       :mod:`megatron_prune.megatron.moe_hooks`); hooks call ``probe.require(outputs=...,
       removal=...)``. The probe registers forward hooks on ``moe_layer.router`` and
       ``moe_layer.experts`` (``SequentialMLP``; ``TEGroupedMLP``/``GroupedMLP`` have the same
       ``(permuted tokens, tokens_per_expert, probs)`` interface).
    2. Router hook (this rank's tokens ``[s/tp or s, b, h]``): logits are recomputed with the
       router's own ``gating`` on the same input (bit-identical); the chosen experts and weights
       are read from the router's native output; the re-routings "as if expert i did not exist"
       are computed with :func:`megatron_prune.math.moe.reroute_without_each`. The plan is
       all-gathered over the dispatcher's ``tp_ep`` group (the allgather dispatcher's token order).
    3. Experts hook (every rank of ``tp_ep``, collective there): the native weighted outputs of
       the local experts give ``f = output / g``; the experts that the re-routings need beyond the
       chosen ones (one per token for plain top-k) are evaluated once, with every forward hook of
       the experts module suppressed. Per chosen slot the probe builds ``f`` and the re-routed
       output (zeros for experts on other ranks, expert-TP partial sums), then reduce-scatters
       ``[N, 2k, h]`` over ``tp_ep`` like the dispatcher's combine: afterwards each rank holds full
       (EP- and expert-TP-reduced) outputs for its own tokens, and every statistic is computed in
       this rank's token space: summed over TP only under sequence parallelism (tokens replicated
       across TP count once) and over DP.
    4. The result of the call is ``probe.record`` (float64 per-expert sums, ``call_id``).

The extra evaluation reads the per-expert token counts on the host once per call (the same read
Megatron's dispatcher and ``SequentialMLP`` perform each forward); statistics never leave the
device. Limits: only the allgather token dispatcher (the CPU/gloo path; the alltoall dispatcher
distributes tokens differently); no context parallelism; ``f`` of a chosen expert is its native
weighted output divided by ``g`` (exact up to rounding in fp32, coarser in bf16); a call's token
count assumes equal DP and sequence-parallel shards (Megatron's micro-batches are).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import reduce_scatter_to_sequence_parallel_region

from megatron_prune.distributed.reductions import ProcessGroups, Reduction, all_gather_concat, group_size
from megatron_prune.math import moe as mm

__all__ = ["MoEProbe", "hooks_suppressed", "extra_pass", "in_extra_pass", "moe_module_name", "is_moe_layer"]

_STATE = threading.local()


def in_extra_pass() -> bool:
    """True while experts run on tokens outside normal routing (probe or calibrate-all)."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def extra_pass():
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@contextlib.contextmanager
def hooks_suppressed(module: torch.nn.Module):
    """Run ``module`` (and its submodules) without their forward (pre-)hooks; restored on exit."""
    saved = []
    for m in module.modules():
        saved.append((m, m._forward_hooks, m._forward_pre_hooks))
        m._forward_hooks = OrderedDict()
        m._forward_pre_hooks = OrderedDict()
    try:
        yield
    finally:
        for m, fh, fph in saved:
            m._forward_hooks = fh
            m._forward_pre_hooks = fph


def is_moe_layer(module) -> bool:
    return all(hasattr(module, a) for a in ("router", "experts", "token_dispatcher", "local_expert_indices"))


def moe_module_name(moe_layer) -> str:
    """``decoder.layers.{i}.mlp`` with the global 0-based layer index (``layer_number`` is the
    1-based global number Megatron gives each transformer layer)."""
    if getattr(moe_layer, "layer_number", None) is None:
        raise ValueError("MoE layer has no layer_number")
    return f"decoder.layers.{int(moe_layer.layer_number) - 1}.mlp"


def _local_first_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class MoEProbe:
    """Routing/expert-output probe of one ``MoELayer``; see the module docstring."""

    _registry: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    @classmethod
    def attach(cls, moe_layer) -> "MoEProbe":
        probe = cls._registry.get(moe_layer)
        if probe is None or probe.closed:
            probe = cls(moe_layer)
            cls._registry[moe_layer] = probe
        return probe

    def __init__(self, moe_layer):
        if not is_moe_layer(moe_layer):
            raise TypeError(f"{type(moe_layer).__name__} is not a Megatron MoE layer")
        if type(moe_layer.token_dispatcher).__name__ != "MoEAllGatherTokenDispatcher":
            raise NotImplementedError(
                f"the MoE probe supports the allgather token dispatcher, not "
                f"{type(moe_layer.token_dispatcher).__name__}"
            )
        self.layer = moe_layer
        cfg = moe_layer.config
        self.spec = getattr(moe_layer.router, "routing_spec", None) or mm.RoutingSpec.from_megatron_config(cfg)
        self.num_experts = int(cfg.num_moe_experts)
        self.topk = int(cfg.moe_router_topk)
        self.num_local = int(moe_layer.num_local_experts)
        self.lo = int(moe_layer.local_expert_indices[0])
        self.tp_ep = moe_layer.token_dispatcher.tp_ep_group
        self.sequence_parallel = bool(cfg.sequence_parallel)
        self.groups = ProcessGroups(tp=moe_layer.attn_tp_group, dp=ps.get_data_parallel_group())
        self.steps = ((Reduction("sum", "tp"),) if self.sequence_parallel else ()) + (Reduction("sum", "dp"),)
        self.want_outputs = False
        self.want_removal = False
        self.want_ballots = False
        self.record: Optional[dict] = None
        self.call_id = 0
        self.closed = False
        self._pending: Optional[dict] = None
        self._users: set = set()
        self._handles = [
            moe_layer.router.register_forward_hook(self._on_router),
            moe_layer.experts.register_forward_hook(self._on_experts),
        ]

    def require(self, outputs: bool = False, removal: bool = False, ballots: bool = False) -> None:
        self.want_outputs |= bool(outputs) or bool(removal)
        self.want_removal |= bool(removal)
        self.want_ballots |= bool(ballots)

    def acquire(self, user) -> None:
        self._users.add(id(user))

    def release(self, user) -> None:
        """Drop ``user``; the probe removes its hooks once nobody uses it."""
        self._users.discard(id(user))
        if not self._users:
            self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.closed = True

    # ------------------------------------------------------------------ tokens of a call
    def call_weight(self, n_local: int) -> float:
        """``1 / tokens of the whole call`` (equal DP and sequence-parallel shards)."""
        n = n_local * group_size(self.groups.dp)
        if self.sequence_parallel:
            n *= group_size(self.groups.tp)
        return 1.0 / max(n, 1)

    def expert_bias(self):
        b = getattr(self.layer.router, "expert_bias", None)
        return None if b is None else b.to(torch.float32)

    # ------------------------------------------------------------------ router side
    @torch.no_grad()
    def _on_router(self, router, args, output) -> None:
        if in_extra_pass():
            return
        x = args[0]
        probs, rmap = output
        logits = router.gating(x).reshape(-1, self.num_experts)
        k = self.topk
        idx = rmap.to(torch.float32).topk(k, dim=1)[1].sort(dim=1)[0]
        g = probs.gather(1, idx)
        rec = {
            "n_local": idx.shape[0],
            "idx": idx,
            "g": g,
            "frequency": mm.accumulate_routed(torch.ones_like(g), idx, self.num_experts),
            "soft_count": mm.accumulate_routed(g, idx, self.num_experts),
        }
        if self.want_ballots:
            choice, _ = mm.choice_scores(logits, self.spec, self.expert_bias())
            rec["ballots"] = mm.preference_ballots(choice)
        pend = {"rec": rec}
        if self.want_outputs:
            pend["C"] = all_gather_concat(idx, self.tp_ep)
            pend["G"] = all_gather_concat(g, self.tp_ep)
        if self.want_removal:
            ni, ng = mm.reroute_without_each(logits, idx, self.spec, self.expert_bias())
            xm = self.spec.max_extra()
            extra = mm.extra_experts(idx, ni, self.num_experts, xm)
            pend["NI"] = all_gather_concat(ni, self.tp_ep)
            pend["NG"] = all_gather_concat(ng.to(g.dtype), self.tp_ep)
            pend["X"] = all_gather_concat(extra, self.tp_ep)
            pend["H"] = all_gather_concat(_local_first_dims(x), self.tp_ep)
        self._pending = pend
        if not self.want_outputs:
            self._finish(rec)

    # ------------------------------------------------------------------ experts side
    def _pairs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions into ``ids [N, m]`` of the local (expert, token) pairs in the order
        Megatron permutes them (expert-major, tokens ascending), and the local mask."""
        n, m = ids.shape
        local = (ids >= self.lo) & (ids < self.lo + self.num_local)
        tok = torch.arange(n, device=ids.device).unsqueeze(1).expand(n, m)
        big = self.num_local * n
        keys = torch.where(local, (ids - self.lo) * n + tok, torch.full_like(ids, big))
        return keys.reshape(-1).argsort(), local

    @torch.no_grad()
    def _on_experts(self, experts, args, output) -> None:
        if in_extra_pass() or self._pending is None or "C" not in self._pending:
            return
        pend, self._pending = self._pending, None
        rec = pend["rec"]
        C, G = pend["C"], pend["G"]
        n, k = C.shape
        out = output[0] if isinstance(output, (tuple, list)) else output
        h = out.shape[-1]
        order, _ = self._pairs(C)
        order = order[: out.shape[0]]
        t, s = order // k, order % k
        gw = G[t, s].unsqueeze(-1).to(out.dtype)
        f_nat = torch.where(gw != 0, out / torch.where(gw != 0, gw, torch.ones_like(gw)), torch.zeros_like(out))
        fc = torch.zeros(n, k, h, dtype=out.dtype, device=out.device)
        fc[t, s] = f_nat
        parts = [fc]
        if self.want_removal:
            parts.append(self._rerouted_outputs(experts, pend, fc))
        full = reduce_scatter_to_sequence_parallel_region(torch.cat(parts, dim=1).contiguous(), group=self.tp_ep)
        f_loc = full[:, :k]
        idx, g = rec["idx"], rec["g"]
        norms = f_loc.to(torch.float64).norm(dim=-1)
        rec["ean_sum"] = mm.accumulate_routed(norms, idx, self.num_experts)
        rec["reap_sum"] = mm.accumulate_routed(g.to(torch.float64) * norms, idx, self.num_experts)
        if self.want_removal:
            mse, cdist = mm.removal_effect(f_loc, g, full[:, k:])
            w = self.call_weight(rec["n_local"])
            rec["removal_mse"] = mm.accumulate_routed(mse * w, idx, self.num_experts)
            rec["removal_cosine"] = mm.accumulate_routed(cdist * w, idx, self.num_experts)
        self._finish(rec)

    def _rerouted_outputs(self, experts, pend, fc: torch.Tensor) -> torch.Tensor:
        """``[N, k, h]`` partial (local experts only) routed output with each chosen slot's
        expert removed; evaluates the needed extra experts once per (token, expert)."""
        C, X, NI, NG, H = pend["C"], pend["X"], pend["NI"], pend["NG"], pend["H"]
        n, k, h = fc.shape
        xm = X.shape[1]
        fx = torch.zeros(n, xm, h, dtype=fc.dtype, device=fc.device)
        if xm:
            order, local = self._pairs(X)
            counts = torch.bincount((X[local] - self.lo), minlength=self.num_local).cpu()
            total = int(counts.sum())
            order = order[:total]
            t, s = order // xm, order % xm
            probs = torch.ones(total, dtype=torch.float32, device=fc.device)
            with extra_pass(), hooks_suppressed(experts):
                res = experts(H[t], counts, probs)
            fx[t, s] = (res[0] if isinstance(res, (tuple, list)) else res).to(fc.dtype)
        ids = torch.cat([C, X], dim=1)
        table = torch.cat([fc, fx], dim=1)
        q = (NI.reshape(n, k * k, 1) == ids.unsqueeze(1)).to(torch.int8).argmax(dim=-1)
        sel = table.gather(1, q.unsqueeze(-1).expand(n, k * k, h))
        y = (NG.reshape(n, k * k, 1).to(fc.dtype) * sel).view(n, k, k, h).sum(dim=2)
        return y

    def _finish(self, rec: dict) -> None:
        self.call_id += 1
        rec["call_id"] = self.call_id
        rec["weight"] = self.call_weight(rec["n_local"])
        self.record = rec
