"""MoE expert criteria on real tiny Megatron-Core GPT-MoE models (gloo, CPU).

Oracles: every criterion at TP=2 (±SP), EP=2, TP=2×EP=2, expert-TP=2 and DP=2 equals the
single-process TP=1 run on the same weights (reference checkpoint) and data; the removal effect
equals the output of the layer after structural removal of the expert (``prune_moe_layer``);
planted experts; calibrate-all-experts is bit-identical and feeds every expert every token.
"""

import copy
import os

import pytest
import torch

from megatron_prune.model_config import ParallelLayout
from megatron_prune.testing.models import TINY_MOE, dp_shard, forward_logits, load_model, save_reference_checkpoint, token_batch

from tests.conftest import _LazyPool

_POOL1 = _LazyPool(1)

SOFTMAX = TINY_MOE
SIGMOID_GROUPED = TINY_MOE.replace(
    num_moe_experts=8, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.0,
)
PRE_SOFTMAX = TINY_MOE.replace(num_moe_experts=8, moe_router_pre_softmax=True)
PRE_SOFTMAX_SHARED = PRE_SOFTMAX.replace(moe_shared_expert_intermediate_size=16)
SIGMOID_BIAS = TINY_MOE.replace(num_moe_experts=8, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
GROUPED = TINY_MOE.replace(num_moe_experts=8, moe_router_num_groups=2, moe_router_group_topk=1)

TOKENS = token_batch(8, 16, TINY_MOE.vocab_size, seed=3)  # 2 steps of 4 samples: DP<=4 gives equal steps
CRIT = ("frequency", "soft_count", "ean_sum", "reap", "removal_mse", "removal_cosine", "ranked_choice")


@pytest.fixture(scope="module")
def pool1():
    """One gloo worker: the single-process TP=1 reference."""
    yield _POOL1
    _POOL1.close()


def _set_bias(model, cfg):
    """Deterministic non-zero expert bias (same global values at every layout)."""
    if not cfg.moe_router_enable_expert_bias:
        return
    from megatron_prune.moe import moe_layers

    for _, layer in moe_layers(model):
        e = cfg.num_moe_experts
        vals = torch.linspace(-0.06, 0.06, e)[torch.randperm(e, generator=torch.Generator().manual_seed(layer.layer_number))]
        layer.router.expert_bias.copy_(vals.to(layer.router.expert_bias.device))


def _forward(model, tokens, calls=2):
    """``calls`` global steps; each rank runs its DP share of every step."""
    for mb in dp_shard(tokens).chunk(calls):
        forward_logits(model, mb, gather=False)


def w_save(cfg, ckpt):
    save_reference_checkpoint(cfg, ckpt)
    return True


def w_criteria(cfg, layout, ckpt, tokens, resume_state=None, calls=2):
    """All criteria per MoE layer (global, from rank 0) plus the hooks' global state."""
    from megatron_prune.megatron.moe_hooks import MegatronMoEImportanceHook, MegatronRankedChoiceVotingHook
    from megatron_prune.moe import moe_layers

    model = load_model(cfg, layout, ckpt)[0]
    _set_bias(model, cfg)
    hooks, rcv = {}, {}
    for _, layer in moe_layers(model):
        h = MegatronMoEImportanceHook(layer)
        layer.register_forward_hook(h)
        hooks[h.module_name] = h
        r = MegatronRankedChoiceVotingHook(layer.router)
        layer.router.register_forward_hook(r)
        rcv[r.module_name] = r
    if resume_state is not None:
        for name, h in hooks.items():
            h.load_state_dict(resume_state[name])
            rcv[name].load_state_dict(resume_state[name + "#router"])
        tokens = tokens[tokens.shape[0] // 2 :]
    _forward(model, tokens, calls)
    out = {name: h.to_dict() for name, h in hooks.items()}
    for name, r in rcv.items():
        out[name]["router_ranked_choice"] = r.to_dict()["ranked_choice"]
    states = {name: h.state_dict() for name, h in hooks.items()}
    states.update({name + "#router": r.state_dict() for name, r in rcv.items()})
    return (out, states) if torch.distributed.get_rank() == 0 else None


def _ckpt(tmp, pool, cfg, tag):
    path = os.path.join(tmp, f"moe_ref_{tag}")
    if not os.path.exists(os.path.join(path, "metadata.json")):
        pool.run(w_save, cfg, path)
    return path


def _assert_same(ref, got, what, rtol=1e-5, atol=1e-13):
    assert ref.keys() == got.keys()
    for name in ref:
        for c in CRIT:
            a, b = ref[name][c].double(), got[name][c].double()
            assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what} {name} {c}: {a} vs {b}"
            if c in ("frequency", "ranked_choice"):
                assert torch.equal(ref[name][f"expert_ranks_{c}"], got[name][f"expert_ranks_{c}"]), (what, name, c)
        assert torch.equal(got[name]["router_ranked_choice"], got[name]["ranked_choice"])


def hooks_only(states):
    return [n for n in states if not n.endswith("#router")]


LAYOUTS2 = {
    "dp2": ParallelLayout(),
    "tp2": ParallelLayout(tp=2),
    "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True),
    "ep2": ParallelLayout(ep=2),
    "etp2": ParallelLayout(etp=2),
    "tp2_etp1_sp": ParallelLayout(tp=2, etp=1, sequence_parallel=True),
}
LAYOUTS4 = {
    "tp2ep2": ParallelLayout(tp=2, ep=2),
    "tp2ep2_sp": ParallelLayout(tp=2, ep=2, sequence_parallel=True),
    "ep2etp2": ParallelLayout(ep=2, etp=2),
}


@pytest.mark.parametrize("cfg_name", ["softmax", "sigmoid_grouped", "pre_softmax_shared"])
def test_criteria_invariant_across_layouts(pool1, pool2, pool4, session_tmp, cfg_name):
    cfg = {"softmax": SOFTMAX, "sigmoid_grouped": SIGMOID_GROUPED, "pre_softmax_shared": PRE_SOFTMAX_SHARED}[cfg_name]
    ckpt = _ckpt(session_tmp, pool1, cfg, cfg_name)
    ref, ref_state = pool1.run(w_criteria, cfg, ParallelLayout(), ckpt, TOKENS)[0]
    for name in ref:  # the statistics are not trivial
        assert ref[name]["frequency"].sum() == TOKENS.numel() * cfg.moe_router_topk
        assert (ref[name]["removal_mse"] > 0).sum() >= 2
    for tag, layout in LAYOUTS2.items():
        got, state = pool2.run(w_criteria, cfg, layout, ckpt, TOKENS)[0]
        _assert_same(ref, got, tag)
        for name in hooks_only(ref_state):  # global state is layout independent
            for k, v in ref_state[name]["sums"].items():
                assert torch.allclose(v, state[name]["sums"][k], rtol=1e-5, atol=1e-13), (tag, name, k)
    for tag, layout in LAYOUTS4.items() if cfg_name != "pre_softmax_shared" else ():
        got, _ = pool4.run(w_criteria, cfg, layout, ckpt, TOKENS)[0]
        _assert_same(ref, got, tag)


def test_resume_across_layouts(pool1, pool2, session_tmp):
    """Half the data at TP=1, state loaded at TP=2×SP / EP=2, second half there == all at TP=1."""
    ckpt = _ckpt(session_tmp, pool1, SOFTMAX, "softmax")
    ref, _ = pool1.run(w_criteria, SOFTMAX, ParallelLayout(), ckpt, TOKENS)[0]
    _, half = pool1.run(w_criteria, SOFTMAX, ParallelLayout(), ckpt, TOKENS[: TOKENS.shape[0] // 2], calls=1)[0]
    for layout in (ParallelLayout(tp=2, sequence_parallel=True), ParallelLayout(ep=2)):
        got, _ = pool2.run(w_criteria, SOFTMAX, layout, ckpt, TOKENS, resume_state=half, calls=1)[0]
        _assert_same(ref, got, f"resume {layout}")


# ---------------------------------------------------------------------------- removal oracle
class _Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def _clone_layer(layer):
    """Deep copy of an ``MoELayer`` sharing its process groups (they cannot be copied)."""
    pg = torch.distributed.ProcessGroup
    had = "__deepcopy__" in vars(pg)
    pg.__deepcopy__ = lambda self, memo: self
    try:
        return copy.deepcopy(layer)
    finally:
        if not had:
            del pg.__deepcopy__


@torch.no_grad()
def w_removal_oracle(cfg, ckpt, tokens):
    """Probe removal effect vs. the layer with expert i structurally removed, every MoE layer."""
    from megatron_prune.megatron.moe_hooks import MegatronMoEImportanceHook, MegatronRemoveExpertsIndependentHook
    from megatron_prune.moe import moe_layers, prune_moe_layer

    model = load_model(cfg, ParallelLayout(), ckpt)[0]
    _set_bias(model, cfg)
    result = {}
    seen = {}
    for _, layer in moe_layers(model):
        h = MegatronRemoveExpertsIndependentHook(layer)
        layer.register_forward_hook(h)
        calls = []
        layer.register_forward_hook(lambda m, a, o, calls=calls: calls.append((a[0].detach().clone(), o[0].detach().clone())))
        seen[layer] = (h, calls)
    _forward(model, tokens)
    e = cfg.num_moe_experts
    for layer, (h, calls) in seen.items():
        got = h.to_dict()
        exp_mse = torch.zeros(e, dtype=torch.float64)
        exp_cos = torch.zeros(e, dtype=torch.float64)
        for i in range(e):
            holder = _Holder(_clone_layer(layer))
            for m in holder.layer.modules():
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
            prune_moe_layer(holder, "layer", [j for j in range(e) if j != i])
            if i == 0:  # the probe also scores a pruned layer (ragged groups included)
                ph = MegatronMoEImportanceHook(holder.layer, {"module_name": "pruned"})
                holder.layer.register_forward_hook(ph)
                holder.layer(calls[0][0])
                pd = ph.to_dict()
                assert pd["frequency"].shape == (e - 1,)
                assert int(pd["frequency"].sum()) == calls[0][0].numel() // calls[0][0].shape[-1] * cfg.moe_router_topk
                assert (pd["removal_mse"] > 0).any()
                ph.close()
                for m in holder.layer.modules():
                    m._forward_hooks.clear()
            for x, y in calls:
                _, rmap = layer.router(x)
                chose = rmap[:, i]
                yi = holder.layer(x)[0]
                a, b = y.reshape(-1, y.shape[-1])[chose].double(), yi.reshape(-1, y.shape[-1])[chose].double()
                n = y.numel() // y.shape[-1]
                exp_mse[i] += (a - b).square().mean(-1).sum() / n
                exp_cos[i] += (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum() / n
        result[h.module_name] = (got["removal_mse"].double(), exp_mse, got["removal_cosine"].double(), exp_cos)
    return result


@pytest.mark.parametrize("cfg_name", ["softmax", "pre_softmax", "sigmoid_bias", "grouped", "sigmoid_grouped"])
def test_removal_effect_equals_structural_removal(pool1, session_tmp, cfg_name):
    cfg = {"softmax": SOFTMAX, "pre_softmax": PRE_SOFTMAX, "sigmoid_bias": SIGMOID_BIAS, "grouped": GROUPED,
           "sigmoid_grouped": SIGMOID_GROUPED}[cfg_name]
    ckpt = _ckpt(session_tmp, pool1, cfg, cfg_name)
    res = pool1.run(w_removal_oracle, cfg, ckpt, TOKENS)[0]
    for name, (mse, exp_mse, cos, exp_cos) in res.items():
        assert (exp_mse > 0).sum() >= 2, (name, exp_mse)
        assert torch.allclose(mse, exp_mse, rtol=2e-4, atol=1e-14), (cfg_name, name, mse, exp_mse)
        assert torch.allclose(cos, exp_cos, rtol=2e-4, atol=1e-9), (cfg_name, name, cos, exp_cos)


# ---------------------------------------------------------------------------- calibrate all
@torch.no_grad()
def w_calibrate_all(cfg, layout, ckpt, tokens):
    from megatron.core import parallel_state as ps

    from megatron_prune.megatron.moe_hooks import MegatronMoEImportanceHook
    from megatron_prune.moe import calibrate_all_experts, moe_layers

    model = load_model(cfg, layout, ckpt)[0]
    data = dp_shard(tokens)
    plain = forward_logits(model, data)
    hooks = [MegatronMoEImportanceHook(layer) for _, layer in moe_layers(model)]
    for (_, layer), h in zip(moe_layers(model), hooks):
        layer.register_forward_hook(h)
    ref_scores = None
    seen = {}
    for _, layer in moe_layers(model):
        for e, expert in enumerate(layer.experts.local_experts):
            seen[(layer.layer_number, e)] = 0

            def count(m, a, o, key=(layer.layer_number, e)):
                seen[key] += a[0].shape[0]

            expert.linear_fc1.register_forward_hook(count)
    forward_logits(model, data)  # normal routing: experts see only routed tokens
    routed_only = dict(seen)
    ref_scores = [h.to_dict() for h in hooks]
    for k in seen:
        seen[k] = 0
    with calibrate_all_experts(model) as wrappers:
        assert len(wrappers) == len(moe_layers(model))
        calib = forward_logits(model, data)
    local = data.numel() // (ps.get_tensor_model_parallel_world_size() if layout.sequence_parallel else 1)
    held = local * ps.get_expert_tensor_and_model_parallel_world_size()  # after the allgather
    restored = all("routed_experts_compute" not in vars(layer) for _, layer in moe_layers(model))
    try:
        with calibrate_all_experts(model):
            raise KeyError("boom")
    except KeyError:
        pass
    restored_exc = all("routed_experts_compute" not in vars(layer) for _, layer in moe_layers(model))
    scores = [h.to_dict() for h in hooks]
    for h in hooks:
        h.close()
    probes_gone = all(not layer.router._forward_hooks and not layer.experts._forward_hooks
                      for _, layer in moe_layers(model))
    return {
        "bit_identical": torch.equal(plain, calib),
        "seen": seen, "routed_only": routed_only, "held": held,
        "restored": restored, "restored_exc": restored_exc, "probes_gone": probes_gone,
        "freq_doubled": [torch.equal(b["frequency"], 2 * a["frequency"]) for a, b in zip(ref_scores, scores)],
    }


@pytest.mark.parametrize("layout_name", ["tp1", "ep2", "tp2", "tp2_sp"])
def test_calibrate_all_experts(pool1, pool2, session_tmp, layout_name):
    ckpt = _ckpt(session_tmp, pool1, SOFTMAX, "softmax")
    layout = {"tp1": ParallelLayout(), "ep2": ParallelLayout(ep=2), "tp2": ParallelLayout(tp=2),
              "tp2_sp": ParallelLayout(tp=2, sequence_parallel=True)}[layout_name]
    pool = pool1 if layout_name == "tp1" else pool2
    for r in pool.run(w_calibrate_all, SOFTMAX, layout, ckpt, TOKENS):
        assert r["bit_identical"]
        assert r["restored"] and r["restored_exc"] and r["probes_gone"]
        assert all(v == r["held"] for v in r["seen"].values()), (r["seen"], r["held"])
        assert any(v < r["held"] for v in r["routed_only"].values())  # normal routing is sparse
        assert all(r["freq_doubled"])  # the probe counted the calibrated forward once, normally


# ---------------------------------------------------------------------------- planted experts
@torch.no_grad()
def w_planted(cfg, ckpt, tokens):
    """In layer 2: the most frequently routed expert gets tiny outputs, the least frequently
    routed (but used) one large outputs; routing of that layer is unchanged."""
    from megatron_prune.hooks.moe import REAPSaliencyTracker
    from megatron_prune.megatron.moe_hooks import MegatronExpertStatsHook
    from megatron_prune.moe import moe_layers

    model = load_model(cfg, ParallelLayout(), ckpt)[0]
    layer = [m for _, m in moe_layers(model) if m.layer_number == 3][0]
    h = MegatronExpertStatsHook(layer)
    layer.register_forward_hook(h)
    _forward(model, tokens)
    freq = h.to_dict()["frequency"]
    used = torch.where(freq > 0, freq, torch.full_like(freq, float("inf")))
    frequent, rare = int(freq.argmax()), int(used.argmin())
    layer.experts.local_experts[frequent].linear_fc2.weight.mul_(1e-3)
    layer.experts.local_experts[rare].linear_fc2.weight.mul_(1e2)
    h2 = MegatronExpertStatsHook(layer)
    layer.register_forward_hook(h2)
    _forward(model, tokens)
    out = h2.to_dict()
    tracker = REAPSaliencyTracker(cfg.num_moe_experts)
    tracker.sum_saliency, tracker.count = out["reap"].double() * out["frequency"].double(), out["frequency"].double()
    keep = tracker.compute_retained_experts(1, None, None)
    return frequent, rare, out, keep


def test_planted_experts(pool1, session_tmp):
    ckpt = _ckpt(session_tmp, pool1, PRE_SOFTMAX, "pre_softmax")
    frequent, rare, out, keep = pool1.run(w_planted, PRE_SOFTMAX, ckpt, TOKENS)[0]
    assert frequent != rare
    assert out["frequency"][frequent] > 2 * out["frequency"][rare] > 0
    assert int(out["expert_ranks_reap"][rare]) == PRE_SOFTMAX.num_moe_experts - 1  # reap keeps it
    assert int(out["expert_ranks_reap"][frequent]) == 0  # ... and drops the tiny frequent one
    assert int(out["experts_importance_ascending_frequency"][0]) == rare  # frequency drops it
    assert rare in keep and frequent not in keep


# ---------------------------------------------------------------------------- pruning, logs
@torch.no_grad()
def w_pruned_logits(cfg, layout, ckpt, tokens, retained):
    from megatron_prune.moe import moe_layers, prune_moe_layer

    model = load_model(cfg, layout, ckpt)[0]
    names = [n for n, m in moe_layers(model) if m.layer_number == 3]
    errors = []
    if layout.ep > 1:
        try:
            prune_moe_layer(model, names[0], [0, 1])  # expert 1 would have to change EP rank
        except ValueError as exc:
            errors.append(str(exc))
    prune_moe_layer(model, names[0], retained)
    layer = model.get_submodule(names[0])
    logits = forward_logits(model, dp_shard(tokens))
    return logits, errors, layer.router.weight.shape[0], layer.num_local_experts


def test_prune_moe_layer_at_ep2_matches_tp1(pool1, pool2, session_tmp):
    ckpt = _ckpt(session_tmp, pool1, SOFTMAX, "softmax")
    ref, _, rows, _ = pool1.run(w_pruned_logits, SOFTMAX, ParallelLayout(), ckpt, TOKENS, [1, 2])[0]
    assert rows == 2
    outs = pool2.run(w_pruned_logits, SOFTMAX, ParallelLayout(ep=2), ckpt, TOKENS, [1, 2])
    got = torch.cat([o[0] for o in outs], dim=0)  # DP=2 at EP=2: each rank its half of the batch
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert all(o[1] and o[3] == 1 for o in outs)  # unbalanced pruning refused; one expert per rank


def w_logs(cfg, ckpt, tokens, log_dir):
    from megatron_prune.hooks.base import ForwardHook
    from megatron_prune.logs import load_activations_logs
    from megatron_prune.megatron.moe_hooks import MegatronMoEImportanceHook
    from megatron_prune.moe import moe_layers

    model = load_model(cfg, ParallelLayout(pp=2), ckpt)[0]
    hooks = {}
    for _, layer in moe_layers(model):
        h = MegatronMoEImportanceHook(layer)
        layer.register_forward_hook(h)
        hooks[h.module_name] = h
    from megatron_prune.testing.models import forward_pipeline

    forward_pipeline([model], dp_shard(tokens), micro_batch_size=2)
    from megatron_prune.megatron.groups import log_args

    ForwardHook.dump_activations_logs(hooks, log_dir, log_args(cfg))
    torch.distributed.barrier()
    return sorted(load_activations_logs(log_dir).items()) if torch.distributed.get_rank() == 0 else None


def test_scores_land_in_activation_logs_with_global_layer_names(pool2, session_tmp, pool1):
    ckpt = _ckpt(session_tmp, pool1, SOFTMAX, "softmax")
    logs = dict(pool2.run(w_logs, SOFTMAX, ckpt, TOKENS, os.path.join(session_tmp, "moe_logs"))[0])
    assert sorted(logs) == ["decoder.layers.1.mlp", "decoder.layers.2.mlp", "decoder.layers.3.mlp"]
    for fields in logs.values():
        for c in CRIT:
            assert fields[c].shape == (SOFTMAX.num_moe_experts,)
            assert fields[f"expert_ranks_{c}"].dtype == torch.int64
            assert sorted(fields[f"expert_ranks_{c}"].tolist()) == list(range(SOFTMAX.num_moe_experts))
            asc = fields[f"experts_importance_ascending_{c}"]
            assert torch.equal(fields[f"expert_ranks_{c}"][asc], torch.arange(SOFTMAX.num_moe_experts))
