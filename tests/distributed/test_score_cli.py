"""`megatron-prune score` end to end under torchrun on CPU (gloo): layouts agree, logs feed
`megatron-prune plan`, a run killed by SIGTERM resumes to the same scores at the same and at
another layout, and a changed spec is refused.

The calibration data is a Megatron indexed dataset written with megatron.core's builder.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_prune.logs import load_activations_logs
from megatron_prune.testing.models import TINY_MOE, save_reference_checkpoint

NUM_SAMPLES, SEQ = 16, 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def score_args(work: Path, out: Path, *extra: str) -> list:
    return [
        "score", "--load", str(work / "ckpt"), "--data", str(work / "calib_text_document"),
        "--num-samples", str(NUM_SAMPLES), "--seq-length", str(SEQ), "--out", str(out),
        "--no-progress", *extra,
    ]


def score_cmd(nproc: int, work: Path, out: Path, *extra: str) -> list:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_port()), "-m", "megatron_prune"]
    return launcher + score_args(work, out, *extra)


def run_score(nproc, work, out, *extra, expect_rc=0):
    proc = subprocess.run(score_cmd(nproc, work, out, *extra), env=_env(), capture_output=True, text=True,
                          timeout=400)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def work(pool2, tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    d = tmp_path_factory.mktemp("score_cli")
    pool2.run(save_reference_checkpoint, TINY_MOE, str(d / "ckpt"))
    TINY_MOE.save(d / "ckpt" / "model_config.json")
    # the same weights as a Megatron-LM checkpoint root: tracker file, iter_0000007, args in common.pt
    it = d / "mlm_root" / "iter_0000007"
    shutil.copytree(d / "ckpt", it, ignore=shutil.ignore_patterns("model_config.json"))
    torch.save({"args": megatron_lm_args(TINY_MOE), "iteration": 7, "checkpoint_version": 3.0}, it / "common.pt")
    (d / "mlm_root" / "latest_checkpointed_iteration.txt").write_text("7")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(d / "calib_text_document.bin"), dtype=np.int32)
    for _ in range(30):
        builder.add_item(torch.from_numpy(rng.integers(0, TINY_MOE.vocab_size, rng.integers(5, 20)).astype(np.int32)))
        builder.end_document()
    builder.finalize(str(d / "calib_text_document.idx"))
    return d


def megatron_lm_args(cfg):
    """An args namespace as Megatron-LM stores it in ``common.pt`` (the fields our reader uses)."""
    import argparse

    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        group_query_attention=True, num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size, padded_vocab_size=cfg.vocab_size, vocab_size=None,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=cfg.seq_length,
        normalization="RMSNorm", norm_epsilon=cfg.layernorm_epsilon, swiglu=True, add_bias_linear=False,
        position_embedding_type="rope", rotary_base=cfg.rotary_base, rotary_percent=1.0,
        untie_embeddings_and_output_weights=True, num_experts=cfg.num_moe_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size, moe_layer_freq=list(cfg.moe_layer_freq),
        moe_router_topk=cfg.moe_router_topk, moe_router_load_balancing_type="aux_loss",
        tensor_model_parallel_size=2, expert_model_parallel_size=2,
    )


def _is_expert_ffn(module: str) -> bool:
    return ".local_experts." in module


def assert_logs_close(ref_dir, other_dir, rtol=1e-5, only=None):
    ref, other = load_activations_logs(ref_dir), load_activations_logs(other_dir)
    assert set(ref) == set(other)
    checked = 0
    for module, fields in ref.items():
        if only is not None and not only(module):
            continue
        assert set(fields) == set(other[module]), module
        for f, t in fields.items():
            o = other[module][f]
            if t.is_floating_point():
                torch.testing.assert_close(o, t, rtol=rtol, atol=1e-12, msg=lambda m: f"{module}/{f}: {m}")
            else:
                assert torch.equal(o, t), f"{module}/{f}"
            checked += 1
    assert checked > 0
    return ref


# (name, nproc, flags): the global micro-batch (micro-batch × DP) is 2 samples everywhere
LAYOUTS = [
    ("tp2", 2, ["--tp", "2", "--micro-batch-size", "2"]),
    ("pp2", 2, ["--pp", "2", "--micro-batch-size", "2"]),
    ("ep2", 2, ["--ep", "2", "--micro-batch-size", "1"]),
    ("tp2_sp", 2, ["--tp", "2", "--sequence-parallel", "--micro-batch-size", "2"]),
    ("pp2_vpp2", 2, ["--pp", "2", "--vpp", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]),
]


@pytest.fixture(scope="module")
def reference(work):
    """TP=1 on one process: the reference logs. It loads the Megatron-LM-style root (model built
    from the args in common.pt), the other runs the iteration dir with model_config.json."""
    out = work / "out_tp1"
    args = score_args(work, out, "--micro-batch-size", "2")
    args[args.index("--load") + 1] = str(work / "mlm_root")
    proc = subprocess.run([sys.executable, "-m", "megatron_prune", *args], env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads((out / "score_run.json").read_text())["model_config_source"].endswith("common.pt")
    return out


@pytest.mark.parametrize("name, nproc, flags", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_agrees_with_tp1(work, reference, name, nproc, flags):
    out = work / f"out_{name}"
    run_score(nproc, work, out, *flags)
    logs = assert_logs_close(reference, out)
    # every pruning target is present: experts, dense FFN, expert FFN, KV groups, hidden
    assert {"reap", "frequency", "removal_mse", "ranked_choice", "expert_ranks_reap"} <= set(logs["decoder.layers.1.mlp"])
    assert logs["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2"]["score"].shape == (TINY_MOE.moe_ffn_hidden_size,)
    assert logs["decoder.layers.0.mlp.linear_fc2"]["score"].shape == (TINY_MOE.ffn_hidden_size,)
    assert logs["decoder.layers.2.self_attention.linear_proj"]["score"].shape == (TINY_MOE.num_query_groups,)
    assert logs["decoder.final_layernorm"]["score"].shape == (TINY_MOE.hidden_size,)


def test_dp2_dense_and_moe_criteria_agree(work, reference):
    """TP=1 with DP=2 (two processes): every statistic but the expert FFN channels (next test)."""
    out = work / "out_dp2"
    run_score(2, work, out, "--micro-batch-size", "1")
    assert_logs_close(reference, out, only=lambda m: not _is_expert_ffn(m))


def test_dp2_expert_ffn_agrees(work, reference):
    out = work / "out_dp2"
    if not out.exists():
        run_score(2, work, out, "--micro-batch-size", "1")
    assert_logs_close(reference, out, only=_is_expert_ffn)


def test_logs_feed_plan(work, reference, tmp_path):
    masks = tmp_path / "masks.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prune", "plan", "--logs", str(reference), "--keep-experts", "2",
         "--expert-criterion", "reap", "--ffn-hidden-size", "32", "--moe-ffn-hidden-size", "8",
         "--num-query-groups", "1", "--output", str(masks)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from megatron_prune.masks import load_masks

    mask_map, _ = load_masks(masks)
    experts = mask_map["decoder.layers.1.mlp.experts"]
    assert experts.shape == (4,) and int(experts.sum()) == 2
    reap = load_activations_logs(reference)["decoder.layers.1.mlp"]["reap"]
    assert set(torch.topk(reap, 2).indices.tolist()) == set(torch.nonzero(experts).flatten().tolist())


def test_sigterm_then_resume_same_and_other_layout(work, tmp_path):
    full = work / "out_tp2"
    if not full.exists():
        run_score(2, work, full, *LAYOUTS[0][2])
    out = tmp_path / "killed"
    cmd = score_cmd(2, work, out, "--tp", "2", "--micro-batch-size", "2", "--save-interval", "1",
                    "--throttle-seconds", "0.4")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = out / "state" / "progress.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if progress.exists() and '"step": 2,' in progress.read_text():
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the signal:\n{proc.stdout.read()[-4000:]}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "stopped by signal 15" in text, text[-4000:]
    from megatron_prune.scoring.session import ScoringSession

    stopped_at = ScoringSession.read_progress(out / "state")["step"]
    total = NUM_SAMPLES // 2
    assert 2 <= stopped_at < total
    assert not (out / "manifest.pp000.json").exists()
    other = tmp_path / "other_layout"
    shutil.copytree(out, other)
    single = tmp_path / "single_process"
    shutil.copytree(out, single)

    # a changed spec is refused with a clear error (single process, another layout)
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_prune", *score_args(work, other, "--resume", "--targets", "ffn")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "another scoring spec" in bad.stderr, bad.stderr[-3000:]

    resumed = run_score(2, work, out, "--tp", "2", "--micro-batch-size", "2", "--resume")
    assert f"resumed at global batch {stopped_at}" in resumed.stderr
    assert_logs_close(full, out, rtol=0)
    run_score(2, work, other, "--ep", "2", "--micro-batch-size", "1", "--resume")
    assert_logs_close(full, other)
    # TP=2 -> TP=1 on one process (micro-batch 2 × DP 1 keeps the global micro-batch)
    run_score(1, work, single, "--micro-batch-size", "2", "--resume")
    assert_logs_close(full, single)
    # the final state saved at EP=2 (experts gathered over EP) loads at EP=1 and gives the same logs
    ep_state = tmp_path / "from_ep2"
    shutil.copytree(other / "state", ep_state / "state")
    run_score(1, work, ep_state, "--micro-batch-size", "2", "--resume")
    assert ScoringSession.read_progress(ep_state / "state")["step"] == total
    assert_logs_close(full, ep_state)
