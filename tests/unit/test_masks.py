import json

import pytest
import torch

from megatron_prune.errors import UserError
from megatron_prune.masks import (MASK_FORMAT_VERSION, load_masks, mask_kind, pack_bits, save_masks,
                                  unpack_bits)


def test_pack_bits_layout_and_round_trip():
    m = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(m).tolist() == [129, 1]  # bit j%8 of byte j//8 is element j
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (3, 5, 7), (16, 33)]:
        x = torch.rand(shape, generator=g) > 0.5
        p = pack_bits(x)
        assert p.dtype == torch.uint8 and p.numel() == (x.numel() + 7) // 8
        assert torch.equal(unpack_bits(p, shape), x)
    with pytest.raises(UserError):
        unpack_bits(p, (16, 34))


def test_save_load_round_trip(tmp_path):
    sp = torch.rand(6, 10) > 0.3
    masks = {
        "decoder.layers.1.mlp.experts": torch.tensor([True, False, True, True]),
        "decoder.layers.1.mlp.experts.ffn": torch.ones(4, 16, dtype=torch.bool),
        "decoder.layers.0.mlp.ffn": torch.arange(48) % 3 != 0,
        "decoder.layers.2.self_attention.query_groups": torch.tensor([False, True]),
        "hidden": torch.arange(32) != 5,
        "sparsity/decoder.layers.0.mlp.linear_fc2.weight": sp,
    }
    path = save_masks(tmp_path / "m.safetensors", masks, {"source": "unit test", "criterion": "reap"})
    loaded, manifest = load_masks(path)
    assert manifest["source"] == "unit test" and manifest["format_version"] == MASK_FORMAT_VERSION
    assert manifest["sparsity_shapes"] == {"decoder.layers.0.mlp.linear_fc2.weight": [6, 10]}
    assert set(loaded) == set(masks)
    for k in masks:
        assert torch.equal(loaded[k], masks[k]), k
    packed, _ = load_masks(path, unpack_sparsity=False)
    assert packed["sparsity/decoder.layers.0.mlp.linear_fc2.weight"].dtype == torch.uint8


def test_mask_kinds():
    assert mask_kind("decoder.layers.12.mlp.experts") == ("experts", 12)
    assert mask_kind("decoder.layers.3.mlp.experts.ffn") == ("expert_ffn", 3)
    assert mask_kind("decoder.layers.3.self_attention.query_groups") == ("query_groups", 3)
    assert mask_kind("hidden") == ("hidden", -1)
    assert mask_kind("sparsity/output_layer.weight") == ("sparsity", -1)
    with pytest.raises(UserError, match="unknown mask key"):
        mask_kind("decoder.layers.3.mlp.router")


@pytest.mark.parametrize("masks,match", [
    ({"decoder.layers.x.mlp.experts": torch.ones(4, dtype=torch.bool)}, "unknown mask key"),
    ({"hidden": torch.ones(4)}, "dtype"),
    ({"hidden": torch.zeros(4, dtype=torch.bool)}, "keeps nothing"),
    ({"hidden": torch.ones(2, 2, dtype=torch.bool)}, "dimensions"),
    ({"decoder.layers.1.mlp.experts.ffn": torch.tensor([[True, False], [False, False]])}, "no channel"),
])
def test_invalid_masks_refused(tmp_path, masks, match):
    with pytest.raises(UserError, match=match):
        save_masks(tmp_path / "bad.safetensors", masks, {})


def test_load_refuses_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="does not exist"):
        load_masks(tmp_path / "none.safetensors")
    (tmp_path / "garbage").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot read"):
        load_masks(tmp_path / "garbage")
    t = {"hidden": torch.ones(4, dtype=torch.bool)}
    save_file(t, str(tmp_path / "nomanifest"))
    with pytest.raises(UserError, match="manifest"):
        load_masks(tmp_path / "nomanifest")
    man = {"format": "megatron_prune.masks", "format_version": 99}
    save_file(t, str(tmp_path / "v99"), metadata={"manifest": json.dumps(man)})
    with pytest.raises(UserError, match="version 99"):
        load_masks(tmp_path / "v99")
    man = {"format": "megatron_prune.masks", "format_version": 1, "sparsity_shapes": {"w": [3, 9]}}
    save_file({"sparsity/w": torch.zeros(2, dtype=torch.uint8)}, str(tmp_path / "short"),
              metadata={"manifest": json.dumps(man)})
    with pytest.raises(UserError, match="does not fit"):
        load_masks(tmp_path / "short")


def test_unpack_bits_range_matches_full_unpack():
    from megatron_prune.masks import unpack_bits_range

    x = torch.rand(5, 13, generator=torch.Generator().manual_seed(3)) > 0.5
    p = pack_bits(x)
    flat = x.reshape(-1)
    for start, count in [(0, 13), (13, 13), (7, 30), (52, 13), (64, 1)]:
        assert torch.equal(unpack_bits_range(p, start, count), flat[start:start + count])
    with pytest.raises(UserError):
        unpack_bits_range(p, 70, 10)
