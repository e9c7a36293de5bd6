"""ScoringSession plumbing on real tiny Megatron GPT models (gloo/CPU, 2 ranks): handles owned and
removed, pause, global names under PP/EP, explicit errors and skips, refused resumes."""

import torch

from megatron_prune.hooks.base import ForwardHook
from megatron_prune.model_config import ParallelLayout
from megatron_prune.scoring.registry import HookKind, register_hook_kind
from megatron_prune.scoring.spec import HookChoice, ScoringSpec
from megatron_prune.testing.models import TINY_DENSE, TINY_MOE


class CountingHook(ForwardHook):
    """Counts forwards and input tokens (local; state summed over the world when read)."""

    def __init__(self, module, kwargs=None):
        self.calls = torch.zeros((), dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)

    def __call__(self, module, args, output):
        self.calls += 1
        self.tokens += args[0].shape[0] * args[0].shape[1]

    def _global(self):
        out = torch.stack([self.calls, self.tokens])
        torch.distributed.all_reduce(out)
        return out

    def accumulate(self):
        return self._global()

    def to_dict(self):
        return {"score": self._global()}

    def state_dict(self):
        return {"calls": self.calls.clone(), "tokens": self.tokens.clone()}

    def load_state_dict(self, sd):
        self.calls, self.tokens = sd["calls"].clone(), sd["tokens"].clone()


_PROJ = ("decoder.layers.{layer}.self_attention.linear_proj",)
register_hook_kind(HookKind("test_counting", "kv_groups", f"{__name__}:CountingHook", _PROJ), replace=True)
register_hook_kind(HookKind("test_never", "kv_groups", f"{__name__}:CountingHook", _PROJ, ("NoSuchClass",)),
                   replace=True)
register_hook_kind(HookKind("test_nothing", "ffn", f"{__name__}:CountingHook", ("decoder.nowhere",)), replace=True)
COUNTING = ScoringSpec(targets=(), hooks=(HookChoice("test_counting"),))


def _forward(chunks, n=2):
    from megatron_prune.scoring.runner import forward_only

    forward_only(chunks, torch.randint(0, 64, (n, 8)), 1)


def lifecycle_worker(out_dir):
    from megatron_prune.scoring.session import ScoringSession
    from megatron_prune.testing.models import load_model

    chunks = load_model(TINY_MOE, ParallelLayout(tp=2), None)
    with ScoringSession(chunks, COUNTING) as s:
        assert sorted(s.hooks) == [f"decoder.layers.{i}.self_attention.linear_proj::test_counting" for i in range(4)]
        _forward(chunks)
        with s.pause():
            _forward(chunks)
        _forward(chunks)
        calls = {k: float(h.calls) for k, h in s.hooks.items()}
        modules = [m for m in chunks[0].modules() if m._forward_hooks]
        assert len(modules) == 4
    assert not any(m._forward_hooks for m in chunks[0].modules())
    _forward(chunks)
    assert {k: float(h.calls) for k, h in s.hooks.items()} == calls
    try:
        with ScoringSession(chunks, COUNTING):
            raise KeyError("boom")
    except KeyError:
        pass
    assert not any(m._forward_hooks for m in chunks[0].modules())
    # expert hooks own extra taps (the MoE probe on router and experts): gone after exit too
    with ScoringSession(chunks, ScoringSpec(targets=("experts",))) as s:
        _forward(chunks)
        assert any(m._forward_hooks for n, m in chunks[0].named_modules() if n.endswith("mlp.experts"))
        s.finalize(out_dir)
    assert not any(m._forward_hooks for m in chunks[0].modules())
    return set(calls.values())


def test_lifecycle_pause_and_handles(pool2, tmp_path):
    assert pool2.run(lifecycle_worker, str(tmp_path)) == [{4.0}, {4.0}]  # 2 micro-batches × 2 unpaused forwards


def names_worker(layout):
    from megatron_prune.scoring.session import ScoringSession
    from megatron_prune.testing.models import load_model

    chunks = load_model(TINY_MOE, layout, None)
    spec = ScoringSpec(targets=("ffn",), exclude=("ffn_independent",))
    with ScoringSession(chunks, spec) as s:
        return sorted(e.log_name for e in s.entries)


def test_global_layer_and_expert_names(pool2):
    pp = pool2.run(names_worker, ParallelLayout(pp=2))
    assert {n.split(".")[2] for n in pp[0]} == {"1"} and {n.split(".")[2] for n in pp[1]} == {"2", "3"}
    ep = pool2.run(names_worker, ParallelLayout(ep=2))
    assert {n.split(".")[6] for n in ep[0]} == {"0", "1"} and {n.split(".")[6] for n in ep[1]} == {"2", "3"}


def errors_worker():
    from megatron_prune.scoring.session import ScoringSession, UnsupportedModuleError
    from megatron_prune.testing.models import load_model

    out = {}
    chunks = load_model(TINY_DENSE, ParallelLayout(tp=2), None)
    for name, spec in {
        "unsupported": ScoringSpec(targets=(), hooks=(HookChoice("test_never"),)),
        "no_experts": ScoringSpec(targets=("experts",)),
        "explicit_unmatched": ScoringSpec(targets=(), hooks=("test_counting", "test_nothing")),
    }.items():
        try:
            with ScoringSession(chunks, spec):
                out[name] = "no error"
        except UnsupportedModuleError as exc:
            out[name] = str(exc)
        assert not any(m._forward_hooks for m in chunks[0].modules())
    skip = ScoringSpec(targets=(), hooks=(HookChoice("test_never"), HookChoice("test_counting")), on_unsupported="skip")
    with ScoringSession(chunks, skip) as s:
        out["skipped"] = sorted({(r["kind"], r["reason"]) for r in s.skipped})
        out["hooks"] = len(s.hooks)
    return out


def test_unsupported_and_unmatched_are_explicit(pool2):
    out = pool2.run(errors_worker)[0]
    assert "cannot handle" in out["unsupported"] and "NoSuchClass" in out["unsupported"]
    assert "target 'experts' matched no module" in out["no_experts"]
    assert "'test_nothing' matched no module" in out["explicit_unmatched"]
    assert out["skipped"] == [("test_never", "unsupported")] and out["hooks"] == 2


def resume_refusal_worker(state_dir):
    from megatron_prune.scoring.session import ScoringSession, ScoringStateError
    from megatron_prune.testing.models import load_model

    chunks = load_model(TINY_DENSE, ParallelLayout(tp=2), None)
    with ScoringSession(chunks, COUNTING, run_info={"seed": 1}) as s:
        _forward(chunks)
        s.step(tokens=16)
        s.save_state(state_dir)
    errors = {}
    for name, (cfg, info) in {
        "model": (TINY_DENSE.replace(ffn_hidden_size=64), {"seed": 1}),
        "run_info": (TINY_DENSE, {"seed": 2}),
    }.items():
        other = load_model(cfg, ParallelLayout(tp=2), None)
        with ScoringSession(other, COUNTING, run_info=info) as s2:
            try:
                s2.load_state(state_dir)
                errors[name] = "loaded"
            except ScoringStateError as exc:
                errors[name] = str(exc)
    # at TP=1 with DP=2 the same state loads, with its progress
    chunks = load_model(TINY_DENSE, ParallelLayout(), None)
    with ScoringSession(chunks, COUNTING, run_info={"seed": 1}) as s3:
        errors["step"] = s3.load_state(state_dir)
        errors["tokens"] = s3.tokens
    return errors


def test_resume_refuses_other_model_and_run_info(pool2, tmp_path):
    out = pool2.run(resume_refusal_worker, str(tmp_path / "state"))[0]
    assert "model of another shape" in out["model"]
    assert "seed: saved 1, now 2" in out["run_info"]
    assert out["step"] == 1 and out["tokens"] == 16


def integration_worker(out_dir):
    import argparse

    from megatron_prune.integration import add_prune_args, session_from_args
    from megatron_prune.testing.models import load_model

    chunks = load_model(TINY_DENSE, ParallelLayout(tp=2), None)
    parser = add_prune_args(argparse.ArgumentParser())
    args = parser.parse_args(["--prune-score-out", out_dir, "--prune-score-targets", "kv_groups"])
    with session_from_args(args, chunks) as s:
        _forward(chunks)
        s.step(tokens=16)
        s.save_state(f"{out_dir}/state")
        first = s.hooks["decoder.layers.1.self_attention.linear_proj::kv_heads"].to_dict()["score"]
    resumed = parser.parse_args(["--prune-score-out", out_dir, "--prune-score-targets", "kv_groups",
                                 "--prune-score-resume"])
    with session_from_args(resumed, chunks) as s2:
        again = s2.hooks["decoder.layers.1.self_attention.linear_proj::kv_heads"].to_dict()["score"]
        return s2.steps, bool(torch.equal(first, again))


def test_integration_session_resumes(pool2, tmp_path):
    assert pool2.run(integration_worker, str(tmp_path)) == [(1, True), (1, True)]
