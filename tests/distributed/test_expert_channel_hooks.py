"""Channel hooks inside experts (SequentialMLP) are layout-invariant, DP included.

Data-parallel replicas of an expert receive different numbers of routed tokens per call, so the
per-call means must be formed after summing (Σ, count) over the expert data-parallel group.
"""

import os

import pytest
import torch

from megatron_prune.model_config import ParallelLayout
from megatron_prune.testing.models import TINY_MOE, load_model, save_reference_checkpoint, token_batch

CFG = TINY_MOE
CALLS, MICRO = 3, 4


def expert_worker(layout, ckpt, reference=False):
    from megatron.core import parallel_state as ps

    from megatron_prune.distributed.reductions import ProcessGroups
    from megatron_prune.megatron import hooks as mh
    from megatron_prune.testing.models import dp_shard, forward_logits

    (model,) = load_model(CFG, layout, ckpt)
    kw = {"process_groups": ProcessGroups()} if reference else {}
    kw["flush_every"] = 2  # exercise the periodic flush too
    hooks, handles = {}, []
    ep_rank = 0 if reference else ps.get_expert_model_parallel_rank()
    for li, layer in enumerate(model.decoder.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        n_local = len(experts.local_experts)
        for local, expert in enumerate(experts.local_experts):
            g = ep_rank * n_local + local
            name = f"decoder.layers.{layer.layer_number - 1}.mlp.experts.local_experts.{g}"
            made = {
                "fc2:ind": (expert.linear_fc2, mh.MegatronIndependentChannelContributionHook(expert.linear_fc2, kw)),
                "fc2:l2": (expert.linear_fc2, mh.MegatronL2NormHook(expert.linear_fc2, kw)),
                "fc2:iter": (expert.linear_fc2, mh.MegatronIterativeChannelContributionHook(
                    expert.linear_fc2, dict(kw, validation_full_iters=CALLS))),
                "fc1:l2": (expert.linear_fc1, mh.MegatronL2NormHook(expert.linear_fc1, kw)),
            }
            for kind, (mod, h) in made.items():
                hooks[f"{name}:{kind}"] = h
                handles.append(mod.register_forward_hook(h))
    data = token_batch(CALLS * MICRO, CFG.seq_length, CFG.vocab_size, seed=5)
    for i in range(CALLS):
        batch = data[i * MICRO : (i + 1) * MICRO]
        forward_logits(model, batch if reference else dp_shard(batch), gather=False)
    for h in handles:
        h.remove()
    return {k: h.to_dict() for k, h in hooks.items()}


@pytest.fixture(scope="module")
def moe_ckpt(session_tmp, pool2):
    path = os.path.join(session_tmp, "moe_ref_experts")
    if not os.path.exists(os.path.join(path, "metadata.json")):
        pool2.run(save_reference_checkpoint, CFG, path)
    return path


@pytest.fixture(scope="module")
def reference(moe_ckpt, pool2):
    return pool2.run(expert_worker, ParallelLayout(), moe_ckpt, True)[0]


def _merge(per_rank):
    out = {}
    for r in per_rank:
        out.update(r)
    return out


@pytest.mark.parametrize("layout", [
    ParallelLayout(tp=1),                                        # DP=2: unequal routed counts
    ParallelLayout(tp=1, ep=2),                                  # EP=2
    ParallelLayout(tp=2),                                        # expert-TP=2
    ParallelLayout(tp=2, ep=2, etp=1, sequence_parallel=True),   # TP=2 x EP=2, SP
], ids=["dp2", "ep2", "etp2", "tp2_ep2_sp"])
def test_expert_channel_hooks_invariant(layout, moe_ckpt, reference, pool2):
    got = _merge(pool2.run(expert_worker, layout, moe_ckpt))
    assert set(got) == set(reference)
    for key, fields in got.items():
        for field, v in fields.items():
            want = reference[key][field]
            if key.endswith(":iter"):
                assert torch.equal(v, want), (layout, key, field)
            else:
                torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-9, msg=f"{layout} {key} {field}")


def test_reference_saw_uneven_routing(reference):
    """The oracle is meaningful: experts got different amounts of traffic."""
    scores = [v["score"].sum().item() for k, v in reference.items() if k.endswith("fc2:ind")]
    assert max(scores) > 1.2 * min(scores)
