"""Tiny real Megatron-Core GPT models and data for tests, benchmarks and the demo.

The invariance oracle needs the *same global weights* at every layout. They come from one
reference checkpoint: :func:`save_reference_checkpoint` builds the model at TP=1 with a fixed seed
and saves it with ``dist_checkpointing``; :func:`load_model` builds the model at any layout and
loads that checkpoint (Megatron reshards it). Functions marked *collective* run on every rank of
the default group (e.g. through :class:`~megatron_prune.testing.workers.WorkerPool`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout

__all__ = [
    "TINY_DENSE",
    "TINY_MOE",
    "save_reference_checkpoint",
    "load_model",
    "token_batch",
    "dp_shard",
    "forward_logits",
    "forward_pipeline",
]

#: dense GPT: GQA (4 heads, 2 groups), SwiGLU, RMSNorm
TINY_DENSE = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=64,
    ffn_hidden_size=48,
    max_position_embeddings=64,
    seq_length=16,
)

#: MoE GPT: layer 0 dense, layers 1-3 MoE with 4 experts, top-2
TINY_MOE = ModelConfig(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=64,
    ffn_hidden_size=48,
    max_position_embeddings=64,
    seq_length=16,
    num_moe_experts=4,
    moe_ffn_hidden_size=16,
    moe_router_topk=2,
    moe_layer_freq=[0, 1, 1, 1],
)


def save_reference_checkpoint(cfg: ModelConfig, ckpt_dir: str, seed: int = 1234) -> None:
    """Collective. Build ``cfg`` at TP=1 (every rank the same weights) and save to ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    from megatron_prune.megatron.model import build_gpt_model, initialize_parallel

    layout = ParallelLayout()
    initialize_parallel(layout, seed=seed)
    model = build_gpt_model(cfg, layout)
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()


def load_model(cfg: ModelConfig, layout: ParallelLayout, ckpt_dir: Optional[str], seed: int = 1234):
    """Collective. Initialise ``layout``, build this rank's model chunks, load ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    from megatron_prune.megatron.model import build_model_chunks, initialize_parallel

    initialize_parallel(layout, seed=seed)
    chunks = build_model_chunks(cfg, layout)
    if ckpt_dir is not None:
        if len(chunks) != 1:
            raise ValueError("load_model loads single-chunk models (no virtual pipeline stages)")
        dist_checkpointing.load(chunks[0].sharded_state_dict(), ckpt_dir)
    return chunks


def token_batch(num_samples: int, seq_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Deterministic global token ids ``[num_samples, seq_length]`` (identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_length), generator=g)


def dp_shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's data-parallel share of a global batch (contiguous split along dim 0)."""
    from megatron.core import parallel_state as ps

    n, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if batch.shape[0] % n:
        raise ValueError(f"batch of {batch.shape[0]} does not split over DP={n}")
    return batch.chunk(n, dim=0)[r]


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Plain forward of a single-stage model: logits ``[b, s, vocab]`` (vocab gathered over TP)."""
    from megatron.core import tensor_parallel

    from megatron_prune.megatron.model import causal_mask

    b, s = tokens.shape
    pos = torch.arange(s)[None].expand(b, s)
    out = model(tokens, pos, causal_mask(s))
    if gather:
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return out


@torch.no_grad()
def forward_pipeline(chunks, tokens: torch.Tensor, micro_batch_size: int) -> Optional[torch.Tensor]:
    """Forward-only Megatron schedule over ``chunks``; logits on the last stage, else ``None``."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune.megatron.model import causal_mask

    b, s = tokens.shape
    if b % micro_batch_size:
        raise ValueError(f"batch {b} is not a multiple of micro batch {micro_batch_size}")
    micro = list(tokens.split(micro_batch_size))
    it = iter(micro)
    outputs = []

    def forward_step(data_iterator, model):
        t = next(data_iterator)
        pos = torch.arange(s)[None].expand(t.shape[0], s)
        out = model(t, pos, causal_mask(s))

        def collect(output_tensor, non_loss_data=False):
            outputs.append(tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor))
            return torch.zeros(()), {}

        return out, collect

    fb = get_forward_backward_func()
    fb(
        forward_step_func=forward_step,
        data_iterator=[it] * len(chunks) if len(chunks) > 1 else it,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro),
        seq_length=s,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    if ps.is_pipeline_last_stage():
        return torch.cat(outputs, dim=0)
    return None
