"""ScoringSpec and the hook-kind registry: validation, JSON round trip, fingerprints."""

import json

import pytest

from megatron_prune.scoring.registry import (
    HookKind,
    UnknownHookKindError,
    default_kinds,
    get_hook_kind,
    hook_kinds,
    register_hook_kind,
)
from megatron_prune.scoring.spec import HookChoice, ScoringSpec


def test_defaults_per_target_are_registered_kinds_of_that_target():
    for target in ("experts", "ffn", "kv_groups", "hidden"):
        kinds = default_kinds(target)
        assert kinds
        for k in kinds:
            assert get_hook_kind(k).target == target
    with pytest.raises(ValueError, match="unknown pruning target"):
        default_kinds("heads")


def test_resolved_order_and_overrides():
    spec = ScoringSpec(
        targets=("ffn", "hidden"),
        hooks=(HookChoice("ffn_independent", {"a": 1}), HookChoice("ffn_l2norm")),
        exclude=("hidden_fused_norm",),
    )
    kinds = [h.kind for h in spec.resolved()]
    assert kinds == ["ffn_independent", "expert_ffn_independent", "hidden_layernorm", "ffn_l2norm"]
    assert spec.resolved()[0].kwargs == {"a": 1}


def test_json_round_trip_and_fingerprint():
    spec = ScoringSpec(targets=("kv_groups",), hooks=("ffn_iterative:{\"validation_full_iters\": 4}",))
    again = ScoringSpec.from_json(spec.to_json())
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()
    # the fingerprint follows the resolved kinds, not the spelling
    same = ScoringSpec(targets=(), hooks=("kv_heads", "ffn_iterative:{\"validation_full_iters\": 4}"))
    assert same.fingerprint() == spec.fingerprint()
    other = ScoringSpec(targets=("kv_groups",), hooks=("ffn_iterative:{\"validation_full_iters\": 5}",))
    assert other.fingerprint() != spec.fingerprint()
    assert ScoringSpec(on_unsupported="skip").fingerprint() != ScoringSpec().fingerprint()


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(targets=("heads",)), "unknown pruning target"),
        (dict(targets="ffn"), "not a string"),
        (dict(targets=("ffn", "ffn")), "repeated"),
        (dict(hooks=("nope",)), "unknown hook kind"),
        (dict(hooks=("ffn_l2norm", "ffn_l2norm")), "repeated"),
        (dict(on_unsupported="ignore"), "on_unsupported"),
        (dict(targets=(), hooks=()), "no hook kind"),
        (dict(exclude=("nope",)), "unknown hook kind"),
    ],
)
def test_invalid_specs_are_refused(kwargs, err):
    with pytest.raises((ValueError, TypeError, UnknownHookKindError), match=err):
        ScoringSpec(**kwargs)


def test_hook_choice_validation():
    with pytest.raises(ValueError, match="not JSON"):
        HookChoice.parse("ffn_l2norm:{bad")
    with pytest.raises(ValueError, match="JSON values"):
        HookChoice("ffn_l2norm", {"x": object()})
    with pytest.raises(ValueError, match="process_groups"):
        HookChoice("ffn_l2norm", {"process_groups": 1})


def test_from_dict_refuses_unknown_fields_and_versions():
    with pytest.raises(ValueError, match="unknown scoring spec fields"):
        ScoringSpec.from_dict({"targets": ["ffn"], "colour": 1})
    with pytest.raises(ValueError, match="format version"):
        ScoringSpec.from_dict({"format_version": 99})
    with pytest.raises(ValueError, match="not valid JSON"):
        ScoringSpec.from_json("{")


def test_from_cli():
    assert ScoringSpec.from_cli("auto", moe=False).targets == ("ffn", "kv_groups", "hidden")
    assert ScoringSpec.from_cli("auto", moe=True).targets == ("experts", "ffn", "kv_groups", "hidden")
    spec = ScoringSpec.from_cli("none", hooks=["ffn_l2norm"])
    assert [h.kind for h in spec.resolved()] == ["ffn_l2norm"]
    assert ScoringSpec.from_cli("ffn,hidden", exclude="expert_ffn_independent").exclude == ("expert_ffn_independent",)


def test_save_load(tmp_path):
    spec = ScoringSpec(targets=("hidden",))
    spec.save(tmp_path / "s.json")
    assert ScoringSpec.load(tmp_path / "s.json") == spec
    assert json.loads((tmp_path / "s.json").read_text())["targets"] == ["hidden"]


class _Norm:  # stand-ins for module classes (classification looks at MRO names)
    pass


class RMSNorm(_Norm):
    pass


class IdentityOp:
    pass


def test_kind_matching_and_classification():
    kind = get_hook_kind("hidden_layernorm")
    assert kind.match("decoder.layers.12.input_layernorm") == "decoder.layers.12.input_layernorm"
    assert kind.match("decoder.final_layernorm") == "decoder.final_layernorm"
    assert kind.match("decoder.layers.x.input_layernorm") is None
    assert kind.match("decoder.layers.1.self_attention.linear_qkv") is None
    assert kind.classify(RMSNorm()) == "accept"
    assert kind.classify(IdentityOp()) == "skip"
    assert kind.classify(object()) == "unsupported"
    fused = get_hook_kind("hidden_fused_norm")
    assert fused.match("decoder.layers.3.mlp.linear_fc1") == "decoder.layers.3.pre_mlp_layernorm"
    rcv = get_hook_kind("moe_ranked_choice")
    assert rcv.match("decoder.layers.2.mlp.router") == "decoder.layers.2.mlp"
    exp = get_hook_kind("expert_ffn_independent")
    assert exp.match("decoder.layers.2.mlp.experts.local_experts.7.linear_fc2")
    assert exp.match("decoder.layers.2.mlp.linear_fc2") is None


def test_register_custom_kind_and_lazy_import_errors():
    name = "test_custom_kind_unit"
    kind = HookKind(name, "ffn", "megatron_prune.no_such_module:Hook", ("decoder.layers.{layer}.mlp.linear_fc2",))
    register_hook_kind(kind)
    try:
        assert name in hook_kinds()
        with pytest.raises(ValueError, match="already registered"):
            register_hook_kind(kind)
        assert not kind.available()
        with pytest.raises(ImportError, match=name):
            kind.load_class()
    finally:
        from megatron_prune.scoring import registry

        registry._REGISTRY.pop(name)
    with pytest.raises(ValueError, match="snake_case"):
        HookKind("Bad-Name", "ffn", "a:b", ())
    with pytest.raises(ValueError, match="unknown target"):
        HookKind("x", "heads", "a:b", ())
    assert get_hook_kind("ffn_independent").available()


def test_integration_args_build_the_spec(tmp_path):
    import argparse

    from megatron_prune.integration import add_prune_args, scoring_enabled, spec_from_args, state_dir_from_args

    parser = add_prune_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert not scoring_enabled(args) and state_dir_from_args(args) is None
    args = parser.parse_args(["--prune-score-out", str(tmp_path), "--prune-score-targets", "ffn",
                              "--prune-score-hooks", "ffn_l2norm", "--prune-score-exclude", "expert_ffn_independent"])
    assert scoring_enabled(args) and state_dir_from_args(args) == tmp_path / "state"
    assert [h.kind for h in spec_from_args(args).resolved()] == ["ffn_independent", "ffn_l2norm"]
    auto = parser.parse_args(["--prune-score-out", "x"])
    auto.num_experts = 8  # Megatron-LM's flag: auto targets include experts
    assert spec_from_args(auto).targets[0] == "experts"
    ScoringSpec(targets=("hidden",)).save(tmp_path / "s.json")
    from_file = parser.parse_args(["--prune-score-out", "x", "--prune-score-spec", str(tmp_path / "s.json")])
    assert spec_from_args(from_file).targets == ("hidden",)


def test_transformer_engine_modules_by_class_name():
    """TE spec: norms fused into linear_qkv/linear_fc1 are scored (logged under the norm's name),
    the IdentityOp norms are skipped by design, grouped experts are refused explicitly."""
    te_fused = type("TELayerNormColumnParallelLinear", (), {})()
    te_row = type("TERowParallelLinear", (), {})()
    te_grouped = type("TERowParallelGroupedLinear", (), {})()
    te_norm = type("RMSNorm", (), {})()  # TENorm builds transformer_engine.pytorch.RMSNorm
    fused = get_hook_kind("hidden_fused_norm")
    assert fused.classify(te_fused) == "accept"
    assert fused.match("decoder.layers.4.self_attention.linear_qkv") == "decoder.layers.4.input_layernorm"
    assert get_hook_kind("hidden_layernorm").classify(te_norm) == "accept"
    assert get_hook_kind("ffn_independent").classify(te_row) == "accept"
    expert = get_hook_kind("expert_ffn_independent")
    assert expert.match("decoder.layers.1.mlp.experts.linear_fc2") == "decoder.layers.1.mlp.experts.linear_fc2"
    assert expert.classify(te_grouped) == "unsupported"
