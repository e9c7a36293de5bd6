"""MoE-Pruner: Wanda-style unstructured and n:m sparsity inside the experts of a Megatron model.

Lifecycle of :meth:`MoEPruner.run` (collective: every rank of the model calls it):
    1. pick the calibration samples (``nsamples`` windows of ``max_seqlen`` tokens, ``seed``) and
       take this rank's data-parallel share;
    2. register a :class:`WandaInputHook` on the input of every target linear (expert
       ``linear_fc1``/``linear_fc2``; dense MLPs with ``include_dense``) and a :class:`GateTap`
       on each expert MLP, which records the per-token gate Megatron passes it;
    3. forward the samples (the pipeline schedule when PP > 1); hooks accumulate ``Σ x²`` per
       input channel and a token count in float64 on the data's device, with no host sync;
    4. reduce the statistics over the groups that saw different tokens, score
       ``|W| · sqrt(mean x²)`` and select per row (:mod:`megatron_prune.math.wanda`): rows of a
       ``linear_fc2`` sharded over (expert-)TP use the exact distributed selection;
    5. zero the pruned weights in memory and return the keep-masks under their checkpoint keys
       (``sparsity/<key>``, gathered on global rank 0) with a per-tensor sparsity report.
    ``mode="layer_by_layer"`` repeats 2-4 for one layer at a time in global layer order (stages in
    pipeline order), so layer ``l`` is calibrated on the output of the already pruned layers. It
    costs one full calibration forward per sparsified layer (no per-layer activation cache), which
    keeps the pipeline schedule, rotary embeddings and masks exactly as Megatron runs them.

Where the gate is (megatron-core 0.16.1, read in source): the allgather dispatcher gathers the
router ``probs`` with the tokens and ``dispatch_postprocess`` hands each expert its tokens' probs;
``SequentialMLP.forward`` calls ``expert(tokens, probs)`` and ``MLP.forward`` multiplies the
activation output by ``per_token_scale`` (the probs) **before** ``linear_fc2``. So the input of an
expert's ``linear_fc2`` is ``g · act(fc1(x))`` while ``linear_fc1`` sees ``x`` unweighted.
Consequences here: ``gate_weighting=True`` (MoE-Pruner, ``‖g·X_c‖``) weights the fc1 tokens by ``g``
and takes the fc2 input as it is (it already carries ``g`` once); ``gate_weighting=False`` uses the
fc1 input as it is and, for fc2, by default also the input as Megatron feeds it (gated); with
``ungate_fc2=True`` the fc2 input is divided by ``g`` (HF-style plain Wanda, where the gate
multiplies the expert output instead), tokens with ``g == 0`` then being skipped. With
``calibrate_all_experts`` the unrouted tokens reach each expert with gate 1
(:func:`megatron_prune.moe.calibrate_all_experts`), so they count unweighted under any option.
Statistics are means (``Σx²`` / tokens): tokens replicated across attention-TP ranks, which the
allgather dispatcher gathers again without sequence parallelism, do not change them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_prune.hooks.base import ForwardHook, check_finite, hook_input
from megatron_prune.math import wanda as wm

__all__ = ["MoEPruner", "SparsifyResult", "WandaInputHook", "GateTap", "calibration_tokens"]

log = logging.getLogger(__name__)


def calibration_tokens(data, nsamples: int, max_seqlen: int, seed: int = 42) -> torch.Tensor:
    """``[nsamples', seqlen]`` int64 calibration samples (identical on every rank).

    ``data``: a 2-D token tensor ``[N, S]`` (rows drawn without replacement by ``seed`` when
    ``N > nsamples``, truncated to ``max_seqlen``), a 1-D token stream, or a list of 1-D documents
    (``nsamples`` random windows of ``max_seqlen`` tokens, Wanda-style: a random document long
    enough, a random start).
    """
    g = torch.Generator().manual_seed(int(seed))
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        tokens = data[:, :max_seqlen]
        if tokens.shape[0] > nsamples:
            tokens = tokens[torch.randperm(tokens.shape[0], generator=g)[:nsamples]]
        return tokens.long().contiguous()
    docs = [data] if isinstance(data, torch.Tensor) else [torch.as_tensor(d) for d in data]
    long_docs = [d.reshape(-1) for d in docs if d.numel() > max_seqlen]
    if not long_docs:
        raise ValueError(f"no calibration document is longer than max_seqlen={max_seqlen} tokens")
    out = []
    for _ in range(nsamples):
        d = long_docs[int(torch.randint(len(long_docs), (1,), generator=g))]
        start = int(torch.randint(d.numel() - max_seqlen, (1,), generator=g))
        out.append(d[start : start + max_seqlen])
    return torch.stack(out).long()


class GateTap:
    """Forward pre-hook on an expert MLP: keeps the per-token gate ``[tokens]`` of its current
    call (``per_token_scale``, positional or keyword; ``None`` when the expert got no gate)."""

    def __init__(self):
        self.probs: Optional[torch.Tensor] = None

    def __call__(self, module, args, kwargs):
        probs = args[1] if len(args) > 1 else kwargs.get("per_token_scale")
        self.probs = probs
        return None


class WandaInputHook(ForwardHook):
    """Accumulates ``Σ_t (w_t x[t, c])²`` and the token count of a linear's input ``[tokens, C]``
    (``[s, b, C]`` for dense linears) in float64 on the data's device.

    ``tap`` gives the expert's gate per token; ``gate_weight=True`` multiplies each token by it,
    ``ungate=True`` divides by it (skipping ``g == 0``). State is this rank's partial sums
    (reduce with :meth:`MoEPruner` or sum ``state_dict()`` over the ranks that saw other tokens).
    """

    def __init__(self, module: torch.nn.Module, tap: Optional[GateTap] = None,
                 gate_weight: bool = False, ungate: bool = False):
        if (gate_weight or ungate) and tap is None:
            raise ValueError("gate weighting needs the expert's GateTap")
        if gate_weight and ungate:
            raise ValueError("gate_weight and ungate exclude each other")
        self.tap, self.gate_weight, self.ungate = tap, gate_weight, ungate
        self.in_features = int(module.weight.shape[1])
        self.sq_sum: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def _ensure(self, device):
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(self.in_features, dtype=torch.float64, device=device)
            self.count = torch.zeros((), dtype=torch.float64, device=device)

    def __call__(self, module, args, output) -> None:
        x = hook_input(args)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[1] != self.in_features:
            raise ValueError(f"{self.module_name}: input of {x2.shape[1]} channels, weight has {self.in_features}")
        self._ensure(x.device)
        weight = None
        if self.gate_weight or self.ungate:
            g = self.tap.probs
            if g is None:
                raise RuntimeError(f"{self.module_name}: the expert was called without a gate")
            g = g.reshape(-1).to(torch.float64)
            if self.ungate:
                nz = g != 0
                weight = torch.where(nz, 1.0 / torch.where(nz, g, torch.ones_like(g)), torch.zeros_like(g))
                self.count += nz.sum()
            else:
                weight = g
        if not self.ungate:
            self.count += x2.shape[0]
        self.sq_sum += wm.input_sq_sum_update(x2, weight)

    def accumulate(self) -> torch.Tensor:
        """This rank's ``sqrt(mean x²)`` per input channel ``[C]`` (no reduction)."""
        self._ensure("cpu")
        check_finite(self.sq_sum, self.module_name)
        return (self.sq_sum / self.count.clamp_min(1)).sqrt()

    def to_dict(self) -> dict:
        return {"score": self.accumulate(), "sq_sum": self.sq_sum.clone(), "count": self.count.clone()}

    def state_dict(self) -> dict:
        self._ensure("cpu")
        return {"sq_sum": self.sq_sum.clone(), "count": self.count.clone(), "in_features": self.in_features}

    def load_state_dict(self, state_dict: dict) -> None:
        if int(state_dict["in_features"]) != self.in_features:
            raise ValueError(f"{self.module_name}: state for {state_dict['in_features']} channels, hook has {self.in_features}")
        self.sq_sum = state_dict["sq_sum"].to(torch.float64).clone()
        self.count = torch.as_tensor(state_dict["count"], dtype=torch.float64).clone()

    def get_progress_info(self) -> dict:
        return {}


@dataclass
class SparsifyResult:
    """Outcome of :meth:`MoEPruner.run`. ``masks`` (``sparsity/<checkpoint key>`` -> global bool
    keep-mask) and ``report`` are filled on global rank 0 only; ``local_masks`` (global module
    name -> this rank's bool keep-mask of the local weight) on every rank."""

    masks: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    local_masks: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    tokens_seen: dict = field(default_factory=dict)  # global module name -> tokens (this rank's targets)

    def save(self, path) -> Optional[str]:
        """Write ``masks`` with :func:`megatron_prune.masks.save_masks` (rank 0; others no-op)."""
        if not self.masks:
            return None
        from megatron_prune.masks import save_masks

        return str(save_masks(path, self.masks, self.manifest))


class MoEPruner:
    """Wanda / MoE-Pruner sparsity of expert linears; parameters as FusionBench's ``MoEPruner``.

    ``prune_type``: ``"unstructured"`` (``sparsity_ratio`` of every row) or ``"semistructured"``
    (``n`` zeros in every ``m`` consecutive input weights). ``gate_weighting``: weight tokens by
    their router gate (MoE-Pruner). ``calibrate_all_experts``: every expert sees every token
    (needs :func:`megatron_prune.moe.calibrate_all_experts`). ``mode``: ``"one_shot"`` or
    ``"layer_by_layer"``. ``include_dense``: also the dense MLPs (any ``MLP`` outside the routed
    experts; shared experts are covered by that rule but untested).
    ``batch_size``: micro-batch size of the calibration forwards.
    """

    def __init__(self, nsamples: int = 100, seed: int = 42, device: Optional[str] = None,
                 max_seqlen: int = 2048, prune_type: str = "unstructured", sparsity_ratio: float = 0.5,
                 n: int = 2, m: int = 4, gate_weighting: bool = False, calibrate_all_experts: bool = False,
                 mode: str = "one_shot", include_dense: bool = False, ungate_fc2: bool = False,
                 batch_size: int = 1):
        if prune_type not in ("unstructured", "semistructured"):
            raise ValueError(f"prune_type must be 'unstructured' or 'semistructured', got {prune_type!r}")
        if mode not in ("one_shot", "layer_by_layer"):
            raise ValueError(f"mode must be 'one_shot' or 'layer_by_layer', got {mode!r}")
        if prune_type == "semistructured" and not (0 <= n <= m and m >= 1):
            raise ValueError(f"invalid n:m = {n}:{m}")
        if gate_weighting and ungate_fc2:
            raise ValueError("ungate_fc2 applies to plain Wanda (gate_weighting=False) only")
        wm.prune_count(sparsity_ratio, 1)  # validates the ratio
        for name, value in (("nsamples", nsamples), ("max_seqlen", max_seqlen), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.nsamples, self.seed, self.max_seqlen = int(nsamples), int(seed), int(max_seqlen)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prune_type, self.sparsity_ratio, self.n, self.m = prune_type, float(sparsity_ratio), int(n), int(m)
        self.gate_weighting, self.calibrate_all_experts = bool(gate_weighting), bool(calibrate_all_experts)
        self.mode, self.include_dense, self.ungate_fc2 = mode, bool(include_dense), bool(ungate_fc2)
        self.batch_size = int(batch_size)

    def params(self) -> dict:
        keys = ("nsamples", "seed", "max_seqlen", "prune_type", "sparsity_ratio", "n", "m", "gate_weighting",
                "calibrate_all_experts", "mode", "include_dense", "ungate_fc2", "batch_size")
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------ forward
    def _forward(self, chunks, tokens: torch.Tensor) -> None:
        """This rank's tokens through Megatron's forward-only schedule (PP stages in order)."""
        from megatron_prune.scoring.runner import forward_only

        forward_only(chunks, tokens, self.batch_size)

    def _calibrate(self, chunks, targets, tokens) -> dict:
        """Hooks on ``targets``, one pass over ``tokens``; returns ``{name: hook}``. Collective."""
        import contextlib

        handles, hooks, taps = [], {}, {}
        try:
            for t in targets:
                tap = None
                if t.expert is not None and (self.gate_weighting or (self.ungate_fc2 and t.kind == "fc2")):
                    tap = taps.get(id(t.mlp))
                    if tap is None:
                        tap = taps[id(t.mlp)] = GateTap()
                        handles.append(t.mlp.register_forward_pre_hook(tap, with_kwargs=True))
                gate_weight = self.gate_weighting and t.expert is not None and t.kind == "fc1"
                ungate = self.ungate_fc2 and t.expert is not None and t.kind == "fc2"
                hook = WandaInputHook(t.module, tap, gate_weight=gate_weight, ungate=ungate)
                hook.module_name = t.name
                hooks[t.name] = hook
                handles.append(t.module.register_forward_hook(hook))
            ctx = contextlib.nullcontext()
            if self.calibrate_all_experts:
                ctx = _calibrate_all_experts_context(chunks)
            with torch.no_grad(), ctx:
                self._forward(chunks, tokens)
        finally:
            for h in handles:
                h.remove()
        return hooks

    # ------------------------------------------------------------------ selection
    def _reduce_stats(self, targets, hooks) -> None:
        """Sum every hook's statistics over its ``stat_groups`` (one all-reduce per group kind)."""
        from megatron_prune.distributed.reductions import all_reduce_sum

        for t in targets:
            hooks[t.name]._ensure(self.device)
        buckets: dict = {}
        for t in targets:
            buckets.setdefault(tuple(id(g) for g in t.stat_groups), (t.stat_groups, []))[1].append(t)
        for groups, members in buckets.values():
            flat = torch.cat([torch.cat([hooks[t.name].sq_sum, hooks[t.name].count.reshape(1)]) for t in members])
            for g in groups:
                flat = all_reduce_sum(flat, g)
            off = 0
            for t in members:
                h = hooks[t.name]
                c = h.in_features
                h.sq_sum, h.count = flat[off : off + c].clone(), flat[off + c].clone()
                off += c + 1

    def _prune(self, targets, hooks) -> dict:
        """Select and zero; ``{name: keep mask (local, bool)}``. Collective over row groups."""
        imps = {}
        for t in targets:
            h = hooks[t.name]
            check_finite(h.sq_sum, t.name)
            if not bool(torch.isfinite(t.weight).all()):
                raise ValueError(f"{t.name}: the weight holds NaN or inf; Wanda cannot rank it")
            imps[t.name] = wm.wanda_importance(t.weight.to(h.sq_sum.device), h.sq_sum, h.count)
        prune = {}
        if self.prune_type == "semistructured":
            for t in targets:
                wm.check_nm_shards(t.weight.shape[1], self.m, t.name)
                prune[t.name] = wm.nm_prune_mask(imps[t.name], self.n, self.m)
        else:
            from megatron_prune.distributed.reductions import group_size

            batches: dict = {}
            for t in targets:
                world = group_size(t.row_group) if t.row_group is not None else 1
                cols = t.weight.shape[1]
                k = wm.prune_count(self.sparsity_ratio, cols * world)
                key = (t.layer, id(t.row_group) if world > 1 else None, cols, k)
                batches.setdefault(key, (t.row_group if world > 1 else None, k, []))[2].append(t)
            for key in sorted(batches, key=lambda b: (b[0], b[1] is not None, b[2], b[3])):
                group, k, members = batches[key]
                stacked = torch.cat([imps[t.name] for t in members])
                if group is None:
                    sel = wm.unstructured_prune_mask(stacked, k)
                else:
                    sel = wm.distributed_row_prune_mask(stacked, k, group)
                for t, part in zip(members, sel.split([imps[t.name].shape[0] for t in members])):
                    prune[t.name] = part
        keep = {}
        with torch.no_grad():
            for t in targets:
                kp = ~prune[t.name].to(t.weight.device)
                t.weight.mul_(kp.to(t.weight.dtype))
                keep[t.name] = kp
        return keep

    # ------------------------------------------------------------------ run
    def run(self, model, data) -> SparsifyResult:
        """Sparsify ``model`` (a model chunk or the list of this rank's chunks) in place.
        ``data``: see :func:`calibration_tokens`. Collective over the whole world."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_prune.megatron.sparsity_targets import find_targets, unwrap_chunk
        from megatron_prune.scoring.runner import dp_micro_shard

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        tokens = calibration_tokens(data, self.nsamples, self.max_seqlen, self.seed)
        dp = ps.get_data_parallel_world_size()
        tokens = dp_micro_shard(tokens, self.batch_size, dp, ps.get_data_parallel_rank()).to(self.device)
        sp = bool(getattr(unwrap_chunk(chunks[0]).config, "sequence_parallel", False))
        targets = find_targets(chunks, self.include_dense, sp)
        keep: dict = {}
        tokens_seen: dict = {}
        if self.mode == "one_shot":
            steps = [targets]
        else:
            mine = sorted({t.layer for t in targets})
            everyone = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
            if dist.is_initialized():
                dist.all_gather_object(everyone, mine)
            # every rank steps through every layer (its forward is collective), targets or not
            layers = sorted({l for ls in everyone for l in ls})
            steps = [[t for t in targets if t.layer == layer] for layer in layers]
        for sub in steps:
            hooks = self._calibrate(chunks, sub, tokens)
            self._reduce_stats(sub, hooks)
            keep.update(self._prune(sub, hooks))
            tokens_seen.update({n: float(h.count) for n, h in hooks.items()})
        masks, report = _gather_global_masks(chunks, targets, keep, tokens_seen)
        manifest = {
            "source": "megatron-prune sparsify",
            "method": "moe_pruner" if self.gate_weighting else "wanda",
            "params": self.params(),
            "calibration_samples": int(tokens.shape[0] * dp),
            "seq_length": int(tokens.shape[1]),
            "sparsity_report": report,
        }
        return SparsifyResult(masks=masks, report=report, local_masks=keep, manifest=manifest,
                              tokens_seen=tokens_seen)


def _calibrate_all_experts_context(chunks):
    """:func:`megatron_prune.moe.calibrate_all_experts` over ``chunks``: after the normal expert
    computation every local expert also runs (outputs discarded) on the tokens not routed to it,
    with gate 1, so the expert hooks see every token of the layer once."""
    try:
        from megatron_prune.moe import calibrate_all_experts
    except ImportError as exc:
        raise NotImplementedError(
            "calibrate_all_experts needs megatron_prune.moe.calibrate_all_experts, which is not available"
        ) from exc
    return calibrate_all_experts(list(chunks))


def _gather_global_masks(chunks, targets, keep, tokens_seen) -> tuple:
    """Assemble global keep-masks under ``sparsity/<checkpoint key>`` on global rank 0.
    Collective over the world. Returns ``(masks, report)`` (empty off rank 0)."""
    import torch.distributed as dist

    from megatron_prune.masks import SPARSITY_PREFIX
    from megatron_prune.megatron.sparsity_targets import mask_pieces, unwrap_chunk

    sds = {}
    pieces = []
    for t in targets:
        if t.chunk not in sds:
            sds[t.chunk] = unwrap_chunk(chunks[t.chunk]).sharded_state_dict()
        for key, gshape, index, data in mask_pieces(sds[t.chunk], t, keep[t.name].cpu()):
            pieces.append((key, gshape, index, data, t.expert, t.layer, tokens_seen[t.name]))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(pieces, gathered, dst=0)
        if dist.get_rank() != 0:
            return {}, {}
        pieces = [p for part in gathered for p in part]
    masks, covered, experts, idle = {}, {}, {}, {}
    for key, gshape, index, data, expert, layer, seen in pieces:
        if key not in masks:
            masks[key] = torch.ones(gshape, dtype=torch.bool)
            covered[key] = 0
        view = masks[key][tuple(slice(o, o + s) for o, s in index)]
        view.copy_(data.reshape(view.shape))
        covered[key] += data.numel()
        experts.setdefault(key, expert is not None)
        if seen == 0:
            idle.setdefault(key, set()).add((layer, -1 if expert is None else expert))
    report = {}
    for key, mask in masks.items():
        if covered[key] != mask.numel():
            raise RuntimeError(f"{key}: masks cover {covered[key]} of {mask.numel()} elements")
        pruned = int((~mask).sum())
        entry = {"shape": list(mask.shape), "pruned": pruned, "total": mask.numel(),
                 "sparsity": pruned / mask.numel()}
        stacked = mask.dim() == (4 if experts[key] else 3)  # leading layer axis (all layers alike)
        if experts[key]:
            # [E] for per-layer keys, [L][E] for stacked ones
            per = (~mask).reshape(*mask.shape[:-2], -1).sum(-1).double() / (mask.shape[-1] * mask.shape[-2])
            entry["sparsity_per_expert"] = per.tolist()
        if key in idle:
            pairs = sorted(idle[key])
            if experts[key]:  # expert ids, or [layer, expert] pairs for a stacked key
                ids = [[l, e] for l, e in pairs] if stacked else [e for _, e in pairs]
                entry["uncalibrated_experts"] = ids
            else:  # global layer numbers
                entry["uncalibrated_layers"] = ids = [l for l, _ in pairs]
            log.warning("%s: no calibration token reached %s %s; its selection is by index order",
                        key, "experts" if experts[key] else "layers", ids)
        report[key] = entry
    return {SPARSITY_PREFIX + k: v for k, v in masks.items()}, report
