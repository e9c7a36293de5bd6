"""Hugging Face-style MoE hooks on real ``transformers`` modules from tiny configs."""

import pytest
import torch

from megatron_prune.hooks import moe as hm
from megatron_prune.math import moe as mm

nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
qwen = pytest.importorskip("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe")
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig  # noqa: E402
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig  # noqa: E402

H = 16


def _init(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _nemotron(n_group=4, topk_group=2, e=8, seed=0):
    cfg = NemotronHConfig(
        hidden_size=H, n_routed_experts=e, num_experts_per_tok=2, n_group=n_group, topk_group=topk_group,
        moe_intermediate_size=8, moe_shared_expert_intermediate_size=8, norm_topk_prob=True,
        routed_scaling_factor=2.0,
    )
    m = _init(nemotron.NemotronHMoE(cfg), seed)
    with torch.no_grad():
        m.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, e)[torch.randperm(e, generator=torch.Generator().manual_seed(seed))])
    return cfg, m


def _qwen(e=8, seed=0):
    cfg = Qwen3VLMoeTextConfig(hidden_size=H, num_experts=e, num_experts_per_tok=2, moe_intermediate_size=8)
    return cfg, _init(qwen.Qwen3VLMoeTextSparseMoeBlock(cfg), seed)


def _x(t=40, seed=1):
    return torch.randn(2, t // 2, H, generator=torch.Generator().manual_seed(seed))


def _same_routing(idx_a, w_a, idx_b, w_b, e):
    da = torch.zeros(idx_a.shape[0], e).scatter(1, idx_a, w_a.float())
    db = torch.zeros(idx_b.shape[0], e).scatter(1, idx_b, w_b.float())
    return torch.allclose(da, db, rtol=1e-6, atol=1e-7)


def test_routing_reproduces_hf_routers():
    _, m = _nemotron()
    x = _x().reshape(-1, H)
    logits, w, idx = m.gate(x)
    i2, w2 = mm.route(logits, hm.nemotron_h_spec(m.gate), m.gate.e_score_correction_bias)
    assert _same_routing(idx, w, i2, w2, 8)
    _, q = _qwen()
    logits, w, idx = q.gate(x)
    i2, w2 = mm.route(logits, hm.qwen3_vl_spec(q.gate))
    assert _same_routing(idx, w, i2, w2, 8)


def test_routed_experts_output_matches_the_block():
    _, m = _nemotron()
    x = _x()
    hook = hm.NemotronHRemoveExpertsIndependentHook(m, {})
    _, routed = hook.get_router_logits_and_routed_experts(x.reshape(-1, H))
    with torch.no_grad():
        full = m(x) - m.shared_experts(x)
    assert torch.allclose(routed.reshape(full.shape), full, atol=1e-5)
    _, q = _qwen()
    qh = hm.Qwen3VLRemoveExpertsIndependentHook(q, {})
    _, routed = qh.get_router_logits_and_routed_experts(x.reshape(-1, H))
    assert torch.allclose(routed.reshape(x.shape), q(x), atol=1e-6)


def _pruned_qwen(cfg, block, removed):
    keep = [j for j in range(cfg.num_experts) if j != removed]
    small_cfg = Qwen3VLMoeTextConfig(hidden_size=H, num_experts=len(keep), num_experts_per_tok=2, moe_intermediate_size=8)
    small = qwen.Qwen3VLMoeTextSparseMoeBlock(small_cfg)
    with torch.no_grad():
        small.gate.weight.copy_(block.gate.weight[keep])
        small.experts.gate_up_proj.copy_(block.experts.gate_up_proj[keep])
        small.experts.down_proj.copy_(block.experts.down_proj[keep])
    return small


def _pruned_nemotron(cfg, block, removed):
    keep = [j for j in range(cfg.n_routed_experts) if j != removed]
    small_cfg = NemotronHConfig(
        hidden_size=H, n_routed_experts=len(keep), num_experts_per_tok=2, n_group=1, topk_group=1,
        moe_intermediate_size=8, moe_shared_expert_intermediate_size=8, norm_topk_prob=True, routed_scaling_factor=2.0,
    )
    small = nemotron.NemotronHMoE(small_cfg)
    with torch.no_grad():
        small.gate.weight.copy_(block.gate.weight[keep])
        small.gate.e_score_correction_bias.copy_(block.gate.e_score_correction_bias[keep])
        small.experts.up_proj.copy_(block.experts.up_proj[keep])
        small.experts.down_proj.copy_(block.experts.down_proj[keep])
        small.shared_experts.load_state_dict(block.shared_experts.state_dict())
    return small


@pytest.mark.parametrize("family", ["qwen", "nemotron"])
def test_removal_hook_equals_structural_removal(family):
    if family == "qwen":
        cfg, block = _qwen()
        hook, prune, e = hm.Qwen3VLRemoveExpertsIndependentHook(block, {}), _pruned_qwen, cfg.num_experts
    else:  # one group: the pruned HF block keeps a valid (7-expert) group layout
        cfg, block = _nemotron(n_group=1, topk_group=1, e=7)
        hook, prune, e = hm.NemotronHRemoveExpertsIndependentHook(block, {}), _pruned_nemotron, cfg.n_routed_experts
    block.register_forward_hook(hook)
    xs = [_x(seed=s) for s in (1, 2)]
    with torch.no_grad():
        outs = [block(x) for x in xs]
    got = hook.to_dict()
    exp = torch.zeros(e, dtype=torch.float64)
    for i in range(e):
        small = prune(cfg, block, i)
        for x, y in zip(xs, outs):
            x2 = x.reshape(-1, H)
            idx = block.gate(x2)[2]
            chose = (idx == i).any(dim=1)
            with torch.no_grad():
                yi = small(x)
            a, b = y.reshape(-1, H)[chose].double(), yi.reshape(-1, H)[chose].double()
            exp[i] += (a - b).square().mean(-1).sum() / x2.shape[0]
    assert (exp > 0).sum() >= 3
    assert torch.allclose(got["removal_mse"].double(), exp, rtol=1e-4, atol=1e-10)
    assert torch.equal(got["expert_ranks_removal_mse"], mm.ranks_from_scores(got["removal_mse"]))


def test_nemotron_group_limited_removal_uses_native_rerouting():
    _, block = _nemotron()
    hook = hm.NemotronHRemoveExpertsIndependentHook(block, {})
    x = _x().reshape(-1, H)
    logits, _ = hook.get_router_logits_and_routed_experts(x)
    lg = logits.clone()
    lg[:, 3] = float("-inf")
    idx, w = hook._route(lg)
    ni, nw = mm.route(logits, hook.spec, hook.expert_bias(), torch.nn.functional.one_hot(torch.full((x.shape[0],), 3), 8).bool())
    assert not (idx == 3).any() and torch.equal(idx, ni) and torch.equal(w, nw)


def test_ranked_choice_hooks():
    _, q = _qwen()
    hook = hm.RankedChoiceVotingHook(q.gate, {})
    q.gate.register_forward_hook(hook)
    with torch.no_grad():
        for s in (1, 2):
            q(_x(seed=s))
    assert hook.ballots[0].dtype == torch.uint8
    d = hook.to_dict()
    assert sorted(d["expert_ranks_ranked_choice"].tolist()) == list(range(8))
    sd = hook.state_dict()
    h2 = hm.RankedChoiceVotingHook(q.gate, {})
    h2.load_state_dict(sd)
    assert torch.equal(h2.to_dict()["ranked_choice"], d["ranked_choice"])

    _, m = _nemotron()
    nh = hm.RankedChoiceVotingHookNemotronH(m.gate, {})
    m.gate.register_forward_hook(nh)
    with torch.no_grad():
        m(_x())
    x = _x().reshape(-1, H)
    choice = torch.sigmoid(torch.nn.functional.linear(x, m.gate.weight)) + m.gate.e_score_correction_bias
    assert torch.equal(nh.ballots[0], mm.preference_ballots(choice))
    assert len(nh.to_dict()["experts_importance_ascending_ranked_choice"]) == 8


def test_reap_tracker_paths_agree_and_retained_per_group():
    g = torch.Generator().manual_seed(0)
    t, e, k = 30, 8, 2
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    norms_all = {j: torch.rand(t, generator=g) for j in range(e)}
    flat = idx.t().reshape(-1)
    tok = torch.arange(t).repeat(k)
    sparse = {j: norms_all[j][tok[flat == j]] for j in range(e)}
    a, b = hm.REAPSaliencyTracker(e), hm.REAPSaliencyTracker(e)
    a.update(idx, w, sparse, all_tokens=False)
    b.update(idx, w, norms_all)
    assert torch.allclose(a.mean_saliency, b.mean_saliency)
    s = a.mean_saliency
    keep = a.compute_retained_experts(3, None, hm.MoeModelAttrs())
    assert keep == sorted(set(range(e)) - set(torch.argsort(s)[:3].tolist()))
    per = a.compute_retained_experts(3, 1, hm.MoeModelAttrs(n_group=2, group_size=4))
    assert len(per) == 6 and sum(i < 4 for i in per) == 3
    assert int(torch.argmin(s[:4])) not in per and 4 + int(torch.argmin(s[4:])) not in per
