"""``megatron-prune plan`` on synthetic activation logs of TINY_MOE (layer 0 dense, 1-3 MoE)."""

import pytest
import torch

from megatron_prune.cli import main
from megatron_prune.convert.plan import PlanTargets, plan_masks, top_k_mask
from megatron_prune.errors import UserError
from megatron_prune.logs import load_activations_logs, write_stage_logs
from megatron_prune.masks import load_masks
from megatron_prune.testing.models import TINY_MOE

CFG = TINY_MOE


def _logs(seed=0, nan_at=None):
    g = torch.Generator().manual_seed(seed)
    res = {}
    E, h = CFG.num_moe_experts, CFG.hidden_size
    for i, moe in enumerate(CFG.moe_layer_pattern()):
        pre = f"decoder.layers.{i}"
        res[f"{pre}.self_attention.linear_proj"] = {"score": torch.rand(CFG.num_query_groups, generator=g)}
        res[f"{pre}.input_layernorm"] = {"score": torch.rand(h, generator=g)}
        res[f"{pre}.pre_mlp_layernorm"] = {"score": torch.rand(h, generator=g)}
        if moe:
            reap = torch.rand(E, generator=g)
            ranks = torch.randperm(E, generator=g)  # deliberately disagrees with `reap`
            res[f"{pre}.mlp"] = {"reap": reap, "expert_ranks_reap": ranks, "frequency": torch.rand(E, generator=g)}
            for e in range(E):
                res[f"{pre}.mlp.experts.local_experts.{e}.linear_fc2"] = {
                    "score": torch.rand(CFG.moe_ffn_hidden_size, generator=g)}
        else:
            res[f"{pre}.mlp.linear_fc2"] = {"score": torch.rand(CFG.ffn_hidden_size, generator=g)}
    res["decoder.final_layernorm"] = {"score": torch.rand(h, generator=g)}
    if nan_at:
        res[nan_at[0]][nan_at[1]][0] = float("nan")
    return res


def _write(tmp_path, res):
    d = tmp_path / "logs"
    write_stage_logs(d, res, {m: "Hook" for m in res}, model_config=CFG.to_dict())
    return d


def _ids(m):
    return torch.nonzero(m).flatten().tolist()


def test_top_k_mask_ties_keep_lower_index():
    assert _ids(top_k_mask(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2)) == [1, 2]


def test_plan_keeps_the_highest_scores():
    logs = _logs()
    t = PlanTargets(keep_experts=2, ffn_hidden_size=32, moe_ffn_hidden_size=12, num_query_groups=1,
                    hidden_size=28)
    masks = plan_masks(logs, CFG, t)
    for i in (1, 2, 3):
        ranks = logs[f"decoder.layers.{i}.mlp"]["expert_ranks_reap"]
        assert _ids(masks[f"decoder.layers.{i}.mlp.experts"]) == sorted(_ids(ranks >= 2))  # ranks, not reap
        ef = masks[f"decoder.layers.{i}.mlp.experts.ffn"]
        for e in range(4):
            s = logs[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2"]["score"]
            assert _ids(ef[e]) == sorted(torch.topk(s, 12).indices.tolist())
    s = logs["decoder.layers.0.mlp.linear_fc2"]["score"]
    assert _ids(masks["decoder.layers.0.mlp.ffn"]) == sorted(torch.topk(s, 32).indices.tolist())
    for i in range(4):
        s = logs[f"decoder.layers.{i}.self_attention.linear_proj"]["score"]
        assert _ids(masks[f"decoder.layers.{i}.self_attention.query_groups"]) == [int(s.argmax())]
    norms = [v["score"] for k, v in logs.items() if k.endswith("layernorm")]
    assert len(norms) == 9
    mean = torch.stack(norms).mean(0)
    assert _ids(masks["hidden"]) == sorted(torch.topk(mean, 28).indices.tolist())
    assert "decoder.layers.0.mlp.experts" not in masks and "decoder.layers.1.mlp.ffn" not in masks


def test_plan_ratio_and_score_fallback():
    logs = _logs()
    for i in (1, 2, 3):
        del logs[f"decoder.layers.{i}.mlp"]["expert_ranks_reap"]
    masks = plan_masks(logs, CFG, PlanTargets(drop_experts_ratio=0.5, expert_criterion="frequency"))
    for i in (1, 2, 3):
        f = logs[f"decoder.layers.{i}.mlp"]["frequency"]
        assert _ids(masks[f"decoder.layers.{i}.mlp.experts"]) == sorted(torch.topk(f, 2).indices.tolist())


def test_plan_drop_per_group():
    cfg = CFG.replace(moe_router_num_groups=2, moe_router_group_topk=1)
    logs = _logs()
    for i in (1, 2, 3):
        logs[f"decoder.layers.{i}.mlp"]["expert_ranks_reap"] = torch.tensor([3, 2, 1, 0])
    with pytest.raises(UserError, match="drop-per-group"):
        plan_masks(logs, cfg, PlanTargets(keep_experts=2))
    masks = plan_masks(logs, cfg, PlanTargets(keep_experts=2, drop_per_group=True))
    assert _ids(masks["decoder.layers.1.mlp.experts"]) == [0, 2]  # best of each group of 2


@pytest.mark.parametrize("targets,match", [
    (PlanTargets(keep_experts=1), "top-k"),
    (PlanTargets(keep_experts=3, target_ep=2), "divisible"),
    (PlanTargets(ffn_hidden_size=33, target_tp=2), "divisible"),
    (PlanTargets(num_query_groups=3), "outside"),
    (PlanTargets(keep_experts=2, drop_experts_ratio=0.5), "either"),
    (PlanTargets(hidden_size=32), "keep everything"),
    (PlanTargets(keep_experts=2, expert_criterion="bogus"), "unknown expert criterion"),
])
def test_plan_refuses_bad_targets(targets, match):
    with pytest.raises(UserError, match=match):
        plan_masks(_logs(), CFG, targets)


def test_plan_refuses_nan_and_missing_scores():
    with pytest.raises(UserError, match="NaN"):
        plan_masks(_logs(nan_at=("decoder.layers.0.mlp.linear_fc2", "score")), CFG, PlanTargets(ffn_hidden_size=32))
    logs = _logs()
    del logs["decoder.layers.2.self_attention.linear_proj"]
    with pytest.raises(UserError, match="lack decoder.layers.2.self_attention.linear_proj/score"):
        plan_masks(logs, CFG, PlanTargets(num_query_groups=1))


def test_plan_cli_writes_masks_and_dry_run(tmp_path, capsys):
    d = _write(tmp_path, _logs())
    assert set(load_activations_logs(d)) == set(_logs())
    out = tmp_path / "m.safetensors"
    rc = main(["plan", "--logs", str(d), "-o", str(out), "--keep-experts", "2", "--num-query-groups", "1",
               "--target-tp", "1", "--target-ep", "2"])
    assert rc == 0
    masks, man = load_masks(out)
    assert man["source"] == "megatron-prune plan" and man["new_model_config"]["num_moe_experts"] == 2
    assert len(masks) == 3 + 4
    capsys.readouterr()
    assert main(["plan", "--logs", str(d), "--dry-run", "--hidden-size", "30"]) == 0
    text = capsys.readouterr().out
    assert "layer 3 (MoE): unchanged" in text and "hidden: 30 of 32 kept" in text


def test_plan_cli_nan_is_one_line_exit_2(tmp_path, capsys):
    d = _write(tmp_path, _logs(nan_at=("decoder.layers.1.mlp", "frequency")))
    capsys.readouterr()
    rc = main(["plan", "--logs", str(d), "--dry-run", "--keep-experts", "2", "--expert-criterion", "frequency"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "NaN" in err[0]
