"""A scoring session: hooks attached to a Megatron model for the duration of a ``with`` block.

Lifecycle::

    with ScoringSession(model_chunks, spec, groups) as session:   # attaches, owns handles
        session.load_state(state_dir)        # optional resume (any layout)
        for batch in batches:                # every rank, same number of global batches
            forward_only(model_chunks, batch)
            session.step(tokens=global_tokens_in_batch)
            with session.pause():            # forwards here are not recorded
                ...
            session.save_state(state_dir)    # optional, collective
        session.finalize(out_dir)            # activation logs, collective
    # handles removed here, also on error

Module names use global layer numbers (Megatron's ``TransformerLayer.layer_number``) and global
expert ids (``MoELayer.local_expert_indices``): ``decoder.layers.5.mlp.experts.local_experts.7.linear_fc2``.

Saved state is global and layout-independent: every hook's (collective) ``state_dict()``; the
writer rank of each pipeline stage writes its stage's states (experts gathered over EP) into a
step directory, then global rank 0 commits it by atomically replacing ``progress.json``. Loading
reads every stage file, so TP, EP, DP and PP may differ between saving and loading runs.

Collective methods (every rank of the default group, in the same order): ``__enter__``,
``save_state``, ``load_state``, ``finalize``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_prune.distributed.reductions import ProcessGroups, group_rank, group_size
from megatron_prune.hooks.base import ForwardHook
from megatron_prune.logs import atomic_write_bytes, atomic_write_json
from megatron_prune.scoring.registry import HookKind, default_kinds, get_hook_kind
from megatron_prune.scoring.spec import ScoringSpec
from megatron_prune.scoring.state import (
    STATE_FORMAT,
    STATE_FORMAT_VERSION,
    ScoringStateError,
    _barrier,
    _cpu,
    _device,
    _gather_objects,
    _world,
    _unwrap,
    model_config_from_model,
    model_fingerprint,
    read_progress,
)

__all__ = [
    "ScoringSession",
    "ScoringStateError",
    "UnsupportedModuleError",
    "model_fingerprint",
    "model_config_from_model",
    "STATE_FORMAT",
]

_EXPERT_RE = re.compile(r"^(.*)\.experts\.local_experts\.(\d+)(\..*)?$")


class UnsupportedModuleError(TypeError):
    """A hook kind matched a module whose class it cannot handle."""


@dataclass
class _Entry:
    key: str  # "<log name>::<kind>" (unique)
    log_name: str
    kind: HookKind
    module_name: str
    hook: ForwardHook
    ep_local: bool  # lives on one expert-parallel rank only
    closed: bool = False


def _global_names(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """Global layer numbers (``megatron.naming``) and global expert ids."""
    from megatron_prune.megatron.naming import global_module_names

    pairs = list(global_module_names(chunk))
    expert_ids = {n: list(m.local_expert_indices) for n, m in pairs if hasattr(m, "local_expert_indices")}
    for name, module in pairs:
        m = _EXPERT_RE.match(name)
        if m and m.group(1) in expert_ids:
            ids = expert_ids[m.group(1)]
            name = f"{m.group(1)}.experts.local_experts.{ids[int(m.group(2))]}{m.group(3) or ''}"
        yield name, module


class _Gate:
    """The callable registered on a module: forwards to the hook unless the session is paused."""

    def __init__(self, session: "ScoringSession", hook: ForwardHook):
        self.session, self.hook = session, hook

    def __call__(self, module, args, output):
        if not self.session._paused:
            self.hook(module, args, output)


class _FrozenResult(ForwardHook):
    """Precomputed ``to_dict`` results standing in for a hook when logs are written."""

    def __init__(self, result: dict, progress: dict):
        self._result, self._progress = result, progress

    def __call__(self, module, args, output):  # pragma: no cover - never registered
        raise RuntimeError("a frozen result is not a hook")

    def accumulate(self):
        return self._result["score"]

    def to_dict(self):
        return self._result

    def state_dict(self):  # pragma: no cover
        raise RuntimeError("a frozen result has no state")

    def load_state_dict(self, state_dict):  # pragma: no cover
        raise RuntimeError("a frozen result has no state")

    def get_progress_info(self):
        return self._progress


_FROZEN_CLASSES: dict[str, type] = {}


def _frozen(class_name: str, result: dict, progress: dict) -> ForwardHook:
    cls = _FROZEN_CLASSES.setdefault(class_name, type(class_name, (_FrozenResult,), {}))
    return cls(result, progress)


class ScoringSession:
    """Attach the hooks of ``spec`` to ``model`` (a list of model chunks, or one module).

    ``process_groups``: explicit groups (default: read once from Megatron's ``parallel_state``).
    ``model_config``: a :class:`~megatron_prune.model_config.ModelConfig` written into the log
    manifests. ``run_info``: JSON facts that must be equal when state is loaded (data, seed,...).
    """

    def __init__(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        spec: ScoringSpec,
        process_groups: Optional[ProcessGroups] = None,
        *,
        model_config: Any = None,
        run_info: Optional[dict] = None,
    ):
        self.chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
        if not self.chunks:
            raise ValueError("the model has no chunks")
        if not isinstance(spec, ScoringSpec):
            raise TypeError(f"spec must be a ScoringSpec, got {type(spec).__name__}")
        self.spec = spec
        self._tconfig = getattr(_unwrap(self.chunks[0]), "config", None)
        if process_groups is None:
            from megatron_prune.megatron.groups import process_groups as _pg

            process_groups = _pg(bool(getattr(self._tconfig, "sequence_parallel", False)))
        self.groups = process_groups
        self.model_config = model_config if model_config is not None else model_config_from_model(self.chunks[0])
        self.run_info = json.loads(json.dumps(run_info or {}, sort_keys=True))
        self.steps = 0
        self.tokens = 0
        self.entries: list[_Entry] = []
        self.skipped: list[dict] = []  # {"kind", "module", "class", "reason"}
        self.unused_kinds: list[str] = []
        self._handles: list = []
        self._paused = False
        self._attached = False

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ScoringSession":
        try:
            self.attach()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def hooks(self) -> dict[str, ForwardHook]:
        """``{key: hook}`` with key ``"<log module name>::<kind>"``."""
        return {e.key: e.hook for e in self.entries}

    def attach(self) -> None:
        """Construct and register every hook. Collective over the default group (it checks that
        each requested kind matched some module on some rank)."""
        if self._attached:
            raise RuntimeError("the session is already attached")
        self._attached = True
        choices = self.spec.resolved()
        counts = torch.zeros(2, len(choices), dtype=torch.int64)  # [matched names, attached hooks]
        for chunk in self.chunks:
            for name, module in _global_names(_unwrap(chunk)):
                for ci, choice in enumerate(choices):
                    kind = get_hook_kind(choice.kind)
                    log_name = kind.match(name)
                    if log_name is None:
                        continue
                    counts[0, ci] += 1
                    counts[1, ci] += int(self._attach_one(kind, choice.kwargs, name, log_name, module))
        total = counts.to(_device())
        if _world()[1] > 1:
            dist.all_reduce(total)
        total = total.cpu()
        explicit = {h.kind for h in self.spec.hooks}
        by_target: dict[str, int] = {}
        for ci, choice in enumerate(choices):
            kind = get_hook_kind(choice.kind)
            by_target[kind.target] = by_target.get(kind.target, 0) + int(total[1, ci])
            if int(total[0, ci]) == 0 and choice.kind in explicit:
                raise UnsupportedModuleError(f"hook kind {choice.kind!r} matched no module of this model")
            if int(total[1, ci]) == 0:
                self.unused_kinds.append(choice.kind)
        for t in self.spec.targets:
            if by_target.get(t, 0) == 0:
                raise UnsupportedModuleError(
                    f"pruning target {t!r} matched no module of this model (kinds {', '.join(default_kinds(t))})"
                )
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise RuntimeError("two hooks of one kind on one log module name")
        self.entries.sort(key=lambda e: (e.ep_local, e.key))

    def _attach_one(self, kind: HookKind, kwargs: dict, name: str, log_name: str, module) -> bool:
        verdict = kind.classify(module)
        record = {"kind": kind.name, "module": name, "class": type(module).__name__}
        if verdict == "skip":
            self.skipped.append(dict(record, reason="not applicable"))
            return False
        if verdict == "unsupported":
            if self.spec.on_unsupported == "skip":
                self.skipped.append(dict(record, reason="unsupported"))
                return False
            raise UnsupportedModuleError(
                f"hook kind {kind.name!r} matches module {name} of class {type(module).__name__}, "
                f"which it cannot handle (it accepts {', '.join(kind.module_types)}); exclude the kind "
                f"or use on_unsupported='skip'"
            )
        cls = kind.load_class()
        hook = cls(module, dict(kind.default_kwargs, **kwargs, process_groups=self.groups))
        hook.module_name = log_name
        if kind.attach == "method":
            self._handles.extend(hook.register(module))
        else:
            self._handles.append(module.register_forward_hook(_Gate(self, hook)))
        ep_local = ".local_experts." in log_name or kind.patterns[0].endswith("mlp.experts.linear_fc2")
        self.entries.append(_Entry(f"{log_name}::{kind.name}", log_name, kind, name, hook, ep_local))
        return True

    def close(self) -> None:
        """Remove every handle and call ``close()`` of hooks that have one (they may own taps of
        their own, e.g. the MoE probe). Idempotent; statistics stay readable."""
        while self._handles:
            self._handles.pop().remove()
        for e in self.entries:
            closer = getattr(e.hook, "close", None)
            if callable(closer) and not e.closed:
                e.closed = True
                closer()

    @contextlib.contextmanager
    def pause(self):
        """Forwards inside this block are not recorded (hooks of ``attach="method"`` kinds must
        honour ``hook.paused`` themselves)."""
        prev = self._paused
        self._paused = True
        for e in self.entries:
            if e.kind.attach == "method":
                e.hook.paused = True
        try:
            yield self
        finally:
            self._paused = prev
            for e in self.entries:
                if e.kind.attach == "method":
                    e.hook.paused = prev

    def step(self, tokens: Optional[int] = None) -> int:
        """Mark the end of one global batch (``tokens``: tokens in it, all ranks together)."""
        self.steps += 1
        if tokens is not None:
            self.tokens += int(tokens)
        return self.steps

    # ------------------------------------------------------------------------------ layout facts
    @property
    def pp_rank(self) -> int:
        return group_rank(self.groups.pp)

    @property
    def pp_size(self) -> int:
        return group_size(self.groups.pp)

    @property
    def is_writer(self) -> bool:
        """One rank per pipeline stage: rank 0 of its TP, DP, EP and expert-TP groups."""
        return all(group_rank(g) == 0 for g in (self.groups.tp, self.groups.dp, self.groups.ep, self.groups.etp))

    def fingerprints(self) -> dict:
        return {"spec": self.spec.fingerprint(), "model": model_fingerprint(self._tconfig)}

    # ------------------------------------------------------------------------------ results
    def _ep_local(self, what: str) -> dict[str, Any]:
        """``{key: hook.<what>()}`` of the expert-local hooks of every EP rank (on CPU).
        Collective over the EP group (and the hooks' own groups)."""
        local = {e.key: _cpu(getattr(e.hook, what)()) for e in self.entries if e.ep_local}
        out: dict[str, Any] = {}
        for part in _gather_objects(local, self.groups.ep):
            out.update(part)
        return out

    def _collect(self, what: str) -> dict[str, Any]:
        """``{key: hook.<what>()}`` for every hook of this stage. Collective; the order of calls
        is the same on every rank of each hook's groups."""
        out = {e.key: getattr(e.hook, what)() for e in self.entries if not e.ep_local}
        out.update(self._ep_local(what))
        return out

    def finalize(self, out_dir: Union[str, Path]) -> Optional[Path]:
        """Write the activation logs of every stage into ``out_dir``. Collective.

        Several kinds on one log module name (e.g. the three expert kinds on
        ``decoder.layers.i.mlp``) share one entry: fields are merged, the first kind in spec order
        gives ``score`` and later kinds' ``score`` is kept as ``score_<kind>``; any other field
        written twice is an error. Also writes ``scoring_report.json`` (global rank 0).
        """
        from megatron_prune.megatron.groups import log_args

        results = self._ep_local("to_dict")
        progress = self._ep_local("get_progress_info")
        by_log: dict[str, list[_Entry]] = {}
        for e in self.entries:
            by_log.setdefault(e.log_name, []).append(e)
        keys_all = set(results) | {e.key for e in self.entries}
        hooks: dict[str, ForwardHook] = {}
        for e in self.entries:  # unique, local, non-expert: the real hook (keeps after_dump)
            if not e.ep_local and len(by_log[e.log_name]) == 1:
                hooks[e.log_name] = e.hook
        merged: dict[str, tuple[list[str], dict, dict]] = {}
        order = {c.kind: i for i, c in enumerate(self.spec.resolved())}
        for key in sorted(keys_all, key=lambda k: (k.partition("::")[0], order.get(k.partition("::")[2], 0), k)):
            log_name, _, kind = key.partition("::")
            if log_name in hooks:
                continue
            if key not in results:
                entry = next(e for e in self.entries if e.key == key)
                results[key] = entry.hook.to_dict()
                progress[key] = entry.hook.get_progress_info()
            names, fields, prog = merged.setdefault(log_name, ([], {}, {}))
            entry = next((e for e in self.entries if e.key == key), None)
            names.append(type(entry.hook).__name__ if entry else kind)
            res = dict(results[key])
            if "score" in fields and "score" in res:  # the first kind (spec order) gives "score"
                res[f"score_{kind}"] = res.pop("score")
            clash = set(fields) & set(res)
            if clash:
                raise ValueError(f"hooks on {log_name} both write fields {sorted(clash)}")
            fields.update(res)
            prog.update(progress.get(key, {}))
        for log_name, (names, fields, prog) in sorted(merged.items()):
            hooks[log_name] = _frozen("+".join(names), fields, prog)
        args = log_args(self.model_config, bool(self.groups.sp), self.tokens or None)
        args["is_writer"] = self.is_writer
        if self.pp_size > 1:
            args["pp_group"] = self.groups.pp
        path = ForwardHook.dump_activations_logs(hooks, out_dir, args)
        if _world()[0] == 0:
            atomic_write_json(Path(out_dir) / "scoring_report.json", self.report())
        _barrier()
        return path

    def report(self) -> dict:
        kinds: dict[str, int] = {}
        for e in self.entries:
            kinds[e.kind.name] = kinds.get(e.kind.name, 0) + 1
        return {
            "spec": self.spec.to_dict(),
            "fingerprints": self.fingerprints(),
            "steps": self.steps,
            "tokens": self.tokens,
            "hooks_on_rank0": kinds,
            "skipped_on_rank0": self.skipped,
            "unused_kinds": self.unused_kinds,
        }

    # ------------------------------------------------------------------------------ resume
    def save_state(self, state_dir: Union[str, Path]) -> Path:
        """Save global hook states plus ``progress.json`` (atomic commit). Collective."""
        state_dir = Path(state_dir)
        states = self._collect("state_dict")
        rank, _ = _world()
        # a fresh directory per save: the committed one is never touched before the new commit
        name = [f"step_{self.steps:09d}_{uuid.uuid4().hex[:8]}"]
        if _world()[1] > 1:
            dist.broadcast_object_list(name, src=0)
        step_dir = state_dir / name[0]
        if rank == 0:
            step_dir.mkdir(parents=True)
        _barrier()
        name = f"hooks.pp{self.pp_rank:03d}-of-{self.pp_size:03d}.pt"
        if self.is_writer:
            buf = io.BytesIO()
            torch.save(_cpu(states), buf)
            atomic_write_bytes(step_dir / name, buf.getvalue())
        _barrier()
        if rank == 0:
            files = sorted(p.name for p in step_dir.iterdir() if p.name.startswith("hooks.pp"))
            expected = [f"hooks.pp{k:03d}-of-{self.pp_size:03d}.pt" for k in range(self.pp_size)]
            if files != expected:
                raise RuntimeError(f"state files {files} in {step_dir}, expected {expected}")
            atomic_write_json(state_dir / "progress.json", {
                "format": STATE_FORMAT,
                "format_version": STATE_FORMAT_VERSION,
                "step": self.steps,
                "tokens": self.tokens,
                "directory": step_dir.name,
                "files": files,
                "fingerprints": self.fingerprints(),
                "spec": self.spec.to_dict(),
                "run_info": self.run_info,
            })
            for old in state_dir.glob("step_*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return state_dir / "progress.json"

    @staticmethod
    def read_progress(state_dir: Union[str, Path]) -> Optional[dict]:
        """The committed progress of ``state_dir``, or None when nothing was saved there."""
        return read_progress(state_dir)

    def load_state(self, state_dir: Union[str, Path]) -> int:
        """Load state saved by :meth:`save_state` at any layout; returns the step reached.
        Refuses a different spec, model shape or ``run_info``. Collective."""
        progress = self.read_progress(state_dir)
        if progress is None:
            raise ScoringStateError(f"no saved scoring state in {state_dir}")
        mine = self.fingerprints()
        if progress["fingerprints"]["spec"] != mine["spec"]:
            raise ScoringStateError(
                f"{state_dir} was saved with another scoring spec ({json.dumps(progress.get('spec'))}); "
                f"this run uses {json.dumps(self.spec.to_dict())}; start in a new directory"
            )
        if progress["fingerprints"]["model"] != mine["model"]:
            raise ScoringStateError(f"{state_dir} was saved for a model of another shape")
        diff = sorted(
            k for k in set(progress.get("run_info", {})) | set(self.run_info)
            if progress.get("run_info", {}).get(k) != self.run_info.get(k)
        )
        if diff:
            raise ScoringStateError(
                f"{state_dir} was saved with other run settings: "
                + "; ".join(f"{k}: saved {progress['run_info'].get(k)!r}, now {self.run_info.get(k)!r}" for k in diff)
            )
        saved: dict[str, Any] = {}
        step_dir = Path(state_dir) / progress["directory"]
        for fname in progress["files"]:
            saved.update(torch.load(step_dir / fname, map_location="cpu", weights_only=False))
        everyone = set()
        world = dist.group.WORLD if _world()[1] > 1 else None
        for part in _gather_objects(sorted(e.key for e in self.entries), world):
            everyone.update(part)
        if everyone != set(saved):
            missing, extra = sorted(everyone - set(saved)), sorted(set(saved) - everyone)
            raise ScoringStateError(
                f"{state_dir} holds other hooks than this run: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for e in self.entries:
            e.hook.load_state_dict(saved[e.key])
        self.steps, self.tokens = int(progress["step"]), int(progress["tokens"])
        return self.steps
