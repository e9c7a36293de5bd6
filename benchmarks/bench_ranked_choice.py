"""Memory per token of the ranked-choice voting hook, measured in one run.

Part 1 runs the real ``MegatronRankedChoiceVotingHook`` on the router of a Megatron-Core MoE
layer (one CPU process, gloo) for E = 8, 64, 256 experts and prints the bytes the hook holds per
calibration token, against an int64 argsort id list (8·E bytes) and a float32 copy of the router
scores (4·E bytes). Part 2 measures the extra resident memory of the final instant-runoff count
per token (sampled RSS), since it widens the ballots while counting.

Usage: ``python benchmarks/bench_ranked_choice.py [--tokens 4096]``
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout
from megatron_prune.testing.workers import WorkerPool


def _hook_worker(num_experts: int, tokens: int, seq: int):
    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.megatron.moe_hooks import MegatronRankedChoiceVotingHook
    from megatron_prune.testing.models import forward_logits, token_batch

    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                      ffn_hidden_size=64, num_moe_experts=num_experts, moe_ffn_hidden_size=16, moe_router_topk=2,
                      max_position_embeddings=seq, seq_length=seq)
    layout = ParallelLayout()
    initialize_parallel(layout)
    model = build_gpt_model(cfg, layout)
    router = model.decoder.layers[0].mlp.router
    hook = MegatronRankedChoiceVotingHook(router, {})
    handle = router.register_forward_hook(hook)
    data = token_batch(tokens // seq, seq, cfg.vocab_size)
    for batch in data.split(8):
        forward_logits(model, batch, gather=False)
    handle.remove()
    held = sum(p.numel() * p.element_size() for p in hook.box.parts)
    seen = sum(p.shape[0] for p in hook.box.parts)
    return {"bytes": held, "tokens": seen, "dtype": str(hook.box.parts[0].dtype)}


def _peak_rss_during(fn) -> tuple[int, float]:
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    return peak[0] - base, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens through the real hook")
    ap.add_argument("--count-tokens", type=int, default=200_000, help="ballots for the instant-runoff count")
    a = ap.parse_args()
    from megatron_prune.math.moe import instant_runoff

    print(f"{'E':>4s} {'held B/token':>13s} {'ballot dtype':>13s} {'vs int64 ids':>13s} {'vs fp32 scores':>15s} "
          f"{'count extra B/token':>20s} {'count s':>8s}")
    with WorkerPool(1) as pool:
        for e in (8, 64, 256):
            r = pool.run(_hook_worker, e, a.tokens, 64)[0]
            per_token = r["bytes"] / r["tokens"]
            g = torch.Generator().manual_seed(0)
            ballots = torch.argsort(torch.rand(a.count_tokens, e, generator=g), dim=1).to(torch.uint8)
            extra, dt = _peak_rss_during(lambda: instant_runoff(ballots, e, 2))
            print(f"{e:4d} {per_token:13.1f} {r['dtype'].replace('torch.', ''):>13s} {per_token / (8 * e):13.3f} "
                  f"{per_token / (4 * e):15.3f} {extra / a.count_tokens:20.1f} {dt:8.2f}")
    print("held = bytes the hook keeps per calibration token; ratios below 1 mean less than the alternative")


if __name__ == "__main__":
    main()
