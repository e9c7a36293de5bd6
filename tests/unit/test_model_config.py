"""ModelConfig round trips (JSON and Megatron-LM args) and validation."""

import pytest

from megatron_prune.demo.train import DEMO_MOE
from megatron_prune.model_config import ModelConfig, ParallelLayout
from megatron_prune.testing.models import TINY_DENSE, TINY_MOE


@pytest.mark.parametrize("cfg", [TINY_DENSE, TINY_MOE, DEMO_MOE], ids=["dense", "moe", "demo"])
def test_round_trips(cfg, tmp_path):
    assert ModelConfig.from_megatron_args(cfg.to_megatron_args()) == cfg
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_derived_and_validation():
    assert TINY_MOE.moe_layer_pattern() == [0, 1, 1, 1]
    assert DEMO_MOE.moe_layer_pattern() == [1, 1, 1, 1]
    assert TINY_DENSE.moe_layer_pattern() == [0, 0]
    assert TINY_DENSE.kv_channels == 8 and TINY_DENSE.heads_per_group == 2
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig(num_layers=1, hidden_size=12, num_attention_heads=3, num_query_groups=2,
                    vocab_size=8, ffn_hidden_size=8)
    with pytest.raises(ValueError, match="lacks required fields"):
        ModelConfig.from_dict({"num_layers": 2})
    unknown = ModelConfig.from_dict({**TINY_DENSE.to_dict(), "some_new_arg": 3})
    assert unknown.extra["some_new_arg"] == 3
    with pytest.raises(ValueError, match="tp must be"):
        ParallelLayout(tp=0)
    assert ParallelLayout(tp=1, sequence_parallel=True).sequence_parallel is False
    assert ParallelLayout(tp=2).expert_tp == 2 and ParallelLayout(tp=2, etp=1).expert_tp == 1
