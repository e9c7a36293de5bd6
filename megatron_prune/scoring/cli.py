"""``megatron-prune score``: score a Megatron ``torch_dist`` checkpoint under torchrun.

    torchrun --nproc-per-node N -m megatron_prune score --load CKPT --tp T --pp P --ep E \\
        --data PREFIX_or_file --num-samples S --seq-length L --micro-batch-size B --out DIR [--resume]

Builds the ``GPTModel`` (local spec) from ``--model-config``, a ``model_config.json`` beside the
checkpoint, or the Megatron-LM ``args`` in ``common.pt``; loads it with
``dist_checkpointing.load`` at the requested layout; runs the calibration samples through the
forward-only pipeline schedule with the hooks of the scoring spec; writes activation logs into
``--out`` and resumable state into ``--out/state`` (periodically, and on SIGTERM/SIGINT).
gloo on CPU when CUDA is absent (single process without torchrun works too).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "resolve_checkpoint", "read_model_config"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--load", help="checkpoint root (latest_checkpointed_iteration.txt) or iteration dir")
    g.add_argument("--model-config", help="model_config.json (default: beside the checkpoint, else common.pt args)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size")
    g.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    g.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    d = p.add_argument_group("calibration data")
    d.add_argument("--data", help="indexed dataset prefix (.bin/.idx), .txt or .jsonl")
    d.add_argument("--data-format", choices=("auto", "indexed", "text", "jsonl"), default="auto")
    d.add_argument("--tokenizer", default="bytes", help="'bytes' (built in) or a Hugging Face tokenizer name")
    d.add_argument("--json-key", default="text")
    d.add_argument("--vocab-overflow", choices=("error", "fold", "clip"), default="error",
                   help="token ids >= the model vocabulary: refuse, fold (id %% vocab) or clip")
    d.add_argument("--eod", type=int, default=None, help="end-of-document id between documents")
    d.add_argument("--num-samples", type=int, default=None)
    d.add_argument("--seq-length", type=int, default=None, help="default: the model's seq_length")
    d.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch per DP rank; scores are layout-invariant for a fixed micro-batch × DP")
    d.add_argument("--global-batch-size", type=int, default=None, help="default: micro-batch size × DP")
    d.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("scoring")
    s.add_argument("--targets", default="auto", help="comma list of experts,ffn,kv_groups,hidden; 'auto'; 'none'")
    s.add_argument("--hooks", action="append", default=[], metavar="KIND[:JSON]", help="extra hook kind (repeatable)")
    s.add_argument("--exclude", default="", help="comma list of hook kinds to drop from the targets' defaults")
    s.add_argument("--on-unsupported", choices=("error", "skip"), default="error")
    s.add_argument("--spec", help="scoring spec JSON file (replaces --targets/--hooks/--exclude)")
    s.add_argument("--list-hooks", action="store_true", help="print the registered hook kinds and exit")
    o = p.add_argument_group("output and resume")
    o.add_argument("--out", help="activation-log directory (state in OUT/state)")
    o.add_argument("--resume", action="store_true", help="continue from OUT/state (any layout)")
    o.add_argument("--save-interval", type=int, default=50, help="save state every N global batches (0: never)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--throttle-seconds", type=float, default=0.0, help=argparse.SUPPRESS)


def resolve_checkpoint(path: str) -> Path:
    """The iteration directory of a checkpoint root or an iteration directory itself."""
    p = Path(path)
    tracker = p / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        it = tracker.read_text().strip()
        d = p / ("release" if it == "release" else f"iter_{int(it):07d}")
        if not d.is_dir():
            raise UserError(f"{tracker} names {d.name}, which does not exist")
        return d
    if (p / "metadata.json").exists() or (p / ".metadata").exists():
        return p
    raise UserError(f"{path} is neither a checkpoint root nor a torch_dist iteration directory")


def read_model_config(ckpt: Path, explicit: str = None):
    from megatron_prune.model_config import ModelConfig

    candidates = [Path(explicit)] if explicit else [ckpt / "model_config.json", ckpt.parent / "model_config.json"]
    for c in candidates:
        if c.exists() or explicit:
            try:
                return ModelConfig.load(c), str(c)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
    common = ckpt / "common.pt"
    if not common.exists():
        raise UserError(f"{ckpt} has no common.pt and no model_config.json; pass --model-config")
    import megatron.core  # noqa: F401  (registers the safe globals of common.pt)
    import torch

    try:
        obj = torch.load(common, map_location="cpu", weights_only=True)
    except Exception:  # older files pickle more than the safe globals allow
        obj = torch.load(common, map_location="cpu", weights_only=False)
    args = obj.get("args") if isinstance(obj, dict) else None
    if args is None:
        raise UserError(f"{common} holds no Megatron-LM args; pass --model-config")
    try:
        return ModelConfig.from_megatron_args(args), str(common)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot read the model configuration from {common}: {exc}") from exc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed() -> bool:
    """Initialise torch.distributed from torchrun's environment (or as a single process);
    returns whether CPU workarounds were applied."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    if torch.cuda.is_available():
        return False
    from megatron_prune.testing.megatron_cpu import apply_cpu_workarounds

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", 1))))
    return apply_cpu_workarounds()


def _spec(args, moe: bool):
    from megatron_prune.scoring.spec import ScoringSpec

    try:
        if args.spec:
            return ScoringSpec.load(args.spec)
        return ScoringSpec.from_cli(args.targets, args.hooks, args.exclude, args.on_unsupported, moe=moe)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(str(exc)) from exc


def _fill_iterative_calls(spec, calls: int):
    """Give iterative hook kinds their schedule length (hook calls per rank) when not set."""
    import dataclasses

    from megatron_prune.scoring.registry import get_hook_kind
    from megatron_prune.scoring.spec import HookChoice

    hooks = []
    for h in spec.hooks:
        if get_hook_kind(h.kind).hook_class.endswith("IterativeChannelContributionHook") and \
                "validation_full_iters" not in h.kwargs:
            h = HookChoice(h.kind, dict(h.kwargs, validation_full_iters=calls))
        hooks.append(h)
    return dataclasses.replace(spec, hooks=tuple(hooks))


def _print_kinds() -> int:
    from megatron_prune.scoring.registry import TARGETS, default_kinds, hook_kinds

    for name, k in sorted(hook_kinds().items()):
        dflt = " (default)" if name in default_kinds(k.target) else ""
        print(f"{name:24s} {k.target:10s} {k.description}{dflt}")
    print("targets: " + ", ".join(TARGETS))
    return 0


def run(args) -> int:
    if args.list_hooks:
        return _print_kinds()
    for name in ("load", "data", "num_samples", "out"):
        if getattr(args, name) is None:
            raise UserError(f"--{name.replace('_', '-')} is required")
    for name in ("tp", "pp", "ep", "num_samples", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    ckpt = resolve_checkpoint(args.load)
    cfg, cfg_source = read_model_config(ckpt, args.model_config)
    spec = _spec(args, moe=bool(cfg.num_moe_experts))
    from megatron_prune.scoring.data import DataError, DataSpec, data_fingerprint

    seq = args.seq_length or cfg.seq_length
    try:
        dspec = DataSpec(args.data, args.num_samples, seq, seed=args.seed, format=args.data_format,
                         tokenizer=args.tokenizer, json_key=args.json_key,
                         vocab_overflow=args.vocab_overflow, eod=args.eod)
        data_fp = data_fingerprint(dspec)
    except DataError as exc:
        raise UserError(str(exc)) from exc
    out = Path(args.out)
    state_dir = out / "state"
    from megatron_prune.scoring.session import ScoringSession, ScoringStateError

    saved = None
    try:
        saved = ScoringSession.read_progress(state_dir)
    except ScoringStateError as exc:
        raise UserError(str(exc)) from exc
    if saved is not None and not args.resume:
        raise UserError(f"{state_dir} holds saved scoring state; pass --resume or choose another --out")
    _init_distributed()
    return _score(args, ckpt, cfg, cfg_source, spec, dspec, data_fp, out, state_dir, saved is not None)


def _score(args, ckpt, cfg, cfg_source, spec, dspec, data_fp, out, state_dir, resuming) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_prune.logs import atomic_write_json
    from megatron_prune.megatron.groups import process_groups
    from megatron_prune.megatron.model import build_model_chunks, initialize_parallel
    from megatron_prune.model_config import ParallelLayout
    from megatron_prune.scoring.data import DataError, calibration_samples
    from megatron_prune.scoring.runner import StopSignal, run_calibration
    from megatron_prune.scoring.session import ScoringSession, ScoringStateError

    world = dist.get_world_size()
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                            sequence_parallel=args.sequence_parallel, vpp=args.vpp)
    if world % (layout.tp * layout.pp):
        raise UserError(f"world size {world} is not a multiple of TP × PP = {layout.tp * layout.pp}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    stop = StopSignal()
    try:
        try:
            initialize_parallel(layout, seed=args.seed)
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot set up layout {layout.to_dict()} on {world} ranks: {exc}") from exc
        dp = ps.get_data_parallel_world_size()
        gbs = args.global_batch_size or args.micro_batch_size * dp
        if gbs % (args.micro_batch_size * dp) or dspec.num_samples % gbs:
            raise UserError(
                f"need global batch {gbs} divisible by micro-batch × DP = {args.micro_batch_size * dp} "
                f"and --num-samples {dspec.num_samples} divisible by the global batch"
            )
        spec = _fill_iterative_calls(spec, dspec.num_samples // (args.micro_batch_size * dp))
        chunks = build_model_chunks(cfg.replace(seq_length=dspec.seq_length), layout, dtype)
        if torch.cuda.is_available():
            chunks = [c.cuda() for c in chunks]
        sharded = chunks[0].sharded_state_dict() if len(chunks) == 1 else {
            f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
        try:
            dist_checkpointing.load(sharded, str(ckpt))
        except Exception as exc:
            raise UserError(f"cannot load {ckpt} into the model of {cfg_source}: {exc}") from exc
        try:
            samples = calibration_samples(dspec, cfg.vocab_size)
        except DataError as exc:
            raise UserError(str(exc)) from exc
        run_info = {"data": data_fp, "global_batch_size": gbs,
                    "global_micro_batch": args.micro_batch_size * dp, "checkpoint": str(ckpt.resolve())}
        groups = process_groups(layout.sequence_parallel)
        rank0 = dist.get_rank() == 0
        with ScoringSession(chunks, spec, groups, model_config=cfg, run_info=run_info) as session:
            if resuming:
                try:
                    session.load_state(state_dir)
                except ScoringStateError as exc:
                    raise UserError(str(exc)) from exc
                if rank0:
                    print(f"resumed at global batch {session.steps}", file=sys.stderr)
            if rank0:
                out.mkdir(parents=True, exist_ok=True)
                spec.save(out / "scoring_spec.json")
            result = run_calibration(
                session, chunks, samples, global_batch_size=gbs, micro_batch_size=args.micro_batch_size,
                state_dir=state_dir, save_interval=args.save_interval, progress=not args.no_progress,
                throttle_seconds=args.throttle_seconds, stop=stop,
            )
            if result["signal"]:
                if rank0:
                    print(f"stopped by signal {result['signal']} after global batch {result['steps']}; "
                          f"state saved in {state_dir}; rerun with --resume", file=sys.stderr)
                return 128 + int(result["signal"])
            session.save_state(state_dir)
            session.finalize(out)
            if rank0:
                atomic_write_json(out / "score_run.json", {
                    "layout": layout.to_dict(), "world_size": world, "model_config_source": cfg_source,
                    "steps": result["steps"], "tokens": result["tokens"], "seconds": result["seconds"],
                    "unused_kinds": session.unused_kinds, "skipped": len(session.skipped),
                })
                print(f"scored {result['tokens']} tokens in {result['steps']} global batches; logs in {out}",
                      file=sys.stderr)
        return 0
    finally:
        stop.restore()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
