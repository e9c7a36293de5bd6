"""The forward-hook contract shared by every importance hook.

Lifecycle:
    1. construct ``hook = SomeHook(module, activation_hooks_kwargs)`` and register it with
       ``handle = module.register_forward_hook(hook)`` (a scoring session owns the handles);
    2. every forward of ``module`` calls ``hook(module, args, output)``, which picks the tensor
       and calls a pure function of :mod:`megatron_prune.math` to update float32/float64
       accumulators on the data's device (no host synchronisation, no collective for additive
       statistics);
    3. ``state_dict()`` / ``load_state_dict()`` at any time to checkpoint and resume;
    4. ``to_dict()`` (collective for Megatron hooks: every rank of the hook's groups calls it)
       returns the final global statistics; :meth:`ForwardHook.dump_activations_logs` writes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from megatron_prune.logs import atomic_write_bytes, atomic_write_json, write_stage_logs

__all__ = ["ForwardHook", "hook_input", "hook_output", "check_finite", "NonFiniteActivationError"]


class NonFiniteActivationError(FloatingPointError):
    pass


def hook_input(args: tuple) -> torch.Tensor:
    """The tensor a hook reads from a forward's positional ``args`` (``args[0]``)."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("the hooked module's first positional argument must be a tensor")
    return args[0]


def hook_output(output: Any) -> torch.Tensor:
    """A module's output tensor; Megatron linears return ``(out, bias)``."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"hooked module returned {type(output).__name__}, expected a tensor")
    return output


def check_finite(stat: torch.Tensor, where: str) -> torch.Tensor:
    """Raise :class:`NonFiniteActivationError` naming ``where`` if ``stat`` holds NaN/inf.

    Called on accumulated statistics at read time (``to_dict``/``accumulate``), never per
    forward: checking inside a hook would synchronise with the device.
    """
    if not bool(torch.isfinite(stat).all()):
        raise NonFiniteActivationError(
            f"non-finite activation statistics in module {where!r}: the activations seen by this "
            f"hook contained NaN or inf"
        )
    return stat


def _get(args: Any, name: str, default=None):
    if args is None:
        return default
    if isinstance(args, Mapping):
        return args.get(name, default)
    return getattr(args, name, default)


class ForwardHook(ABC):
    """Base class of importance hooks; ``module.register_forward_hook(hook)``.

    Subclasses implement ``__call__(module, args, output)``, :meth:`accumulate`,
    :meth:`to_dict`, :meth:`state_dict` and :meth:`load_state_dict`.
    """

    #: set by whoever registers the hook; used in error messages and logs
    module_name: str = "<unnamed>"

    @abstractmethod
    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None: ...

    @abstractmethod
    def accumulate(self) -> torch.Tensor:
        """The main importance score, one entry per channel/group/expert."""

    @abstractmethod
    def to_dict(self) -> dict[str, torch.Tensor]:
        """Result tensors to save (always holds ``"score"``)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Internal state for checkpointing (tensors, ints, lists)."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` output; refuses state that does not fit this hook."""

    def get_progress_info(self) -> dict:
        return {}

    # ------------------------------------------------------------------ logs
    @classmethod
    def dump_activations_logs(
        cls,
        activation_hooks: dict[str, "ForwardHook"],
        activations_log_dir: Union[str, Path],
        args: Any = None,
    ) -> Optional[Path]:
        """Write every hook's :meth:`to_dict` as activation logs (see :mod:`megatron_prune.logs`).

        Collective: every rank calls it (``to_dict`` of parallel hooks gathers statistics);
        only the writer rank of each pipeline stage writes. ``args`` (mapping or namespace) may
        give ``pp_rank``, ``pp_size``, ``is_writer``, ``model_config``, ``parallel_layout`` and
        ``tokens_seen``; by default the writer is global rank 0 (or the only process).
        """
        results = {name: hook.to_dict() for name, hook in activation_hooks.items()}
        is_writer = _get(args, "is_writer")
        if is_writer is None:
            is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        path = None
        if is_writer:
            tokens = _get(args, "tokens_seen")
            if tokens is None:
                counts = [h.get_progress_info().get("tokens_seen") for h in activation_hooks.values()]
                counts = [c for c in counts if c is not None]
                tokens = max(counts) if counts else None
            path = write_stage_logs(
                activations_log_dir,
                results,
                {name: type(h).__name__ for name, h in activation_hooks.items()},
                pp_rank=int(_get(args, "pp_rank", 0)),
                pp_size=int(_get(args, "pp_size", 1)),
                model_config=_get(args, "model_config"),
                parallel_layout=_get(args, "parallel_layout"),
                tokens_seen=tokens,
            )
        seen = []
        for h in activation_hooks.values():
            for klass in type(h).__mro__:
                if "after_dump" in vars(klass) and klass not in seen:
                    seen.append(klass)
        for klass in seen:
            klass.after_dump(activation_hooks, activations_log_dir, args, bool(is_writer))
        return path

    @classmethod
    def after_dump(cls, activation_hooks: dict, activations_log_dir, args, is_writer: bool) -> None:
        """Extra files a hook family writes beside the logs (called on every rank, once per
        family, after the logs are written; ``is_writer`` says whether this rank writes)."""

    @classmethod
    def save_hook_states(
        cls, activation_hooks: dict[str, "ForwardHook"], activations_log_dir: Union[str, Path]
    ) -> Path:
        """Save every hook's :meth:`state_dict` to ``hook_states/rank<r>.pth`` (atomic).

        Each rank writes its own file. Synchronisation between ranks is the caller's business.
        """
        import io

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out_dir = Path(activations_log_dir) / "hook_states"
        out_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({name: h.state_dict() for name, h in activation_hooks.items()}, buf)
        path = out_dir / f"rank{rank:05d}.pth"
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_json(
            out_dir / f"rank{rank:05d}.progress.json",
            {name: h.get_progress_info() for name, h in activation_hooks.items()},
        )
        return path

    @classmethod
    def load_hook_states(
        cls, activation_hooks: dict[str, "ForwardHook"], activations_log_dir: Union[str, Path]
    ) -> None:
        """Counterpart of :meth:`save_hook_states` for this rank; every hook must be present."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = Path(activations_log_dir) / "hook_states" / f"rank{rank:05d}.pth"
        if not path.exists():
            raise FileNotFoundError(f"no saved hook states at {path}")
        states = torch.load(path, map_location="cpu", weights_only=False)
        missing = sorted(set(activation_hooks) - set(states))
        if missing:
            raise KeyError(f"{path} has no state for hooks: {', '.join(missing)}")
        for name, hook in activation_hooks.items():
            hook.load_state_dict(states[name])

