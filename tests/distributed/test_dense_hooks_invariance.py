"""Dense Megatron hooks give the same statistics at every layout (real tiny GPTModel, gloo/CPU)."""

import os

import pytest
import torch

from megatron_prune.model_config import ParallelLayout
from megatron_prune.testing.models import TINY_DENSE, load_model, save_reference_checkpoint, token_batch

CFG = TINY_DENSE
NUM_CALLS = 3
MICRO = 4  # global micro-batch size of one call


def _attach(model, plain: bool, groups=None):
    """Hooks of every kind on the modules they fit; returns ({key: hook}, handles)."""
    from megatron_prune.hooks import channel as plain_hooks
    from megatron_prune.megatron import hooks as mh
    from megatron_prune.megatron.naming import global_module_names

    kw = {} if groups is None else {"process_groups": groups}
    iter_kw = dict(kw, validation_full_iters=NUM_CALLS)
    iter_kw_mag = dict(iter_kw, calibration_method="scale_by_magnitude")
    if plain:
        table = {
            "l2": lambda m: plain_hooks.L2NormHook(),
            "ind": lambda m: plain_hooks.IndependentChannelContributionHook(m),
            "iter": lambda m: plain_hooks.IterativeChannelContributionHook(m, iter_kw),
            "iter_mag": lambda m: plain_hooks.IterativeChannelContributionHook(m, iter_kw_mag),
            "kv": lambda m: plain_hooks.IndependentKvHeadContributionHook(m, {"config": m.config}),
            "kv_lat": lambda m: plain_hooks.IndependentKvHeadContributionHook(
                m, {"config": m.config, "optimize_for": "latency"}),
            "ln": lambda m: plain_hooks.LayerNormContributionHook(m, {}),
        }
    else:
        table = {
            "l2": lambda m: mh.MegatronL2NormHook(m, dict(kw, flush_every=2)),
            "ind": lambda m: mh.MegatronIndependentChannelContributionHook(m, kw),
            "iter": lambda m: mh.MegatronIterativeChannelContributionHook(m, iter_kw),
            "iter_mag": lambda m: mh.MegatronIterativeChannelContributionHook(m, iter_kw_mag),
            "kv": lambda m: mh.MegatronIndependentKvHeadContributionHook(m, kw),
            "kv_lat": lambda m: mh.MegatronIndependentKvHeadContributionHook(m, dict(kw, optimize_for="latency")),
            "ln": lambda m: mh.MegatronLayerNormContributionHook(m, kw),
        }
    plan = {
        "self_attention.linear_proj": ("l2", "ind", "iter", "iter_mag", "kv", "kv_lat"),
        "mlp.linear_fc2": ("l2", "ind", "iter"),
        "self_attention.linear_qkv": ("l2", "ind"),
        "mlp.linear_fc1": ("l2",),
        "input_layernorm": ("ln",),
        "pre_mlp_layernorm": ("ln",),
        "final_layernorm": ("ln",),
    }
    hooks, handles = {}, []
    for name, module in global_module_names(model):
        for suffix, kinds in plan.items():
            if name.endswith(suffix):
                for kind in kinds:
                    h = table[kind](module)
                    h.module_name = name
                    hooks[f"{name}:{kind}"] = h
                    handles.append(module.register_forward_hook(h))
    return hooks, handles


def _calls(data_seed: int, shard: bool):
    from megatron_prune.testing.models import dp_shard

    data = token_batch(NUM_CALLS * MICRO, CFG.seq_length, CFG.vocab_size, seed=data_seed)
    for i in range(NUM_CALLS):
        batch = data[i * MICRO : (i + 1) * MICRO]
        yield dp_shard(batch) if shard else batch


def score_worker(layout: ParallelLayout, ckpt: str, reference: bool = False, stop_after=None, resume_state=None):
    """Run NUM_CALLS global micro-batches with every hook kind; returns {key: to_dict()}.

    ``reference``: TP=1 with explicit size-1 groups, every rank sees the whole batch, and plain
    torch hooks run beside the Megatron ones. ``stop_after``: return the hooks' (global) state
    after that many calls instead. ``resume_state``: load it first and run the remaining calls.
    """
    from megatron_prune.distributed.reductions import ProcessGroups
    from megatron_prune.testing.models import forward_logits, forward_pipeline

    (model,) = load_model(CFG, layout, ckpt)
    groups = ProcessGroups() if reference else None
    hooks, handles = _attach(model, plain=False, groups=groups)
    if reference:
        plain, h2 = _attach(model, plain=True)
        handles += h2
        hooks.update({k + ":plain": v for k, v in plain.items()})
    done = 0
    if resume_state is not None:
        for k, h in hooks.items():
            h.load_state_dict(resume_state["hooks"][k])
        done = resume_state["done"]
    for i, batch in enumerate(_calls(0, shard=not reference)):
        if i < done:
            continue
        if layout.pp > 1:
            forward_pipeline([model], batch, micro_batch_size=batch.shape[0])
        else:
            forward_logits(model, batch, gather=False)
        if stop_after is not None and i + 1 == stop_after:
            state = {"hooks": {k: h.state_dict() for k, h in hooks.items()}, "done": i + 1}
            for hd in handles:
                hd.remove()
            return state
    for hd in handles:
        hd.remove()
    return {k: h.to_dict() for k, h in hooks.items()}


@pytest.fixture(scope="module")
def dense_ckpt(session_tmp, pool2):
    path = os.path.join(session_tmp, "dense_ref")
    if not os.path.exists(os.path.join(path, "metadata.json")):
        pool2.run(save_reference_checkpoint, CFG, path)
    return path


@pytest.fixture(scope="module")
def reference(dense_ckpt, pool2):
    out = pool2.run(score_worker, ParallelLayout(), dense_ckpt, True)
    return out[0]


def _compare(got: dict, ref: dict, what: str, partial: bool = False):
    want_keys = {k for k in ref if not k.endswith(":plain")}
    if partial:
        assert set(got) <= want_keys and got
    else:
        assert set(got) == want_keys
    for key, fields in got.items():
        for field, value in fields.items():
            want = ref[key][field]
            assert value.shape == want.shape, (what, key, field)
            if field == "channels_importance_ascending" and ":ln" not in key or key.endswith((":iter", ":iter_mag")):
                assert torch.equal(value, want), (what, key, field, value, want)
            else:
                torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7, msg=f"{what} {key} {field}")


def test_plain_hooks_equal_megatron_hooks_at_tp1(reference):
    n = 0
    for key, fields in reference.items():
        if key.endswith(":plain"):
            continue
        plain = reference[key + ":plain"]
        assert set(plain) == set(fields), key
        for field in fields:
            torch.testing.assert_close(fields[field], plain[field].to(fields[field].dtype), rtol=1e-6, atol=0)
            n += 1
    assert n > 40
    # the iterative hook really ran its whole schedule: a permutation of the channels
    order = reference["decoder.layers.0.mlp.linear_fc2:iter"]["channels_importance_ascending"]
    assert sorted(order.tolist()) == list(range(CFG.ffn_hidden_size))


@pytest.mark.parametrize(
    "layout",
    [ParallelLayout(tp=2), ParallelLayout(tp=2, sequence_parallel=True), ParallelLayout(tp=1)],
    ids=["tp2", "tp2_sp", "dp2"],
)
def test_invariance_two_ranks(layout, dense_ckpt, reference, pool2):
    out = pool2.run(score_worker, layout, dense_ckpt)
    for rank_result in out:  # every rank gets the global result
        _compare(rank_result, reference, str(layout))


@pytest.mark.parametrize(
    "layout",
    [ParallelLayout(tp=2), ParallelLayout(tp=2, sequence_parallel=True)],
    ids=["tp2_dp2", "tp2_sp_dp2"],
)
def test_invariance_four_ranks(layout, dense_ckpt, reference, pool4):
    out = pool4.run(score_worker, layout, dense_ckpt)
    _compare(out[0], reference, "dp2 x " + str(layout))
    _compare(out[3], reference, "dp2 x " + str(layout))


def test_resume_across_layouts(dense_ckpt, reference, pool2):
    """State saved after 1 call at TP=2+SP, resumed at DP=2 and at TP=2: same final scores."""
    state = pool2.run(score_worker, ParallelLayout(tp=2, sequence_parallel=True), dense_ckpt, False, 1)[0]
    for layout in (ParallelLayout(tp=1), ParallelLayout(tp=2)):
        out = pool2.run(score_worker, layout, dense_ckpt, False, None, state)
        _compare(out[0], reference, f"resumed at {layout}")


def test_pipeline_parallel_stages(dense_ckpt, reference, pool2):
    """PP=2: each stage scores its own layers (global layer numbers), together the TP=1 result."""
    out = pool2.run(score_worker, ParallelLayout(pp=2), dense_ckpt)
    assert {k.split(":")[0] for k in out[0]} >= {"decoder.layers.0.mlp.linear_fc2"}
    assert "decoder.layers.1.mlp.linear_fc2:ind" in out[1] and "decoder.final_layernorm:ln" in out[1]
    assert not set(out[0]) & set(out[1])
    _compare(out[0], reference, "pp2 stage 0", partial=True)
    _compare(out[1], reference, "pp2 stage 1", partial=True)
    _compare({**out[0], **out[1]}, reference, "pp2")


def count_collectives_worker(layout, ckpt):
    """Counts torch.distributed collectives issued during forwards with every additive hook."""
    import torch.distributed as dist

    from megatron_prune.megatron import hooks as mh
    from megatron_prune.megatron.naming import global_module_names
    from megatron_prune.testing.models import dp_shard, forward_logits

    (model,) = load_model(CFG, layout, ckpt)
    hooks = {}
    for name, m in global_module_names(model):
        if name.endswith(("linear_proj", "linear_fc2")):
            hooks[name + ":ind"] = mh.MegatronIndependentChannelContributionHook(m)
            hooks[name + ":l2"] = mh.MegatronL2NormHook(m)
        if name.endswith("linear_proj"):
            hooks[name + ":kv"] = mh.MegatronIndependentKvHeadContributionHook(m)
        if name.endswith("linear_qkv"):
            hooks[name + ":l2"] = mh.MegatronL2NormHook(m)
            hooks[name + ":ind"] = mh.MegatronIndependentChannelContributionHook(m)
        if name.endswith(("input_layernorm", "pre_mlp_layernorm", "final_layernorm")):
            hooks[name + ":ln"] = mh.MegatronLayerNormContributionHook(m)
    handles = [dict(global_module_names(model))[k.split(":")[0]].register_forward_hook(h) for k, h in hooks.items()]
    data = token_batch(8, CFG.seq_length, CFG.vocab_size)

    def forwards():
        for batch in data.split(MICRO):
            forward_logits(model, dp_shard(batch), gather=False)

    forwards()  # warm-up outside the count
    counts = {"hooks": 0, "model": 0}
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "all_to_all_single", "_all_gather_base", "_reduce_scatter_base")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    bucket = ["model"]

    def wrap(fn):
        def counted(*a, **k):
            counts[bucket[0]] += 1
            return fn(*a, **k)
        return counted

    for n, fn in saved.items():
        setattr(dist, n, wrap(fn))
    try:
        forwards()  # model's own collectives (TP all-reduce, SP gathers)
        for h in handles:
            h.remove()
        model_only = counts["model"]
        counts["model"] = 0
        handles = [dict(global_module_names(model))[k.split(":")[0]].register_forward_hook(h) for k, h in hooks.items()]
        forwards()
        with_hooks = counts["model"]
        counts["model"] = 0
        for h in hooks.values():
            h.to_dict()
        at_finalize = counts["model"]
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
        for h in handles:
            h.remove()
    return {"model": model_only, "with_hooks": with_hooks, "finalize": at_finalize, "num_hooks": len(hooks)}


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_additive_hooks_issue_no_collective_per_forward(sp, dense_ckpt, pool2):
    res = pool2.run(count_collectives_worker, ParallelLayout(tp=2, sequence_parallel=sp), dense_ckpt)[0]
    if not sp:  # the counter sees Megatron's own all-reduces (SP uses pre-bound gather functions)
        assert res["model"] > 0, res
    assert res["with_hooks"] == res["model"], res
    # the hooks' own collectives are counted: they happen when results are read
    assert 0 < res["finalize"] <= 3 * res["num_hooks"], res
