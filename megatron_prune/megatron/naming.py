"""Module names with global layer (and expert) numbers, as used in logs and masks."""

from __future__ import annotations

import re
from typing import Iterator

import torch

__all__ = ["global_module_names", "global_layer_index"]

_LAYER = re.compile(r"^(.*?\bdecoder\.layers\.)(\d+)(\..*)?$")


def global_layer_index(layer: torch.nn.Module) -> int:
    """0-based global index of a ``TransformerLayer`` (Megatron's ``layer_number`` is 1-based)."""
    return int(layer.layer_number) - 1


def global_module_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(name, module)`` for every submodule of one model chunk, with the local layer index
    in ``decoder.layers.<i>`` replaced by the global one (pipeline and virtual stages give each
    chunk a slice of the layers). Wrappers such as DDP/Float16Module prefixes are dropped."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module) and not hasattr(inner, "decoder"):
        inner = inner.module
    layers = getattr(getattr(inner, "decoder", None), "layers", None)
    for name, module in inner.named_modules():
        m = _LAYER.match(name)
        if m and layers is not None:
            g = global_layer_index(layers[int(m.group(2))])
            name = f"{m.group(1)}{g}{m.group(3) or ''}"
        yield name, module
