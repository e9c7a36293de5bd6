"""``megatron-prune demo``: the whole tool on an embedded default, on CPU, with no downloads.

Steps (two gloo processes):

1. train a tiny MoE GPT with Megatron-Core on text that ships with Python (standard-library
   sources, the ``pydoc`` topics, synthetic arithmetic/reversal as the rare domain), or reuse the
   cached one; it is saved as a ``torch_dist`` checkpoint at TP=2/EP=2;
2. score every MoE criterion at TP=2/EP=2 in one calibration pass (activation logs);
3. plan 25% and 50% expert pruning per criterion with ``megatron-prune plan`` (and a random
   baseline), convert with ``megatron-prune convert``;
4. reload each pruned checkpoint at TP=1, evaluate the loss per domain, print a table and write
   a PNG.

``--dense`` runs the first, dense-only version instead (hooks on a random GPT at TP=2).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout

__all__ = ["add_arguments", "run"]

SCORE_LAYOUT = ParallelLayout(tp=2, ep=2, etp=1)
CRITERIA = ("frequency", "soft_count", "ean_sum", "reap", "removal_mse", "removal_cosine", "ranked_choice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (logs, masks, checkpoints, PNG)")
    parser.add_argument("--cache-dir", default=os.environ.get("MEGATRON_PRUNE_CACHE",
                        str(Path.home() / ".cache" / "megatron_prune")),
                        help="where the trained demo model is cached")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the demo model")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="expert drop ratios")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA) + ["random"])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=64, help="per domain")
    parser.add_argument("--dense", action="store_true", help="the dense-hook demo (first version)")
    # options of the dense demo
    parser.add_argument("--tp", type=int, default=2, help="--dense: tensor-parallel size")
    parser.add_argument("--sequence-parallel", action="store_true", help="--dense: sequence parallelism")
    parser.add_argument("--num-samples", type=int, default=32, help="--dense: calibration samples")
    parser.add_argument("--micro-batch-size", type=int, default=4)


def _score_worker(cfg: ModelConfig, iter_dir: str, layout: ParallelLayout, calib: torch.Tensor,
                  log_dir: str, micro: int) -> bool:
    from megatron.core import dist_checkpointing

    from megatron_prune.demo.train import _lm_loss
    from megatron_prune.hooks.base import ForwardHook
    from megatron_prune.megatron.groups import log_args
    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.megatron.moe_hooks import MegatronMoEImportanceHook
    from megatron_prune.megatron.naming import global_module_names
    from megatron_prune.testing.models import dp_shard

    initialize_parallel(layout)
    model = build_gpt_model(cfg, layout)
    dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
    hooks, handles = {}, []
    for name, module in global_module_names(model):
        if type(module).__name__ == "MoELayer":
            hook = MegatronMoEImportanceHook(module, {"criteria": CRITERIA, "criterion": "reap", "module_name": name})
            hooks[name] = hook
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in calib.split(micro):
            _lm_loss(model, dp_shard(batch))
    for h in handles:
        h.remove()
    tokens = calib.shape[0] * (calib.shape[1] - 1)
    ForwardHook.dump_activations_logs(hooks, log_dir, log_args(cfg, layout.sequence_parallel, tokens))
    return True


def _random_masks(path: Path, cfg: ModelConfig, ratio: float, seed: int) -> None:
    from megatron_prune.masks import save_masks

    g = torch.Generator().manual_seed(seed)
    e = cfg.num_moe_experts
    keep = e - int(round(ratio * e))
    masks = {}
    for i, is_moe in enumerate(cfg.moe_layer_pattern()):
        if is_moe:
            m = torch.zeros(e, dtype=torch.bool)
            m[torch.randperm(e, generator=g)[:keep]] = True
            masks[f"decoder.layers.{i}.mlp.experts"] = m
    save_masks(path, masks, {"source": f"random baseline, seed {seed}, drop ratio {ratio}"})


def _cli(*argv) -> None:
    from megatron_prune.cli import main

    rc = main([str(a) for a in argv])
    if rc:
        raise RuntimeError(f"megatron-prune {' '.join(map(str, argv))} exited with {rc}")


def run(args: argparse.Namespace) -> int:
    if args.dense:
        from megatron_prune.demo import dense

        return dense.run(args)
    import contextlib
    import io

    from megatron_prune.demo import report
    from megatron_prune.demo.data import DOMAINS, domain_samples, mixture
    from megatron_prune.demo.train import DEMO_MOE, TrainSettings, ensure_trained_checkpoint, evaluate_worker, iteration_dir
    from megatron_prune.errors import UserError
    from megatron_prune.logs import load_activations_logs
    from megatron_prune.masks import load_masks
    from megatron_prune.testing.workers import WorkerPool

    unknown = sorted(set(args.criteria) - set(CRITERIA) - {"random"})
    if unknown:
        raise UserError(f"unknown criteria {unknown}; choose from {list(CRITERIA) + ['random']}")
    if any(not 0 < r < 1 for r in args.ratios):
        raise UserError("--ratios must lie strictly between 0 and 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = DEMO_MOE
    seq = cfg.seq_length
    eval_sets = {d: domain_samples(d, "eval", args.eval_samples, seq) for d in DOMAINS}
    calib = mixture("calib", args.calib_samples, seq, seed=1)
    with WorkerPool(2) as pool:
        root, _ = ensure_trained_checkpoint(Path(args.cache_dir), pool, cfg, TrainSettings(steps=args.steps))
        src_iter = iteration_dir(root)
        log_dir = out / "activation_logs"
        print(f"[{time.perf_counter() - t0:5.0f}s] scoring {len(CRITERIA)} MoE criteria at TP=2/EP=2 "
              f"on {args.calib_samples} calibration samples ...")
        pool.run(_score_worker, cfg, str(src_iter), SCORE_LAYOUT, calib, str(log_dir), 8)
        logs = load_activations_logs(log_dir)
        baseline = pool.run(evaluate_worker, cfg, str(src_iter), ParallelLayout(), eval_sets)[0]
        results, kept = {}, {}
        for crit in args.criteria:
            for ratio in args.ratios:
                tag = f"{crit}_{int(round(ratio * 100))}"
                mask_path, dst = out / "masks" / f"{tag}.safetensors", out / "pruned" / tag
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.redirect_stdout(io.StringIO()):
                    if crit == "random":
                        _random_masks(mask_path, cfg, ratio, seed=0)
                    else:
                        _cli("plan", "--logs", log_dir, "--output", mask_path, "--drop-experts-ratio", ratio,
                             "--expert-criterion", crit)
                    _cli("convert", "--load", root, "--masks", mask_path, "--save", dst, "--overwrite",
                         "--no-progress")
                new_cfg = ModelConfig.load(dst / "model_config.json")
                losses = pool.run(evaluate_worker, new_cfg, str(iteration_dir(dst)), ParallelLayout(), eval_sets)[0]
                results.setdefault(crit, {})[ratio] = losses
                masks, _ = load_masks(mask_path)
                kept.setdefault(crit, {})[ratio] = {k[: -len(".experts")]: v for k, v in masks.items() if k.endswith(".experts")}
                print(f"[{time.perf_counter() - t0:5.0f}s] {tag:22s} -> {new_cfg.num_moe_experts} experts, "
                      + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()))
    table = report.quality_table(results, baseline, DOMAINS)
    print(table)
    (out / "quality.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "results": {
        c: {str(r): v for r, v in per.items()} for c, per in results.items()}}, indent=2))
    scores = {c: {name: f[c] for name, f in logs.items() if c in f} for c in CRITERIA if c in args.criteria}
    png = report.write_figure(out / "demo.png", results, baseline, DOMAINS, scores, kept, max(args.ratios))
    _verdict(results, baseline)
    print(f"outputs in {out}" + (f" (figure {png.name})" if png else " (matplotlib missing: no figure)")
          + f"; total {time.perf_counter() - t0:.0f}s")
    return 0


def _verdict(results: dict, baseline: dict) -> None:
    """Say plainly whether REAP beat frequency on the rare domain at the highest drop ratio."""
    if "reap" not in results or "frequency" not in results:
        return
    r = max(results["reap"])
    reap, freq = results["reap"][r]["arith"], results["frequency"][r]["arith"]
    word = "at least as good as" if reap <= freq else "WORSE than"
    print(f"rare domain (arith) at {int(r * 100)}% dropped: reap {reap:.4f} vs frequency {freq:.4f} "
          f"-> REAP is {word} frequency (unpruned {baseline['arith']:.4f})")
