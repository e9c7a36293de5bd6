"""Extra time of the removal-effect hook per MoE forward, against a naive per-expert re-run.

One CPU process (gloo, TP=1) builds a one-layer Megatron-Core GPT-MoE for E = 8, 32, 64 experts
(top-2, softmax, and the group-limited sigmoid+bias variant), captures the MoE layer's input and
times, on that same input:

* ``forward``: the ``MoELayer`` forward alone;
* ``probe``: the forward with ``MegatronRemoveExpertsIndependentHook`` registered (all experts'
  removal effects from one pass: one extra expert evaluation per token for plain top-k);
* ``naive``: what re-running the layer once per expert costs: the E structurally pruned layers
  (``prune_moe_layer``) each run on the same input.

It prints ``extra = probe - forward`` as a multiple of ``forward`` (the issue asks for about
2.5x or less, flat in E) and the naive multiple.

Usage: ``python benchmarks/bench_removal.py [--tokens 2048] [--hidden 128] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout
from megatron_prune.testing.workers import WorkerPool


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _clone(layer):
    pg = torch.distributed.ProcessGroup
    pg.__deepcopy__ = lambda self, memo: self
    try:
        c = copy.deepcopy(layer)
    finally:
        del pg.__deepcopy__
    for m in c.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return c


@torch.no_grad()
def _worker(num_experts: int, variant: str, tokens: int, hidden: int, repeats: int):
    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.megatron.moe_hooks import MegatronRemoveExpertsIndependentHook
    from megatron_prune.moe import prune_moe_layer
    from megatron_prune.testing.models import forward_logits, token_batch

    seq = 128
    extra = {}
    if variant == "sigmoid_grouped":
        extra = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     moe_router_num_groups=4, moe_router_group_topk=2)
    cfg = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                      ffn_hidden_size=hidden, num_moe_experts=num_experts, moe_ffn_hidden_size=hidden,
                      moe_router_topk=2, max_position_embeddings=seq, seq_length=seq, **extra)
    initialize_parallel(ParallelLayout())
    model = build_gpt_model(cfg, ParallelLayout())
    layer = model.decoder.layers[0].mlp
    captured = []
    h = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].detach().clone()))
    forward_logits(model, token_batch(max(tokens // seq, 1), seq, cfg.vocab_size)[:, :seq], gather=False)
    h.remove()
    x = captured[0]
    t_fwd = _time(lambda: layer(x), repeats)
    hook = MegatronRemoveExpertsIndependentHook(layer)
    handle = layer.register_forward_hook(hook)
    t_probe = _time(lambda: layer(x), repeats)
    handle.remove()
    hook.close()

    class Holder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.layer = inner

    pruned = []
    for i in range(num_experts):
        holder = Holder(_clone(layer))
        prune_moe_layer(holder, "layer", [j for j in range(num_experts) if j != i])
        pruned.append(holder.layer)
    t_naive = _time(lambda: [p(x) for p in pruned], max(1, repeats // 2))
    return {"tokens": x.shape[0] * x.shape[1], "forward": t_fwd, "probe": t_probe, "naive": t_naive}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"{'routing':>16s} {'E':>4s} {'tokens':>7s} {'forward ms':>11s} {'probe ms':>9s} "
          f"{'extra/fwd':>10s} {'naive ms':>9s} {'naive/fwd':>10s}")
    pool = WorkerPool(1)
    try:
        for variant in ("softmax", "sigmoid_grouped"):
            for e in (8, 32, 64):
                r = pool.run(_worker, e, variant, a.tokens, a.hidden, a.repeats)[0]
                extra = r["probe"] - r["forward"]
                print(f"{variant:>16s} {e:4d} {r['tokens']:7d} {1e3 * r['forward']:11.2f} {1e3 * r['probe']:9.2f} "
                      f"{extra / r['forward']:9.2f}x {1e3 * r['naive']:9.1f} {r['naive'] / r['forward']:9.1f}x")
    finally:
        pool.close()


if __name__ == "__main__":
    main()
