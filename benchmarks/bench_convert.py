"""Benchmark ``megatron-prune convert`` against ``cp -r`` on synthetic torch_dist checkpoints.

For each size (about 0.25 GB and 2 GB by default) and key layout (``per-layer``: layer 0 dense,
the rest MoE, keys ``decoder.layers.<i>.*``; ``stacked``: all layers MoE, keys with a leading
``[L]`` axis), the script writes a synthetic checkpoint with torch.distributed.checkpoint
(``no_dist``), then times

* ``cp -r SRC`` (and ``cp -r`` plus an fsync of every copied file, the durability the converter
  gives its output), and
* ``python -m megatron_prune convert`` in a subprocess (masks drop 2 of 8 experts per layer, 1/8
  of every expert's FFN channels and 64 of 1024 hidden channels), with the child's peak RSS from
  ``os.wait4``.

Usage: ``python benchmarks/bench_convert.py [--sizes 0.25 2] [--layouts per-layer stacked]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_prune.masks import save_masks
from megatron_prune.model_config import ModelConfig
from megatron_prune.testing.checkpoints import synthetic_layout

BASE = dict(hidden_size=1024, num_attention_heads=16, num_query_groups=4, vocab_size=8192, ffn_hidden_size=4096,
            num_moe_experts=8, moe_ffn_hidden_size=1024, moe_router_topk=2, max_position_embeddings=4096)


def config_for(size_gb: float, layout: str) -> ModelConfig:
    for layers in range(2, 200):
        freq = [0] + [1] * (layers - 1) if layout == "per-layer" else 1
        cfg = ModelConfig(num_layers=layers, moe_layer_freq=freq, **BASE)
        tensors, _ = synthetic_layout(cfg)
        if sum(torch.Size(s).numel() for s in tensors.values()) * 4 >= size_gb * 0.93e9:
            return cfg
    raise ValueError(size_gb)


def masks_for(cfg: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    masks = {}
    for i, moe in enumerate(cfg.moe_layer_pattern()):
        if moe:
            keep = torch.zeros(8, dtype=torch.bool)
            keep[torch.randperm(8, generator=g)[:6]] = True
            masks[f"decoder.layers.{i}.mlp.experts"] = keep
            masks[f"decoder.layers.{i}.mlp.experts.ffn"] = torch.rand(8, 1024, generator=g).argsort(1) < 896
    masks["hidden"] = torch.randperm(1024, generator=g) >= 64
    return masks


def _run_child(cmd) -> tuple[float, int, int, str]:
    """(wall seconds, exit code, peak RSS in MiB, stdout) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, p.returncode, usage.ru_maxrss // 1024, out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def bench(size_gb: float, layout: str, work: Path) -> dict:
    cfg = config_for(size_gb, layout)
    src, copy, dst = work / "src", work / "copy", work / "dst"
    for p in (src, copy, dst):
        shutil.rmtree(p, ignore_errors=True)
    # written by a child: the parent stays small, and a child's peak RSS starts from the parent's
    code = ("import sys, json; from megatron_prune.model_config import ModelConfig; "
            "from megatron_prune.testing.checkpoints import write_synthetic_checkpoint; "
            "write_synthetic_checkpoint(ModelConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict()), str(src)], check=True)
    save_masks(work / "m.safetensors", masks_for(cfg), {"source": "benchmark"})
    size = _du(src)
    t_cp, rc, _, _ = _run_child(["cp", "-r", str(src), str(copy)])
    assert rc == 0
    t0 = time.perf_counter()
    _fsync_tree(copy)
    t_cp_sync = t_cp + time.perf_counter() - t0
    shutil.rmtree(copy)
    cmd = [sys.executable, "-m", "megatron_prune", "convert", "--load", str(src), "--masks",
           str(work / "m.safetensors"), "--save", str(dst), "--no-progress"]
    t_conv, rc, rss, out = _run_child(cmd)
    assert rc == 0, out
    inner = float(re.search(r" in ([\d.]+)s", out).group(1))
    res = dict(layout=layout, layers=cfg.num_layers, size_mb=size / 2**20, out_mb=_du(dst) / 2**20, cp_s=t_cp,
               cp_sync_s=t_cp_sync, convert_s=t_conv, convert_inner_s=inner, rss_mb=rss,
               largest_mb=max(torch.Size(s).numel() for s in synthetic_layout(cfg)[0].values()) * 4 / 2**20)
    for p in (src, dst):
        shutil.rmtree(p, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 2.0], help="checkpoint sizes in GB")
    ap.add_argument("--layouts", nargs="+", default=["per-layer", "stacked"], choices=["per-layer", "stacked"])
    ap.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start, _, base_rss, _ = _run_child([sys.executable, "-c", "import torch, torch.distributed.checkpoint, "
                                          "safetensors.torch, tqdm, megatron_prune.convert.storage"])
    print(f"process baseline (python + imports the converter needs): {t_start:.2f}s, {base_rss} MiB RSS")
    head = (f"{'layout':>9} {'L':>3} {'size MiB':>9} {'out MiB':>8} {'largest':>8} {'cp -r s':>8} {'cp+sync':>8} "
            f"{'conv s':>7} {'(inner)':>7} {'ratio':>6} {'r(sync)':>7} {'r(inner)':>8} {'RSS MiB':>8}")
    print(head)
    try:
        for layout in args.layouts:
            for size in args.sizes:
                r = bench(size, layout, work)
                print(f"{r['layout']:>9} {r['layers']:>3} {r['size_mb']:>9.0f} {r['out_mb']:>8.0f} "
                      f"{r['largest_mb']:>8.0f} {r['cp_s']:>8.2f} {r['cp_sync_s']:>8.2f} {r['convert_s']:>7.2f} "
                      f"{r['convert_inner_s']:>7.2f} {r['convert_s'] / r['cp_s']:>6.2f} "
                      f"{r['convert_s'] / r['cp_sync_s']:>7.2f} {r['convert_inner_s'] / r['cp_sync_s']:>8.2f} "
                      f"{r['rss_mb']:>8}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
