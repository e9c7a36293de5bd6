"""Read and write ``torch_dist`` checkpoints in one process through ``torch.distributed.checkpoint``.

Reading: :class:`CheckpointReader` loads one key at a time (``dcp.load`` with ``no_dist=True``
and a state dict holding only that key), with the ``.metadata`` parsed once. Writing:
:func:`write_tensors` runs one ``dcp.save`` whose state dict holds *meta* tensors of the new
global shapes; its planner produces each real tensor only when the writer asks for it, so at most
one converted tensor is alive at a time. Also here: locating the iteration directory
(``latest_checkpointed_iteration.txt`` -> ``iter_XXXXXXX``), ``common.pt``, ``metadata.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_prune.convert.planner import ObjectInfo, TensorInfo
from megatron_prune.errors import UserError

__all__ = [
    "TRACKER_FILE",
    "CheckpointLocation",
    "locate_checkpoint",
    "read_entries",
    "check_data_files",
    "CheckpointReader",
    "write_tensors",
    "read_common",
    "write_common",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class CheckpointLocation:
    """``iter_dir`` holds ``.metadata``; ``root`` (with the tracker file) is None when the user
    named the iteration directory itself."""

    iter_dir: Path
    root: Optional[Path] = None
    tracker: Optional[str] = None  # the tracker file's content


def locate_checkpoint(path) -> CheckpointLocation:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            it = path / "release"
        elif text.isdigit():
            it = path / f"iter_{int(text):07d}"
        else:
            raise UserError(f"{tracker} holds {text[:40]!r}, neither an iteration number nor 'release'")
        if not (it / ".metadata").is_file():
            raise UserError(f"{tracker} points at {it.name}, which holds no torch_dist .metadata")
        return CheckpointLocation(it, path, text)
    if (path / ".metadata").is_file():
        return CheckpointLocation(path)
    raise UserError(f"{path} is neither a Megatron checkpoint root ({TRACKER_FILE}) nor a torch_dist "
                    "iteration directory (.metadata)")


def _read_metadata(iter_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    mj = iter_dir / "metadata.json"
    if mj.is_file():
        try:
            backend = json.loads(mj.read_text()).get("sharded_backend")
        except json.JSONDecodeError:
            raise UserError(f"{mj} is not valid JSON") from None
        if backend not in (None, "torch_dist"):
            raise UserError(f"{iter_dir} uses the {backend!r} backend; only torch_dist is supported")
    try:
        return FileSystemReader(str(iter_dir)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot read {iter_dir / '.metadata'}: {type(exc).__name__}: {exc}") from None


def read_entries(iter_dir) -> dict:
    """``{key: TensorInfo | ObjectInfo}`` from an iteration directory's ``.metadata``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = _read_metadata(Path(iter_dir))
    out = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            out[key] = TensorInfo(tuple(int(s) for s in m.size), str(m.properties.dtype).split(".")[-1])
        elif isinstance(m, BytesStorageMetadata):
            out[key] = ObjectInfo()
        else:  # pragma: no cover - a newer DCP entry type
            raise UserError(f"checkpoint entry {key} has unsupported metadata {type(m).__name__}")
    return out


def check_data_files(iter_dir) -> None:
    """Every data file the metadata refers to exists and is long enough (catches truncation)."""
    iter_dir = Path(iter_dir)
    md = _read_metadata(iter_dir)
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for rel, end in sorted(need.items()):
        p = iter_dir / rel
        if not p.is_file():
            raise UserError(f"checkpoint data file {p} is missing")
        if p.stat().st_size < end:
            raise UserError(f"checkpoint data file {p} is truncated ({p.stat().st_size} of {end} bytes)")


class _LayerPlanner(DefaultLoadPlanner):
    """Reads only ``chunk`` of ``key`` into ``dest``. Module level on purpose: a class made per call
    sits in a reference cycle and keeps ``dest`` alive until the next garbage-collector pass."""

    def __init__(self, key, chunk, dest):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._key, self._chunk, self._dest = key, chunk, dest

    def create_local_plan(self):
        md = self.metadata.state_dict_metadata[self._key]
        return LoadPlan(create_read_items_for_chunk_list(self._key, md, [self._chunk]))

    def lookup_tensor(self, index):
        return self._dest


class CheckpointReader:
    """Reads single entries of a ``torch_dist`` iteration directory (metadata parsed once)."""

    def __init__(self, iter_dir):
        from torch.distributed.checkpoint import FileSystemReader

        md = _read_metadata(Path(iter_dir))

        class _Cached(FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                return md

        self._reader = _Cached(str(iter_dir))

    def _load(self, sd: dict) -> dict:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcp.load(sd, storage_reader=self._reader, no_dist=True)
            except Exception as exc:  # DCP wraps storage errors in CheckpointException
                first = str(exc).strip().splitlines()
                raise UserError(f"cannot read {list(sd)[0]} from the checkpoint: "
                                f"{type(exc).__name__}: {first[-1] if first else ''}"[:300]) from None
        return sd

    def read_tensor(self, key: str, info: TensorInfo) -> torch.Tensor:
        """The full global tensor ``key`` (shape ``info.shape``)."""
        return self._load({key: torch.empty(info.shape, dtype=getattr(torch, info.dtype))})[key]

    def read_layer(self, key: str, info: TensorInfo, layer: int) -> torch.Tensor:
        """Slice ``layer`` of a layer-stacked tensor: ``[1, *info.shape[1:]]`` (only the
        overlapping parts of the stored chunks are read)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        shape = (1,) + tuple(info.shape[1:])
        dest = torch.empty(shape, dtype=getattr(torch, info.dtype))
        chunk = ChunkStorageMetadata(offsets=torch.Size((layer,) + (0,) * (len(shape) - 1)), sizes=torch.Size(shape))
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcp.load({key: dest}, storage_reader=self._reader, planner=_LayerPlanner(key, chunk, dest),
                         no_dist=True)
            except Exception as exc:
                first = str(exc).strip().splitlines()
                raise UserError(f"cannot read {key} from the checkpoint: "
                                f"{type(exc).__name__}: {first[-1] if first else ''}"[:300]) from None
        return dest

    def read_object(self, key: str) -> Any:
        """A non-tensor entry (e.g. ``_extra_state``) as the object Megatron stored."""
        return self._load({key: None})[key]


#: data bytes per output file; the DCP writer keeps every tensor of a file alive until the file is
#: closed (torch 2.13 ``_write_files_from_queue``), so this bounds the writer's memory.
FILE_BYTES = 128 * 2**20


def _bucketed_writer(base):
    """``FileSystemWriter`` that starts a new data file every :data:`FILE_BYTES` of tensors."""
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _item_size

    class _Writer(base):
        def write_data(self, plan, planner):
            import queue

            prefix = getattr(plan.storage_data, "prefix", None)
            if prefix is None or not hasattr(self, "_write_data"):  # pragma: no cover - other torch
                return super().write_data(plan, planner)
            buckets, size = [[]], 0
            for item in plan.items:
                n = _item_size(item) if item.tensor_data is not None else 0
                if buckets[-1] and size + n > FILE_BYTES and n:
                    buckets.append([])
                    size = 0
                buckets[-1].append(item)
                size += n
            files: queue.Queue = queue.Queue()
            for i, bucket in enumerate(buckets):
                name = f"{prefix}{i}{DEFAULT_SUFFIX}"
                files.put((self.fs.concat_path(self.path, name), name, bucket))
            return self._write_data(planner, files)

    return _Writer


def write_tensors(dst_dir, tensors: dict, objects: dict, produce: Callable[[str, tuple], Any],
                  chunked: frozenset = frozenset()) -> None:
    """Write a ``torch_dist`` iteration directory in one streaming ``dcp.save``.

    ``tensors``: ``{key: (global shape, dtype name)}``; ``objects``: non-tensor keys;
    ``chunked``: tensor keys stored as one chunk per index of axis 0 (layer-stacked tensors).
    ``produce(key, offsets)`` returns the data when the writer needs it: the whole tensor, the
    ``[1, ...]`` slice at ``offsets[0]`` of a chunked key, or the object (``offsets`` None).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    def items():
        for key in objects:
            yield WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)
        for key, (shape, dt) in tensors.items():
            size, props = torch.Size(shape), TensorProperties(dtype=getattr(torch, dt))
            if key in chunked and len(shape) > 1:
                for i in range(shape[0]):
                    off = torch.Size((i,) + (0,) * (len(shape) - 1))
                    chunk = ChunkStorageMetadata(offsets=off, sizes=torch.Size((1,) + tuple(shape[1:])))
                    yield WriteItem(index=MetadataIndex(key, off), type=WriteItemType.SHARD,
                                    tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size))
            else:
                off = torch.Size((0,) * len(shape))
                yield WriteItem(index=MetadataIndex(key, off), type=WriteItemType.TENSOR,
                                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(off, size),
                                                            properties=props, size=size))

    class _StreamingPlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self):
            self.plan = SavePlan(list(items()))
            return self.plan

        def lookup_object(self, index):
            if index.fqn in objects:
                return produce(index.fqn, None)
            return produce(index.fqn, tuple(index.offset))

    sd: dict = {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, (shape, dt) in tensors.items()}
    sd.update({k: None for k in objects})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.save(sd, storage_writer=_bucketed_writer(FileSystemWriter)(str(dst_dir), thread_count=1),
                     planner=_StreamingPlanner(), no_dist=True)
        except Exception as exc:  # DCP wraps errors of ``produce`` in a CheckpointException
            for failure in getattr(exc, "failures", {}).values():
                inner = getattr(failure, "exception", failure)
                if isinstance(inner, UserError):
                    raise inner from None
            raise


def read_common(iter_dir) -> Optional[dict]:
    """``common.pt`` of an iteration directory (None when absent). Megatron-LM stores ``args``
    as an ``argparse.Namespace``; importing ``megatron.core`` registers its safe globals."""
    p = Path(iter_dir) / "common.pt"
    if not p.is_file():
        return None
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        try:  # Megatron-LM args hold Megatron types: importing megatron.core registers them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import megatron.core.dist_checkpointing  # noqa: F401
            with torch.serialization.safe_globals([argparse.Namespace]):
                data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            raise UserError(f"cannot read {p}: {type(exc).__name__}: {msg[0][:200] if msg else ''}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} holds a {type(data).__name__}, expected a dict")
    return data


def write_common(dst_dir, data: dict) -> None:
    tmp = Path(dst_dir) / ".common.pt.tmp"
    torch.save(data, tmp)
    os.replace(tmp, Path(dst_dir) / "common.pt")
