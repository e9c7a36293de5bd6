"""Pure MoE math: routing reproduction (vs. Megatron-Core's own function), native re-routing,
removal effect, instant runoff and ranks."""

import itertools

import pytest
import torch

from megatron_prune.math import moe as mm

VARIANTS = {
    "softmax": dict(),
    "pre_softmax": dict(pre_softmax=True),
    "sigmoid": dict(score_function="sigmoid"),
    "sigmoid_bias": dict(score_function="sigmoid", bias=True),
    "grouped": dict(num_groups=2, group_topk=1),
    "grouped_pre_scaled": dict(num_groups=4, group_topk=2, pre_softmax=True, scaling_factor=2.5),
    "sigmoid_bias_grouped": dict(score_function="sigmoid", bias=True, num_groups=4, group_topk=2, scaling_factor=2.0),
}


def _case(name, e=8, k=2, t=64, seed=0):
    kw = dict(VARIANTS[name])
    bias = kw.pop("bias", False)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    b = torch.randn(e, generator=g) * 0.1 if bias else None
    return logits, mm.RoutingSpec(num_experts=e, topk=k, **kw), b


@pytest.mark.parametrize("name", list(VARIANTS))
def test_route_matches_megatron_bit_exactly(name):
    mu = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    logits, spec, bias = _case(name)
    probs, rmap = mu.topk_routing_with_score_function(
        logits, spec.topk, use_pre_softmax=spec.pre_softmax, num_groups=spec.num_groups,
        group_topk=spec.group_topk, scaling_factor=spec.scaling_factor,
        score_function=spec.score_function, expert_bias=bias,
    )
    p2, m2 = mm.route_dense(logits, spec, bias)
    assert torch.equal(rmap, m2)
    assert torch.equal(probs, p2)


def _structural(logits, spec, bias, t, removed):
    keep = [j for j in range(spec.num_experts) if j != removed]
    kw = dict(num_experts=len(keep))
    if spec.grouped:
        kw["group_members"] = tuple(
            tuple(keep.index(j) for j in grp if j != removed) for grp in spec.groups()
        )
        kw["group_score_topk"] = spec.m_per_group
    sub = spec.replace(**kw)
    idx, g = mm.route(logits[t : t + 1, keep], sub, None if bias is None else bias[keep])
    return {keep[j]: w for j, w in zip(idx[0].tolist(), g[0].tolist())}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reroute_equals_router_without_the_expert(name):
    logits, spec, bias = _case(name, t=24)
    idx, _ = mm.route(logits, spec, bias)
    ni, ng = mm.reroute_without_each(logits, idx, spec, bias)
    extra = mm.extra_experts(idx, ni, spec.num_experts, spec.max_extra())
    for t in range(logits.shape[0]):
        for s in range(spec.topk):
            want = _structural(logits, spec, bias, t, int(idx[t, s]))
            got = dict(zip(ni[t, s].tolist(), ng[t, s].tolist()))
            assert want.keys() == got.keys()
            assert all(abs(want[j] - got[j]) < 1e-6 for j in want)
        needed = set(ni[t].reshape(-1).tolist()) - set(idx[t].tolist())
        have = set(extra[t].tolist()) - {spec.num_experts}
        assert needed == have  # the bound never truncates, and nothing spurious
    if not spec.grouped:  # plain top-k: exactly one extra expert per token (the (k+1)-th)
        assert (extra[:, 0] < spec.num_experts).all() and extra.shape[1] == 1
        assert torch.equal(extra[:, 0], torch.topk(mm.choice_scores(logits, spec, bias)[0], 3)[1][:, 2])


def test_removal_effect_simple():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one token, two experts
    g = torch.tensor([[0.75, 0.25]])
    y_wo = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # slot 0 removed -> only expert 1, etc.
    mse, cd = mm.removal_effect(f, g, y_wo)
    y = torch.tensor([0.75, 0.25])
    assert torch.allclose(mse[0, 0], ((y - y_wo[0, 0]) ** 2).mean().double())
    cos1 = torch.nn.functional.cosine_similarity(y, y_wo[0, 1], dim=0)
    assert torch.allclose(cd[0, 1], (1 - cos1).double())
    assert mse.dtype == torch.float64


def _irv_reference(ballots, e, k):
    alive, order = set(range(e)), []
    while alive:
        votes = {x: 0 for x in alive}
        for b in ballots:
            for x in [x for x in b if x in alive][:k]:
                votes[x] += 1
        loser = min(alive, key=lambda x: (votes[x], x))
        order.append(loser)
        alive.remove(loser)
    return order


def test_instant_runoff_matches_reference_and_zero_votes_go_first():
    g = torch.Generator().manual_seed(1)
    choice = torch.randn(40, 6, generator=g)
    choice[:, 4] -= 10  # expert 4 never in anybody's top-2 ...
    choice[:, 1] -= 10  # ... nor expert 1: both eliminated first, lowest id first
    ballots = mm.preference_ballots(choice)
    assert ballots.dtype == torch.uint8
    order = mm.instant_runoff(ballots, 6, 2).tolist()
    assert order == _irv_reference(ballots.tolist(), 6, 2)
    assert order[:2] == [1, 4]
    ranks = mm.ranks_from_order(order)
    assert int(ranks[1]) == 0 and int(ranks[order[-1]]) == 5


def test_ranks_are_per_expert_not_argsort():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1])
    ranks = mm.ranks_from_scores(scores)
    assert ranks.tolist() == [2, 0, 3, 1]  # ties: lower id is less important
    assert mm.ascending_from_ranks(ranks).tolist() == [1, 3, 0, 2]


def test_accumulate_routed_float64():
    idx = torch.tensor([[0, 2], [2, 1]])
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = mm.accumulate_routed(v, idx, 4)
    assert out.dtype == torch.float64 and out.tolist() == [1.0, 4.0, 5.0, 0.0]


def test_spec_validation():
    with pytest.raises(ValueError):
        mm.RoutingSpec(num_experts=6, topk=2, num_groups=4, group_topk=2)
    with pytest.raises(ValueError):
        mm.RoutingSpec(num_experts=4, topk=2, score_function="relu")
    assert mm.RoutingSpec(num_experts=8, topk=2).max_extra() == 1
    assert list(itertools.chain(*mm.RoutingSpec(num_experts=8, topk=2, num_groups=2, group_topk=1).groups())) == list(range(8))


@pytest.mark.parametrize("name", ["grouped", "grouped_pre_scaled", "sigmoid_bias_grouped"])
def test_explicit_groups_equal_contiguous_groups(name):
    logits, spec, bias = _case(name)
    explicit = spec.replace(group_members=tuple(tuple(g) for g in spec.groups()))
    a, b = mm.route_dense(logits, spec, bias), mm.route_dense(logits, explicit, bias)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=1e-6, atol=0)
