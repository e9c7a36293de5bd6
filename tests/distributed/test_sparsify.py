"""MoE-Pruner on a real tiny Megatron GPT-MoE: layout invariance, dense-Wanda oracle, conversion.

Pattern: one TP=1 reference checkpoint; load it at each layout, sparsify the same global
calibration tokens, compare the global masks gathered on rank 0 with the TP=1 ones.
"""

import os

import pytest
import torch

from megatron_prune.math.wanda import dense_wanda_keep_mask
from megatron_prune.model_config import ParallelLayout
from megatron_prune.testing.models import TINY_MOE, forward_logits, load_model, save_reference_checkpoint

CAL = dict(nsamples=4, max_seqlen=16, batch_size=2, seed=7)
MOE_LAYERS = [i for i, v in enumerate(TINY_MOE.moe_layer_pattern()) if v]
DENSE_LAYERS = [i for i, v in enumerate(TINY_MOE.moe_layer_pattern()) if not v]
E, F, H = TINY_MOE.num_moe_experts, TINY_MOE.moe_ffn_hidden_size, TINY_MOE.hidden_size
DENSE = [f"decoder.layers.{i}.mlp.linear_{k}" for i in DENSE_LAYERS for k in ("fc1", "fc2")]


def _data():
    return torch.randint(0, TINY_MOE.vocab_size, (12, 24), generator=torch.Generator().manual_seed(5))


def _key(layer, kind):
    return f"sparsity/decoder.layers.{layer}.mlp.experts.experts.linear_{kind}.weight"


# ---------------------------------------------------------------------------- workers
def _sparsify_worker(layout: dict, ckpt: str, params: dict, logits_tokens=None, cfg=TINY_MOE):
    from megatron_prune.sparsify import MoEPruner

    chunks = load_model(cfg, ParallelLayout(**layout), ckpt)
    res = MoEPruner(**{**CAL, **params}).run(chunks, _data())
    out = {"masks": res.masks, "report": res.report}
    if logits_tokens is not None:
        out["logits"] = _logits(chunks, logits_tokens)
    return out


def _logits(chunks, tokens):
    from megatron.core import parallel_state as ps

    from megatron_prune.testing.models import forward_pipeline

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return forward_logits(chunks[0], tokens)
    out = forward_pipeline(chunks, tokens, tokens.shape[0])
    holder = ps.get_pipeline_model_parallel_last_rank()
    box = [out]
    torch.distributed.broadcast_object_list(box, src=holder)
    return box[0]


def _capture_worker(ckpt: str, params: dict):
    """TP=1 (DP over the world): capture every expert linear's inputs and gates, then sparsify.

    Returns the captured tensors of this rank's DP share, the weights before and after, and
    (rank 0) the pruner's global masks.
    """
    from megatron_prune.megatron.naming import global_module_names
    from megatron_prune.sparsify import MoEPruner, calibration_tokens
    from megatron_prune.testing.models import dp_shard

    chunks = load_model(TINY_MOE, ParallelLayout(), ckpt)
    model = chunks[0]
    cap, gates, before, handles = {}, {}, {}, []
    for name, mod in global_module_names(model):
        if (".local_experts." in name and name.endswith(("linear_fc1", "linear_fc2"))) or name in DENSE:
            before[name] = mod.weight.detach().clone()
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: cap.setdefault(n, []).append(a[0].detach().clone())))
        if ".local_experts." in name and name.split(".")[-2] == "local_experts":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: gates.setdefault(n, []).append(a[1].detach().clone())))
    tokens = dp_shard(calibration_tokens(_data(), CAL["nsamples"], CAL["max_seqlen"], CAL["seed"]))
    with torch.no_grad():
        for mb in tokens.split(CAL["batch_size"]):
            forward_logits(model, mb, gather=False)
    for h in handles:
        h.remove()
    res = MoEPruner(**{**CAL, **params}).run(chunks, _data())
    after = {n: dict(global_module_names(model))[n].weight.detach().clone() for n in before}
    return {
        "inputs": {n: torch.cat(v) for n, v in cap.items()},
        "gates": {n: torch.cat(v) for n, v in gates.items()},
        "before": before, "after": after, "masks": res.masks, "report": res.report,
    }


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moe_ckpt(session_tmp, pool2):
    path = os.path.join(session_tmp, "sparsify_moe_ref")
    if not os.path.exists(os.path.join(path, ".metadata")):
        pool2.run(save_reference_checkpoint, TINY_MOE, path)
    return path


_REF = {}


def _reference(pool2, ckpt, params):
    key = tuple(sorted(params.items()))
    if key not in _REF:
        _REF[key] = pool2.run(_sparsify_worker, {}, ckpt, params)[0]
    return _REF[key]


def _dense_wanda_masks(ranks, params):
    """Global keep-masks from the captured inputs of every DP rank, by the dense definition."""
    inputs = {n: torch.cat([r["inputs"][n] for r in ranks]) for n in ranks[0]["inputs"]}
    gates = {n: torch.cat([r["gates"][n] for r in ranks]) for n in ranks[0]["gates"]}
    kw = {k: params[k] for k in ("prune_type", "sparsity_ratio", "n", "m") if k in params}
    masks = {}
    for layer in MOE_LAYERS:
        for kind in ("fc1", "fc2"):
            per = []
            for e in range(E):
                name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_{kind}"
                x = inputs[name]
                g = gates[name.rsplit(".", 1)[0]]
                tw = None
                if params.get("gate_weighting") and kind == "fc1":
                    tw = g
                if params.get("ungate_fc2") and kind == "fc2":
                    tw = 1.0 / g.double()
                per.append(dense_wanda_keep_mask(ranks[0]["before"][name], x, token_weight=tw, **kw))
            masks[_key(layer, kind)] = torch.stack(per)
    if params.get("include_dense"):
        for name in DENSE:
            x = inputs[name].reshape(-1, inputs[name].shape[-1])
            masks[f"sparsity/{name}.weight"] = dense_wanda_keep_mask(ranks[0]["before"][name], x, **kw)
    return masks


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(gate_weighting=True),
        dict(ungate_fc2=True, sparsity_ratio=0.3),
        dict(prune_type="semistructured", n=2, m=4),
        dict(include_dense=True, sparsity_ratio=0.6),
    ],
    ids=["wanda", "gate_weighted", "ungated_fc2", "2of4", "with_dense"],
)
def test_pruned_model_equals_dense_wanda_on_captured_inputs(pool2, moe_ckpt, params):
    ranks = pool2.run(_capture_worker, moe_ckpt, params)
    expect = _dense_wanda_masks(ranks, params)
    got = ranks[0]["masks"]
    assert sorted(got) == sorted(expect)
    for key in expect:
        assert torch.equal(got[key], expect[key]), key
    # the in-memory weights are the dense weights times the dense keep-mask, on every rank
    for r in ranks:
        for name, w in r["before"].items():
            if name in DENSE:
                want = w * expect[f"sparsity/{name}.weight"] if params.get("include_dense") else w
                assert torch.equal(r["after"][name], want)
                continue
            layer, e, kind = int(name.split(".")[2]), int(name.split(".")[-2]), name[-3:]
            assert torch.equal(r["after"][name], w * expect[_key(layer, kind)][e])
    # achieved sparsity is exactly the request (no weight of the tiny model is exactly zero)
    for key, entry in ranks[0]["report"].items():
        if params.get("prune_type") == "semistructured":
            assert entry["sparsity"] == params["n"] / params["m"]
        else:
            cols = entry["shape"][-1]
            assert entry["pruned"] == entry["total"] // cols * int(params.get("sparsity_ratio", 0.5) * cols + 1e-9)
        # every row of every tensor holds the same count: the mask says so directly, too
        mask = ranks[0]["masks"]["sparsity/" + key]
        per_row = (~mask).sum(-1)
        assert (per_row == per_row.reshape(-1)[0]).all(), key
        assert int((~mask).sum()) == entry["pruned"] and mask.numel() == entry["total"]
        if ".experts." in key:
            assert entry["sparsity_per_expert"] == pytest.approx([entry["sparsity"]] * E), key


LAYOUTS = [dict(tp=2), dict(tp=2, etp=1), dict(ep=2), dict(tp=1, etp=2), dict(tp=2, etp=1, ep=2), dict(pp=2),
           dict(tp=2, sequence_parallel=True)]
LAYOUT_IDS = ["tp2_etp2", "tp2_etp1", "ep2", "etp2", "tp2_ep2", "pp2", "tp2_sp"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_masks_invariant_across_layouts(pool2, moe_ckpt, layout):
    params = dict(gate_weighting=True, include_dense=True)
    ref = _reference(pool2, moe_ckpt, params)
    got = pool2.run(_sparsify_worker, layout, moe_ckpt, params)[0]
    assert sorted(got["masks"]) == sorted(ref["masks"])
    assert len(ref["masks"]) == 2 * len(MOE_LAYERS) + len(DENSE)
    for key, mask in ref["masks"].items():
        if ".experts." in key:
            assert mask.shape == ((E, 2 * F, H) if "fc1" in key else (E, H, F))
        assert torch.equal(got["masks"][key], mask), key


@pytest.mark.parametrize("layout", [dict(tp=2), dict(ep=2)], ids=["tp2_etp2", "ep2"])
def test_nm_masks_invariant_and_exact(pool2, moe_ckpt, layout):
    params = dict(prune_type="semistructured", n=2, m=4)
    ref = _reference(pool2, moe_ckpt, params)
    got = pool2.run(_sparsify_worker, layout, moe_ckpt, params)[0]
    for key, mask in ref["masks"].items():
        assert torch.equal(got["masks"][key], mask), key
        blocks = (~mask).reshape(*mask.shape[:-1], -1, 4).sum(-1)
        assert (blocks == 2).all()


def test_layer_by_layer_invariant_and_differs_from_one_shot(pool2, moe_ckpt):
    params = dict(mode="layer_by_layer")
    ref = _reference(pool2, moe_ckpt, params)
    one_shot = _reference(pool2, moe_ckpt, dict())
    first = MOE_LAYERS[0]
    # the first MoE layer sees unpruned inputs either way; later layers see pruned outputs
    for kind in ("fc1", "fc2"):
        assert torch.equal(ref["masks"][_key(first, kind)], one_shot["masks"][_key(first, kind)])
    later = [_key(l, k) for l in MOE_LAYERS[1:] for k in ("fc1", "fc2")]
    assert any(not torch.equal(ref["masks"][k], one_shot["masks"][k]) for k in later)
    for layout in (dict(tp=2), dict(pp=2)):
        got = pool2.run(_sparsify_worker, layout, moe_ckpt, params)[0]
        for key, mask in ref["masks"].items():
            assert torch.equal(got["masks"][key], mask), (layout, key)


def test_gate_weighting_changes_fc1_masks_only_by_the_gate(pool2, moe_ckpt):
    plain = _reference(pool2, moe_ckpt, dict())
    gated = _reference(pool2, moe_ckpt, dict(gate_weighting=True))
    fc1 = [k for k in plain["masks"] if "fc1" in k]
    assert any(not torch.equal(plain["masks"][k], gated["masks"][k]) for k in fc1)
    # fc2 already carries the gate in Megatron: weighting adds nothing there
    for k in plain["masks"]:
        if "fc2" in k:
            assert torch.equal(plain["masks"][k], gated["masks"][k]), k


def _logits_worker(layout: dict, ckpt: str, tokens, cfg=TINY_MOE):
    chunks = load_model(cfg, ParallelLayout(**layout), ckpt)
    return _logits(chunks, tokens)


def test_converted_checkpoint_gives_in_memory_pruned_logits(pool2, moe_ckpt, tmp_path):
    from megatron_prune.cli import main
    from megatron_prune.masks import load_masks, save_masks

    tokens = _data()[:2, :16]
    params = dict(sparsity_ratio=0.5, gate_weighting=True)
    out = pool2.run(_sparsify_worker, dict(tp=2), moe_ckpt, params, tokens)
    dense = pool2.run(_logits_worker, {}, moe_ckpt, tokens)[0]
    pruned_logits = out[0]["logits"]
    assert not torch.allclose(pruned_logits, dense, atol=1e-3)  # pruning changed the model
    masks_path = tmp_path / "masks.safetensors"
    save_masks(masks_path, out[0]["masks"], {"source": "test"})
    back, manifest = load_masks(masks_path)
    for k, v in out[0]["masks"].items():
        assert torch.equal(back[k], v)
    cfg_path = tmp_path / "model_config.json"
    TINY_MOE.save(cfg_path)
    dst = tmp_path / "sparse_ckpt"
    rc = main(["convert", "--load", moe_ckpt, "--masks", str(masks_path), "--save", str(dst),
               "--model-config", str(cfg_path), "--no-progress", "--verify"])
    assert rc == 0
    for layout in (dict(), dict(ep=2)):
        got = pool2.run(_logits_worker, layout, str(dst), tokens)[0]
        assert torch.allclose(got, pruned_logits, atol=1e-5, rtol=1e-5), (layout, (got - pruned_logits).abs().max())


def _sequential_dense_reference_worker(ckpt: str):
    """Layer by layer with the dense definition: capture layer l's expert inputs on the model
    pruned so far (all DP shares gathered), prune layer l by dense Wanda, go on."""
    import torch.distributed as dist

    from megatron_prune.megatron.naming import global_module_names
    from megatron_prune.sparsify import calibration_tokens
    from megatron_prune.testing.models import dp_shard

    chunks = load_model(TINY_MOE, ParallelLayout(), ckpt)
    model = chunks[0]
    mods = dict(global_module_names(model))
    tokens = dp_shard(calibration_tokens(_data(), CAL["nsamples"], CAL["max_seqlen"], CAL["seed"]))
    masks = {}
    for layer in MOE_LAYERS:
        cap, handles = {}, []
        for e in range(E):
            for kind in ("fc1", "fc2"):
                name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_{kind}"
                handles.append(mods[name].register_forward_hook(
                    lambda m, a, o, n=name: cap.setdefault(n, []).append(a[0].detach().clone())))
        with torch.no_grad():
            for mb in tokens.split(CAL["batch_size"]):
                forward_logits(model, mb, gather=False)
        for h in handles:
            h.remove()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {n: torch.cat(v) for n, v in cap.items()})
        for kind in ("fc1", "fc2"):
            per = []
            for e in range(E):
                name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_{kind}"
                x = torch.cat([r[name] for r in everyone])
                keep = dense_wanda_keep_mask(mods[name].weight.detach(), x)
                with torch.no_grad():
                    mods[name].weight.mul_(keep)
                per.append(keep)
            masks[_key(layer, kind)] = torch.stack(per)
    return masks


def test_layer_by_layer_equals_sequential_dense_reference(pool2, moe_ckpt):
    expect = pool2.run(_sequential_dense_reference_worker, moe_ckpt)[0]
    got = _reference(pool2, moe_ckpt, dict(mode="layer_by_layer"))
    assert sorted(got["masks"]) == sorted(expect)
    for key, mask in expect.items():
        assert torch.equal(got["masks"][key], mask), key


def _cli_reference_worker(ckpt: str, params: dict, tokens):
    from megatron_prune.sparsify import MoEPruner

    chunks = load_model(TINY_MOE, ParallelLayout(), ckpt)
    return MoEPruner(**params).run(chunks, tokens).masks


def test_cli_under_torchrun_matches_library(pool2, moe_ckpt, tmp_path):
    import subprocess
    import sys

    from megatron_prune.masks import load_masks
    from megatron_prune.sparsify_cli import random_tokens

    cfg_path = tmp_path / "model_config.json"
    TINY_MOE.save(cfg_path)
    out = tmp_path / "masks.safetensors"
    from megatron_prune.testing.workers import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "megatron_prune", "sparsify", "--load", moe_ckpt, "--model-config", str(cfg_path),
           "--tp", "2", "--etp", "2", "--data", "random", "--nsamples", "4", "--max-seqlen", "16",
           "--seed", "3", "--micro-batch-size", "2", "--prune-type", "semistructured", "--out", str(out),
           "--report", str(tmp_path / "report.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "50.00%" in proc.stdout
    masks, manifest = load_masks(out)
    tokens = random_tokens(4, 16, TINY_MOE.vocab_size, 3)
    params = dict(nsamples=4, max_seqlen=16, seed=3, batch_size=2, prune_type="semistructured")
    expect = pool2.run(_cli_reference_worker, moe_ckpt, params, tokens)[0]
    assert sorted(masks) == sorted(expect)
    for k in expect:
        assert torch.equal(masks[k], expect[k]), k
    assert manifest["params"]["prune_type"] == "semistructured"


def _calibrate_all_worker(layout: dict, ckpt: str, params: dict):
    """Sparsify with calibrate_all_experts; at TP=1 also capture each MoE layer's input tokens."""
    import torch.distributed as dist

    from megatron_prune.megatron.naming import global_module_names
    from megatron_prune.sparsify import MoEPruner

    chunks = load_model(TINY_MOE, ParallelLayout(**layout), ckpt)
    cap, handles = {}, []
    if not layout:
        for name, mod in global_module_names(chunks[0]):
            if name in [f"decoder.layers.{l}.mlp" for l in MOE_LAYERS]:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, n=name: cap.setdefault(n, []).append(a[0].detach().reshape(-1, H).clone())))
    before = {n: m.weight.detach().clone() for n, m in global_module_names(chunks[0]) if n.endswith("linear_fc1")}
    res = MoEPruner(**{**CAL, **params, "calibrate_all_experts": True}).run(chunks, _data())
    for h in handles:
        h.remove()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {n: torch.cat(v) for n, v in cap.items()})
    inputs = {n: torch.cat([r[n] for r in everyone]) for n in everyone[0]}
    return {"masks": res.masks, "tokens_seen": res.tokens_seen, "inputs": inputs, "before": before}


def test_calibrate_all_experts_every_expert_sees_every_token(pool2, moe_ckpt):
    params = dict(gate_weighting=False)
    ref = pool2.run(_calibrate_all_worker, {}, moe_ckpt, params)[0]
    total = CAL["nsamples"] * CAL["max_seqlen"]
    expert_counts = {n: c for n, c in ref["tokens_seen"].items() if ".local_experts." in n}
    assert len(expert_counts) == 2 * E * len(MOE_LAYERS)
    assert all(c == total for c in expert_counts.values()), expert_counts
    # without it, the experts together see top-k times the tokens, not every expert all of them
    plain = pool2.run(_capture_worker, moe_ckpt, params)[0]
    routed = {n: x.shape[0] for n, x in plain["inputs"].items() if ".local_experts." in n}
    assert any(c < total for c in routed.values())
    # fc1 of every expert: dense Wanda on all the layer's tokens
    for layer in MOE_LAYERS:
        x = ref["inputs"][f"decoder.layers.{layer}.mlp"]
        assert x.shape[0] == total
        for e in range(E):
            w = ref["before"][f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1"]
            assert torch.equal(ref["masks"][_key(layer, "fc1")][e], dense_wanda_keep_mask(w, x))
    for layout in (dict(tp=2), dict(ep=2)):
        got = pool2.run(_calibrate_all_worker, layout, moe_ckpt, params)[0]
        for key, mask in ref["masks"].items():
            assert torch.equal(got["masks"][key], mask), (layout, key)


ALL_MOE = TINY_MOE.replace(num_layers=2, moe_layer_freq=1)


def test_stacked_layer_keys_invariant_and_convertible(pool2, session_tmp, tmp_path):
    """All layers MoE: the checkpoint stacks layers (``decoder.layers.mlp.experts.experts.*``
    ``[L, E, ...]``); PP=2 places each stage's layer at its global index."""
    from megatron_prune.cli import main
    from megatron_prune.masks import save_masks

    ckpt = os.path.join(session_tmp, "sparsify_all_moe_ref")
    if not os.path.exists(os.path.join(ckpt, ".metadata")):
        pool2.run(save_reference_checkpoint, ALL_MOE, ckpt)
    tokens = _data()[:2, :16]
    params = dict(mode="layer_by_layer")
    ref = pool2.run(_sparsify_worker, {}, ckpt, params, tokens, ALL_MOE)[0]
    stacked = "sparsity/decoder.layers.mlp.experts.experts.linear_{}.weight"
    assert sorted(ref["masks"]) == sorted(stacked.format(k) for k in ("fc1", "fc2"))
    assert ref["masks"][stacked.format("fc1")].shape == (2, E, 2 * F, H)
    per_expert = ref["report"][stacked.format("fc2")[len("sparsity/"):]]["sparsity_per_expert"]
    assert per_expert == [[pytest.approx(0.5)] * E] * 2  # [L][E]
    for layout in (dict(pp=2), dict(ep=2, tp=2, etp=1)):
        got = pool2.run(_sparsify_worker, layout, ckpt, params, tokens, ALL_MOE)[0]
        for key, mask in ref["masks"].items():
            assert torch.equal(got["masks"][key], mask), (layout, key)
        assert torch.allclose(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    masks_path = tmp_path / "m.safetensors"
    save_masks(masks_path, ref["masks"], {"source": "test"})
    ALL_MOE.save(tmp_path / "cfg.json")
    dst = tmp_path / "out"
    assert main(["convert", "--load", ckpt, "--masks", str(masks_path), "--save", str(dst),
                 "--model-config", str(tmp_path / "cfg.json"), "--no-progress"]) == 0
    got = pool2.run(_logits_worker, dict(pp=2), str(dst), tokens, ALL_MOE)[0]
    assert torch.allclose(got, ref["logits"], atol=1e-5, rtol=1e-5)


def test_cli_reports_bad_input_in_one_line(moe_ckpt, tmp_path, capsys):
    from megatron_prune.cli import main

    assert main(["sparsify", "--load", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    TINY_MOE.save(tmp_path / "cfg.json")
    assert main(["sparsify", "--load", moe_ckpt, "--model-config", str(tmp_path / "cfg.json"),
                 "--sparsity-ratio", "1.5", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("megatron-prune sparsify: error:") for line in err)
    assert "sparsity_ratio" in err[1]
    assert main(["sparsify", "--load", moe_ckpt, "--model-config", str(tmp_path / "cfg.json"),
                 "--micro-batch-size", "0", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-prune sparsify: error:") and "batch_size" in err[0]
    assert not (tmp_path / "m").exists()


def test_nm_blocks_straddling_expert_tp_shards_are_refused(pool2, moe_ckpt):
    """m = F_moe fits one row at TP=1 but straddles the two expert-TP shards of ``linear_fc2``."""
    from megatron_prune.testing.workers import WorkerError

    params = dict(prune_type="semistructured", n=2, m=F)
    ref = _reference(pool2, moe_ckpt, params)  # TP=1: every fc2 row is one block of F
    for key, mask in ref["masks"].items():
        if "fc2" in key:
            assert ((~mask).sum(-1) == 2).all(), key
    with pytest.raises(WorkerError) as info:
        pool2.run(_sparsify_worker, dict(tp=2), moe_ckpt, params)
    text = str(info.value)
    assert "rank(s) [0, 1]" in text and "straddle" in text and "linear_fc2" in text
