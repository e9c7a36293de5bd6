"""Hook kinds by stable string name: which hook class goes on which Megatron modules.

A :class:`HookKind` names a hook class by import path (imported lazily, so kinds of optional
families, e.g. the MoE hooks, can be listed before their module is importable) and says where
it attaches: module-name templates over *global* names (``decoder.layers.{layer}.mlp.linear_fc2``,
``{expert}`` = global expert id) and the module classes it accepts (names looked up in the
module's MRO). A module that matches a template but has a class the kind neither accepts nor
lists in ``skip_types`` is *unsupported*: the session raises, or skips it explicitly when the
spec says ``on_unsupported="skip"`` (and reports it). Nothing is ignored silently.

Pure Python: importing this module does not import Megatron.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

__all__ = [
    "TARGETS",
    "HookKind",
    "UnknownHookKindError",
    "register_hook_kind",
    "get_hook_kind",
    "hook_kinds",
    "default_kinds",
]

#: pruning targets and what their scores decide
TARGETS = {
    "experts": "which experts of each MoE layer to keep",
    "ffn": "FFN channels of dense MLPs and of experts",
    "kv_groups": "attention query groups (KV heads with their query heads)",
    "hidden": "hidden (residual stream) channels",
}


class UnknownHookKindError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "unknown hook kind"


def _template_regex(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(layer|expert)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(rf"(?P<{m.group(1)}>\d+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


@dataclass(frozen=True)
class HookKind:
    """One attachable hook kind.

    ``hook_class``: ``"package.module:ClassName"``, constructed as ``Cls(module, kwargs)``.
    ``patterns``: global module-name templates (``{layer}``, ``{expert}`` placeholders).
    ``log_names``: per pattern, a template of the module name used in the activation logs
    (``None`` or absent: the module's own global name).
    ``module_types``: accepted class names (empty: any class). ``skip_types``: class names for
    which the kind does not apply by design (e.g. ``IdentityOp`` where a norm is fused into the
    next linear layer); such modules are skipped and reported.
    ``attach``: ``"forward"`` (``module.register_forward_hook(hook)``) or ``"method"`` (the hook's
    ``register(module) -> list of handles`` attaches itself, for hooks needing several taps).
    """

    name: str
    target: str
    hook_class: str
    patterns: tuple[str, ...]
    module_types: tuple[str, ...] = ()
    skip_types: tuple[str, ...] = ()
    log_names: tuple[Optional[str], ...] = ()
    default_kwargs: Mapping = field(default_factory=dict)
    attach: str = "forward"
    description: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"hook kind name {self.name!r} must be lower_snake_case")
        if self.target not in TARGETS:
            raise ValueError(f"hook kind {self.name}: unknown target {self.target!r}; one of {sorted(TARGETS)}")
        if ":" not in self.hook_class:
            raise ValueError(f"hook kind {self.name}: hook_class must be 'module.path:ClassName'")
        if self.attach not in ("forward", "method"):
            raise ValueError(f"hook kind {self.name}: attach must be 'forward' or 'method'")
        object.__setattr__(self, "patterns", tuple(self.patterns))
        object.__setattr__(self, "module_types", tuple(self.module_types))
        object.__setattr__(self, "skip_types", tuple(self.skip_types))
        object.__setattr__(self, "log_names", tuple(self.log_names))
        if len(self.log_names) > len(self.patterns):
            raise ValueError(f"hook kind {self.name}: more log_names than patterns")
        object.__setattr__(self, "_regexes", tuple(_template_regex(p) for p in self.patterns))

    def match(self, name: str) -> Optional[str]:
        """The log module name if global module ``name`` matches one of the templates, else None."""
        for i, rx in enumerate(self._regexes):  # type: ignore[attr-defined]
            m = rx.match(name)
            if m:
                template = self.log_names[i] if i < len(self.log_names) else None
                return template.format(**m.groupdict()) if template else name
        return None

    def classify(self, module) -> str:
        """``"accept"``, ``"skip"`` (not applicable by design) or ``"unsupported"``."""
        names = {k.__name__ for k in type(module).__mro__}
        if self.skip_types and names & set(self.skip_types):
            return "skip"
        if not self.module_types or names & set(self.module_types):
            return "accept"
        return "unsupported"

    def load_class(self):
        """Import the hook class; a missing optional family raises ``ImportError`` naming the kind."""
        mod_name, _, cls_name = self.hook_class.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ImportError(
                f"hook kind {self.name!r} needs {mod_name}, which cannot be imported: {exc}"
            ) from exc
        try:
            return getattr(mod, cls_name)
        except AttributeError:
            raise ImportError(f"hook kind {self.name!r}: {mod_name} has no class {cls_name}") from None

    def available(self) -> bool:
        try:
            self.load_class()
            return True
        except ImportError:
            return False


_REGISTRY: dict[str, HookKind] = {}
_DEFAULTS: dict[str, tuple[str, ...]] = {}


def register_hook_kind(kind: HookKind, *, replace: bool = False) -> HookKind:
    """Add ``kind`` to the registry (an existing name needs ``replace=True``)."""
    if kind.name in _REGISTRY and not replace:
        raise ValueError(f"hook kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def get_hook_kind(name: str) -> HookKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownHookKindError(
            f"unknown hook kind {name!r}; registered kinds: {', '.join(sorted(_REGISTRY))}"
        ) from None


def hook_kinds() -> dict[str, HookKind]:
    return dict(_REGISTRY)


def default_kinds(target: str) -> tuple[str, ...]:
    """The hook kinds a pruning target uses when a spec names only the target."""
    if target not in TARGETS:
        raise ValueError(f"unknown pruning target {target!r}; one of {', '.join(TARGETS)}")
    return _DEFAULTS[target]


# ----------------------------------------------------------------------------- built-in kinds
_DENSE = "megatron_prune.megatron.hooks"
_MOE = "megatron_prune.megatron.moe_hooks"
_ROW = ("RowParallelLinear", "TERowParallelLinear")
_NORMS = (
    "RMSNorm", "LayerNorm", "WrappedTorchNorm", "FusedLayerNorm", "MixedFusedLayerNorm",
    "FusedRMSNorm", "MixedFusedRMSNorm",
)
_FUSED_NORM_LINEAR = ("TELayerNormColumnParallelLinear",)
_LAYER = "decoder.layers.{layer}."
_EXPERT_FC2 = _LAYER + "mlp.experts.local_experts.{expert}.linear_fc2"
_GROUPED_FC2 = _LAYER + "mlp.experts.linear_fc2"

_BUILTIN = [
    # ffn
    HookKind("ffn_independent", "ffn", f"{_DENSE}:MegatronIndependentChannelContributionHook",
             (_LAYER + "mlp.linear_fc2",), _ROW,
             description="dense FFN channels: |x| mean times weight column norm at linear_fc2"),
    HookKind("ffn_l2norm", "ffn", f"{_DENSE}:MegatronL2NormHook", (_LAYER + "mlp.linear_fc2",), _ROW,
             description="dense FFN channels: L2 norm of per-sample mean |x| at linear_fc2"),
    HookKind("ffn_iterative", "ffn", f"{_DENSE}:MegatronIterativeChannelContributionHook",
             (_LAYER + "mlp.linear_fc2",), _ROW,
             description="dense FFN channels: iterative removal (kwargs: validation_full_iters)"),
    HookKind("expert_ffn_independent", "ffn", f"{_DENSE}:MegatronIndependentChannelContributionHook",
             (_EXPERT_FC2, _GROUPED_FC2), _ROW,
             description="FFN channels inside each expert (SequentialMLP experts; grouped GEMM unsupported)"),
    HookKind("expert_ffn_l2norm", "ffn", f"{_DENSE}:MegatronL2NormHook", (_EXPERT_FC2, _GROUPED_FC2), _ROW,
             description="FFN channels inside each expert, L2 norm of activations"),
    # kv groups
    HookKind("kv_heads", "kv_groups", f"{_DENSE}:MegatronIndependentKvHeadContributionHook",
             (_LAYER + "self_attention.linear_proj",), _ROW,
             description="per query group: mean norm of its heads' contribution through linear_proj"),
    HookKind("attn_proj_independent", "kv_groups",
             f"{_DENSE}:MegatronIndependentChannelContributionHook",
             (_LAYER + "self_attention.linear_proj",), _ROW,
             description="per attention channel (heads x head dim) at linear_proj"),
    # hidden
    HookKind("hidden_layernorm", "hidden", f"{_DENSE}:MegatronLayerNormContributionHook",
             (_LAYER + "input_layernorm", _LAYER + "pre_mlp_layernorm", "decoder.final_layernorm"),
             _NORMS, skip_types=("IdentityOp",),
             description="hidden channels: mean |norm output| (IdentityOp norms: see hidden_fused_norm)"),
    HookKind("hidden_fused_norm", "hidden", f"{_DENSE}:MegatronLayerNormContributionHook",
             (_LAYER + "self_attention.linear_qkv", _LAYER + "mlp.linear_fc1"), _FUSED_NORM_LINEAR,
             skip_types=("ColumnParallelLinear", "TEColumnParallelLinear"),
             log_names=(_LAYER + "input_layernorm", _LAYER + "pre_mlp_layernorm"),
             description="hidden channels from the norm fused into TELayerNormColumnParallelLinear"),
    # experts (issue 4 hooks; optional until that module exists)
    HookKind("moe_expert_stats", "experts", f"{_MOE}:MegatronExpertStatsHook", (_LAYER + "mlp",),
             ("MoELayer",), skip_types=("MLP",),
             description="REAP, frequency, soft count and EAN per expert, on the MoELayer"),
    HookKind("moe_removal", "experts", f"{_MOE}:MegatronRemoveExpertsIndependentHook", (_LAYER + "mlp",),
             ("MoELayer",), skip_types=("MLP",),
             description="output change when each expert is removed (native re-routing)"),
    HookKind("moe_ranked_choice", "experts", f"{_MOE}:MegatronRankedChoiceVotingHook",
             (_LAYER + "mlp.router",), ("TopKRouter", "Router"), log_names=(_LAYER + "mlp",),
             description="instant-runoff ranked-choice voting over router preferences"),
]
for _k in _BUILTIN:
    register_hook_kind(_k)

_DEFAULTS.update(
    experts=("moe_expert_stats", "moe_removal", "moe_ranked_choice"),
    ffn=("ffn_independent", "expert_ffn_independent"),
    kv_groups=("kv_heads",),
    hidden=("hidden_layernorm", "hidden_fused_norm"),
)
