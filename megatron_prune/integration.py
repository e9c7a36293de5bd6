"""Scoring from inside a Megatron training script.

With Megatron-LM::

    from megatron_prune.integration import add_prune_args, session_from_args

    pretrain(..., extra_args_provider=add_prune_args)
    # later, with model = the list of model chunks and args = get_args():
    if scoring_enabled(args):
        with session_from_args(args, model) as session:
            for batch in calibration_batches:      # forward-only, every rank
                forward_only(model, batch)
                session.step(tokens=...)
            session.finalize(args.prune_score_out)

Flags (all optional; scoring is off unless ``--prune-score-out`` is given): ``--prune-score-out``,
``--prune-score-targets``, ``--prune-score-hooks``, ``--prune-score-exclude``,
``--prune-score-spec``, ``--prune-score-on-unsupported``, ``--prune-score-state-dir``,
``--prune-score-resume``. No Megatron import at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

__all__ = ["add_prune_args", "scoring_enabled", "spec_from_args", "session_from_args", "state_dir_from_args"]


def add_prune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--prune-score-*`` flags (Megatron-LM ``extra_args_provider``); returns ``parser``."""
    g = parser.add_argument_group("megatron_prune scoring")
    g.add_argument("--prune-score-out", default=None, metavar="DIR",
                   help="write activation logs here (enables scoring)")
    g.add_argument("--prune-score-targets", default="auto",
                   help="comma list of experts,ffn,kv_groups,hidden; 'auto' (all; experts if MoE); 'none'")
    g.add_argument("--prune-score-hooks", action="append", default=[], metavar="KIND[:JSON]",
                   help="extra hook kind by registry name (repeatable)")
    g.add_argument("--prune-score-exclude", default="", help="comma list of default hook kinds to drop")
    g.add_argument("--prune-score-spec", default=None, metavar="JSON", help="scoring spec file (overrides the above)")
    g.add_argument("--prune-score-on-unsupported", choices=("error", "skip"), default="error")
    g.add_argument("--prune-score-state-dir", default=None, metavar="DIR",
                   help="resumable scoring state (default: OUT/state)")
    g.add_argument("--prune-score-resume", action="store_true", help="load the saved scoring state first")
    return parser


def scoring_enabled(args: Any) -> bool:
    return bool(getattr(args, "prune_score_out", None))


def spec_from_args(args: Any, moe: Optional[bool] = None):
    """The :class:`~megatron_prune.scoring.spec.ScoringSpec` of ``args``. ``moe`` (for ``auto``
    targets) defaults to ``args.num_experts`` being set."""
    from megatron_prune.scoring.spec import ScoringSpec

    if getattr(args, "prune_score_spec", None):
        return ScoringSpec.load(args.prune_score_spec)
    if moe is None:
        moe = bool(getattr(args, "num_experts", None))
    return ScoringSpec.from_cli(
        getattr(args, "prune_score_targets", "auto"),
        getattr(args, "prune_score_hooks", []) or [],
        getattr(args, "prune_score_exclude", ""),
        getattr(args, "prune_score_on_unsupported", "error"),
        moe=moe,
    )


def state_dir_from_args(args: Any) -> Optional[Path]:
    if getattr(args, "prune_score_state_dir", None):
        return Path(args.prune_score_state_dir)
    out = getattr(args, "prune_score_out", None)
    return Path(out) / "state" if out else None


class _ResumingSession:
    """Context manager: enters the session, then loads saved state when asked to resume."""

    def __init__(self, session, state_dir: Optional[Path], resume: bool):
        self.session, self.state_dir, self.resume = session, state_dir, resume

    def __enter__(self):
        s = self.session.__enter__()
        try:
            if self.resume and self.state_dir is not None and s.read_progress(self.state_dir) is not None:
                s.load_state(self.state_dir)
        except BaseException:
            self.session.__exit__(None, None, None)
            raise
        return s

    def __exit__(self, *exc):
        return self.session.__exit__(*exc)


def session_from_args(args: Any, model, process_groups=None, *, model_config=None, run_info: Optional[dict] = None):
    """A scoring session (context manager) over ``model`` (list of chunks) configured by ``args``.

    Collective on entry (every rank). With ``--prune-score-resume`` the saved state of
    :func:`state_dir_from_args` is loaded on entry when present.
    """
    from megatron_prune.scoring.session import ScoringSession

    if model_config is None and hasattr(args, "num_layers") and hasattr(args, "hidden_size"):
        try:
            from megatron_prune.model_config import ModelConfig

            model_config = ModelConfig.from_megatron_args(args)
        except (TypeError, ValueError):
            model_config = None
    session = ScoringSession(model, spec_from_args(args), process_groups, model_config=model_config,
                             run_info=run_info)
    return _ResumingSession(session, state_dir_from_args(args), bool(getattr(args, "prune_score_resume", False)))
