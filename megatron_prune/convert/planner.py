"""Plan a checkpoint conversion from metadata and masks only (pure: no tensor data, no Megatron).

The plan is reviewable data, in the manner of ``torch.distributed.checkpoint`` save/load plans:
one frozen :class:`TensorItem` per kept checkpoint tensor with the index lists to keep along each
axis (:class:`Take`, or :class:`PerIndex` where the lists differ per layer or per expert), one
:class:`ObjectItem` per ``_extra_state`` entry (renamed when experts are renumbered), the keys
dropped (optimizer and RNG state) and the new :class:`~megatron_prune.model_config.ModelConfig`.

Global layouts handled (Megatron-Core ``torch_dist``): per-layer keys ``decoder.layers.<i>.<name>``
and layer-stacked keys ``decoder.layers.<name>`` with a leading ``[L]`` axis; experts
``[E, ...]`` under ``mlp.experts.experts``; SwiGLU ``linear_fc1`` rows ``[gate; up]``; fused QKV rows
per query group ``[q heads..., k, v]`` of ``kv_channels`` rows each; local-spec and
Transformer-Engine-spec norm names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from megatron_prune.errors import UserError
from megatron_prune.masks import SPARSITY_PREFIX, mask_kind
from megatron_prune.model_config import ModelConfig

__all__ = [
    "TensorInfo",
    "ObjectInfo",
    "Take",
    "PerIndex",
    "TensorItem",
    "ObjectItem",
    "KeepSets",
    "ConversionPlan",
    "resolve_keep",
    "make_plan",
    "is_dropped_key",
]


@dataclass(frozen=True)
class TensorInfo:
    """Global shape and dtype name (``"float32"``) of one checkpoint tensor."""

    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class ObjectInfo:
    """A non-tensor (bytes) checkpoint entry."""


@dataclass(frozen=True)
class Take:
    """Keep positions ``index`` (ascending) along ``axis``."""

    axis: int
    index: tuple


@dataclass(frozen=True)
class PerIndex:
    """Along ``axis``, apply ``parts[j]`` (a sequence of ops on the slice without ``axis``) to
    position ``j``; the slices are stacked back along ``axis``."""

    axis: int
    parts: tuple


Op = Union[Take, PerIndex]


@dataclass(frozen=True)
class TensorItem:
    key: str
    dtype: str
    src_shape: tuple
    dst_shape: tuple
    ops: tuple = ()
    sparsity: Optional[str] = None  # mask key whose False entries are zeroed before slicing
    layer_stacked: bool = False  # leading [L] axis: converted and written one layer at a time

    def layer_ops(self, layer: int) -> tuple:
        """The ops on slice ``layer`` (without the layer axis) of a layer-stacked tensor."""
        if len(self.ops) == 1 and isinstance(self.ops[0], PerIndex) and self.ops[0].axis == 0:
            return self.ops[0].parts[layer]
        if any(o.axis == 0 for o in self.ops):
            raise ValueError(f"{self.key}: the plan changes the layer axis")
        return _shift(self.ops, -1)


@dataclass(frozen=True)
class ObjectItem:
    dst_key: str
    src_key: str


@dataclass(frozen=True)
class KeepSets:
    """Resolved masks: kept index tuples (``None`` = all kept). Expert FFN lists use original ids."""

    hidden: Optional[tuple] = None
    experts: dict = field(default_factory=dict)  # layer -> tuple
    ffn: dict = field(default_factory=dict)  # layer -> tuple
    expert_ffn: dict = field(default_factory=dict)  # layer -> {expert: tuple}
    groups: dict = field(default_factory=dict)  # layer -> tuple
    new_config: Optional[ModelConfig] = None


@dataclass(frozen=True)
class ConversionPlan:
    tensors: tuple
    objects: tuple
    dropped: tuple
    old_config: ModelConfig
    new_config: ModelConfig
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        c0, c1 = self.old_config, self.new_config
        names = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "num_moe_experts", "moe_ffn_hidden_size")
        changes = [f"{n} {getattr(c0, n)} -> {getattr(c1, n)}" for n in names
                   if getattr(c0, n) != getattr(c1, n)]
        return ", ".join(changes) or "no shape changes"


_DROP_PREFIXES = ("optimizer.", "optimizer/", "rng_state")


def is_dropped_key(key: str) -> bool:
    """Optimizer and RNG entries: not carried over (the output is a model-only checkpoint)."""
    return key.startswith(_DROP_PREFIXES)


def _all(n):
    return tuple(range(n))


def _kept(mask: torch.Tensor) -> tuple:
    return tuple(int(i) for i in torch.nonzero(mask.reshape(-1)).reshape(-1))


def _uniform(kind: str, counts: dict, full: int) -> int:
    values = sorted(set(counts.values()))
    if len(values) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())[:6])
        raise UserError(
            f"{kind} counts differ ({detail}); Megatron needs the same count everywhere"
        )
    return values[0] if values else full


def _check_div(what: str, n: int, by: Optional[int], name: str):
    if by and n % by:
        raise UserError(f"{what} = {n} is not divisible by the target {name} = {by}")


def resolve_keep(cfg: ModelConfig, masks: dict, target_tp=None, target_ep=None, target_etp=None) -> KeepSets:
    """Check structural masks against ``cfg`` (sizes, uniformity, top-k, divisibility) and
    return the kept index lists and the new model config."""
    pattern = cfg.moe_layer_pattern()
    E, F, Fm = cfg.num_moe_experts or 0, cfg.ffn_hidden_size, cfg.moe_ffn_hidden_size or 0
    G, h = cfg.num_query_groups, cfg.hidden_size
    keep = dict(hidden=None, experts={}, ffn={}, expert_ffn={}, groups={})
    for key, m in masks.items():
        kind, layer = mask_kind(key)
        if kind == "sparsity":
            continue
        if kind != "hidden" and not 0 <= layer < cfg.num_layers:
            raise UserError(f"mask {key}: the model has layers 0..{cfg.num_layers - 1}")
        is_moe = kind != "hidden" and pattern[layer] == 1
        if kind in ("experts", "expert_ffn") and not is_moe:
            raise UserError(f"mask {key}: layer {layer} is not an MoE layer")
        if kind == "ffn" and is_moe:
            raise UserError(f"mask {key}: layer {layer} is an MoE layer (use ...mlp.experts.ffn)")
        want = {"hidden": (h,), "experts": (E,), "ffn": (F,), "expert_ffn": (E, Fm),
                "query_groups": (G,)}[kind]
        if tuple(m.shape) != want:
            raise UserError(f"mask {key} has shape {list(m.shape)}, the model needs {list(want)}")
        if kind == "hidden":
            keep["hidden"] = _kept(m)
        elif kind == "expert_ffn":
            keep["expert_ffn"][layer] = {e: _kept(m[e]) for e in range(E)}
        else:
            keep["groups" if kind == "query_groups" else kind][layer] = _kept(m)
    moe_layers = [i for i, p in enumerate(pattern) if p]
    dense_layers = [i for i, p in enumerate(pattern) if not p]
    n_exp = _uniform("kept expert", {f"layer {i}": len(keep["experts"].get(i, _all(E)))
                                     for i in moe_layers}, E)
    n_ffn = _uniform("dense FFN channel", {f"layer {i}": len(keep["ffn"].get(i, _all(F)))
                                           for i in dense_layers}, F)
    n_moe_ffn = _uniform("expert FFN channel", {
        f"layer {i} expert {e}": len(keep["expert_ffn"].get(i, {}).get(e, _all(Fm)))
        for i in moe_layers for e in keep["experts"].get(i, _all(E))}, Fm)
    n_grp = _uniform("query group", {f"layer {i}": len(keep["groups"].get(i, _all(G)))
                                     for i in range(cfg.num_layers)}, G)
    n_hid = len(keep["hidden"]) if keep["hidden"] is not None else h
    if moe_layers:
        if n_exp < cfg.moe_router_topk:
            raise UserError(f"keeping {n_exp} experts, fewer than the router top-k {cfg.moe_router_topk}")
        ng = cfg.moe_router_num_groups
        if ng:
            size = E // ng
            for i in moe_layers:
                per = [sum(1 for e in keep["experts"].get(i, _all(E)) if e // size == g) for g in range(ng)]
                if len(set(per)) > 1:
                    raise UserError(
                        f"layer {i} keeps {per} experts in its {ng} router groups; group-limited "
                        "routing needs the same count in every group"
                    )
        _check_div("kept experts", n_exp, target_ep, "EP")
        _check_div("expert FFN size", n_moe_ffn, target_etp or target_tp, "expert TP")
    _check_div("dense FFN size", n_ffn, target_tp, "TP")
    _check_div("query groups", n_grp, target_tp, "TP")
    new = cfg.replace(
        hidden_size=n_hid,
        num_query_groups=n_grp,
        num_attention_heads=n_grp * cfg.heads_per_group,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=n_ffn,
        num_moe_experts=n_exp if cfg.num_moe_experts else cfg.num_moe_experts,
        moe_ffn_hidden_size=n_moe_ffn if cfg.num_moe_experts else cfg.moe_ffn_hidden_size,
    )
    return KeepSets(new_config=new, **keep)


# ----------------------------------------------------------------------------- per-key rules
_HIDDEN_VECTORS = (
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
    "input_layernorm.weight", "input_layernorm.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
    "self_attention.linear_proj.bias", "mlp.linear_fc2.bias", "mlp.shared_experts.linear_fc2.bias",
)
_UNCHANGED = ("self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
              "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
              "mlp.shared_experts.linear_fc1.bias")
_TOP_LEVEL = {
    "embedding.word_embeddings.weight": ("vh", 1),
    "embedding.position_embeddings.weight": ("vh", 1),
    "output_layer.weight": ("vh", 1),
    "output_layer.bias": (None, None),
    "decoder.final_layernorm.weight": ("h", 0),
    "decoder.final_layernorm.bias": ("h", 0),
}


class _Layer:
    """Index lists of one layer, and the expected per-layer shape of each known tensor."""

    def __init__(self, cfg: ModelConfig, keep: KeepSets, i: int):
        self.cfg, self.i = cfg, i
        self.moe = cfg.moe_layer_pattern()[i] == 1
        c = cfg
        d, hpg = c.kv_channels, c.heads_per_group
        E, Fm, F = c.num_moe_experts or 0, c.moe_ffn_hidden_size or 0, c.ffn_hidden_size
        self.h = keep.hidden
        g = keep.groups.get(i)
        self.qkv_rows = None if g is None else tuple(
            gi * (hpg + 2) * d + j for gi in g for j in range((hpg + 2) * d))
        self.proj_cols = None if g is None else tuple(
            (gi * hpg + k) * d + j for gi in g for k in range(hpg) for j in range(d))
        self.fc1 = self._glu(keep.ffn.get(i), F)
        self.fc2 = keep.ffn.get(i)
        self.experts = keep.experts.get(i)
        ef = keep.expert_ffn.get(i, {})
        kept_e = self.experts if self.experts is not None else _all(E)
        self.e_fc1 = [self._glu(ef.get(e), Fm) for e in kept_e]
        self.e_fc2 = [ef.get(e) for e in kept_e]
        fc1_out = (2 if c.swiglu else 1)
        S = c.moe_shared_expert_intermediate_size or 0
        R = c.num_query_groups * (hpg + 2) * d
        H = c.hidden_size
        self.expected = {
            "self_attention.linear_qkv.weight": (R, H), "self_attention.linear_qkv.bias": (R,),
            "self_attention.linear_proj.weight": (H, c.num_attention_heads * d),
            "mlp.router.weight": (E, H), "mlp.router.bias": (E,), "mlp.router.expert_bias": (E,),
            "mlp.experts.experts.linear_fc1.weight": (E, fc1_out * Fm, H),
            "mlp.experts.experts.linear_fc1.bias": (E, fc1_out * Fm),
            "mlp.experts.experts.linear_fc2.weight": (E, H, Fm),
            "mlp.experts.experts.linear_fc2.bias": (E, H),
            "mlp.shared_experts.linear_fc1.weight": (fc1_out * S, H),
            "mlp.shared_experts.linear_fc1.bias": (fc1_out * S,),
            "mlp.shared_experts.linear_fc2.weight": (H, S),
            "mlp.shared_experts.gate_weight": (1, H),
        }
        if not self.moe:
            self.expected.update({"mlp.linear_fc1.weight": (fc1_out * F, H),
                                  "mlp.linear_fc1.bias": (fc1_out * F,),
                                  "mlp.linear_fc2.weight": (H, F)})
        for name in _HIDDEN_VECTORS:
            self.expected[name] = (H,)
        for name in _UNCHANGED:
            self.expected[name] = None

    def _glu(self, ch, n):
        if ch is None or not self.cfg.swiglu:
            return ch
        return tuple(ch) + tuple(n + c for c in ch)

    def ops(self, name: str, shape: tuple, key: str) -> tuple:
        if name not in self.expected:
            kind = "MoE" if self.moe else "dense"
            raise UserError(f"unknown checkpoint key {key} (not a known tensor of a {kind} layer)")
        want = self.expected[name]
        if want is not None and tuple(shape) != want:
            raise UserError(
                f"checkpoint tensor {key} has shape {list(shape)} but the model config implies "
                f"{list(want)} (config mismatch)"
            )
        if name in _UNCHANGED:
            return ()
        t = _takes
        if name in _HIDDEN_VECTORS:
            return t((0, self.h))
        if name == "mlp.experts.experts.linear_fc2.bias":
            return t((0, self.experts), (1, self.h))
        if name == "self_attention.linear_qkv.weight":
            return t((0, self.qkv_rows), (1, self.h))
        if name == "self_attention.linear_qkv.bias":
            return t((0, self.qkv_rows))
        if name == "self_attention.linear_proj.weight":
            return t((0, self.h), (1, self.proj_cols))
        if name == "mlp.linear_fc1.weight":
            return t((0, self.fc1), (1, self.h))
        if name == "mlp.linear_fc1.bias":
            return t((0, self.fc1))
        if name == "mlp.linear_fc2.weight":
            return t((0, self.h), (1, self.fc2))
        if name == "mlp.router.weight":
            return t((0, self.experts), (1, self.h))
        if name in ("mlp.router.bias", "mlp.router.expert_bias"):
            return t((0, self.experts))
        if name == "mlp.experts.experts.linear_fc1.weight":
            return t((0, self.experts)) + _per_index(0, [t((0, r)) for r in self.e_fc1]) + t((2, self.h))
        if name == "mlp.experts.experts.linear_fc1.bias":
            return t((0, self.experts)) + _per_index(0, [t((0, r)) for r in self.e_fc1])
        if name == "mlp.experts.experts.linear_fc2.weight":
            return t((0, self.experts), (1, self.h)) + _per_index(0, [t((1, r)) for r in self.e_fc2])
        if name in ("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.gate_weight"):
            return t((1, self.h))
        if name == "mlp.shared_experts.linear_fc2.weight":
            return t((0, self.h))
        raise AssertionError(name)  # pragma: no cover - every expected name is handled above


def _takes(*pairs) -> tuple:
    return tuple(Take(a, tuple(ix)) for a, ix in pairs if ix is not None)


def _shift(ops: tuple, by: int) -> tuple:
    return tuple(Take(o.axis + by, o.index) if isinstance(o, Take) else PerIndex(o.axis + by, o.parts)
                 for o in ops)


def _per_index(axis: int, parts: list) -> tuple:
    """``PerIndex`` over ``parts``, or the shared ops shifted past ``axis`` when all are equal."""
    parts = [tuple(p) for p in parts]
    if not parts or all(not p for p in parts):
        return ()
    if all(p == parts[0] for p in parts):
        return tuple(Take(o.axis + (o.axis >= axis), o.index) if isinstance(o, Take)
                     else PerIndex(o.axis + (o.axis >= axis), o.parts) for o in parts[0])
    return (PerIndex(axis, tuple(parts)),)


def _apply_shape(shape: tuple, ops: tuple) -> tuple:
    shape = list(shape)
    for o in ops:
        if isinstance(o, Take):
            shape[o.axis] = len(o.index)
        else:
            subs = {_apply_shape(tuple(shape[: o.axis] + shape[o.axis + 1:]), p) for p in o.parts}
            if len(subs) != 1:
                raise UserError("the masks give different sizes to slices of one tensor")
            sub = list(subs.pop())
            shape = sub[: o.axis] + [len(o.parts)] + sub[o.axis:]
    return tuple(shape)


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SHARD_RE = re.compile(r"^(.*)/shard_([\d.]+)_([\d.]+)$")


def _object_items(key: str, cfg: ModelConfig, keep: KeepSets) -> list:
    m = _SHARD_RE.match(key)
    if not m or not m.group(1).endswith("._extra_state"):
        raise UserError(f"unknown non-tensor checkpoint entry {key}")
    module, offs, shape = m.group(1), m.group(2).split("."), m.group(3).split(".")
    if ".mlp.experts.experts." not in module:
        return [ObjectItem(key, key)]
    lm = _LAYER_RE.match(module)
    layer = int(lm.group(1)) if lm else int(offs[0])
    kept = keep.experts.get(layer)
    if kept is None:
        return [ObjectItem(key, key)]
    e = int(offs[-1])
    if e not in kept:
        return []
    offs[-1], shape[-1] = str(kept.index(e)), str(len(kept))
    return [ObjectItem(f"{module}/shard_{'.'.join(offs)}_{'.'.join(shape)}", key)]


_REQUIRED_DENSE = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                   "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_REQUIRED_MOE = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.router.weight",
                 "mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight")


def _check_complete(keys: set, cfg: ModelConfig, layers: list) -> None:
    """Every layer of ``cfg`` has its weights in the checkpoint (else the config does not match)."""
    for ly in layers:
        for name in _REQUIRED_MOE if ly.moe else _REQUIRED_DENSE:
            if f"decoder.layers.{ly.i}.{name}" not in keys and f"decoder.layers.{name}" not in keys:
                raise UserError(f"the checkpoint lacks decoder.layers.{ly.i}.{name} that the model config "
                                f"implies ({cfg.num_layers} layers; config mismatch)")
    if "embedding.word_embeddings.weight" not in keys:
        raise UserError("the checkpoint lacks embedding.word_embeddings.weight")


def make_plan(entries: dict, cfg: ModelConfig, masks: dict, *, sparsity_shapes: Optional[dict] = None,
              target_tp=None, target_ep=None, target_etp=None) -> ConversionPlan:
    """Plan the conversion of a checkpoint described by ``entries`` (``{key: TensorInfo |
    ObjectInfo}``, from its metadata) under ``masks``; UserError on any inconsistency."""
    keep = resolve_keep(cfg, masks, target_tp, target_ep, target_etp)
    layers = [_Layer(cfg, keep, i) for i in range(cfg.num_layers)]
    sparsity_keys = {k[len(SPARSITY_PREFIX):]: k for k in masks if k.startswith(SPARSITY_PREFIX)}
    sparsity_shapes = dict(sparsity_shapes or {})
    tensors, objects, dropped = [], [], []
    before = after = 0
    for key in sorted(entries):
        info = entries[key]
        if is_dropped_key(key):
            dropped.append(key)
            before += info.nbytes if isinstance(info, TensorInfo) else 0
            continue
        if isinstance(info, ObjectInfo):
            objects.extend(_object_items(key, cfg, keep))
            continue
        shape = tuple(info.shape)
        lm = _LAYER_RE.match(key)
        if key in _TOP_LEVEL:
            kind, axis = _TOP_LEVEL[key]
            want_h = shape[axis] if axis is not None else None
            if axis is not None and want_h != cfg.hidden_size:
                raise UserError(f"checkpoint tensor {key} has shape {list(shape)} but the model config "
                                f"has hidden_size {cfg.hidden_size} (config mismatch)")
            if key != "output_layer.bias" and kind == "vh" and shape[0] < cfg.vocab_size and "word" in key:
                raise UserError(f"checkpoint tensor {key} has {shape[0]} rows, fewer than the vocabulary "
                                f"size {cfg.vocab_size} (config mismatch)")
            ops = _takes((axis, keep.hidden)) if axis is not None else ()
        elif lm:
            i = int(lm.group(1))
            if i >= cfg.num_layers:
                raise UserError(f"checkpoint key {key} names layer {i}; the config has {cfg.num_layers}")
            ops = layers[i].ops(lm.group(2), shape, key)
        elif key.startswith("decoder.layers."):
            name = key[len("decoder.layers."):]
            if shape[0] != cfg.num_layers:
                raise UserError(f"stacked checkpoint tensor {key} has {shape[0]} layers; the config "
                                f"has {cfg.num_layers} (config mismatch)")
            kinds = {ly.moe for ly in layers}
            if len(kinds) != 1:
                raise UserError(f"layer-stacked key {key} but the config mixes dense and MoE layers")
            ops = _per_index(0, [ly.ops(name, shape[1:], key) for ly in layers])
        else:
            raise UserError(f"unknown checkpoint key {key}")
        sp = sparsity_keys.pop(key, None)
        if sp is not None:
            sshape = tuple(masks[sp].shape) if masks[sp].dtype == torch.bool else tuple(
                sparsity_shapes.get(key, ()))
            if sshape != shape:
                raise UserError(f"sparsity mask for {key} has shape {list(sshape)}, the tensor {list(shape)}")
        dst = _apply_shape(shape, ops)
        stacked = key.startswith("decoder.layers.") and not lm and len(shape) > 1
        item = TensorItem(key, info.dtype, shape, dst, ops, sp, stacked)
        tensors.append(item)
        before += info.nbytes
        after += TensorInfo(dst, info.dtype).nbytes
    _check_complete({t.key for t in tensors}, cfg, layers)
    if sparsity_keys:
        raise UserError(f"sparsity mask for {sorted(sparsity_keys)[0]}: no such checkpoint tensor")
    if not tensors:
        raise UserError("the checkpoint holds no model tensors")
    return ConversionPlan(tuple(tensors), tuple(objects), tuple(dropped), cfg, keep.new_config,
                          before, after)
