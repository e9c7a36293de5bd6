"""The first-version demo runs as the README says and writes valid logs."""

import json
import os
import subprocess
import sys
import time

from megatron_prune.logs import load_activations_logs


def test_demo_runs_and_writes_logs(tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_prune", "demo", "--dense", "--out", str(out), "--sequence-parallel"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decoder.layers.3.mlp.linear_fc2" in proc.stdout
    assert "hidden channels, averaged" in proc.stdout
    logs = load_activations_logs(out)
    assert logs["decoder.layers.0.mlp.linear_fc2"]["score"].shape == (128,)
    assert logs["decoder.layers.2.self_attention.linear_proj"]["score"].shape == (4,)
    manifest = json.loads((out / "manifest.pp000.json").read_text())
    assert manifest["parallel_layout"]["tp"] == 2 and manifest["parallel_layout"]["sequence_parallel"]
    assert elapsed < 60, elapsed


def _demo(out, cache, *extra):
    return subprocess.run(
        [sys.executable, "-m", "megatron_prune", "demo", "--out", str(out), "--cache-dir", str(cache),
         "--steps", "40", "--criteria", "reap", "frequency", "random", "--ratios", "0.5",
         "--calib-samples", "16", "--eval-samples", "16", *extra],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def test_moe_demo_end_to_end_and_cache(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = _demo(out, cache)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "training the demo MoE GPT" in first.stdout
    for row in ("(unpruned)", "reap", "frequency", "random"):
        assert row in first.stdout
    assert "rare domain (arith) at 50% dropped" in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"reap", "frequency", "random"}
    for crit, per in results["results"].items():
        assert set(per["0.5"]) == {"stdlib", "pydoc", "arith"}
        cfg = json.loads((out / "pruned" / f"{crit}_50" / "model_config.json").read_text())
        assert cfg["num_moe_experts"] == 4  # 8 experts, half dropped
    # pruning hurts: every pruned model is worse than the unpruned one on average
    base = sum(results["baseline"].values())
    assert all(sum(per["0.5"].values()) > base for per in results["results"].values())
    png = out / "demo.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second = _demo(tmp_path / "out2", cache)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "reusing the trained demo model" in second.stdout
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert again["baseline"] == results["baseline"]


def test_demo_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_prune", "demo", "--out", str(tmp_path),
                           "--criteria", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown criteria" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
