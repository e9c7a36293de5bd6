"""``megatron-prune demo``: score a tiny Megatron GPT at TP=2 on CPU, no downloads.

Spawns two gloo processes, builds a small ``GPTModel`` (GQA, SwiGLU, RMSNorm) at tensor-parallel
size 2, runs every dense importance hook on built-in text (this package's own source, read as
bytes), writes the activation logs and prints the most and least important channels per layer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout

__all__ = ["add_arguments", "run", "DEMO_MODEL", "builtin_tokens"]

DEMO_MODEL = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=8,
    num_query_groups=4,
    vocab_size=256,
    ffn_hidden_size=128,
    max_position_embeddings=128,
    seq_length=64,
)


def builtin_tokens(num_samples: int, seq_length: int) -> torch.Tensor:
    """Byte-level tokens ``[num_samples, seq_length]`` of text shipped with this package."""
    root = Path(__file__).resolve().parent
    text = b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))
    need = num_samples * seq_length
    if len(text) < need:
        text = text * (need // len(text) + 1)
    return torch.frombuffer(bytearray(text[:need]), dtype=torch.uint8).long().view(num_samples, seq_length)


def _worker(cfg: ModelConfig, layout: ParallelLayout, out_dir: str, num_samples: int, micro: int):
    from megatron_prune.hooks.base import ForwardHook
    from megatron_prune.megatron import hooks as mh
    from megatron_prune.megatron.groups import log_args, process_groups
    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.megatron.naming import global_module_names
    from megatron_prune.testing.models import dp_shard, forward_logits

    initialize_parallel(layout, seed=1234)
    model = build_gpt_model(cfg, layout)
    groups = process_groups(layout.sequence_parallel)
    kw = {"process_groups": groups}
    hooks, handles = {}, []
    for name, module in global_module_names(model):
        if name.endswith("mlp.linear_fc2"):
            hooks[name] = mh.MegatronIndependentChannelContributionHook(module, kw)
        elif name.endswith("self_attention.linear_proj"):
            hooks[name] = mh.MegatronIndependentKvHeadContributionHook(module, kw)
        elif name.endswith(("input_layernorm", "pre_mlp_layernorm", "final_layernorm")):
            hooks[name] = mh.MegatronLayerNormContributionHook(module, kw)
        else:
            continue
        hooks[name].module_name = name
        handles.append(module.register_forward_hook(hooks[name]))
    tokens = builtin_tokens(num_samples, cfg.seq_length)
    for batch in tokens.split(micro):
        forward_logits(model, dp_shard(batch), gather=False)
    for h in handles:
        h.remove()
    ForwardHook.dump_activations_logs(hooks, out_dir, log_args(cfg, layout.sequence_parallel))
    return torch.distributed.get_rank()


def _table(out_dir: Path, cfg: ModelConfig, top: int = 4) -> str:
    from megatron_prune.logs import load_activations_logs

    logs = load_activations_logs(out_dir)
    lines = [f"{'module':44s} {'most important':28s} {'least important':28s}"]
    for name in sorted(logs, key=lambda n: (n.count("layers") == 0, n)):
        score = logs[name]["score"]
        order = torch.sort(score, descending=True, stable=True).indices.tolist()
        k = max(1, min(top, len(order) // 2))
        kind = "group" if "linear_proj" in name else "ch"
        most = ", ".join(f"{kind}{i}" for i in order[:k])
        least = ", ".join(f"{kind}{i}" for i in order[::-1][:k])
        lines.append(f"{name:44s} {most:28s} {least:28s}")
    ranking = out_dir / "hidden_channel_ranking.json"
    if ranking.exists():
        import json

        asc = json.loads(ranking.read_text())["channels_importance_ascending"]
        lines.append(f"hidden channels, averaged over every norm: least important first: "
                     f"{', '.join(map(str, asc[:8]))}, ...")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="directory for the activation logs")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (= processes)")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4)


def run(args: argparse.Namespace) -> int:
    from megatron_prune.errors import UserError
    from megatron_prune.testing.workers import WorkerPool

    if args.tp < 1 or args.num_samples % args.micro_batch_size:
        raise UserError("--num-samples must be a multiple of --micro-batch-size and --tp >= 1")
    out = Path(args.out).resolve()
    layout = ParallelLayout(tp=args.tp, sequence_parallel=args.sequence_parallel)
    t0 = time.perf_counter()
    print(f"megatron-prune demo: {args.tp} CPU processes, GPT {DEMO_MODEL.num_layers} layers, "
          f"h={DEMO_MODEL.hidden_size}, TP={args.tp}{' +SP' if layout.sequence_parallel else ''}")
    with WorkerPool(args.tp) as pool:
        pool.run(_worker, DEMO_MODEL, layout, str(out), args.num_samples, args.micro_batch_size)
    print(_table(out, DEMO_MODEL))
    print(f"activation logs written to {out} in {time.perf_counter() - t0:.1f}s")
    return 0
