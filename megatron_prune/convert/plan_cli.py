"""``megatron-prune plan``: activation logs + size targets -> a mask file for ``convert``."""

from __future__ import annotations

from pathlib import Path

from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    from megatron_prune.convert.plan import EXPERT_CRITERIA

    parser.add_argument("--activations-log-dir", "--logs", dest="logs", required=True, metavar="DIR",
                        help="directory written by `megatron-prune score`")
    parser.add_argument("--output", "-o", metavar="M", help="mask file to write (safetensors)")
    parser.add_argument("--model-config", metavar="JSON", help="model config (default: from the logs' manifest)")
    parser.add_argument("--keep-experts", type=int, metavar="N", help="experts kept in every MoE layer")
    parser.add_argument("--drop-experts-ratio", type=float, metavar="R", help="fraction of experts dropped")
    parser.add_argument("--drop-per-group", action="store_true",
                        help="drop the same number in every router group (group-limited routers)")
    parser.add_argument("--expert-criterion", default="reap", choices=EXPERT_CRITERIA)
    parser.add_argument("--ffn-hidden-size", type=int, help="dense FFN channels kept")
    parser.add_argument("--moe-ffn-hidden-size", type=int, help="FFN channels kept inside each expert")
    parser.add_argument("--num-query-groups", type=int, help="KV groups kept (with their query heads)")
    parser.add_argument("--hidden-size", type=int, help="hidden channels kept")
    parser.add_argument("--target-tp", type=int, help="refuse sizes the TP size could not load")
    parser.add_argument("--target-ep", type=int, help="refuse expert counts the EP size could not load")
    parser.add_argument("--target-etp", type=int, help="expert TP size (default: --target-tp)")
    parser.add_argument("--dry-run", action="store_true", help="print what is kept per layer, write nothing")


def _config(args):
    from megatron_prune.logs import load_activations_manifest
    from megatron_prune.model_config import ModelConfig

    try:
        if args.model_config:
            return ModelConfig.load(args.model_config)
        data = load_activations_manifest(args.logs)[0].get("model_config") or {}
        if not data:
            raise UserError(f"the logs in {args.logs} record no model config; pass --model-config")
        return ModelConfig.from_dict(data)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from None


def run(args) -> int:
    from megatron_prune.convert.plan import PlanTargets, describe_masks, plan_masks
    from megatron_prune.convert.planner import resolve_keep
    from megatron_prune.logs import load_activations_logs
    from megatron_prune.masks import save_masks

    if not args.dry_run and not args.output:
        raise UserError("give --output M (or --dry-run)")
    cfg = _config(args)
    try:
        logs = load_activations_logs(args.logs)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    targets = PlanTargets(
        keep_experts=args.keep_experts, drop_experts_ratio=args.drop_experts_ratio,
        drop_per_group=args.drop_per_group, expert_criterion=args.expert_criterion,
        ffn_hidden_size=args.ffn_hidden_size, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        num_query_groups=args.num_query_groups, hidden_size=args.hidden_size,
        target_tp=args.target_tp, target_ep=args.target_ep, target_etp=args.target_etp)
    masks = plan_masks(logs, cfg, targets)
    keep = resolve_keep(cfg, masks, args.target_tp, args.target_ep, args.target_etp)  # converter's checks
    for line in describe_masks(masks, cfg):
        print(line)
    if args.dry_run:
        print("dry run: no mask file written")
        return 0
    manifest = {"source": "megatron-prune plan", "activation_logs": str(Path(args.logs).absolute()),
                "targets": targets.to_dict(), "model_config": cfg.to_dict(),
                "new_model_config": keep.new_config.to_dict()}
    save_masks(args.output, masks, manifest)
    print(f"wrote {args.output} ({len(masks)} masks)")
    return 0
