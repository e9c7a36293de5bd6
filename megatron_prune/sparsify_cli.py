"""``megatron-prune sparsify``: Wanda / MoE-Pruner sparsity inside experts of a checkpoint.

Run under ``torchrun`` (one process per rank of the layout; a single process without it)::

    torchrun --nproc-per-node 2 -m megatron_prune sparsify --load CKPT --tp 2 \\
        --data corpus.txt --nsamples 100 --max-seqlen 2048 --out masks.safetensors

Loads the ``torch_dist`` checkpoint at ``--tp/--pp/--ep/--etp``, calibrates on ``--data`` (a
Megatron indexed dataset, a ``.txt``/``.jsonl`` file read by :mod:`megatron_prune.scoring.data`,
or ``random`` for seeded random tokens), zeroes the selected expert weights in memory and writes
the keep-masks as ``sparsity/<checkpoint key>`` entries of a mask file (global rank 0), which
``megatron-prune convert`` applies to the checkpoint. Prints the achieved sparsity per tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "random_tokens"]


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--load", required=True, metavar="CKPT", help="checkpoint root or torch_dist iteration directory")
    a("--model-config", metavar="JSON", help="model config JSON (default: model_config.json in CKPT, else common.pt args)")
    a("--tp", type=int, default=1)
    a("--pp", type=int, default=1)
    a("--ep", type=int, default=1)
    a("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    a("--data", default="random", help="'random', a .txt/.jsonl file or an indexed dataset prefix")
    a("--tokenizer", default="bytes", help="tokenizer for text data: 'bytes' or a Hugging Face name")
    a("--vocab-overflow", default="fold", choices=("error", "fold", "clip"))
    a("--nsamples", type=int, default=100)
    a("--max-seqlen", type=int, default=2048)
    a("--seed", type=int, default=42)
    a("--prune-type", default="unstructured", choices=("unstructured", "semistructured"))
    a("--sparsity-ratio", type=float, default=0.5)
    a("--n", type=int, default=2, help="zeros per block (semistructured)")
    a("--m", type=int, default=4, help="block length (semistructured)")
    a("--gate-weighting", action="store_true", help="weight tokens by their router gate (MoE-Pruner)")
    a("--ungate-fc2", action="store_true", help="divide the expert fc2 input by the gate (plain Wanda)")
    a("--calibrate-all-experts", action="store_true", help="every expert sees every token")
    a("--mode", default="one_shot", choices=("one_shot", "layer_by_layer"))
    a("--include-dense", action="store_true", help="also sparsify dense MLPs and shared experts")
    a("--micro-batch-size", type=int, default=1)
    a("--out", required=True, metavar="MASKS", help="mask file to write (safetensors)")
    a("--report", metavar="JSON", help="also write the per-tensor sparsity report here")


def random_tokens(nsamples: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Seeded random token ids ``[nsamples, seq_length]`` (the ``--data random`` source)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, int(vocab_size), (int(nsamples), int(seq_length)), generator=g)


def _init_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _model_config(args, loc):
    from megatron_prune.convert import storage
    from megatron_prune.model_config import ModelConfig

    paths = [Path(args.model_config)] if args.model_config else [loc.iter_dir / "model_config.json"] + (
        [loc.root / "model_config.json"] if loc.root else [])
    for p in paths:
        if p.is_file() or args.model_config:
            try:
                return ModelConfig.load(p)
            except (ValueError, TypeError) as exc:
                raise UserError(f"model config {p}: {exc}") from None
    common = storage.read_common(loc.iter_dir)
    if common and "args" in common:
        return ModelConfig.from_megatron_args(common["args"])
    raise UserError("no model config: pass --model-config or put model_config.json beside the checkpoint")


def _tokens(args, cfg) -> torch.Tensor:
    if args.data == "random":
        return random_tokens(args.nsamples, args.max_seqlen, cfg.vocab_size, args.seed)
    from megatron_prune.scoring.data import DataError, DataSpec, calibration_samples

    try:
        spec = DataSpec(path=args.data, num_samples=args.nsamples, seq_length=args.max_seqlen, seed=args.seed,
                        tokenizer=args.tokenizer, vocab_overflow=args.vocab_overflow)
        return calibration_samples(spec, cfg.vocab_size)
    except (DataError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    import torch.distributed as dist

    from megatron_prune.convert.storage import locate_checkpoint
    from megatron_prune.model_config import ParallelLayout
    from megatron_prune.sparsify import MoEPruner

    loc = locate_checkpoint(args.load)
    cfg = _model_config(args, loc)
    if not cfg.num_moe_experts and not args.include_dense:
        raise UserError("the model has no experts; pass --include-dense to sparsify its dense MLPs")
    try:
        pruner = MoEPruner(
            nsamples=args.nsamples, seed=args.seed, max_seqlen=args.max_seqlen, prune_type=args.prune_type,
            sparsity_ratio=args.sparsity_ratio, n=args.n, m=args.m, gate_weighting=args.gate_weighting,
            calibrate_all_experts=args.calibrate_all_experts, mode=args.mode, include_dense=args.include_dense,
            ungate_fc2=args.ungate_fc2, batch_size=args.micro_batch_size,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tokens = _tokens(args, cfg)
    _init_distributed()
    if not torch.cuda.is_available():
        from megatron_prune.testing.megatron_cpu import apply_cpu_workarounds

        apply_cpu_workarounds()
    from megatron.core import dist_checkpointing

    from megatron_prune.megatron.model import build_model_chunks, initialize_parallel

    try:
        layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if dist.get_world_size() % (args.tp * args.pp):
        raise UserError(f"world size {dist.get_world_size()} is not a multiple of tp*pp={args.tp * args.pp}")
    expert_ranks = layout.ep * layout.expert_tp * args.pp
    if dist.get_world_size() % expert_ranks:
        raise UserError(f"world size {dist.get_world_size()} is not a multiple of ep*etp*pp={expert_ranks}")
    if cfg.num_moe_experts and cfg.num_moe_experts % layout.ep:
        raise UserError(f"{cfg.num_moe_experts} experts cannot be split over ep={layout.ep} ranks")
    dp = dist.get_world_size() // (args.tp * args.pp)
    if args.nsamples % (args.micro_batch_size * dp):
        raise UserError(f"--nsamples {args.nsamples} is not a multiple of --micro-batch-size x DP = "
                        f"{args.micro_batch_size} x {dp}")
    initialize_parallel(layout, seed=args.seed)
    chunks = build_model_chunks(cfg, layout)
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    dist_checkpointing.load(chunks[0].sharded_state_dict(), str(loc.iter_dir))
    result = pruner.run(chunks, tokens)
    if dist.get_rank() == 0:
        result.manifest.update(checkpoint=str(loc.iter_dir), parallel_layout=layout.to_dict(),
                               model_config=cfg.to_dict(), data=args.data)
        path = result.save(args.out)
        for key, entry in result.report.items():
            print(f"{key}: {entry['pruned']}/{entry['total']} pruned ({100 * entry['sparsity']:.2f}%)")
        print(f"wrote {path} ({len(result.masks)} sparsity masks)")
        if args.report:
            Path(args.report).write_text(json.dumps(result.report, indent=2, sort_keys=True))
    dist.barrier()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0
