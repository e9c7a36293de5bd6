"""Scoring: attach importance hooks to a Megatron model by spec, run calibration, write logs.

* :mod:`~megatron_prune.scoring.registry`: hook kinds by stable string name, defaults per target;
* :mod:`~megatron_prune.scoring.spec`: :class:`ScoringSpec` (frozen, JSON, fingerprint);
* :mod:`~megatron_prune.scoring.session`: :class:`ScoringSession` (handles, pause, resume, logs);
* :mod:`~megatron_prune.scoring.data`: calibration samples (indexed datasets, text, JSONL);
* :mod:`~megatron_prune.scoring.runner`: the forward-only calibration loop;
* :mod:`~megatron_prune.scoring.cli`: ``megatron-prune score``.

Importing this package does not import Megatron.
"""

from megatron_prune.scoring.registry import HookKind, default_kinds, get_hook_kind, hook_kinds, register_hook_kind
from megatron_prune.scoring.session import ScoringSession, ScoringStateError, UnsupportedModuleError
from megatron_prune.scoring.spec import HookChoice, ScoringSpec

__all__ = [
    "HookKind",
    "HookChoice",
    "ScoringSpec",
    "ScoringSession",
    "ScoringStateError",
    "UnsupportedModuleError",
    "default_kinds",
    "get_hook_kind",
    "hook_kinds",
    "register_hook_kind",
]
