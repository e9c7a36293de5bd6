"""``megatron-prune convert --load SRC --masks M --save DST``: apply a mask file to a checkpoint.

Orchestration only: :mod:`~megatron_prune.convert.planner` decides from metadata and masks,
:mod:`~megatron_prune.convert.applier` transforms one tensor at a time, and
:mod:`~megatron_prune.convert.storage` reads and writes through ``torch.distributed.checkpoint``.
The result is written into a temporary sibling of DST and renamed at the end, so an interrupted
run leaves nothing at DST; SRC is only read. Optimizer and RNG state are not carried over.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "convert_checkpoint", "verify_output"]


def add_arguments(parser) -> None:
    parser.add_argument("--load", required=True, metavar="SRC",
                        help="Megatron checkpoint root (latest_checkpointed_iteration.txt) or iteration directory")
    parser.add_argument("--masks", required=True, metavar="M", help="mask file written by `megatron-prune plan`")
    parser.add_argument("--save", required=True, metavar="DST", help="output directory (must not exist)")
    parser.add_argument("--model-config", metavar="JSON",
                        help="model config JSON (default: model_config.json in SRC, else common.pt args)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--verify", action="store_true", help="re-read the output metadata and check every shape")
    parser.add_argument("--target-tp", type=int, help="check the new sizes divide by this TP size")
    parser.add_argument("--target-ep", type=int, help="check the kept experts divide by this EP size")
    parser.add_argument("--target-etp", type=int, help="expert TP size for the check (default: --target-tp)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _model_config(args, loc, common):
    from megatron_prune.model_config import ModelConfig

    candidates = [Path(args.model_config)] if args.model_config else [
        loc.iter_dir / "model_config.json"] + ([loc.root / "model_config.json"] if loc.root else [])
    for p in candidates:
        if p.is_file() or args.model_config:
            try:
                return ModelConfig.load(p)
            except (ValueError, TypeError) as exc:
                raise UserError(f"model config {p}: {exc}") from None
    if common and "args" in common:
        try:
            return ModelConfig.from_megatron_args(common["args"])
        except (ValueError, TypeError) as exc:
            raise UserError(f"common.pt args do not describe a GPT model: {exc}") from None
    raise UserError(f"no model config: pass --model-config, or put model_config.json in {loc.iter_dir} "
                    "(a Megatron-LM checkpoint has it in common.pt args)")


@contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def convert_checkpoint(plan, loc, out_iter: Path, masks: dict, sparsity_shapes: dict, common, progress=True):
    """Write the converted iteration directory ``out_iter`` (must not exist)."""
    import torch

    from megatron_prune.convert import applier, storage
    from megatron_prune.convert.planner import TensorInfo
    from megatron_prune.masks import SPARSITY_PREFIX, unpack_bits, unpack_bits_range

    out_iter.mkdir(parents=True)
    reader = storage.CheckpointReader(loc.iter_dir)
    items = {t.key: t for t in plan.tensors}
    objects = {o.dst_key: o for o in plan.objects}
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(TensorInfo(t.src_shape, t.dtype).nbytes for t in plan.tensors)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr)

    def keep_mask(item, layer=None):
        if item.sparsity is None:
            return None
        m = masks[item.sparsity]
        if layer is None:
            return m if m.dtype == torch.bool else unpack_bits(m, sparsity_shapes[item.sparsity[len(SPARSITY_PREFIX):]])
        n = math.prod(item.src_shape[1:])
        return m.reshape(-1)[layer * n:(layer + 1) * n] if m.dtype == torch.bool else unpack_bits_range(m, layer * n, n)

    def produce(key, offsets):
        if key in objects:
            return reader.read_object(objects[key].src_key)
        item = items[key]
        info = TensorInfo(item.src_shape, item.dtype)
        if item.layer_stacked:
            layer = offsets[0]
            out = applier.apply_layer(item, layer, reader.read_layer(key, info, layer), keep_mask(item, layer))
            done = info.nbytes // item.src_shape[0]
        else:
            out = applier.apply_item(item, reader.read_tensor(key, info), keep_mask(item))
            done = info.nbytes
        if bar is not None:
            bar.update(done)
        return out

    try:
        storage.write_tensors(out_iter, {k: (t.dst_shape, t.dtype) for k, t in items.items()}, objects, produce,
                              frozenset(k for k, t in items.items() if t.layer_stacked))
    finally:
        if bar is not None:
            bar.close()
    new_common = dict(common or {})
    for k in ("optimizer", "opt_param_scheduler"):
        new_common.pop(k, None)
    if "args" in new_common:
        args = copy.deepcopy(new_common["args"])
        plan.new_config.update_megatron_args(args)
        new_common["args"] = args
    storage.write_common(out_iter, new_common)
    src_meta = loc.iter_dir / "metadata.json"
    if src_meta.is_file():
        shutil.copyfile(src_meta, out_iter / "metadata.json")
    else:
        (out_iter / "metadata.json").write_text(
            '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
            '"common_backend": "torch", "common_backend_version": 1}')
    plan.new_config.save(out_iter / "model_config.json")


def verify_output(plan, out_iter: Path) -> None:
    """Re-read the written metadata: exactly the planned keys, every shape and dtype as planned."""
    from megatron_prune.convert import storage
    from megatron_prune.convert.planner import ObjectInfo, TensorInfo

    entries = storage.read_entries(out_iter)
    want = {t.key: TensorInfo(tuple(t.dst_shape), t.dtype) for t in plan.tensors}
    want.update({o.dst_key: ObjectInfo() for o in plan.objects})
    if set(entries) != set(want):
        diff = sorted(set(entries) ^ set(want))
        raise UserError(f"verify: output keys differ from the plan ({len(diff)} keys, e.g. {diff[0]})")
    for k, info in want.items():
        if entries[k] != info:
            raise UserError(f"verify: {k} is {entries[k]}, planned {info}")
    storage.check_data_files(out_iter)


def _remove_stale_partials(dst: Path) -> None:
    """Remove temporary siblings left by conversions that were killed (their process is gone)."""
    for p in dst.parent.glob(f".{dst.name}.partial-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(p, ignore_errors=True)
        print(f"removed {p.name}, left by an interrupted conversion")


def run(args) -> int:
    from megatron_prune.convert import storage
    from megatron_prune.convert.planner import make_plan
    from megatron_prune.masks import load_masks

    t0 = time.time()
    loc = storage.locate_checkpoint(args.load)
    src = (loc.root or loc.iter_dir).resolve()
    dst = Path(args.save).absolute()
    rdst = dst.resolve()
    if rdst == src or src in rdst.parents or rdst in src.parents:
        raise UserError(f"DST {dst} overlaps SRC {src}; choose a separate directory")
    if dst.exists() and not args.overwrite:
        raise UserError(f"DST {dst} exists (pass --overwrite to replace it)")
    if not dst.parent.is_dir():
        raise UserError(f"the parent directory of DST {dst} does not exist")
    masks, manifest = load_masks(args.masks, unpack_sparsity=False)
    shapes = manifest.get("sparsity_shapes", {})
    entries = storage.read_entries(loc.iter_dir)
    storage.check_data_files(loc.iter_dir)
    common = storage.read_common(loc.iter_dir)
    cfg = _model_config(args, loc, common)
    plan = make_plan(entries, cfg, masks, sparsity_shapes=shapes, target_tp=args.target_tp,
                     target_ep=args.target_ep, target_etp=args.target_etp)
    _remove_stale_partials(dst)
    print(f"plan: {len(plan.tensors)} tensors, {len(plan.objects)} extra-state entries; {plan.describe()}")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    out_iter = tmp / loc.iter_dir.name if loc.root else tmp
    try:
        with _sigterm_as_interrupt():
            convert_checkpoint(plan, loc, out_iter, masks, shapes, common, progress=not args.no_progress)
            if loc.root:
                (tmp / storage.TRACKER_FILE).write_text(loc.tracker + "\n")
                plan.new_config.save(tmp / "model_config.json")
            if args.verify:
                verify_output(plan, out_iter)
            if dst.exists():
                os.rename(dst, old)
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    pct = 100.0 * plan.bytes_after / max(plan.bytes_before, 1)
    print(f"wrote {dst}: {_human(plan.bytes_before)} -> {_human(plan.bytes_after)} ({pct:.1f}%) "
          f"in {time.time() - t0:.1f}s" + (", verified" if args.verify else ""))
    print(f"model config written to {dst / 'model_config.json'} (common.pt args updated where present)")
    print(f"optimizer and RNG state are not carried over ({len(plan.dropped)} entries dropped): "
          "load with --no-load-optim --no-load-rng (or --finetune)")
    return 0
