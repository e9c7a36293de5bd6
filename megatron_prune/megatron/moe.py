"""Megatron-Core MoE expert importance: the routing probe and the hooks it feeds.

The implementation lives in :mod:`megatron_prune.megatron.moe_probe` (one probe per
``MoELayer``: routing reproduction, native re-routing, expert outputs exact under TP/SP/EP/
expert-TP/DP) and :mod:`megatron_prune.megatron.moe_hooks` (the hook contract on top of it).
This module re-exports both.
"""

from megatron_prune.megatron.moe_hooks import (
    ALL_CRITERIA,
    MegatronExpertStatsHook,
    MegatronMoEImportanceHook,
    MegatronRankedChoiceVotingHook,
    MegatronRemoveExpertsIndependentHook,
    criterion_fields,
)
from megatron_prune.megatron.moe_probe import MoEProbe, is_moe_layer, moe_module_name

__all__ = [
    "ALL_CRITERIA",
    "MegatronExpertStatsHook",
    "MegatronMoEImportanceHook",
    "MegatronRankedChoiceVotingHook",
    "MegatronRemoveExpertsIndependentHook",
    "MoEProbe",
    "criterion_fields",
    "is_moe_layer",
    "moe_module_name",
]
