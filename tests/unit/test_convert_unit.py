"""Converter pieces without Megatron: plan ops, the applier, stacked layouts, sparsity, common.pt args."""

import argparse
from pathlib import Path

import torch

from megatron_prune.cli import main
from megatron_prune.convert.applier import apply_ops
from megatron_prune.convert.planner import PerIndex, Take, TensorInfo, make_plan
from megatron_prune.convert.storage import CheckpointReader, read_common, read_entries
from megatron_prune.masks import save_masks
from megatron_prune.model_config import ModelConfig
from megatron_prune.testing.checkpoints import synthetic_layout, write_synthetic_checkpoint
from megatron_prune.testing.models import TINY_MOE

UNIFORM = TINY_MOE.replace(num_layers=2, moe_layer_freq=1, moe_router_enable_expert_bias=True,
                           moe_router_score_function="sigmoid")


def test_apply_ops_per_index():
    t = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    ops = (Take(1, (0, 2)), PerIndex(0, ((Take(1, (1, 3)),), (Take(1, (0, 1)),))))
    out = apply_ops(t, ops)
    assert out.shape == (2, 2, 2)
    assert torch.equal(out[0], t[0][[0, 2]][:, [1, 3]]) and torch.equal(out[1], t[1][[0, 2]][:, [0, 1]])


def test_apply_ops_per_index_adjacent_gather():
    t = torch.randn(4, 6, 5)
    rows = ((0, 2, 5), (1, 2, 3), (4, 5, 0))
    ops = (Take(0, (0, 1, 3)), PerIndex(0, tuple((Take(0, r),) for r in rows)), Take(2, (1, 4)))
    ref = torch.stack([t[e][list(r)] for e, r in zip((0, 1, 3), rows)])[:, :, [1, 4]]
    assert torch.equal(apply_ops(t, ops), ref)
    uneven = (PerIndex(0, ((Take(0, (0, 1)),), (Take(0, (2,)),))),)  # slices of different lengths
    try:
        apply_ops(t[:2], uneven)
        raise AssertionError("stacking slices of different lengths must fail")
    except RuntimeError:
        pass


def test_plan_collapses_uniform_per_layer_ops():
    tensors, extras = synthetic_layout(UNIFORM)
    entries = {k: TensorInfo(s, "float32") for k, s in tensors.items()}
    masks = {"hidden": torch.arange(32) % 4 != 0}  # same in every layer -> plain Takes
    plan = make_plan(entries, UNIFORM, masks)
    qkv = next(t for t in plan.tensors if t.key == "decoder.layers.self_attention.linear_qkv.weight")
    assert all(isinstance(o, Take) for o in qkv.ops) and qkv.dst_shape == (2, 64, 24)
    masks["decoder.layers.0.mlp.experts"] = torch.tensor([True, False, True, False])
    masks["decoder.layers.1.mlp.experts"] = torch.tensor([False, True, True, False])
    plan = make_plan(entries, UNIFORM, masks)
    router = next(t for t in plan.tensors if t.key == "decoder.layers.mlp.router.weight")
    assert isinstance(router.ops[0], PerIndex) and router.dst_shape == (2, 2, 24)
    assert plan.new_config.num_moe_experts == 2 and plan.new_config.hidden_size == 24


def _namespace(cfg: ModelConfig):
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, group_query_attention=True, kv_channels=None,
        ffn_hidden_size=cfg.ffn_hidden_size, padded_vocab_size=cfg.vocab_size, swiglu=True, normalization="RMSNorm",
        num_experts=cfg.num_moe_experts, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size, moe_layer_freq=1,
        moe_router_topk=2, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
        untie_embeddings_and_output_weights=True, add_bias_linear=False, position_embedding_type="rope",
        lr=3e-4)


def test_stacked_conversion_with_sparsity_args_and_overwrite(tmp_path, capsys):
    cfg = UNIFORM
    src = tmp_path / "src"
    common = {"args": _namespace(cfg), "iteration": 100, "checkpoint_version": 3.0,
              "optimizer": {"param_groups": []}}
    it = write_synthetic_checkpoint(cfg, src, extra_common=common)
    (it / "model_config.json").unlink()  # the config must come from common.pt args
    before = read_entries(it)
    assert "decoder.layers.mlp.router.expert_bias" in before
    keep_e = {0: [1, 3], 1: [0, 2]}
    masks = {f"decoder.layers.{i}.mlp.experts": torch.tensor([e in k for e in range(4)]) for i, k in keep_e.items()}
    masks["decoder.layers.0.self_attention.query_groups"] = torch.tensor([False, True])
    masks["decoder.layers.1.self_attention.query_groups"] = torch.tensor([True, False])
    masks["hidden"] = torch.arange(32) != 7
    key = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    sp = torch.rand(before[key].shape, generator=torch.Generator().manual_seed(1)) > 0.5
    masks["sparsity/" + key] = sp
    save_masks(tmp_path / "m.safetensors", masks, {"source": "test"})
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    args = ["convert", "--load", str(src), "--masks", str(tmp_path / "m.safetensors"), "--save", str(dst),
            "--verify", "--overwrite", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "optimizer and RNG state are not carried over" in out and "verified" in out
    assert not (dst / "old.txt").exists() and (dst / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    new_it = dst / "iter_0000100"
    new_common = read_common(new_it)
    a = new_common["args"]
    assert (a.hidden_size, a.num_experts, a.num_query_groups, a.num_attention_heads, a.kv_channels) == (31, 2, 1, 2, 8)
    assert a.lr == 3e-4 and "optimizer" not in new_common and new_common["iteration"] == 100
    assert ModelConfig.load(new_it / "model_config.json").hidden_size == 31

    r_src, r_dst = CheckpointReader(it), CheckpointReader(new_it)
    after = read_entries(new_it)
    H = torch.tensor([h for h in range(32) if h != 7])
    w = r_src.read_tensor(key, before[key]) * sp
    got = r_dst.read_tensor(key, after[key])
    for l in range(2):
        assert torch.equal(got[l], w[l][keep_e[l]][:, H]), l
    bias = r_dst.read_tensor("decoder.layers.mlp.router.expert_bias", after["decoder.layers.mlp.router.expert_bias"])
    src_bias = r_src.read_tensor("decoder.layers.mlp.router.expert_bias", before["decoder.layers.mlp.router.expert_bias"])
    assert torch.equal(bias, torch.stack([src_bias[l][keep_e[l]] for l in range(2)]))
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    q_src, q_dst = r_src.read_tensor(qkv, before[qkv]), r_dst.read_tensor(qkv, after[qkv])
    assert torch.equal(q_dst[0], q_src[0][32:64][:, H]) and torch.equal(q_dst[1], q_src[1][:32][:, H])
    ex = sorted(k for k in after if "experts.linear_fc1._extra_state" in k)
    assert ex == [f"decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_{l}.{e}_2.2"
                  for l in range(2) for e in range(2)]
    assert r_dst.read_object(ex[0]) == [None]
    assert not any(Path(tmp_path).glob(".dst.*"))


def test_output_split_over_files_reads_back(tmp_path, monkeypatch):
    from megatron_prune.convert import storage

    monkeypatch.setattr(storage, "FILE_BYTES", 16 * 1024)  # several data files
    it = write_synthetic_checkpoint(TINY_MOE, tmp_path / "src")
    masks = {"hidden": torch.arange(32) % 5 != 0}
    save_masks(tmp_path / "m.safetensors", masks, {})
    assert main(["convert", "--load", str(it), "--masks", str(tmp_path / "m.safetensors"), "--save",
                 str(tmp_path / "dst"), "--verify", "--no-progress"]) == 0
    assert len(list((tmp_path / "dst").glob("*.distcp"))) > 3
    a, b = read_entries(it), read_entries(tmp_path / "dst")
    key = "embedding.word_embeddings.weight"
    H = torch.tensor([h for h in range(32) if h % 5])
    assert torch.equal(CheckpointReader(tmp_path / "dst").read_tensor(key, b[key]),
                       CheckpointReader(it).read_tensor(key, a[key])[:, H])


def test_optimizer_and_rng_state_are_dropped(tmp_path, capsys):
    from megatron_prune.convert.storage import write_tensors

    it = write_synthetic_checkpoint(TINY_MOE, tmp_path / "base")
    entries = read_entries(it)
    reader = CheckpointReader(it)
    src = tmp_path / "with_optim"
    tensors = {k: (v.shape, v.dtype) for k, v in entries.items() if isinstance(v, TensorInfo)}
    opt = {f"optimizer.state.exp_avg.{k}": v for k, v in tensors.items()}
    objects = [k for k, v in entries.items() if not isinstance(v, TensorInfo)] + ["rng_state/shard_0.0_1.1"]

    def produce(key, off):
        if key.startswith("optimizer."):
            return torch.zeros(opt[key][0])
        if key.startswith("rng_state"):
            return [{"random_rng_state": 1}]
        return reader.read_tensor(key, entries[key]) if key in tensors else reader.read_object(key)

    write_tensors(src, {**tensors, **opt}, {k: None for k in objects}, produce)
    TINY_MOE.save(src / "model_config.json")
    save_masks(tmp_path / "m.safetensors", {"hidden": torch.arange(32) != 0}, {})
    capsys.readouterr()
    assert main(["convert", "--load", str(src), "--masks", str(tmp_path / "m.safetensors"), "--save",
                 str(tmp_path / "dst"), "--verify", "--no-progress"]) == 0
    assert f"({len(opt) + 1} entries dropped)" in capsys.readouterr().out
    out = read_entries(tmp_path / "dst")
    assert not any(k.startswith(("optimizer.", "rng_state")) for k in out) and len(out) == len(entries)


def test_plan_then_convert(tmp_path, capsys):
    """``plan`` on activation logs, then ``convert``: the written config is the one the plan announced."""
    import json

    from megatron_prune.logs import write_stage_logs
    from tests.unit.test_plan import _logs

    logs = _logs()
    write_stage_logs(tmp_path / "logs", logs, {m: "Hook" for m in logs}, model_config=TINY_MOE.to_dict())
    it = write_synthetic_checkpoint(TINY_MOE, tmp_path / "src")
    m = tmp_path / "m.safetensors"
    assert main(["plan", "--logs", str(tmp_path / "logs"), "-o", str(m), "--keep-experts", "2",
                 "--ffn-hidden-size", "32", "--moe-ffn-hidden-size", "8", "--num-query-groups", "1",
                 "--hidden-size", "24", "--target-tp", "1", "--target-ep", "2"]) == 0
    assert main(["convert", "--load", str(tmp_path / "src"), "--masks", str(m), "--save", str(tmp_path / "dst"),
                 "--verify", "--no-progress", "--target-ep", "2"]) == 0
    from megatron_prune.masks import load_masks

    announced = load_masks(m)[1]["new_model_config"]
    written = json.loads((tmp_path / "dst" / it.name / "model_config.json").read_text())
    assert written == announced
    assert (written["num_moe_experts"], written["ffn_hidden_size"], written["moe_ffn_hidden_size"],
            written["num_query_groups"], written["num_attention_heads"], written["hidden_size"],
            written["kv_channels"]) == (2, 32, 8, 1, 2, 24, 8)
