"""Synthetic ``torch_dist`` checkpoints with Megatron-Core's global key layout (no Megatron needed).

:func:`synthetic_layout` lists the keys, global shapes and ``_extra_state`` entries that
``dist_checkpointing.save`` writes for a local-spec ``GPTModel`` of ``cfg`` (the distributed
tests check it against a real checkpoint); :func:`write_synthetic_checkpoint` streams random
tensors of that layout to disk through ``torch.distributed.checkpoint`` (one tensor in memory
at a time), for the converter's error tests and benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.model_config import ModelConfig

__all__ = ["synthetic_layout", "write_synthetic_checkpoint", "te_key"]


def _layer_tensors(cfg: ModelConfig, moe: bool) -> dict:
    h, d, G, hpg = cfg.hidden_size, cfg.kv_channels, cfg.num_query_groups, cfg.heads_per_group
    glu = 2 if cfg.swiglu else 1
    out = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (G * (hpg + 2) * d, h),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
        "mlp.linear_fc1.layer_norm_weight": (h,),
    }
    if moe:
        E, F = cfg.num_moe_experts, cfg.moe_ffn_hidden_size
        out.update({"mlp.router.weight": (E, h),
                    "mlp.experts.experts.linear_fc1.weight": (E, glu * F, h),
                    "mlp.experts.experts.linear_fc2.weight": (E, h, F)})
        if cfg.moe_router_enable_expert_bias:
            out["mlp.router.expert_bias"] = (E,)
    else:
        out.update({"mlp.linear_fc1.weight": (glu * cfg.ffn_hidden_size, h),
                    "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size)})
    return out


_EXTRA = ("self_attention.linear_qkv", "self_attention.linear_proj")


def synthetic_layout(cfg: ModelConfig) -> tuple[dict, list]:
    """``({key: global shape}, [extra-state keys])`` as Megatron-Core 0.16 saves ``cfg``."""
    pattern = cfg.moe_layer_pattern()
    L = cfg.num_layers
    tensors = {"embedding.word_embeddings.weight": (cfg.vocab_size, cfg.hidden_size),
               "decoder.final_layernorm.weight": (cfg.hidden_size,)}
    if cfg.untie_embeddings_and_output_weights:
        tensors["output_layer.weight"] = (cfg.vocab_size, cfg.hidden_size)
    extras = []
    E = cfg.num_moe_experts or 0
    if len(set(pattern)) == 1:  # one layer kind: stacked keys with a leading [L] axis
        moe = pattern[0] == 1
        for name, shape in _layer_tensors(cfg, moe).items():
            tensors[f"decoder.layers.{name}"] = (L,) + shape
        mods = list(_EXTRA) + (["mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2"]
                               if moe else ["mlp.linear_fc1", "mlp.linear_fc2"])
        for mod in mods:
            if ".experts." in mod:
                extras += [f"decoder.layers.{mod}._extra_state/shard_{l}.{e}_{L}.{E}" for l in range(L)
                           for e in range(E)]
            else:
                extras += [f"decoder.layers.{mod}._extra_state/shard_{l}_{L}" for l in range(L)]
    else:
        for i, moe in enumerate(pattern):
            for name, shape in _layer_tensors(cfg, bool(moe)).items():
                tensors[f"decoder.layers.{i}.{name}"] = shape
            extras += [f"decoder.layers.{i}.{mod}._extra_state/shard_0_1" for mod in _EXTRA]
            if moe:
                extras += [f"decoder.layers.{i}.mlp.experts.experts.{m}._extra_state/shard_{e}_{E}"
                           for m in ("linear_fc1", "linear_fc2") for e in range(E)]
            else:
                extras += [f"decoder.layers.{i}.mlp.{m}._extra_state/shard_0_1" for m in ("linear_fc1", "linear_fc2")]
    return tensors, extras


def te_key(key: str, cfg: ModelConfig) -> str:
    """The Transformer-Engine-spec name of a local-spec key: an MoE layer's MLP norm is
    ``pre_mlp_layernorm.weight`` (TE fuses norms only into dense ``linear_fc1`` and ``linear_qkv``)."""
    pattern = cfg.moe_layer_pattern()
    parts = key.split(".")
    if key.endswith("mlp.linear_fc1.layer_norm_weight") and key.startswith("decoder.layers."):
        layer = parts[2]
        moe = pattern[int(layer)] == 1 if layer.isdigit() else pattern[0] == 1
        if moe:
            return key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
    return key


def write_synthetic_checkpoint(cfg: ModelConfig, root, iteration: int = 100, seed: int = 0,
                               dtype: torch.dtype = torch.float32, extra_common: Optional[dict] = None,
                               extra_state=None) -> Path:
    """Write a checkpoint root (tracker file + ``iter_XXXXXXX``) of random weights; returns the
    iteration directory. ``model_config.json`` is written into the iteration directory."""
    from megatron_prune.convert.storage import TRACKER_FILE, write_tensors

    root = Path(root)
    it = root / f"iter_{iteration:07d}"
    root.mkdir(parents=True, exist_ok=True)
    tensors, extras = synthetic_layout(cfg)
    dt = str(dtype).split(".")[-1]

    stacked = frozenset(k for k in tensors if k.startswith("decoder.layers.") and not k.split(".")[2].isdigit())

    def produce(key, offsets):
        if key not in tensors:
            return [extra_state]
        shape = tensors[key]
        layer = offsets[0] if key in stacked else 0
        if key in stacked:
            shape = (1,) + tuple(shape[1:])
        g = torch.Generator().manual_seed(seed + sum(key.encode()) * 7 + len(key) + 1000 * layer)
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    write_tensors(it, {k: (s, dt) for k, s in tensors.items()}, {k: None for k in extras}, produce, stacked)
    torch.save(dict(extra_common or {}), it / "common.pt")
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    cfg.save(it / "model_config.json")
    (root / TRACKER_FILE).write_text(f"{iteration}\n")
    return it
