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
        [sys.executable, "-m", "megatron_prune", "demo", "--out", str(out), "--sequence-parallel"],
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
