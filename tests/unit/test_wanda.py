"""Wanda math: importance, exact per-row counts, n:m blocks, and the row-sharded selection."""

import pytest
import torch

from megatron_prune.math.wanda import (
    check_nm_shards,
    dense_wanda_keep_mask,
    distributed_row_prune_mask,
    input_sq_sum_update,
    nm_prune_mask,
    prune_count,
    unstructured_prune_mask,
    wanda_importance,
)


def _naive_wanda_keep(weight, inputs, ratio):
    """Wanda written out element by element (no shared helpers)."""
    out, cin = weight.shape
    norms = [sum(float(inputs[t, c]) ** 2 for t in range(inputs.shape[0])) ** 0.5 for c in range(cin)]
    k = int(ratio * cin)
    keep = torch.ones(out, cin, dtype=torch.bool)
    for r in range(out):
        scored = sorted(((abs(float(weight[r, c])) * norms[c], c) for c in range(cin)))
        for _, c in scored[:k]:
            keep[r, c] = False
    return keep


def test_dense_wanda_matches_naive_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 12, generator=g)
    x = torch.randn(20, 12, generator=g) * torch.linspace(0.1, 3, 12)
    keep = dense_wanda_keep_mask(w, x, "unstructured", 0.5)
    assert torch.equal(keep, _naive_wanda_keep(w, x, 0.5))
    assert int((~keep).sum()) == 6 * 6


def test_importance_uses_column_norms_and_gate_weights():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # column norms sqrt(10), 2
    imp = wanda_importance(w, input_sq_sum_update(x))
    expect = torch.tensor([[10**0.5, 4.0], [3 * 10**0.5, 1.0]], dtype=torch.float64)
    assert torch.allclose(imp, expect)
    gate = torch.tensor([0.5, 2.0])
    s = input_sq_sum_update(x, gate)
    assert torch.allclose(s, torch.tensor([0.25 + 36.0, 1.0], dtype=torch.float64))
    # [s, b, C] input gives the same as the flattened tokens
    x3 = torch.randn(4, 3, 5)
    assert torch.allclose(input_sq_sum_update(x3), input_sq_sum_update(x3.reshape(12, 5)))
    # count rescales rows alike: the selection does not change
    imp_mean = wanda_importance(w, input_sq_sum_update(x), count=torch.tensor(7.0))
    assert torch.equal(unstructured_prune_mask(imp, 1), unstructured_prune_mask(imp_mean, 1))


@pytest.mark.parametrize("ratio,cols,expect", [(0.5, 16, 8), (0.29, 100, 29), (0.7, 10, 7), (1.0, 5, 5), (0.0, 9, 0), (0.33, 10, 3)])
def test_prune_count_is_exact(ratio, cols, expect):
    assert prune_count(ratio, cols) == expect


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.29, 0.9, 1.0])
def test_unstructured_exact_sparsity_per_row(ratio):
    imp = torch.rand(7, 31, dtype=torch.float64)
    prune = unstructured_prune_mask(imp, prune_count(ratio, 31))
    assert (prune.sum(dim=1) == prune_count(ratio, 31)).all()
    # every pruned weight is no more important than every kept one in its row
    for r in range(7):
        if 0 < prune[r].sum() < 31:
            assert imp[r][prune[r]].max() <= imp[r][~prune[r]].min()


def test_unstructured_ties_prune_lowest_index_first():
    imp = torch.tensor([[1.0, 0.5, 0.5, 0.5, 2.0, 0.5]], dtype=torch.float64)
    prune = unstructured_prune_mask(imp, 2)
    assert prune.tolist() == [[False, True, True, False, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4)])
def test_nm_every_block_has_exactly_n_zeros(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    imp = torch.rand(5, 4 * m, generator=g, dtype=torch.float64)
    imp[0, :m] = 0.25  # a block of ties
    prune = nm_prune_mask(imp, n, m)
    blocks = prune.reshape(5, 4, m)
    assert (blocks.sum(dim=2) == n).all()
    if 0 < n < m:
        assert blocks[0, 0].tolist() == [True] * n + [False] * (m - n)
        ib = imp.reshape(5, 4, m)
        assert (ib.masked_fill(~blocks, -1).amax(2) <= ib.masked_fill(blocks, 9).amin(2)).all()


def test_nm_refuses_straddling_blocks():
    with pytest.raises(ValueError, match="multiple of m"):
        nm_prune_mask(torch.rand(2, 10, dtype=torch.float64), 2, 4)
    with pytest.raises(ValueError, match="straddle"):
        check_nm_shards(6, 4, "fc2")
    check_nm_shards(8, 4)


def test_distributed_selection_single_process_equals_sort():
    g = torch.Generator().manual_seed(3)
    imp = torch.rand(9, 40, generator=g, dtype=torch.float64)
    imp[:, 5:15] = 0.5  # many ties
    imp[2] = 0.0
    for k in (0, 1, 7, 20, 39, 40):
        assert torch.equal(distributed_row_prune_mask(imp, k, None), unstructured_prune_mask(imp, k))


def _tied_importance(rows=6, cols=24, seed=11):
    g = torch.Generator().manual_seed(seed)
    imp = torch.randint(0, 4, (rows, cols), generator=g).to(torch.float64)  # heavy ties
    imp[1] = 1.0  # a row of one value across every shard
    imp[2, : cols // 2] = 3.0  # ties straddling the shard boundary
    imp[3] = torch.rand(cols, generator=g, dtype=torch.float64) * 1e-300  # tiny values
    return imp


def _dist_select_worker(k, rows, cols):
    import torch.distributed as dist

    imp = _tied_importance(rows, cols)
    world, rank = dist.get_world_size(), dist.get_rank()
    local = imp.chunk(world, dim=1)[rank].contiguous()
    group = dist.new_group(list(range(world)))
    part = distributed_row_prune_mask(local, k, group)
    return part


@pytest.mark.parametrize("k", [0, 1, 5, 12, 13, 23, 24])
def test_distributed_selection_pool2_equals_single_process(pool2, k):
    parts = pool2.run(_dist_select_worker, k, 6, 24)
    got = torch.cat(parts, dim=1)
    expect = unstructured_prune_mask(_tied_importance(6, 24), k)
    assert torch.equal(got, expect)
    assert (got.sum(dim=1) == k).all()


def _dist_select_many_worker(ks, rows, cols):
    import torch.distributed as dist

    imp = _tied_importance(rows, cols)
    world, rank = dist.get_world_size(), dist.get_rank()
    local = imp.chunk(world, dim=1)[rank].contiguous()
    group = dist.new_group(list(range(world)))
    return [distributed_row_prune_mask(local, k, group) for k in ks]


def test_distributed_selection_pool4_equals_single_process(pool4):
    """Four shards: ties are split by the exclusive prefix of the lower ranks' tie counts."""
    ks = [0, 1, 5, 6, 7, 11, 12, 13, 17, 18, 23, 24]
    per_rank = pool4.run(_dist_select_many_worker, ks, 6, 24)
    imp = _tied_importance(6, 24)
    for i, k in enumerate(ks):
        got = torch.cat([r[i] for r in per_rank], dim=1)
        assert torch.equal(got, unstructured_prune_mask(imp, k)), k
        assert (got.sum(dim=1) == k).all(), k


def test_distributed_selection_refuses_values_it_cannot_order():
    imp = torch.rand(3, 8, dtype=torch.float64)
    for bad in (float("nan"), float("inf"), -1.0):
        x = imp.clone()
        x[1, 2] = bad
        with pytest.raises(ValueError, match="non-negative finite"):
            distributed_row_prune_mask(x, 3, None)
    with pytest.raises(ValueError, match="cannot prune 9 of 8"):
        distributed_row_prune_mask(imp, 9, None)
    with pytest.raises(ValueError, match="cannot prune 9 of 8"):
        unstructured_prune_mask(imp, 9)
    # -0.0 orders as +0.0: ties with 0.0 go by column index, as in the sort
    z = torch.tensor([[0.0, -0.0, 0.0, 1.0]], dtype=torch.float64)
    assert distributed_row_prune_mask(z, 2, None).tolist() == [[True, True, False, False]]
    assert distributed_row_prune_mask(z, 2, None).tolist() == unstructured_prune_mask(z, 2).tolist()


def test_pruner_refuses_bad_parameters_with_named_errors():
    from megatron_prune.sparsify import MoEPruner

    cases = [
        (dict(prune_type="structured"), "prune_type"),
        (dict(mode="iterative"), "mode"),
        (dict(prune_type="semistructured", n=5, m=4), "n:m"),
        (dict(sparsity_ratio=1.5), "sparsity_ratio"),
        (dict(sparsity_ratio=-0.1), "sparsity_ratio"),
        (dict(gate_weighting=True, ungate_fc2=True), "ungate_fc2"),
        (dict(nsamples=0), "nsamples"),
        (dict(max_seqlen=0), "max_seqlen"),
        (dict(batch_size=0), "batch_size"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            MoEPruner(**kwargs)
    p = MoEPruner(nsamples=8, sparsity_ratio=0.25, prune_type="semistructured", n=1, m=4, device="cpu")
    assert p.params()["nsamples"] == 8 and p.params()["n"] == 1 and p.params()["sparsity_ratio"] == 0.25


def test_calibration_tokens_rows_and_windows():
    from megatron_prune.sparsify import calibration_tokens

    rows = torch.arange(10 * 12).reshape(10, 12)
    a = calibration_tokens(rows, 4, 8, seed=1)
    assert a.shape == (4, 8) and a.dtype == torch.int64
    assert torch.equal(a, calibration_tokens(rows, 4, 8, seed=1))  # seeded
    assert not torch.equal(a, calibration_tokens(rows, 4, 8, seed=2))
    starts = (a[:, 0] // 12).tolist()
    assert len(set(starts)) == 4  # rows drawn without replacement
    assert torch.equal(a, rows[starts, :8])
    assert torch.equal(calibration_tokens(rows[:3], 4, 8), rows[:3, :8])  # fewer rows than asked: all
    docs = [torch.arange(5), torch.arange(100, 140), torch.arange(200, 230)]
    w = calibration_tokens(docs, 6, 16, seed=3)
    assert w.shape == (6, 16)
    for row in w:
        assert bool((row[1:] - row[:-1] == 1).all())  # one contiguous window of one document
        assert int(row[0]) >= 100  # the 5-token document is too short to be drawn
    with pytest.raises(ValueError, match="longer than max_seqlen"):
        calibration_tokens([torch.arange(5)], 2, 16)


def test_input_hook_gate_weighting_and_ungating_on_a_plain_expert():
    """The hooks on a torch stand-in of a Megatron expert: fc2 input = g * act(fc1 x)."""
    from megatron_prune.sparsify import GateTap, WandaInputHook

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1 = torch.nn.Linear(6, 8, bias=False)
            self.linear_fc2 = torch.nn.Linear(8, 6, bias=False)

        def forward(self, x, per_token_scale):
            return self.linear_fc2(torch.relu(self.linear_fc1(x)) * per_token_scale[:, None])

    torch.manual_seed(0)
    ex = Expert()
    tap = GateTap()
    ex.register_forward_pre_hook(tap, with_kwargs=True)
    h1 = WandaInputHook(ex.linear_fc1, tap, gate_weight=True)
    h2 = WandaInputHook(ex.linear_fc2, tap, ungate=True)
    h2g = WandaInputHook(ex.linear_fc2)
    ex.linear_fc1.register_forward_hook(h1)
    ex.linear_fc2.register_forward_hook(h2)
    ex.linear_fc2.register_forward_hook(h2g)
    xs, gs = [torch.randn(5, 6), torch.randn(3, 6)], [torch.rand(5) + 0.1, torch.tensor([0.5, 0.0, 2.0])]
    with torch.no_grad():
        for x, g in zip(xs, gs):
            ex(x, g)
        x, g = torch.cat(xs).double(), torch.cat(gs).double()
        act = torch.relu(x @ ex.linear_fc1.weight.double().T)
    assert torch.allclose(h1.sq_sum, ((g[:, None] * x) ** 2).sum(0))
    assert float(h1.count) == 8
    nz = g != 0  # the zero-gate token cannot be ungated: skipped
    assert torch.allclose(h2.sq_sum, (act[nz] ** 2).sum(0))
    assert float(h2.count) == 7
    assert torch.allclose(h2g.sq_sum, ((g[:, None] * act) ** 2).sum(0))
    state = h1.state_dict()
    fresh = WandaInputHook(ex.linear_fc1, tap, gate_weight=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.accumulate(), h1.accumulate())
    with pytest.raises(ValueError):
        WandaInputHook(ex.linear_fc2).load_state_dict(state)
