"""Activation-log files: scores as safetensors plus a JSON manifest, one pair per pipeline stage.

Layout of an activation-log directory::

    scores.pp000.safetensors     tensors, keys "<module name>/<field>"
    manifest.pp000.json          {"format": "megatron_prune.activation_logs", "format_version": 1,
                                  "pp_rank": 0, "pp_size": 1, "hooks": {module: hook class},
                                  "fields": {module: [field, ...]}, "model_config": {...},
                                  "parallel_layout": {...}, "tokens_seen": int, ...}

Module names use Megatron names with **global** layer numbers (``decoder.layers.5.mlp.linear_fc2``).
Exactly one rank per pipeline stage writes its pair; :func:`load_activations_logs` merges all
stages and validates them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = [
    "LOG_FORMAT",
    "LOG_FORMAT_VERSION",
    "write_stage_logs",
    "load_activations_logs",
    "load_activations_manifest",
    "atomic_write_bytes",
    "atomic_write_json",
]

LOG_FORMAT = "megatron_prune.activation_logs"
LOG_FORMAT_VERSION = 1
_STAGE_RE = re.compile(r"^manifest\.pp(\d{3})\.json$")


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Union[str, Path], obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _to_jsonable(obj.to_dict())
    return repr(obj)


def write_stage_logs(
    log_dir: Union[str, Path],
    results: dict[str, dict[str, torch.Tensor]],
    hook_classes: dict[str, str],
    *,
    pp_rank: int = 0,
    pp_size: int = 1,
    model_config: Optional[dict] = None,
    parallel_layout: Optional[dict] = None,
    tokens_seen: Optional[int] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write one pipeline stage's scores and manifest (call on exactly one rank of the stage)."""
    from safetensors.torch import save

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    fields: dict[str, list[str]] = {}
    for module, res in results.items():
        if "/" in module:
            raise ValueError(f"module name {module!r} must not contain '/'")
        fields[module] = sorted(res)
        for name, value in res.items():
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            tensors[f"{module}/{name}"] = value.detach().cpu().contiguous()
    manifest = {
        "format": LOG_FORMAT,
        "format_version": LOG_FORMAT_VERSION,
        "pp_rank": pp_rank,
        "pp_size": pp_size,
        "hooks": dict(sorted(hook_classes.items())),
        "fields": fields,
        "model_config": _to_jsonable(model_config or {}),
        "parallel_layout": _to_jsonable(parallel_layout or {}),
        "tokens_seen": tokens_seen,
    }
    if extra:
        manifest.update(_to_jsonable(extra))
    atomic_write_bytes(log_dir / f"scores.pp{pp_rank:03d}.safetensors", save(tensors))
    atomic_write_json(log_dir / f"manifest.pp{pp_rank:03d}.json", manifest)
    return log_dir


def load_activations_manifest(log_dir: Union[str, Path]) -> list[dict]:
    """The manifests of every stage, validated, in stage order."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"activation-log directory {log_dir} does not exist")
    stages = {}
    for p in log_dir.iterdir():
        m = _STAGE_RE.match(p.name)
        if m:
            try:
                stages[int(m.group(1))] = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: not valid JSON ({exc})") from exc
    if not stages:
        raise ValueError(f"{log_dir} holds no activation logs (no manifest.ppNNN.json)")
    manifests = [stages[k] for k in sorted(stages)]
    for k, man in zip(sorted(stages), manifests):
        if man.get("format") != LOG_FORMAT:
            raise ValueError(f"{log_dir}: stage {k} manifest is not a {LOG_FORMAT} file")
        if man.get("format_version") != LOG_FORMAT_VERSION:
            raise ValueError(
                f"{log_dir}: stage {k} has format version {man.get('format_version')}, "
                f"this megatron_prune reads version {LOG_FORMAT_VERSION}"
            )
        if man.get("pp_rank") != k:
            raise ValueError(f"{log_dir}: manifest.pp{k:03d}.json says pp_rank={man.get('pp_rank')}")
    pp_size = manifests[0].get("pp_size", 1)
    if sorted(stages) != list(range(pp_size)):
        raise ValueError(
            f"{log_dir}: expected logs of {pp_size} pipeline stages, found stages {sorted(stages)}"
        )
    return manifests


def load_activations_logs(log_dir: Union[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {field: tensor}}`` merged over every pipeline stage."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    log_dir = Path(log_dir)
    manifests = load_activations_manifest(log_dir)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for man in manifests:
        k = man["pp_rank"]
        path = log_dir / f"scores.pp{k:03d}.safetensors"
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        for module, fields in man["fields"].items():
            if module in out:
                raise ValueError(f"{log_dir}: module {module} appears in two pipeline stages")
            entry = {}
            for f in fields:
                key = f"{module}/{f}"
                if key not in tensors:
                    raise ValueError(f"{path}: manifest lists {key} but the file lacks it")
                entry[f] = tensors[key]
            out[module] = entry
    return out
