"""Cost of the dense importance hooks at TP=2 on CPU: time ratio and collectives counted.

Prints, measured in one run:
* forward time with every cheap (additive) hook attached / plain forward time;
* collectives issued per forward by the additive hooks (counted by wrapping
  ``torch.distributed``'s collectives) and collectives issued at finalize (``to_dict``);
* the same for the iterative hook, which needs full layer outputs (one all-reduce per hooked
  layer per forward).

Usage: ``python benchmarks/bench_hooks.py [--layers 4 --hidden 256 --seq 128 --batch 4 --iters 10]``
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout
from megatron_prune.testing.workers import WorkerPool

_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


class _Counter:
    def __init__(self):
        import torch.distributed as dist

        self.dist, self.n, self.saved = dist, 0, {}

    def __enter__(self):
        for name in _NAMES:
            fn = getattr(self.dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def counted(*a, _fn=fn, **k):
                self.n += 1
                return _fn(*a, **k)

            setattr(self.dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def _attach(model, kinds):
    from megatron_prune.megatron import hooks as mh
    from megatron_prune.megatron.naming import global_module_names

    hooks, handles = [], []
    for name, m in global_module_names(model):
        made = []
        if name.endswith(("linear_proj", "linear_fc2")):
            if "cheap" in kinds:
                made += [mh.MegatronIndependentChannelContributionHook(m), mh.MegatronL2NormHook(m)]
                if name.endswith("linear_proj"):
                    made.append(mh.MegatronIndependentKvHeadContributionHook(m))
            if "iterative" in kinds:
                made.append(mh.MegatronIterativeChannelContributionHook(m, {"validation_full_iters": 10**6}))
        if "cheap" in kinds and name.endswith(("input_layernorm", "pre_mlp_layernorm", "final_layernorm")):
            made.append(mh.MegatronLayerNormContributionHook(m))
        for h in made:
            handles.append(m.register_forward_hook(h))
        hooks += made
    return hooks, handles


def _worker(cfg: ModelConfig, iters: int, batch: int):
    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel
    from megatron_prune.testing.models import forward_logits, token_batch

    layout = ParallelLayout(tp=2)
    initialize_parallel(layout)
    model = build_gpt_model(cfg, layout)
    data = token_batch(batch, cfg.seq_length, cfg.vocab_size)

    def timed():
        forward_logits(model, data, gather=False)  # warm-up
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            forward_logits(model, data, gather=False)
        torch.distributed.barrier()
        return (time.perf_counter() - t0) / iters

    out = {"plain": timed()}
    for kinds in ("cheap", "iterative"):
        hooks, handles = _attach(model, kinds)
        out[kinds] = timed()
        with _Counter() as c:
            forward_logits(model, data, gather=False)
        out[kinds + "_coll_per_forward"] = c.n
        if kinds == "cheap":
            with _Counter() as c:
                for h in hooks:
                    h.to_dict()
            out["cheap_coll_finalize"] = c.n
            out["cheap_hooks"] = len(hooks)
        else:
            out["iterative_hooks"] = len(hooks)
        for h in handles:
            h.remove()
    with _Counter() as c:
        forward_logits(model, data, gather=False)
    out["model_coll_per_forward"] = c.n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    cfg = ModelConfig(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=8, num_query_groups=4,
        vocab_size=1024, ffn_hidden_size=4 * a.hidden, max_position_embeddings=a.seq, seq_length=a.seq,
    )
    with WorkerPool(2, threads=1) as pool:
        r = pool.run(_worker, cfg, a.iters, a.batch)[0]
    print(f"model: {a.layers} layers, h={a.hidden}, seq={a.seq}, batch={a.batch}, TP=2 on CPU (gloo), "
          f"{a.iters} timed forwards")
    print(f"{'measure':56s} {'value':>10s}")
    print(f"{'plain forward (ms)':56s} {r['plain'] * 1e3:10.2f}")
    print(f"{'forward with ' + str(r['cheap_hooks']) + ' additive hooks / plain forward':56s} {r['cheap'] / r['plain']:10.3f}")
    print(f"{'forward with ' + str(r['iterative_hooks']) + ' iterative hooks / plain forward':56s} {r['iterative'] / r['plain']:10.3f}")
    print(f"{'collectives per forward: model alone (all_reduce etc.)':56s} {r['model_coll_per_forward']:10d}")
    print(f"{'collectives per forward added by additive hooks':56s} {r['cheap_coll_per_forward'] - r['model_coll_per_forward']:10d}")
    print(f"{'collectives at finalize, all additive hooks':56s} {r['cheap_coll_finalize']:10d}")
    print(f"{'collectives per forward added by iterative hooks':56s} {r['iterative_coll_per_forward'] - r['model_coll_per_forward']:10d}")


if __name__ == "__main__":
    main()
