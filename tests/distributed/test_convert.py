"""Acceptance of ``megatron-prune convert`` on real Megatron-Core checkpoints (gloo, CPU).

A TINY_MOE-like model (MoE + GQA + SwiGLU + RMSNorm, local spec) is saved with
``dist_checkpointing.save`` at TP=2/EP=2 (ETP=1, 2 ranks); the converted checkpoint is loaded with
``dist_checkpointing.load`` into a model built from the written ``model_config.json`` at TP=1 and
at TP=2/EP=2, and its logits are compared with independent references:

* experts / FFN channels / query groups: the original model with the dropped parts unreachable
  (router logits of dropped experts at -inf) or zeroed (FFN rows and columns; ``linear_proj``
  columns of the dropped group's query heads) - the identical function;
* hidden channels as well: a TP=1 model of the new config whose weights the test copies by index
  from the original modules.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout
from megatron_prune.testing.models import TINY_MOE, forward_logits, load_model, token_batch

UNIFORM_MOE = TINY_MOE.replace(num_layers=2, moe_layer_freq=1)
BIASED_MOE = TINY_MOE.replace(add_bias_linear=True)
SHARED_MOE = TINY_MOE.replace(moe_shared_expert_intermediate_size=32, moe_router_enable_expert_bias=True,
                              moe_router_score_function="sigmoid")
CONFIGS = [(TINY_MOE, "mixed"), (UNIFORM_MOE, "uniform"), (BIASED_MOE, "biased"), (SHARED_MOE, "shared")]
TP2EP2 = ParallelLayout(tp=2, ep=2, etp=1)


# ----------------------------------------------------------------------------- worker functions
def save_at_layout(cfg, ref_dir, out_dir, layout):
    """Collective: reference weights (TP=1, fixed seed; norms, biases and expert biases set to
    random values so that slicing them wrongly shows) saved, then re-saved from ``layout``."""
    from megatron.core import dist_checkpointing

    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel

    initialize_parallel(ParallelLayout(), seed=1234)
    model = build_gpt_model(cfg, ParallelLayout())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.05 * noise)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=g))
    for d in (ref_dir, out_dir):
        if torch.distributed.get_rank() == 0:
            os.makedirs(d, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ref_dir)
    torch.distributed.barrier()
    chunks = load_model(cfg, layout, ref_dir)
    dist_checkpointing.save(chunks[0].sharded_state_dict(), out_dir)
    torch.distributed.barrier()
    return True


def _unreachable_reference(cfg, ref_dir, keep, tokens):
    """The original model, dropped experts unreachable and dropped channels/groups zeroed."""
    model = load_model(cfg, ParallelLayout(), ref_dir)[0]
    d, hpg, F = cfg.kv_channels, cfg.heads_per_group, cfg.ffn_hidden_size
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            g = keep["groups"].get(i)
            if g is not None:
                for grp in set(range(cfg.num_query_groups)) - set(g):
                    layer.self_attention.linear_proj.weight[:, grp * hpg * d:(grp + 1) * hpg * d] = 0
            mlp = layer.mlp
            if hasattr(mlp, "router"):
                dropped = sorted(set(range(cfg.num_moe_experts)) - set(keep["experts"].get(i, [])))
                if dropped:
                    orig = mlp.router.gating
                    idx = torch.tensor(dropped)
                    mlp.router.gating = lambda x, orig=orig, idx=idx: orig(x).index_fill(-1, idx, float("-inf"))
                Fm = cfg.moe_ffn_hidden_size
                for e, ch in keep["expert_ffn"].get(i, {}).items():
                    ex = mlp.experts.local_experts[e]
                    drop = torch.tensor(sorted(set(range(Fm)) - set(ch)), dtype=torch.long)
                    ex.linear_fc1.weight[drop] = 0
                    ex.linear_fc1.weight[drop + Fm] = 0
                    ex.linear_fc2.weight[:, drop] = 0
                    if ex.linear_fc1.bias is not None:
                        ex.linear_fc1.bias[torch.cat([drop, drop + Fm])] = 0
            elif i in keep["ffn"]:
                drop = torch.tensor(sorted(set(range(F)) - set(keep["ffn"][i])), dtype=torch.long)
                mlp.linear_fc1.weight[drop] = 0
                mlp.linear_fc1.weight[drop + F] = 0
                mlp.linear_fc2.weight[:, drop] = 0
                if mlp.linear_fc1.bias is not None:
                    mlp.linear_fc1.bias[torch.cat([drop, drop + F])] = 0
    return forward_logits(model, tokens)


def _sliced_reference(cfg, new_cfg, ref_dir, keep, tokens):
    """A TP=1 model of ``new_cfg`` with weights copied by index from the original modules."""
    from megatron_prune.megatron.model import build_gpt_model

    orig = load_model(cfg, ParallelLayout(), ref_dir)[0]
    src = dict(orig.named_parameters())
    new = build_gpt_model(new_cfg, ParallelLayout())
    d, hpg = cfg.kv_channels, cfg.heads_per_group
    H = torch.tensor(keep["hidden"])
    L = lambda xs: torch.tensor(list(xs), dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        for name, p in new.named_parameters():
            parts = name.split(".")
            i = int(parts[2]) if name.startswith("decoder.layers.") else None
            sname = name
            if ".local_experts." in name:
                j = int(parts[parts.index("local_experts") + 1])
                e = keep["experts"][i][j]
                sname = name.replace(f"local_experts.{j}.", f"local_experts.{e}.")
            w = src[sname]
            groups = keep["groups"].get(i, range(cfg.num_query_groups)) if i is not None else None
            qkv_rows = L(g * (hpg + 2) * d + r for g in groups for r in range((hpg + 2) * d)) if i is not None else None
            if name.endswith("layernorm.weight") or name.endswith("linear_fc2.bias") or name.endswith("linear_proj.bias"):
                w = w[H]
            elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                w = w[:, H]
            elif name.endswith("linear_qkv.weight"):
                w = w[qkv_rows][:, H]
            elif name.endswith("linear_qkv.bias"):
                w = w[qkv_rows]
            elif name.endswith("linear_proj.weight"):
                cols = [g * hpg * d + c for g in groups for c in range(hpg * d)]
                w = w[H][:, L(cols)]
            elif name.endswith("router.weight"):
                w = w[L(keep["experts"][i])][:, H]
            elif name.endswith("router.bias"):
                w = w[L(keep["experts"][i])]
            elif ".shared_experts." in name:
                w = w[:, H] if "fc1" in name else w[H]
            elif ".local_experts." in name:
                Fm = cfg.moe_ffn_hidden_size
                ch = L(keep["expert_ffn"][i][e])
                rows = torch.cat([ch, ch + Fm])
                if name.endswith("fc1.bias"):
                    w = w[rows]
                else:
                    w = w[rows][:, H] if "fc1" in name else w[H][:, ch]
            elif name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias"):
                ch = L(keep["ffn"][i])
                w = w[torch.cat([ch, ch + cfg.ffn_hidden_size])]
                w = w[:, H] if w.dim() == 2 else w
            elif name.endswith("mlp.linear_fc2.weight"):
                w = w[H][:, L(keep["ffn"][i])]
            else:
                raise AssertionError(f"test does not know how to slice {name}")
            assert w.shape == p.shape, (name, w.shape, p.shape)
            p.copy_(w)
        src_buf = dict(orig.named_buffers())
        for name, b in new.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(src_buf[name][L(keep["experts"][int(name.split(".")[2])])])
    return forward_logits(new, tokens)


def compare_converted(cfg, ref_dir, conv_dir, keep, reference):
    """Collective: reference logits at TP=1 and converted logits at TP=1 and TP=2/EP=2 (ETP=1)."""
    new_cfg = ModelConfig.load(Path(conv_dir) / "model_config.json")
    tokens = token_batch(2, 16, cfg.vocab_size, seed=3)
    if reference == "unreachable":
        ref = _unreachable_reference(cfg, ref_dir, keep, tokens)
    else:
        ref = _sliced_reference(cfg, new_cfg, ref_dir, keep, tokens)
    out = {"ref": ref, "orig": forward_logits(load_model(cfg, ParallelLayout(), ref_dir)[0], tokens)}
    for name, layout in (("tp1", ParallelLayout()), ("tp2ep2", TP2EP2)):
        model = load_model(new_cfg, layout, conv_dir)[0]
        out[name] = forward_logits(model, tokens)
    return out


# ----------------------------------------------------------------------------- helpers
def _masks(cfg, with_hidden: bool):
    """Masks dropping 2 of 4 experts (different per layer), FFN and expert-FFN channels (different
    per expert), one of two query groups (different per layer) and, optionally, 4 hidden channels."""
    g = torch.Generator().manual_seed(7)
    masks, keep = {}, {"experts": {}, "ffn": {}, "expert_ffn": {}, "groups": {}, "hidden": None}
    E, Fm, F = cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.ffn_hidden_size
    for i, moe in enumerate(cfg.moe_layer_pattern()):
        grp = torch.tensor([i % 2 == 0, i % 2 == 1])
        masks[f"decoder.layers.{i}.self_attention.query_groups"] = grp
        keep["groups"][i] = [int(x) for x in torch.nonzero(grp).flatten()]
        if moe:
            kept = sorted([i % E, (i + 1) % E]) if i % 2 else [0, 3]
            em = torch.zeros(E, dtype=torch.bool)
            em[kept] = True
            masks[f"decoder.layers.{i}.mlp.experts"] = em
            keep["experts"][i] = kept
            fm = torch.zeros(E, Fm, dtype=torch.bool)
            keep["expert_ffn"][i] = {}
            for e in range(E):
                ch = sorted(torch.randperm(Fm, generator=g)[:12].tolist())
                fm[e, ch] = True
                keep["expert_ffn"][i][e] = ch
            masks[f"decoder.layers.{i}.mlp.experts.ffn"] = fm
        else:
            ch = sorted(torch.randperm(F, generator=g)[:32].tolist())
            fmask = torch.zeros(F, dtype=torch.bool)
            fmask[ch] = True
            masks[f"decoder.layers.{i}.mlp.ffn"] = fmask
            keep["ffn"][i] = ch
    if with_hidden:
        hm = torch.ones(cfg.hidden_size, dtype=torch.bool)
        hm[[1, 8, 9, 30]] = False
        masks["hidden"] = hm
        keep["hidden"] = [int(x) for x in torch.nonzero(hm).flatten()]
    return masks, keep


def _saved(pool2, session_tmp, cfg, name):
    ref = os.path.join(session_tmp, f"convert_ref_{name}")
    src = os.path.join(session_tmp, f"convert_src_{name}")
    if not os.path.exists(os.path.join(src, ".metadata")):
        pool2.run(save_at_layout, cfg, ref, src, TP2EP2)
        cfg.save(os.path.join(src, "model_config.json"))
    return ref, src


def _convert(src, masks, dst, *extra):
    from megatron_prune.cli import main
    from megatron_prune.masks import save_masks

    mpath = str(dst) + ".masks.safetensors"
    save_masks(mpath, masks, {"source": "test"})
    assert main(["convert", "--load", src, "--masks", mpath, "--save", str(dst), "--verify",
                 "--no-progress", *extra]) == 0


def _assert_close(out, what):
    changed = (out["orig"] - out["ref"]).abs().max().item()
    print(f"{what}: pruning changed the logits by up to {changed:.3g}")
    assert changed > 1e-3, f"{what}: the masks hardly change the model ({changed:.3g}); the check would be weak"
    for name in ("tp1", "tp2ep2"):
        diff = (out[name] - out["ref"]).abs().max().item()
        scale = out["ref"].abs().max().item()
        print(f"{what} {name}: max |diff| {diff:.3g} (logit scale {scale:.3g})")
        assert diff <= 1e-5 * max(scale, 1.0), f"{what} {name}: max |diff| {diff:.3g} (logit scale {scale:.3g})"


# ----------------------------------------------------------------------------- tests
def test_synthetic_layout_matches_real_checkpoint(pool2, session_tmp):
    from megatron_prune.convert.planner import TensorInfo
    from megatron_prune.convert.storage import read_entries
    from megatron_prune.testing.checkpoints import synthetic_layout

    for cfg, name in ((TINY_MOE, "mixed"), (UNIFORM_MOE, "uniform")):
        _, src = _saved(pool2, session_tmp, cfg, name)
        entries = read_entries(src)
        tensors, extras = synthetic_layout(cfg)
        assert {k: v.shape for k, v in entries.items() if isinstance(v, TensorInfo)} == tensors
        assert sorted(k for k, v in entries.items() if not isinstance(v, TensorInfo)) == sorted(extras)


@pytest.mark.parametrize("cfg,name", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_convert_structures_equal_unreachable_reference(pool2, session_tmp, cfg, name):
    ref, src = _saved(pool2, session_tmp, cfg, name)
    masks, keep = _masks(cfg, with_hidden=False)
    dst = Path(session_tmp) / f"conv_struct_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    _convert(src, masks, dst)
    new_cfg = ModelConfig.load(dst / "model_config.json")
    assert (new_cfg.num_moe_experts, new_cfg.moe_ffn_hidden_size, new_cfg.num_query_groups,
            new_cfg.num_attention_heads, new_cfg.kv_channels) == (2, 12, 1, 2, cfg.kv_channels)
    if cfg is not UNIFORM_MOE:
        assert new_cfg.ffn_hidden_size == 32
    out = pool2.run(compare_converted, cfg, ref, str(dst), keep, "unreachable")[0]
    _assert_close(out, f"{name} structures")


@pytest.mark.parametrize("cfg,name", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_convert_all_masks_equal_sliced_reference(pool2, session_tmp, cfg, name):
    ref, src = _saved(pool2, session_tmp, cfg, name)
    masks, keep = _masks(cfg, with_hidden=True)
    dst = Path(session_tmp) / f"conv_all_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    _convert(src, masks, dst)
    assert ModelConfig.load(dst / "model_config.json").hidden_size == cfg.hidden_size - 4
    out = pool2.run(compare_converted, cfg, ref, str(dst), keep, "sliced")[0]
    _assert_close(out, f"{name} all masks")


def test_convert_transformer_engine_key_names(pool2, session_tmp):
    """TE-spec names (an MoE layer's norm as ``pre_mlp_layernorm.weight``) and non-empty
    extra states: the conversion equals the local-spec one key by key, extra states follow their
    experts."""
    from megatron_prune.convert.planner import TensorInfo
    from megatron_prune.convert.storage import CheckpointReader, read_entries, write_tensors
    from megatron_prune.testing.checkpoints import te_key

    cfg = TINY_MOE
    _, src = _saved(pool2, session_tmp, cfg, "mixed")
    entries = read_entries(src)
    reader = CheckpointReader(src)
    te_src = Path(session_tmp) / "te_src"
    shutil.rmtree(te_src, ignore_errors=True)
    rename = {k: te_key(k, cfg) for k in entries}
    back = {v: k for k, v in rename.items()}
    assert sum(k != v for k, v in rename.items()) == 3  # the three MoE layers' norms

    def produce(key, offsets):
        k = back[key]
        if isinstance(entries[k], TensorInfo):
            return reader.read_tensor(k, entries[k])
        return [f"fp8-meta of {k}".encode()]  # TE stores real extra state; it must follow its owner

    write_tensors(te_src, {rename[k]: (v.shape, v.dtype) for k, v in entries.items() if isinstance(v, TensorInfo)},
                  {rename[k]: None for k, v in entries.items() if not isinstance(v, TensorInfo)}, produce)
    shutil.copy(Path(src) / "common.pt", te_src / "common.pt")
    shutil.copy(Path(src) / "metadata.json", te_src / "metadata.json")
    cfg.save(te_src / "model_config.json")

    masks, keep = _masks(cfg, with_hidden=True)
    dst_local, dst_te = Path(session_tmp) / "te_cmp_local", Path(session_tmp) / "te_cmp_te"
    for d in (dst_local, dst_te):
        shutil.rmtree(d, ignore_errors=True)
    _convert(src, masks, dst_local)
    _convert(str(te_src), masks, dst_te)
    local, te = read_entries(dst_local), read_entries(dst_te)
    assert {te_key(k, cfg) for k in local} == set(te)
    r_local, r_te = CheckpointReader(dst_local), CheckpointReader(dst_te)
    for k, info in local.items():
        if isinstance(info, TensorInfo):
            assert te[te_key(k, cfg)] == info
            assert torch.equal(r_local.read_tensor(k, info), r_te.read_tensor(te_key(k, cfg), info)), k
    # expert extra state renumbered with its expert: new expert j of layer 1 is old keep[1][j]
    for j, e in enumerate(keep["experts"][1]):
        key = f"decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_{j}_2"
        old = f"decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_{e}_4"
        assert r_te.read_object(key) == [f"fp8-meta of {old}".encode()]
