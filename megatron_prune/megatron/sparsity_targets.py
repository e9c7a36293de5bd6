"""The linears Wanda/MoE-Pruner sparsifies in a Megatron-Core model, and where their masks go.

A :class:`SparsityTarget` is one ``linear_fc1``/``linear_fc2`` of a routed expert
(``SequentialMLP.local_experts[j]``) or, when asked, of a dense MLP (``MLP``/shared experts),
with the sharding facts its selection needs, read from the model:

* expert linears: statistics summed over the expert-data-parallel group (ranks holding the same
  expert shard see different tokens); ``linear_fc2`` rows are sharded along the input dimension
  over the expert-tensor-parallel group, ``linear_fc1`` rows are whole on every rank;
* dense linears: statistics summed over the data-parallel group (and over TP for the
  sequence-sharded input of ``linear_fc1`` under sequence parallelism); ``linear_fc2`` rows span
  the TP group.

:func:`mask_pieces` places a local keep-mask into its global checkpoint tensor through the
model's own ``sharded_state_dict`` (``ShardedTensor`` offsets, the SwiGLU factory's split of
``linear_fc1`` into its gate and up halves), so stacked ``decoder.layers.*`` keys, per-layer keys,
expert axes and TP shards all come out as ``dist_checkpointing`` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_prune.megatron.naming import global_module_names

__all__ = ["SparsityTarget", "find_targets", "mask_pieces", "unwrap_chunk"]

#: expert container classes by name -> supported; anything else holding experts is an error
_EXPERT_CONTAINERS = {"SequentialMLP": True, "GroupedMLP": False, "TEGroupedMLP": False}


@dataclass
class SparsityTarget:
    """One linear to sparsify on this rank (see module docstring)."""

    name: str  # global module name, global layer and expert numbers
    local_name: str  # module path inside its chunk (local layer index), for the state dict
    chunk: int
    layer: int  # global 0-based layer index
    kind: str  # "fc1" or "fc2"
    expert: Optional[int]  # global expert id, None for dense
    module: torch.nn.Module
    mlp: torch.nn.Module  # the expert (or dense) MLP module owning the linear
    stat_groups: tuple  # groups statistics are summed over, in order
    row_group: Any  # group a row's input columns are sharded over (None: rows whole)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def sort_key(self) -> tuple:
        return (self.layer, -1 if self.expert is None else self.expert, self.kind, self.name)


def unwrap_chunk(model: torch.nn.Module) -> torch.nn.Module:
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module) and not hasattr(inner, "decoder"):
        inner = inner.module
    return inner


def find_targets(chunks, include_dense: bool = False, sequence_parallel: bool = False) -> list:
    """Every :class:`SparsityTarget` of this rank's model chunks, sorted by (layer, expert, kind).

    Raises ``NotImplementedError`` for expert implementations without per-expert linears
    (grouped GEMM) and for ``moe_apply_probs_on_input`` (the fc1 input would carry the gate).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.mlp import MLP

    ep_rank = ps.get_expert_model_parallel_rank()
    edp = ps.get_expert_data_parallel_group()
    etp = ps.get_expert_tensor_parallel_group()
    dp = ps.get_data_parallel_group()
    tp = ps.get_tensor_model_parallel_group()
    out = []
    for c, chunk in enumerate(chunks):
        inner = unwrap_chunk(chunk)
        local_names = [n for n, _ in inner.named_modules()]
        for (gname, module), lname in zip(global_module_names(inner), local_names):
            cls = type(module).__name__
            if cls in _EXPERT_CONTAINERS and not _EXPERT_CONTAINERS[cls]:
                raise NotImplementedError(
                    f"{gname}: {cls} experts have no per-expert linears to hook; build the model "
                    f"with moe_grouped_gemm=False (SequentialMLP) to sparsify it"
                )
            if cls != "SequentialMLP":
                continue
            if getattr(module.config, "moe_apply_probs_on_input", False):
                raise NotImplementedError(f"{gname}: moe_apply_probs_on_input is not supported")
            layer = int(gname.split("decoder.layers.")[1].split(".")[0])
            for j, expert in enumerate(module.local_experts):
                e = ep_rank * module.num_local_experts + j
                for kind in ("fc1", "fc2"):
                    lin = getattr(expert, f"linear_{kind}")
                    _check_linear(f"{gname}.local_experts.{e}.linear_{kind}", lin, kind)
                    out.append(
                        SparsityTarget(
                            name=f"{gname}.local_experts.{e}.linear_{kind}",
                            local_name=f"{lname}.local_experts.{j}.linear_{kind}",
                            chunk=c, layer=layer, kind=kind, expert=e, module=lin, mlp=expert,
                            stat_groups=(edp,), row_group=_row_group(lin, etp) if kind == "fc2" else None,
                        )
                    )
        if not include_dense:
            continue
        for (gname, module), lname in zip(global_module_names(inner), local_names):
            if not isinstance(module, MLP) or getattr(module, "is_expert", False):
                continue
            if ".experts.local_experts." in gname:
                continue
            layer = int(gname.split("decoder.layers.")[1].split(".")[0])
            for kind in ("fc1", "fc2"):
                lin = getattr(module, f"linear_{kind}")
                _check_linear(f"{gname}.linear_{kind}", lin, kind)
                stat = (dp, tp) if (kind == "fc1" and sequence_parallel) else (dp,)
                out.append(
                    SparsityTarget(
                        name=f"{gname}.linear_{kind}", local_name=f"{lname}.linear_{kind}",
                        chunk=c, layer=layer, kind=kind, expert=None, module=lin, mlp=module,
                        stat_groups=stat, row_group=_row_group(lin, tp) if kind == "fc2" else None,
                    )
                )
    return sorted(out, key=lambda t: t.sort_key)


def _check_linear(name: str, lin: torch.nn.Module, kind: str) -> None:
    """Refuse linears whose sharding or input is not what the selection assumes."""
    w = getattr(lin, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise NotImplementedError(f"{name}: {type(lin).__name__} has no 2-D weight to sparsify")
    if kind == "fc1" and hasattr(lin, "layer_norm_weight"):
        raise NotImplementedError(
            f"{name}: {type(lin).__name__} fuses the norm into the linear, so its hooked input is "
            "the un-normalized hidden state; use the local spec for --include-dense"
        )
    if getattr(w, "tensor_model_parallel", False):
        want = 0 if kind == "fc1" else 1
        if int(getattr(w, "partition_dim", want)) != want:
            raise NotImplementedError(f"{name}: weight sharded along dim {w.partition_dim}, expected {want}")


def _row_group(lin: torch.nn.Module, default):
    """The group a row-parallel linear's input columns are sharded over (its own, else ``default``)."""
    return getattr(lin, "tp_group", None) or default


def _is_main(replica_id) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(int(r) == 0 for r in replica_id)


def _piece(sh_ten, data: torch.Tensor) -> Optional[tuple]:
    if getattr(sh_ten, "flattened_range", None) is not None:
        raise NotImplementedError(f"{sh_ten.key}: flattened (distributed-optimizer) shards are not supported")
    if not _is_main(sh_ten.replica_id):
        return None
    gshape = tuple(int(s) for s in sh_ten.global_shape)
    offset = tuple(int(o) for o in sh_ten.global_offset)
    pre = len(gshape) - data.dim()
    index = tuple((o, 1) for o in offset[:pre]) + tuple((o, int(s)) for o, s in zip(offset[pre:], data.shape))
    return (sh_ten.key, gshape, index, data.detach().to("cpu", torch.bool).clone())


def mask_pieces(sharded_sd: dict, target: SparsityTarget, keep: torch.Tensor) -> list:
    """``[(checkpoint key, global shape, ((offset, size) per global dim), bool local piece)]``
    for the main replica of ``target``'s weight; empty on non-main replicas. Not collective.

    ``sharded_sd``: the chunk's ``sharded_state_dict()``; ``keep``: ``bool`` of the local weight's
    shape.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    key = f"{target.local_name}.weight"
    sh = sharded_sd.get(key)
    if sh is None:
        raise KeyError(f"{key} is not in the model's sharded state dict")
    if tuple(keep.shape) != tuple(target.weight.shape):
        raise ValueError(f"mask of shape {tuple(keep.shape)} for {key} of shape {tuple(target.weight.shape)}")
    if isinstance(sh, ShardedTensorFactory):
        built = sh.build_fn(sh.key, keep, sh.replica_id, getattr(sh, "flattened_range", None))
        built = list(built.values()) if isinstance(built, dict) else list(built)
        pieces = [_piece(b, b.data) for b in built]
    elif isinstance(sh, ShardedTensor):
        pieces = [_piece(sh, keep)]
    else:
        raise TypeError(f"{key}: unexpected sharded entry {type(sh).__name__}")
    return [p for p in pieces if p is not None]
