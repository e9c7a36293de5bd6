"""Plain-torch channel hooks against direct, independent formulas."""

import json

import pytest
import torch

from megatron_prune.hooks import (
    ForwardHook,
    IndependentChannelContributionHook,
    IndependentKvHeadContributionHook,
    IterativeChannelContributionHook,
    L2NormHook,
    LayerNormContributionHook,
    NoActivationsError,
    NonFiniteActivationError,
    load_activations_logs,
)
from megatron_prune.math.channel import iterative_schedule


def _data(calls=4, s=5, b=3, h=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, h, generator=g).to(dtype) for _ in range(calls)]


def _run(hook, module, xs):
    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for x in xs:
            module(x)
    handle.remove()
    return hook


@pytest.mark.parametrize("c,n", [(10, 3), (7, 7), (3, 8), (1, 5), (48, 3), (5, 13)])
def test_iterative_schedule(c, n):
    sched = iterative_schedule(c, n)
    assert len(sched) == n and sum(sched) == c
    if c >= n:
        assert sched == [c // n + (i < c % n) for i in range(n)]
    else:
        assert sched[n - 1] == 1 and all(v in (0, 1) for v in sched)
        assert [i for i, v in enumerate(sched) if v] == [(i * n) // c - 1 for i in range(1, c + 1)]


def test_l2_norm_hook_formula():
    xs = _data()
    hook = _run(L2NormHook(), torch.nn.Identity(), xs)
    want = sum((x.double().abs().mean(0)) ** 2 for x in xs).sum(0).sqrt()  # Σ_b (mean_s|x|)^2
    torch.testing.assert_close(hook.accumulate(), want)
    assert set(hook.to_dict()) == {"score"}


def test_two_dim_input_is_tokens_by_one():
    x = torch.randn(7, 6)
    h2 = _run(L2NormHook(), torch.nn.Identity(), [x])
    h3 = _run(L2NormHook(), torch.nn.Identity(), [x[:, None, :]])
    torch.testing.assert_close(h2.accumulate(), h3.accumulate())


def test_independent_channel_contribution():
    lin = torch.nn.Linear(12, 5, bias=False)
    xs = _data()
    hook = _run(IndependentChannelContributionHook(lin), lin, xs)
    d = hook.to_dict()
    agg = sum(x.double().abs().reshape(-1, 12).mean(0) for x in xs)
    wn = lin.weight.double().norm(dim=0)
    torch.testing.assert_close(d["agg_channel_activations"], agg)
    torch.testing.assert_close(d["weight_norm"], wn)
    torch.testing.assert_close(d["score"], wn * agg)
    # resume refuses state computed with other weights
    sd = hook.state_dict()
    lin2 = torch.nn.Linear(12, 5, bias=False)
    with pytest.raises(ValueError, match="different weights"):
        IndependentChannelContributionHook(lin2).load_state_dict(sd)


def _iterative_reference(xs, w, method):
    """Straight from the definition: per channel, per token, the norm of a vector."""
    c = w.shape[1]
    sched = iterative_schedule(c, len(xs))
    removed = torch.zeros(c, dtype=torch.bool)
    agg = torch.zeros(c, dtype=torch.float64)
    order = []
    for call, x in enumerate(xs):
        x = x.reshape(-1, c).double()
        wd = w.double()
        y = x @ wd.T
        y_cur = (x * ~removed) @ wd.T
        if method is None:
            alpha = torch.ones(x.shape[0], 1, dtype=torch.float64)
        else:
            alpha = y_cur.norm(dim=-1, keepdim=True) / (y.norm(dim=-1, keepdim=True) + 1e-8)
        contrib = torch.empty(c, dtype=torch.float64)
        for i in range(c):
            if removed[i]:
                contrib[i] = float("inf")
                continue
            v = alpha * y - y_cur + x[:, i : i + 1] * wd[:, i][None]
            contrib[i] = torch.sqrt((v * v).sum(-1) + 1e-8).mean()
        agg += contrib
        for _ in range(sched[call]):
            vals = torch.where(removed, torch.tensor(float("inf"), dtype=torch.float64), agg)
            i = int(torch.argmin(vals))  # argmin returns the first (lowest index) minimum
            removed[i] = True
            order.append(i)
        if sched[call]:
            agg.zero_()
    return order


@pytest.mark.parametrize("method", [None, "scale_by_magnitude"])
@pytest.mark.parametrize("calls", [3, 20])
def test_iterative_matches_definition(method, calls):
    torch.manual_seed(1)
    lin = torch.nn.Linear(10, 6, bias=True)  # the bias must not matter
    xs = _data(calls=calls, h=10, seed=2)
    hook = IterativeChannelContributionHook(lin, {"validation_full_iters": calls, "calibration_method": method})
    _run(hook, lin, xs)
    d = hook.to_dict()
    want = _iterative_reference(xs, lin.weight.detach(), method)
    assert d["channels_importance_ascending"].tolist() == want
    assert d["score"][torch.tensor(want)].tolist() == list(range(10))
    assert hook.get_progress_info()["pruned_channels"] == 10


def test_iterative_errors_and_resume():
    lin = torch.nn.Linear(8, 4, bias=False)
    xs = _data(calls=4, h=8, seed=3)
    kw = {"validation_full_iters": 4}
    hook = IterativeChannelContributionHook(lin, kw)
    h = lin.register_forward_hook(hook)
    lin(xs[0])
    with pytest.raises(RuntimeError, match="1 of its 4"):
        hook.to_dict()
    state = hook.state_dict()
    for x in xs[1:]:
        lin(x)
    with pytest.raises(RuntimeError, match="beyond its schedule"):
        lin(xs[0])
    h.remove()
    fresh = IterativeChannelContributionHook(lin, kw)
    fresh.load_state_dict(state)
    _run(fresh, lin, xs[1:])
    assert torch.equal(fresh.to_dict()["channels_importance_ascending"], hook.to_dict()["channels_importance_ascending"])
    with pytest.raises(ValueError, match="num_iters"):
        IterativeChannelContributionHook(lin, {"validation_full_iters": 5}).load_state_dict(state)
    with pytest.raises(ValueError, match="validation_full_iters"):
        IterativeChannelContributionHook(lin, {})


class _Cfg:
    num_attention_heads = 6
    num_query_groups = 2
    kv_channels = 4
    hidden_size = 24


def test_kv_head_contribution_both_modes():
    proj = torch.nn.Linear(24, 10, bias=False)
    xs = _data(calls=3, h=24)
    lat = _run(IndependentKvHeadContributionHook(proj, {"config": _Cfg, "optimize_for": "latency"}), proj, xs)
    mem = _run(IndependentKvHeadContributionHook(proj, {"config": _Cfg}), proj, xs)
    want = torch.zeros(2, dtype=torch.float64)
    for x in xs:
        a = x.reshape(-1, 24).double()
        for g in range(2):  # group g: its 3 query heads x 4 dims are contiguous columns
            cols = slice(g * 12, (g + 1) * 12)
            want[g] += (a[:, cols] @ proj.weight.double()[:, cols].T).norm(dim=-1).mean()
    torch.testing.assert_close(mem.accumulate(), want)
    torch.testing.assert_close(lat.accumulate(), mem.accumulate())
    # Hugging Face names work too
    class HF:
        num_attention_heads, num_key_value_heads, head_dim = 6, 2, 4
    hf = _run(IndependentKvHeadContributionHook(proj, {"config": HF}), proj, xs)
    torch.testing.assert_close(hf.accumulate(), want)
    with pytest.raises(ValueError, match="optimize_for"):
        IndependentKvHeadContributionHook(proj, {"config": _Cfg, "optimize_for": "speed"})


def test_layernorm_contribution_resume_and_logs(tmp_path):
    norm = torch.nn.RMSNorm(12)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    xs = _data(calls=4)
    full = _run(LayerNormContributionHook(norm, {}), norm, xs)
    want = sum(norm(x).double().abs().reshape(-1, 12).mean(0) for x in xs)
    torch.testing.assert_close(full.accumulate(), want.detach())
    half = _run(LayerNormContributionHook(norm, {}), norm, xs[:2])
    resumed = LayerNormContributionHook(norm, {})
    resumed.load_state_dict(half.state_dict())
    _run(resumed, norm, xs[2:])
    torch.testing.assert_close(resumed.accumulate(), full.accumulate())
    # logs: safetensors + manifest, and the averaged hidden ranking
    other = _run(LayerNormContributionHook(norm, {}), norm, xs[:1])
    hooks = {"decoder.layers.0.input_layernorm": full, "decoder.final_layernorm": other}
    ForwardHook.dump_activations_logs(hooks, tmp_path, {"model_config": {"hidden_size": 12}})
    logs = load_activations_logs(tmp_path)
    torch.testing.assert_close(logs["decoder.final_layernorm"]["score"], other.accumulate())
    ranking = json.loads((tmp_path / "hidden_channel_ranking.json").read_text())
    mean = (full.accumulate() + other.accumulate()) / 2
    assert ranking["num_norms"] == 2
    assert ranking["channels_importance_ascending"] == torch.sort(mean, stable=True).indices.tolist()
    manifest = json.loads((tmp_path / "manifest.pp000.json").read_text())
    assert manifest["hooks"]["decoder.final_layernorm"] == "LayerNormContributionHook"
    assert manifest["tokens_seen"] == 4 * 15


def test_bf16_outliers_do_not_overflow():
    xs = _data(calls=3, dtype=torch.float32)
    xs[1][2, 1, 3] = 1e4
    xs[2][0, 0, 7] = -3e4
    xb = [x.to(torch.bfloat16) for x in xs]
    lin_b = torch.nn.Linear(12, 5, bias=False).to(torch.bfloat16)
    lin_f = torch.nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        lin_f.weight.copy_(lin_b.weight.float())  # the same values in float32
    for make in (lambda m: L2NormHook(), lambda m: IndependentChannelContributionHook(m),
                 lambda m: IterativeChannelContributionHook(m, {"validation_full_iters": 3})):
        hb = _run(make(lin_b), lin_b, xb)
        hf = _run(make(lin_f), lin_f, [x.float() for x in xb])
        for k, v in hb.to_dict().items():
            assert torch.isfinite(v.double()).all(), k
            assert v.dtype in (torch.float64, torch.int64), k
            torch.testing.assert_close(v, hf.to_dict()[k], rtol=1e-6, atol=0)
    # the statistics really saw the outliers
    l2 = _run(L2NormHook(), torch.nn.Identity(), xb)
    assert l2.accumulate()[7] > 1e3


def test_nan_raises_naming_the_module():
    lin = torch.nn.Linear(12, 5, bias=False)
    xs = _data(calls=2)
    xs[1][0, 0, 0] = float("nan")
    for hook in (L2NormHook(), IndependentChannelContributionHook(lin),
                 IterativeChannelContributionHook(lin, {"validation_full_iters": 2})):
        hook.module_name = "decoder.layers.3.mlp.linear_fc2"
        _run(hook, lin, xs)
        with pytest.raises(NonFiniteActivationError, match="decoder.layers.3.mlp.linear_fc2"):
            hook.to_dict()


def test_no_activations():
    with pytest.raises(NoActivationsError):
        L2NormHook().accumulate()


def test_save_and_load_hook_states(tmp_path):
    lin = torch.nn.Linear(12, 5, bias=False)
    xs = _data()
    hooks = {"a": IndependentChannelContributionHook(lin), "b": L2NormHook()}
    for h in hooks.values():
        _run(h, lin, xs[:2])
    ForwardHook.save_hook_states(hooks, tmp_path)
    fresh = {"a": IndependentChannelContributionHook(lin), "b": L2NormHook()}
    ForwardHook.load_hook_states(fresh, tmp_path)
    for k in hooks:
        _run(hooks[k], lin, xs[2:])
        _run(fresh[k], lin, xs[2:])
        torch.testing.assert_close(fresh[k].accumulate(), hooks[k].accumulate())
    with pytest.raises(KeyError, match="c"):
        ForwardHook.load_hook_states({"c": L2NormHook()}, tmp_path)
