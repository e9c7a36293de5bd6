"""Importance hooks for plain torch modules and the shared hook contract."""

from megatron_prune.hooks.base import ForwardHook, NonFiniteActivationError
from megatron_prune.hooks.channel import (
    IndependentChannelContributionHook,
    IndependentKvHeadContributionHook,
    IterativeChannelContributionHook,
    L2NormHook,
    LayerNormContributionHook,
    NoActivationsError,
)
from megatron_prune.logs import load_activations_logs

__all__ = [
    "ForwardHook",
    "NonFiniteActivationError",
    "NoActivationsError",
    "L2NormHook",
    "IndependentChannelContributionHook",
    "IterativeChannelContributionHook",
    "IndependentKvHeadContributionHook",
    "LayerNormContributionHook",
    "load_activations_logs",
]
