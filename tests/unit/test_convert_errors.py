"""Bad input to ``megatron-prune convert``: one line on stderr, exit code 2, SRC untouched, nothing
at DST; a conversion killed midway leaves nothing at DST. Checkpoints are synthetic (Megatron's
TINY_MOE key layout, written through torch.distributed.checkpoint)."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_prune.cli import main
from megatron_prune.masks import save_masks
from megatron_prune.testing.checkpoints import write_synthetic_checkpoint
from megatron_prune.testing.models import TINY_MOE

CFG = TINY_MOE


def _tree_hash(root) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv_err") / "src"
    write_synthetic_checkpoint(CFG, root)
    return root


def _good_masks():
    return {
        "decoder.layers.1.mlp.experts": torch.tensor([True, True, False, False]),
        "decoder.layers.2.mlp.experts": torch.tensor([False, True, True, False]),
        "decoder.layers.3.mlp.experts": torch.tensor([True, False, False, True]),
    }


def _run(tmp_path, capsys, src, masks, *extra, dst=None, manifest=None):
    mpath = tmp_path / "m.safetensors"
    if masks is not None:
        save_masks(mpath, masks, manifest or {})
    dst = dst or (tmp_path / "dst")
    capsys.readouterr()
    rc = main(["convert", "--load", str(src), "--masks", str(mpath), "--save", str(dst), "--no-progress", *extra])
    return rc, capsys.readouterr().err.strip().splitlines(), dst


def _expect_error(tmp_path, capsys, src, masks, match, *extra, dst=None):
    before = _tree_hash(src) if Path(src).exists() else None
    existed = dst is not None and Path(dst).exists()
    rc, err, dst = _run(tmp_path, capsys, src, masks, *extra, dst=dst)
    assert rc == 2, err
    assert len(err) == 1 and match in err[0], err
    assert err[0].startswith("megatron-prune convert: error: ")
    if before is not None:
        assert _tree_hash(src) == before
    assert existed or not Path(dst).exists()
    assert not list(Path(dst).parent.glob(f".{Path(dst).name}.partial-*"))
    return dst


MASK_CASES = [
    ("wrong expert mask size", {"decoder.layers.1.mlp.experts": torch.ones(5, dtype=torch.bool)}, "shape [5]"),
    ("wrong hidden size", {"hidden": torch.ones(31, dtype=torch.bool)}, "the model needs [32]"),
    ("fewer experts than top-k", {f"decoder.layers.{i}.mlp.experts": torch.tensor([True, False, False, False])
                                  for i in (1, 2, 3)}, "top-k"),
    ("non-uniform expert counts", {**_good_masks(), "decoder.layers.2.mlp.experts": torch.tensor([True] * 3 + [False])},
     "kept expert counts differ"),
    ("non-uniform query groups", {"decoder.layers.0.self_attention.query_groups": torch.tensor([True, False])},
     "query group counts differ"),
    ("non-uniform expert ffn", {"decoder.layers.1.mlp.experts.ffn": torch.arange(64).reshape(4, 16) % 16 < 8 + (
        torch.arange(4)[:, None] == 0).long()}, "expert FFN channel counts differ"),
    ("unknown layer", {"decoder.layers.9.mlp.experts": torch.ones(4, dtype=torch.bool)}, "layers 0..3"),
    ("expert mask on a dense layer", {"decoder.layers.0.mlp.experts": torch.ones(4, dtype=torch.bool)},
     "not an MoE layer"),
    ("ffn mask on an MoE layer", {"decoder.layers.1.mlp.ffn": torch.ones(48, dtype=torch.bool)}, "is an MoE layer"),
    ("sparsity for a missing tensor", {"sparsity/decoder.layers.0.mlp.nothing.weight": torch.ones(3, dtype=torch.bool)},
     "no such checkpoint tensor"),
    ("sparsity of the wrong shape", {"sparsity/decoder.layers.0.mlp.linear_fc2.weight": torch.ones(32, 47, dtype=torch.bool)},
     "has shape [32, 47]"),
]


@pytest.mark.parametrize("name,masks,match", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_bad_masks(tmp_path, capsys, ckpt, name, masks, match):
    dst = _expect_error(tmp_path, capsys, ckpt, masks, match)
    assert not dst.exists()


def test_all_false_mask_file(tmp_path, capsys, ckpt):
    from safetensors.torch import save_file
    import json

    mpath = tmp_path / "m.safetensors"
    save_file({"decoder.layers.0.mlp.ffn": torch.zeros(48, dtype=torch.bool)}, str(mpath),
              metadata={"manifest": json.dumps({"format": "megatron_prune.masks", "format_version": 1})})
    capsys.readouterr()
    rc = main(["convert", "--load", str(ckpt), "--masks", str(mpath), "--save", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "keeps nothing" in err[0]


def test_not_divisible_by_target(tmp_path, capsys, ckpt):
    m = {f"decoder.layers.{i}.mlp.experts": torch.tensor([True, True, True, False]) for i in (1, 2, 3)}
    _expect_error(tmp_path, capsys, ckpt, m, "not divisible by the target EP", "--target-ep", "2")
    m = {"decoder.layers.0.mlp.ffn": torch.arange(48) < 33}
    _expect_error(tmp_path, capsys, ckpt, m, "not divisible by the target TP", "--target-tp", "2")


def test_garbage_mask_file(tmp_path, capsys, ckpt):
    (tmp_path / "m.safetensors").write_bytes(b"not a safetensors file at all")
    _expect_error(tmp_path, capsys, ckpt, None, "cannot read mask file")


def test_existing_dst_and_overlap(tmp_path, capsys, ckpt):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _expect_error(tmp_path, capsys, ckpt, _good_masks(), "exists (pass --overwrite", dst=dst)
    assert (dst / "keep.txt").read_text() == "mine"
    _expect_error(tmp_path, capsys, ckpt, _good_masks(), "overlaps SRC", dst=ckpt / "inside")
    assert not (ckpt / "inside").exists()


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path, capsys, tmp_path / "empty", _good_masks(), "neither a Megatron checkpoint root")
    _expect_error(tmp_path, capsys, tmp_path / "missing", _good_masks(), "does not exist")


def _copy(ckpt, tmp_path):
    c = tmp_path / "copy"
    shutil.copytree(ckpt, c)
    return c, c / "iter_0000100"


def test_missing_and_truncated_data_files(tmp_path, capsys, ckpt):
    c, it = _copy(ckpt, tmp_path)
    data = sorted(it.glob("*.distcp"))[0]
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    _expect_error(tmp_path, capsys, c, _good_masks(), "is truncated")
    data.unlink()
    _expect_error(tmp_path, capsys, c, _good_masks(), "is missing")


def test_corrupt_metadata_and_tracker(tmp_path, capsys, ckpt):
    c, it = _copy(ckpt, tmp_path)
    (it / ".metadata").write_bytes(b"\x80\x04garbage")
    _expect_error(tmp_path, capsys, c, _good_masks(), "cannot read")
    (c / "latest_checkpointed_iteration.txt").write_text("abc")
    _expect_error(tmp_path, capsys, c, _good_masks(), "neither an iteration number")


def test_config_mismatch(tmp_path, capsys, ckpt):
    wrong = tmp_path / "cfg.json"
    CFG.replace(ffn_hidden_size=64).save(wrong)
    _expect_error(tmp_path, capsys, ckpt, _good_masks(), "config mismatch", "--model-config", str(wrong))
    CFG.replace(num_layers=5, moe_layer_freq=[0, 1, 1, 1, 1]).save(wrong)
    _expect_error(tmp_path, capsys, ckpt, {"decoder.layers.4.mlp.experts": torch.ones(4, dtype=torch.bool)},
                  "lacks decoder.layers.4.self_attention.linear_qkv.weight", "--model-config", str(wrong))


def test_unknown_checkpoint_key(tmp_path, capsys):
    from megatron_prune.convert.storage import CheckpointReader, read_entries, write_tensors
    from megatron_prune.convert.planner import TensorInfo

    src = tmp_path / "base"
    it = write_synthetic_checkpoint(CFG, src)
    entries = read_entries(it)
    reader = CheckpointReader(it)
    odd = tmp_path / "odd"
    tensors = {k: (v.shape, v.dtype) for k, v in entries.items() if isinstance(v, TensorInfo)}
    tensors["mtp.layers.0.enorm.weight"] = ((32,), "float32")
    write_tensors(odd, tensors, {k: None for k, v in entries.items() if not isinstance(v, TensorInfo)},
                  lambda k, off: torch.zeros(32) if k.startswith("mtp") else (
                      reader.read_tensor(k, entries[k]) if k in tensors else reader.read_object(k)))
    shutil.copy(it / "model_config.json", odd)
    _expect_error(tmp_path, capsys, odd, _good_masks(), "unknown checkpoint key mtp.layers.0.enorm.weight")


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path, ckpt):
    mpath = tmp_path / "m.safetensors"
    save_masks(mpath, {"decoder.layers.1.mlp.experts": torch.ones(5, dtype=torch.bool)}, {})
    p = subprocess.run([sys.executable, "-m", "megatron_prune", "convert", "--load", str(ckpt), "--masks",
                        str(mpath), "--save", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr


_SLOW = """
import sys, time
import megatron_prune.convert.applier as a
orig = a.apply_item
def slow(*args, **kw):
    time.sleep(0.4)
    return orig(*args, **kw)
a.apply_item = slow
from megatron_prune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_conversion_leaves_nothing_at_dst(tmp_path, ckpt, sig):
    mpath = tmp_path / "m.safetensors"
    save_masks(mpath, _good_masks(), {})
    dst = tmp_path / "dst"
    before = _tree_hash(ckpt)
    p = subprocess.Popen([sys.executable, "-c", _SLOW, "convert", "--load", str(ckpt), "--masks", str(mpath),
                          "--save", str(dst), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    partial = []
    while time.time() < deadline and not partial:  # wait until it is writing tensors
        partial = [q for q in tmp_path.glob(".dst.partial-*") if list(q.rglob("*.distcp"))]
        time.sleep(0.05)
    assert partial, "the conversion never started writing"
    time.sleep(1.0)
    os.kill(p.pid, sig)
    p.wait(timeout=30)
    assert p.returncode != 0
    assert not dst.exists()
    if sig == signal.SIGTERM:  # an orderly stop also removes its temporary sibling
        assert not list(tmp_path.glob(".dst.partial-*"))
    assert _tree_hash(ckpt) == before
    # the next run cleans up what a killed run left and converts normally
    assert main(["convert", "--load", str(ckpt), "--masks", str(mpath), "--save", str(dst), "--no-progress",
                 "--verify"]) == 0
    assert dst.is_dir() and not list(tmp_path.glob(".dst.partial-*"))
