"""Saved scoring state: format, fingerprints, progress file, model facts, small collective helpers.

``STATE_DIR/progress.json`` commits one ``step_<n>/`` directory holding one
``hooks.ppKKK-of-NNN.pt`` file per pipeline stage (global, layout-independent hook states keyed
``"<log module name>::<kind>"``). The progress file is replaced atomically after every stage
file is written, so a crash leaves the previous commit intact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from megatron_prune.distributed.reductions import group_size

__all__ = [
    "STATE_FORMAT",
    "STATE_FORMAT_VERSION",
    "ScoringStateError",
    "model_fingerprint",
    "model_config_from_model",
    "read_progress",
]

STATE_FORMAT = "megatron_prune.scoring_state"
STATE_FORMAT_VERSION = 1
_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "ffn_hidden_size", "num_moe_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_topk",
    "normalization", "gated_linear_unit", "add_bias_linear",
)


class ScoringStateError(ValueError):
    """Saved scoring state that does not fit this run (other spec, model or data)."""


def model_fingerprint(config: Any) -> str:
    """sha256 over the shape fields of a ``TransformerConfig`` (or any object with them)."""
    body = {}
    for name in _SHAPE_FIELDS:
        v = getattr(config, name, None)
        body[name] = v if isinstance(v, (int, float, str, bool, list, type(None))) else repr(v)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(chunk, "decoder") and isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def model_config_from_model(chunk: torch.nn.Module):
    """A :class:`~megatron_prune.model_config.ModelConfig` read from a ``GPTModel`` chunk and its
    ``TransformerConfig`` (for log manifests when the caller gives none); None if not a GPT."""
    from megatron_prune.model_config import ModelConfig

    model = _unwrap(chunk)
    tc = getattr(model, "config", None)
    if tc is None or getattr(model, "vocab_size", None) is None:
        return None
    get = lambda name, default=None: getattr(tc, name, default)  # noqa: E731
    fields = dict(
        num_layers=tc.num_layers, hidden_size=tc.hidden_size, num_attention_heads=tc.num_attention_heads,
        num_query_groups=get("num_query_groups"), kv_channels=get("kv_channels"),
        ffn_hidden_size=tc.ffn_hidden_size, vocab_size=int(model.vocab_size),
        max_position_embeddings=int(getattr(model, "max_sequence_length", 4096)),
        normalization=get("normalization", "LayerNorm"), layernorm_epsilon=get("layernorm_epsilon", 1e-5),
        swiglu=bool(get("gated_linear_unit", False)), add_bias_linear=bool(get("add_bias_linear", True)),
        add_qkv_bias=bool(get("add_qkv_bias", False)),
        position_embedding_type=getattr(model, "position_embedding_type", "learned_absolute"),
        untie_embeddings_and_output_weights=not getattr(model, "share_embeddings_and_output_weights", True),
    )
    if get("num_moe_experts"):
        fields.update(
            num_moe_experts=tc.num_moe_experts, moe_ffn_hidden_size=get("moe_ffn_hidden_size"),
            moe_layer_freq=get("moe_layer_freq", 1), moe_router_topk=get("moe_router_topk", 2),
            moe_router_score_function=get("moe_router_score_function", "softmax"),
            moe_router_pre_softmax=bool(get("moe_router_pre_softmax", False)),
            moe_router_enable_expert_bias=bool(get("moe_router_enable_expert_bias", False)),
            moe_router_num_groups=get("moe_router_num_groups"), moe_router_group_topk=get("moe_router_group_topk"),
            moe_router_topk_scaling_factor=get("moe_router_topk_scaling_factor"),
            moe_shared_expert_intermediate_size=get("moe_shared_expert_intermediate_size"),
            moe_grouped_gemm=bool(get("moe_grouped_gemm", False)),
            moe_token_dispatcher_type=get("moe_token_dispatcher_type", "allgather"),
        )
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError):
        return None


def read_progress(state_dir: Union[str, Path]) -> Optional[dict]:
    """The committed progress of ``state_dir``, or None when nothing was saved there."""
    path = Path(state_dir) / "progress.json"
    if not path.exists():
        return None
    try:
        progress = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ScoringStateError(f"{path}: not valid JSON ({exc})") from exc
    if progress.get("format") != STATE_FORMAT or progress.get("format_version") != STATE_FORMAT_VERSION:
        raise ScoringStateError(f"{path} is not a {STATE_FORMAT} v{STATE_FORMAT_VERSION} file")
    return progress


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _gather_objects(obj, group) -> list:
    if group_size(group) == 1:
        return [obj]
    out = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
