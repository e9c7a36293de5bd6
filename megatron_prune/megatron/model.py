"""Build a Megatron-Core ``GPTModel`` from a :class:`~megatron_prune.model_config.ModelConfig`.

Uses only Megatron-Core modules (local spec). On CPU, call
:func:`megatron_prune.testing.megatron_cpu.apply_cpu_workarounds` first; sequence parallelism on
CPU uses :class:`~megatron_prune.testing.megatron_cpu.SequenceParallelTorchNorm` in the spec.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from megatron_prune.model_config import ModelConfig, ParallelLayout

__all__ = [
    "initialize_parallel",
    "destroy_parallel",
    "transformer_config",
    "build_gpt_model",
    "build_model_chunks",
    "causal_mask",
    "TorchNorm",
]


class TorchNorm:
    """``WrappedTorchNorm`` without its refusal of ``sequence_parallel``.

    Builds ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` (numerically what ``WrappedTorchNorm``
    builds) and marks its parameters with ``sequence_parallel`` like Megatron's fused norms do.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm


# Process groups the last :func:`initialize_parallel` had Megatron create on this rank.
_OWN_GROUPS: list = []


def _current_groups() -> list:
    from torch.distributed import distributed_c10d as c10d

    return list(c10d._world.pg_map)


def _destroy_groups(groups: list) -> None:
    """Destroy ``groups`` on this rank. Collective over the default group when ``groups`` is
    not empty: the barrier makes sure no peer is still inside a collective on them."""
    if not groups:
        return
    torch.distributed.barrier()
    for g in groups:
        try:
            torch.distributed.destroy_process_group(g)
        except Exception:  # pragma: no cover - already destroyed by its owner
            pass


def destroy_parallel() -> None:
    """Undo :func:`initialize_parallel`: forget Megatron's parallel state and destroy the groups
    it created (``destroy_model_parallel`` alone leaves each gloo/NCCL group with its sockets
    and threads alive, so re-initialising in a loop leaks them). Collective over the default
    group. Groups created by anyone else are left alone."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _destroy_groups(_OWN_GROUPS)
    _OWN_GROUPS.clear()


def initialize_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """(Re)initialise Megatron's parallel state for ``layout`` on the current world.

    Collective over the default process group: every rank calls it with the same layout. A
    previous initialisation made here is undone first, its process groups destroyed.
    """
    from megatron.core import parallel_state, tensor_parallel

    destroy_parallel()
    before = set(map(id, _current_groups()))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    _OWN_GROUPS[:] = [g for g in _current_groups() if id(g) not in before]
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def transformer_config(cfg: ModelConfig, layout: ParallelLayout, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=cfg.swiglu,
        activation_func=torch.nn.functional.silu if cfg.swiglu else torch.nn.functional.gelu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
    )
    if cfg.num_moe_experts:
        kwargs.update(
            num_moe_experts=cfg.num_moe_experts,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
            moe_layer_freq=cfg.moe_layer_freq,
            moe_router_topk=cfg.moe_router_topk,
            moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
            moe_router_score_function=cfg.moe_router_score_function,
            moe_router_pre_softmax=cfg.moe_router_pre_softmax,
            moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
            moe_router_num_groups=cfg.moe_router_num_groups,
            moe_router_group_topk=cfg.moe_router_group_topk,
            moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            moe_grouped_gemm=cfg.moe_grouped_gemm,
            moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        )
        if cfg.moe_router_enable_expert_bias:
            kwargs["moe_router_bias_update_rate"] = 0.0
    return TransformerConfig(**kwargs)


def _layer_specs(cfg: ModelConfig, tcfg, vp_stage: Optional[int], pp_rank: Optional[int]):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron.core.models.gpt.gpt_layer_specs import LNImpl
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    specs = get_gpt_decoder_layer_specs(tcfg, use_transformer_engine=False, normalization=cfg.normalization)
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    local = [copy.deepcopy(s) for s in specs[offset : offset + count]]
    final_norm = LNImpl
    if LNImpl is WrappedTorchNorm:
        # WrappedTorchNorm refuses sequence parallelism; TorchNorm builds the same torch norm and
        # accepts it.
        final_norm = TorchNorm
        for spec in local:
            spec.submodules.input_layernorm = TorchNorm
            spec.submodules.pre_mlp_layernorm = TorchNorm
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm)


def build_gpt_model(
    cfg: ModelConfig,
    layout: ParallelLayout,
    dtype: torch.dtype = torch.float32,
    vp_stage: Optional[int] = None,
):
    """One ``GPTModel`` chunk for this rank (parallel state must be initialised for ``layout``)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    tcfg = transformer_config(cfg, layout, dtype)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = _layer_specs(cfg, tcfg, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    model.eval()
    return model


def build_model_chunks(cfg: ModelConfig, layout: ParallelLayout, dtype: torch.dtype = torch.float32):
    """The list of model chunks of this rank (one per virtual pipeline stage)."""
    if layout.vpp and layout.vpp > 1:
        return [build_gpt_model(cfg, layout, dtype, vp_stage=i) for i in range(layout.vpp)]
    return [build_gpt_model(cfg, layout, dtype)]


def causal_mask(seq_length: int, device=None) -> torch.Tensor:
    """Boolean attention mask ``[1, 1, s, s]``, True = masked (Megatron's convention)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]
