"""The scoring spec: which hook kinds to attach, validated at the boundary (no Megatron import).

A :class:`ScoringSpec` names pruning targets (each expands to the registry's default kinds) and
explicit hook kinds with keyword arguments. It round-trips through JSON and has a
:meth:`~ScoringSpec.fingerprint` over its *resolved* form, so a resumed run can refuse state
that was collected under a different spec.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from megatron_prune.scoring.registry import TARGETS, default_kinds, get_hook_kind

__all__ = ["HookChoice", "ScoringSpec", "SPEC_FORMAT_VERSION"]

SPEC_FORMAT_VERSION = 1
_ON_UNSUPPORTED = ("error", "skip")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class HookChoice:
    """One hook kind by registry name, with keyword arguments for its constructor (JSON values)."""

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.kind, str):
            raise TypeError(f"hook kind must be a string, got {type(self.kind).__name__}")
        get_hook_kind(self.kind)  # raises UnknownHookKindError
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"kwargs of hook kind {self.kind!r} must be a mapping")
        try:
            frozen = json.loads(_canonical(dict(self.kwargs)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"kwargs of hook kind {self.kind!r} are not JSON values: {exc}") from exc
        if "process_groups" in frozen:
            raise ValueError("process_groups are given by the session, not by the spec")
        object.__setattr__(self, "kwargs", frozen)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "kwargs": dict(self.kwargs)}

    @classmethod
    def parse(cls, text: str) -> "HookChoice":
        """``"kind"`` or ``"kind:{json kwargs}"`` (command-line form)."""
        kind, sep, rest = text.partition(":")
        kwargs = {}
        if sep:
            try:
                kwargs = json.loads(rest)
            except json.JSONDecodeError as exc:
                raise ValueError(f"hook {kind!r}: kwargs {rest!r} are not JSON: {exc}") from exc
            if not isinstance(kwargs, dict):
                raise ValueError(f"hook {kind!r}: kwargs must be a JSON object")
        return cls(kind.strip(), kwargs)


@dataclass(frozen=True)
class ScoringSpec:
    """What a scoring session attaches.

    ``targets``: pruning targets (``experts``, ``ffn``, ``kv_groups``, ``hidden``), each adding the
    registry's default kinds. ``hooks``: explicit kinds (their kwargs override a default kind of
    the same name). ``exclude``: kinds removed from the targets' defaults. ``on_unsupported``:
    ``"error"`` (default) or ``"skip"`` for a module that matches a kind's name template but
    has a class the kind cannot handle (skips are reported, never silent).
    """

    targets: tuple[str, ...] = ("ffn", "kv_groups", "hidden")
    hooks: tuple[HookChoice, ...] = ()
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "error"

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise TypeError("targets must be a sequence of target names, not a string")
        targets = tuple(self.targets)
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"unknown pruning target {t!r}; one of {', '.join(TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"pruning targets repeated: {list(targets)}")
        hooks = tuple(h if isinstance(h, HookChoice) else _choice(h) for h in self.hooks)
        names = [h.kind for h in hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hook kinds repeated: {names}")
        exclude = tuple(self.exclude)
        for k in exclude:
            get_hook_kind(k)
        if self.on_unsupported not in _ON_UNSUPPORTED:
            raise ValueError(f"on_unsupported must be one of {_ON_UNSUPPORTED}, got {self.on_unsupported!r}")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "hooks", hooks)
        object.__setattr__(self, "exclude", exclude)
        if not self.resolved():
            raise ValueError("the scoring spec selects no hook kind")

    # ---------------------------------------------------------------------------------- queries
    def resolved(self) -> tuple[HookChoice, ...]:
        """The kinds to attach, in a fixed order: target defaults, then explicit extras."""
        explicit = {h.kind: h for h in self.hooks}
        out: list[HookChoice] = []
        seen = set()
        for t in self.targets:
            for k in default_kinds(t):
                if k in seen or k in self.exclude:
                    continue
                seen.add(k)
                out.append(explicit.get(k, HookChoice(k)))
        for h in self.hooks:
            if h.kind not in seen:
                seen.add(h.kind)
                out.append(h)
        return tuple(out)

    def fingerprint(self) -> str:
        """sha256 over the resolved kinds (with kwargs) and ``on_unsupported``."""
        body = {
            "format_version": SPEC_FORMAT_VERSION,
            "kinds": [h.to_dict() for h in self.resolved()],
            "on_unsupported": self.on_unsupported,
        }
        return hashlib.sha256(_canonical(body).encode()).hexdigest()

    # ------------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "targets": list(self.targets),
            "hooks": [h.to_dict() for h in self.hooks],
            "exclude": list(self.exclude),
            "on_unsupported": self.on_unsupported,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "ScoringSpec":
        if not isinstance(data, Mapping):
            raise ValueError("a scoring spec must be a JSON object")
        data = dict(data)
        version = data.pop("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise ValueError(f"scoring spec format version {version}; this version reads {SPEC_FORMAT_VERSION}")
        unknown = set(data) - {"targets", "hooks", "exclude", "on_unsupported"}
        if unknown:
            raise ValueError(f"unknown scoring spec fields: {', '.join(sorted(unknown))}")
        return cls(
            targets=tuple(data.get("targets", cls.targets)),
            hooks=tuple(_choice(h) for h in data.get("hooks", ())),
            exclude=tuple(data.get("exclude", ())),
            on_unsupported=data.get("on_unsupported", "error"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ScoringSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"scoring spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: Union[str, Path]) -> None:
        from megatron_prune.logs import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ScoringSpec":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read scoring spec {path}: {exc}") from exc
        return cls.from_json(text)

    @classmethod
    def from_cli(
        cls,
        targets: Optional[Union[str, Sequence[str]]] = None,
        hooks: Iterable[str] = (),
        exclude: Optional[Union[str, Sequence[str]]] = None,
        on_unsupported: str = "error",
        moe: bool = True,
    ) -> "ScoringSpec":
        """From command-line values: ``targets`` comma list or ``"auto"`` (every target; experts only
        when ``moe``), ``"none"`` for explicit kinds only; ``hooks`` as :meth:`HookChoice.parse`."""
        if targets is None or targets == "auto":
            ts = tuple(t for t in TARGETS if moe or t != "experts")
        elif targets == "none":
            ts = ()
        else:
            ts = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
        ex = exclude.split(",") if isinstance(exclude, str) else (exclude or ())
        return cls(
            targets=ts,
            hooks=tuple(HookChoice.parse(h) for h in hooks),
            exclude=tuple(e.strip() for e in ex if e.strip()),
            on_unsupported=on_unsupported,
        )


def _choice(h) -> HookChoice:
    if isinstance(h, HookChoice):
        return h
    if isinstance(h, str):
        return HookChoice.parse(h)
    if isinstance(h, Mapping):
        unknown = set(h) - {"kind", "kwargs"}
        if unknown or "kind" not in h:
            raise ValueError(f"a hook entry needs 'kind' (and optional 'kwargs'), got keys {sorted(h)}")
        return HookChoice(h["kind"], h.get("kwargs", {}))
    raise TypeError(f"cannot read a hook choice from {type(h).__name__}")
