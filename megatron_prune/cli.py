"""``megatron-prune``: a thin command line over the library.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs. A
:class:`~megatron_prune.errors.UserError` (or ``FileNotFoundError``/``ValueError`` raised while
validating input) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from megatron_prune.errors import UserError

__all__ = ["main", "COMMANDS"]

#: command name -> (module, one-line help)
COMMANDS = {
    "demo": ("megatron_prune.demo", "train, score, prune and evaluate a tiny MoE GPT on CPU (no downloads)"),
    "plan": ("megatron_prune.convert.plan_cli", "turn activation logs and targets into a mask file"),
    "convert": ("megatron_prune.convert.cli", "apply a mask file to a torch_dist checkpoint"),
    "score": ("megatron_prune.scoring.cli", "score a checkpoint (run under torchrun)"),
    "sparsify": ("megatron_prune.sparsify_cli", "Wanda/MoE-Pruner sparsity inside experts"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        if name == chosen:
            try:
                importlib.import_module(module).add_arguments(sp)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
                print(f"megatron-prune: error: command {name!r} is not available", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except UserError as exc:
        print(f"megatron-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megatron-prune {args.command}: interrupted", file=sys.stderr)
        return 130
