"""The model description shared by the scorer, planner, converter and demo (no Megatron import).

A :class:`ModelConfig` is the subset of Megatron-LM arguments that fixes the shapes of a GPT
model. It round-trips through JSON (``model_config.json`` written by the converter) and can be
read from a Megatron-LM ``args`` namespace stored in ``common.pt``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["ModelConfig", "ParallelLayout"]


@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes of a run. ``etp`` None means "same as tp" (Megatron's default)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    sequence_parallel: bool = False
    vpp: Optional[int] = None

    def __post_init__(self):
        for name in ("tp", "pp", "ep"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tp == 1:
            object.__setattr__(self, "sequence_parallel", False)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    ffn_hidden_size: int
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    max_position_embeddings: int = 4096
    seq_length: int = 2048
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    untie_embeddings_and_output_weights: bool = True
    # MoE
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_layer_freq: Union[int, list] = 1
    moe_router_topk: int = 2
    moe_router_load_balancing_type: str = "none"
    moe_aux_loss_coeff: float = 0.0
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: str = "allgather"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.num_moe_experts and self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        if isinstance(self.moe_layer_freq, tuple):
            object.__setattr__(self, "moe_layer_freq", list(self.moe_layer_freq))
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )

    # ----------------------------------------------------------------- derived facts
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for a dense one, per global layer index (Megatron's rule)."""
        if not self.num_moe_experts:
            return [0] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        if len(freq) != self.num_layers:
            raise ValueError(f"moe_layer_freq has {len(freq)} entries for {self.num_layers} layers")
        return [int(v) for v in freq]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            and f.name not in known
        ]
        if missing:
            raise ValueError(f"model config lacks required fields: {', '.join(missing)}")
        extra = dict(known.pop("extra", {}) or {})
        extra.update(unknown)
        return cls(**known, extra=extra)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_megatron_args(cls, args: Any) -> "ModelConfig":
        """From a Megatron-LM ``argparse.Namespace`` (``common.pt['args']``)."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        moe_freq = get("moe_layer_freq", 1)
        if isinstance(moe_freq, str):
            moe_freq = json.loads(moe_freq)
        vocab = get("padded_vocab_size") or get("vocab_size")
        if vocab is None:
            raise ValueError("Megatron args hold neither padded_vocab_size nor vocab_size")
        return cls(
            num_layers=get("num_layers"),
            hidden_size=get("hidden_size"),
            num_attention_heads=get("num_attention_heads"),
            num_query_groups=get("num_query_groups") if get("group_query_attention", True) else None,
            kv_channels=get("kv_channels"),
            ffn_hidden_size=get("ffn_hidden_size"),
            vocab_size=vocab,
            max_position_embeddings=get("max_position_embeddings", 4096),
            seq_length=get("seq_length", 2048),
            normalization=get("normalization", "LayerNorm"),
            layernorm_epsilon=get("norm_epsilon", get("layernorm_epsilon", 1e-5)),
            swiglu=bool(get("swiglu", False)),
            add_bias_linear=bool(get("add_bias_linear", True)),
            add_qkv_bias=bool(get("add_qkv_bias", False)),
            position_embedding_type=get("position_embedding_type", "learned_absolute"),
            rotary_base=get("rotary_base", 10000),
            rotary_percent=get("rotary_percent", 1.0),
            untie_embeddings_and_output_weights=bool(get("untie_embeddings_and_output_weights", False)),
            num_moe_experts=get("num_experts"),
            moe_ffn_hidden_size=get("moe_ffn_hidden_size"),
            moe_layer_freq=moe_freq,
            moe_router_topk=get("moe_router_topk", 2),
            moe_router_load_balancing_type=get("moe_router_load_balancing_type", "aux_loss"),
            moe_aux_loss_coeff=float(get("moe_aux_loss_coeff", 0.0) or 0.0),
            moe_router_score_function=get("moe_router_score_function", "softmax"),
            moe_router_pre_softmax=bool(get("moe_router_pre_softmax", False)),
            moe_router_enable_expert_bias=bool(get("moe_router_enable_expert_bias", False)),
            moe_router_num_groups=get("moe_router_num_groups"),
            moe_router_group_topk=get("moe_router_group_topk"),
            moe_router_topk_scaling_factor=get("moe_router_topk_scaling_factor"),
            moe_shared_expert_intermediate_size=get("moe_shared_expert_intermediate_size"),
            moe_grouped_gemm=bool(get("moe_grouped_gemm", False)),
        )

    def to_megatron_args(self) -> "argparse.Namespace":
        """A Megatron-LM style ``args`` namespace describing this model (for ``common.pt``);
        :meth:`from_megatron_args` reads it back to an equal config."""
        import argparse

        args = argparse.Namespace(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            padded_vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            seq_length=self.seq_length,
            normalization=self.normalization,
            norm_epsilon=self.layernorm_epsilon,
            swiglu=self.swiglu,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            position_embedding_type=self.position_embedding_type,
            rotary_base=self.rotary_base,
            rotary_percent=self.rotary_percent,
            untie_embeddings_and_output_weights=self.untie_embeddings_and_output_weights,
            moe_layer_freq=self.moe_layer_freq,
            moe_router_topk=self.moe_router_topk,
            moe_router_load_balancing_type=self.moe_router_load_balancing_type,
            moe_aux_loss_coeff=self.moe_aux_loss_coeff,
            moe_router_score_function=self.moe_router_score_function,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
            moe_router_num_groups=self.moe_router_num_groups,
            moe_router_group_topk=self.moe_router_group_topk,
            moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_grouped_gemm=self.moe_grouped_gemm,
        )
        return self.update_megatron_args(args)

    def update_megatron_args(self, args: Any) -> Any:
        """Write this config's shape fields into a Megatron-LM args namespace (in place)."""
        args.num_layers = self.num_layers
        args.hidden_size = self.hidden_size
        args.num_attention_heads = self.num_attention_heads
        args.num_query_groups = self.num_query_groups
        args.group_query_attention = self.num_query_groups != self.num_attention_heads
        args.kv_channels = self.kv_channels
        args.ffn_hidden_size = self.ffn_hidden_size
        args.num_experts = self.num_moe_experts
        args.moe_ffn_hidden_size = self.moe_ffn_hidden_size
        return args
