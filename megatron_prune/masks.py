"""Mask files: which experts, channels, query groups and weights a pruned model keeps.

One safetensors file; True = keep. The JSON manifest lives in the safetensors metadata under
``"manifest"`` (format name and version, the source of the decision, and for every sparsity entry
its unpacked shape). Keys use **global** layer numbers:

========================================================  =============  ==============================
key                                                       shape          meaning
========================================================  =============  ==============================
``decoder.layers.{i}.mlp.experts``                        ``[E]``        experts kept in MoE layer i
``decoder.layers.{i}.mlp.ffn``                            ``[F]``        dense FFN channels
``decoder.layers.{i}.mlp.experts.ffn``                    ``[E, F_moe]`` FFN channels inside each expert
``decoder.layers.{i}.self_attention.query_groups``        ``[G]``        KV groups (with their queries)
``hidden``                                                ``[h]``        hidden (residual) channels
``sparsity/<checkpoint tensor key>``                      packed uint8   element keep-mask of one weight
========================================================  =============  ==============================

Sparsity masks are bit-packed (bit ``j % 8`` of byte ``j // 8`` is element ``j`` of the
row-major flattened mask) and their shape is stored in ``manifest["sparsity_shapes"]``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Union

import torch

from megatron_prune.errors import UserError

__all__ = [
    "MASK_FORMAT",
    "MASK_FORMAT_VERSION",
    "SPARSITY_PREFIX",
    "pack_bits",
    "unpack_bits",
    "unpack_bits_range",
    "mask_kind",
    "save_masks",
    "load_masks",
    "validate_masks",
]

MASK_FORMAT = "megatron_prune.masks"
MASK_FORMAT_VERSION = 1
SPARSITY_PREFIX = "sparsity/"

#: (kind, regex, number of dimensions) for every structural key
_KINDS = (
    ("experts", re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts$"), 1),
    ("ffn", re.compile(r"^decoder\.layers\.(\d+)\.mlp\.ffn$"), 1),
    ("expert_ffn", re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.ffn$"), 2),
    ("query_groups", re.compile(r"^decoder\.layers\.(\d+)\.self_attention\.query_groups$"), 1),
    ("hidden", re.compile(r"^hidden$"), 1),
)
_BIT_WEIGHTS = torch.tensor([1 << k for k in range(8)], dtype=torch.int32)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor of any shape -> ``uint8 [ceil(numel / 8)]`` (little bit order, row-major)."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [n]`` -> bool tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise UserError(
            f"packed mask of {packed.numel()} {packed.dtype} bytes does not fit shape {list(shape)}"
        )
    bits = (packed.to(torch.int32)[:, None] & _BIT_WEIGHTS) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def unpack_bits_range(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the flattened mask packed in ``packed`` (bool [count])."""
    lo, hi = start // 8, (start + count + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or hi > packed.numel():
        raise UserError(f"packed mask of {packed.numel()} bytes has no elements [{start}, {start + count})")
    bits = (packed[lo:hi].to(torch.int32)[:, None] & _BIT_WEIGHTS) != 0
    off = start - 8 * lo
    return bits.reshape(-1)[off:off + count]


def mask_kind(key: str) -> tuple[str, int]:
    """``(kind, layer)`` of a structural mask key (layer -1 for ``hidden``/sparsity); else UserError."""
    if key.startswith(SPARSITY_PREFIX):
        if len(key) == len(SPARSITY_PREFIX):
            raise UserError("mask key 'sparsity/' names no checkpoint tensor")
        return "sparsity", -1
    for kind, rx, _ in _KINDS:
        m = rx.match(key)
        if m:
            return kind, int(m.group(1)) if m.groups() else -1
    raise UserError(f"unknown mask key {key!r}")


def validate_masks(masks: dict, sparsity_shapes: dict) -> None:
    """Check key names, dtypes, dimensions and that no structural mask keeps nothing."""
    for key, value in masks.items():
        kind, _ = mask_kind(key)
        if not isinstance(value, torch.Tensor):
            raise UserError(f"mask {key} is a {type(value).__name__}, not a tensor")
        if kind == "sparsity":
            name = key[len(SPARSITY_PREFIX):]
            if value.dtype == torch.bool:
                continue
            if name not in sparsity_shapes:
                raise UserError(f"mask {key}: the manifest gives no sparsity shape for it")
            unpack_bits(value, sparsity_shapes[name])
            continue
        ndim = next(n for k, _, n in _KINDS if k == kind)
        if value.dtype != torch.bool:
            raise UserError(f"mask {key} has dtype {value.dtype}, expected torch.bool")
        if value.dim() != ndim:
            raise UserError(f"mask {key} has {value.dim()} dimensions, expected {ndim}")
        if value.numel() == 0 or not bool(value.any()):
            raise UserError(f"mask {key} keeps nothing (all False)")
        if kind == "expert_ffn" and not bool(value.any(dim=1).all()):
            raise UserError(f"mask {key} keeps no channel of some expert")
    for name in sparsity_shapes:
        if SPARSITY_PREFIX + name not in masks:
            raise UserError(f"the manifest gives a sparsity shape for {name} but the file lacks it")


def save_masks(path: Union[str, Path], masks: dict, manifest: dict) -> Path:
    """Write ``masks`` (bool tensors; ``sparsity/*`` may be bool of the weight's shape and are
    then bit-packed here) and ``manifest`` to one safetensors file. Returns the path."""
    from safetensors.torch import save_file

    from megatron_prune.logs import atomic_write_bytes

    path = Path(path)
    shapes = dict(manifest.get("sparsity_shapes", {}))
    tensors = {}
    for key, value in masks.items():
        value = torch.as_tensor(value)
        if mask_kind(key)[0] == "sparsity" and value.dtype == torch.bool:
            shapes[key[len(SPARSITY_PREFIX):]] = list(value.shape)
            value = pack_bits(value)
        tensors[key] = value.detach().cpu().contiguous()
    validate_masks(tensors, shapes)
    man = dict(manifest)
    man.update(format=MASK_FORMAT, format_version=MASK_FORMAT_VERSION, sparsity_shapes=shapes)
    text = json.dumps(man, sort_keys=True, default=repr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.writing")
    save_file(tensors, str(tmp), metadata={"manifest": text})
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path


def load_masks(path: Union[str, Path], unpack_sparsity: bool = True) -> tuple[dict, dict]:
    """``(masks, manifest)`` from a mask file, validated; UserError on any problem.

    With ``unpack_sparsity=False`` the ``sparsity/*`` entries stay packed (``uint8``), to be
    unpacked one tensor at a time with :func:`unpack_bits` and ``manifest["sparsity_shapes"]``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            masks = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot read mask file {path}: {str(exc).splitlines()[0]}") from None
    try:
        manifest = json.loads(meta["manifest"])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path} has no valid JSON manifest in its metadata") from None
    if manifest.get("format") != MASK_FORMAT:
        raise UserError(f"{path} is not a {MASK_FORMAT} file")
    if manifest.get("format_version") != MASK_FORMAT_VERSION:
        raise UserError(
            f"{path} has mask format version {manifest.get('format_version')}, "
            f"this megatron_prune reads version {MASK_FORMAT_VERSION}"
        )
    shapes = manifest.get("sparsity_shapes", {})
    validate_masks(masks, shapes)
    if unpack_sparsity:
        for key in list(masks):
            if key.startswith(SPARSITY_PREFIX):
                masks[key] = unpack_bits(masks[key], shapes[key[len(SPARSITY_PREFIX):]])
    return masks, manifest
