"""examples/score_in_training_loop.py runs under torchrun on CPU; its mid-training scores at TP=2
equal those of a TP=1 run of the same script (same seeds, same global weights and data)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from megatron_prune.logs import load_activations_logs, load_activations_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "score_in_training_loop.py"


def _run(nproc: int, tp: int, out: Path) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
         str(EXAMPLE), "--tp", str(tp), "--prune-score-out", str(out), "--train-steps", "3", "--score-at", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_example_scores_mid_training(tmp_path):
    out2 = _run(2, 2, tmp_path / "tp2")
    assert "scored 96 tokens at step 2" in out2 and "step 3:" in out2
    logs = load_activations_logs(tmp_path / "tp2")
    expected = {f"decoder.layers.{i}.{m}" for i in range(2) for m in
                ("mlp.linear_fc2", "self_attention.linear_proj", "input_layernorm", "pre_mlp_layernorm")}
    assert set(logs) == expected | {"decoder.final_layernorm"}
    assert logs["decoder.layers.1.mlp.linear_fc2"]["score"].shape == (64,)
    manifest = load_activations_manifest(tmp_path / "tp2")[0]
    assert manifest["parallel_layout"]["tp"] == 2
    assert manifest["model_config"]["ffn_hidden_size"] == 64 and manifest["model_config"]["vocab_size"] == 128
    # the logs alone (model config from their manifest) feed the planner
    plan = subprocess.run([sys.executable, "-m", "megatron_prune", "plan", "--logs", str(tmp_path / "tp2"),
                           "--ffn-hidden-size", "32", "--num-query-groups", "1", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "FFN 32 of 64" in plan.stdout
    _run(1, 1, tmp_path / "tp1")
    ref = load_activations_logs(tmp_path / "tp1")
    for module, fields in ref.items():
        for f, t in fields.items():
            if t.is_floating_point():
                torch.testing.assert_close(logs[module][f], t, rtol=1e-5, atol=1e-12)
            else:
                assert torch.equal(logs[module][f], t), (module, f)
