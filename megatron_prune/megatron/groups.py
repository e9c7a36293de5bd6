"""Process groups and layout facts read once from Megatron's ``parallel_state``."""

from __future__ import annotations

from megatron_prune.distributed.reductions import ProcessGroups

__all__ = ["process_groups", "current_layout", "log_args", "is_stage_writer"]


def process_groups(sequence_parallel: bool = False) -> ProcessGroups:
    """The groups of this rank, from ``megatron.core.parallel_state`` (must be initialised)."""
    from megatron.core import parallel_state as ps

    return ProcessGroups(
        tp=ps.get_tensor_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        ep=ps.get_expert_model_parallel_group(),
        etp=ps.get_expert_tensor_parallel_group(),
        edp=ps.get_expert_data_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        sp=bool(sequence_parallel),
    )


def current_layout(sequence_parallel: bool = False) -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "sequence_parallel": bool(sequence_parallel),
    }


def is_stage_writer() -> bool:
    """True on exactly one rank per pipeline stage (the first rank of the stage's model-parallel
    and data-parallel groups)."""
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_expert_model_parallel_rank() == 0
        and ps.get_expert_tensor_parallel_rank() == 0
    )


def log_args(model_config=None, sequence_parallel: bool = False, tokens_seen=None) -> dict:
    """``args`` for ``ForwardHook.dump_activations_logs`` from the current parallel state."""
    from megatron.core import parallel_state as ps

    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else (model_config or {})
    return {
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "pp_size": ps.get_pipeline_model_parallel_world_size(),
        "is_writer": is_stage_writer(),
        "model_config": cfg,
        "parallel_layout": current_layout(sequence_parallel),
        "tokens_seen": tokens_seen,
    }
