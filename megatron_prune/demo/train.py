"""Train (or reuse a cached) tiny MoE GPT with Megatron-Core on CPU, saved as ``torch_dist``.

Training runs data-parallel on two gloo processes (TP=1, DP=2, gradients averaged by hand); the
trained model is then loaded at TP=2/EP=2 and saved there in Megatron-LM's layout::

    <cache>/ckpt/latest_checkpointed_iteration.txt
    <cache>/ckpt/iter_0000NNN/{.metadata, __*_*.distcp, common.pt, metadata.json}
    <cache>/model_config.json, <cache>/train_log.json

``common.pt`` holds Megatron-LM style ``args`` (see ``ModelConfig.to_megatron_args``) and the
iteration. The cache key is a hash of the model config and the training settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout

__all__ = ["TrainSettings", "DEMO_MOE", "ensure_trained_checkpoint", "iteration_dir", "evaluate_worker"]

DEMO_MOE = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    ffn_hidden_size=128,
    max_position_embeddings=128,
    seq_length=64,
    num_moe_experts=8,
    moe_ffn_hidden_size=64,
    moe_router_topk=2,
    moe_layer_freq=1,
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=1e-3,
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    global_batch: int = 16
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 1234
    mixture: tuple = (0.6, 0.3, 0.1)

    def key(self, cfg: ModelConfig) -> str:
        blob = json.dumps({"cfg": cfg.to_dict(), "train": asdict(self), "v": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def iteration_dir(root: Path) -> Path:
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    return root / ("release" if it == "release" else f"iter_{int(it):07d}")


def _lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    from megatron_prune.megatron.model import causal_mask

    tokens, labels = batch[:, :-1], batch[:, 1:]
    b, s = tokens.shape
    pos = torch.arange(s)[None].expand(b, s)
    return model(tokens, pos, causal_mask(s), labels=labels)  # [b, s] per-token loss


def _train_worker(cfg: ModelConfig, s: TrainSettings, tp1_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_prune.demo.data import mixture
    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.testing.models import dp_shard

    layout = ParallelLayout()
    initialize_parallel(layout, seed=s.seed)
    model = build_gpt_model(cfg, layout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = mixture("train", s.steps * s.global_batch, cfg.seq_length, s.mixture, seed=s.seed)
    world = dist.get_world_size()
    losses = []
    t0 = time.perf_counter()
    for step in range(s.steps):
        batch = dp_shard(data[step * s.global_batch : (step + 1) * s.global_batch])
        for g in opt.param_groups:
            g["lr"] = _lr(step, s)
        loss = _lm_loss(model, batch).mean()
        loss.backward()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    if dist.get_rank() == 0:
        os.makedirs(tp1_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), tp1_dir)
    return {"losses": losses, "seconds": time.perf_counter() - t0}


def _reshard_worker(cfg: ModelConfig, tp1_dir: str, layout: ParallelLayout, iter_dir: str, iteration: int):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_prune.testing.models import load_model

    (model,) = load_model(cfg, layout, tp1_dir)
    if dist.get_rank() == 0:
        os.makedirs(iter_dir, exist_ok=True)
    dist.barrier()
    state = {
        "model": model.sharded_state_dict(),
        "args": cfg.to_megatron_args(),
        "checkpoint_version": 3.0,
        "iteration": iteration,
    }
    dist_checkpointing.save(state, iter_dir)
    return True


def ensure_trained_checkpoint(
    cache_root: Path,
    pool,
    cfg: ModelConfig = DEMO_MOE,
    settings: TrainSettings = TrainSettings(),
    layout: ParallelLayout = ParallelLayout(tp=2, ep=2, etp=1),
    log=print,
) -> tuple[Path, dict]:
    """Path of the Megatron-LM style checkpoint root (trained if not cached) and the train log."""
    cache = Path(cache_root) / f"moe-{settings.key(cfg)}"
    root = cache / "ckpt"
    done = cache / "train_log.json"
    if done.exists() and (root / "latest_checkpointed_iteration.txt").exists():
        log(f"reusing the trained demo model cached at {cache}")
        return root, json.loads(done.read_text())
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"training the demo MoE GPT ({cfg.num_layers} layers, {cfg.num_moe_experts} experts, top-"
        f"{cfg.moe_router_topk}) for {settings.steps} steps on CPU, TP=1 x DP=2 ...")
    res = pool.run(_train_worker, cfg, settings, str(tmp / "tp1"))[0]
    log(f"trained in {res['seconds']:.0f}s, loss {res['losses'][0]:.3f} -> {sum(res['losses'][-20:]) / 20:.3f}")
    it_dir = tmp / "ckpt" / f"iter_{settings.steps:07d}"
    pool.run(_reshard_worker, cfg, str(tmp / "tp1"), layout, str(it_dir), settings.steps)
    (tmp / "ckpt" / "latest_checkpointed_iteration.txt").write_text(str(settings.steps))
    cfg.save(tmp / "model_config.json")
    shutil.rmtree(tmp / "tp1")
    (tmp / "train_log.json").write_text(json.dumps(res))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    log(f"saved at TP={layout.tp}/EP={layout.ep} to {root}")
    return root, res


def evaluate_worker(cfg: ModelConfig, ckpt_dir: str, layout: ParallelLayout, eval_sets: dict,
                    micro: int = 16) -> Optional[dict]:
    """Collective. Mean next-token loss per domain of the checkpoint at ``layout``."""
    from megatron.core import dist_checkpointing

    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.testing.models import dp_shard

    initialize_parallel(layout)
    model = build_gpt_model(cfg, layout)
    dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
    out = {}
    with torch.no_grad():
        for name, data in eval_sets.items():
            total, count = torch.zeros((), dtype=torch.float64), 0
            for batch in data.split(micro):
                loss = _lm_loss(model, dp_shard(batch))
                total += loss.double().sum()
                count += loss.numel()
            t = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])
            from megatron.core import parallel_state as ps

            torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
            out[name] = float(t[0] / t[1])
    return out
