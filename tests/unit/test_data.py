"""Calibration data: indexed datasets (megatron.core builder), text and JSONL with the byte tokenizer."""

import json

import numpy as np
import pytest
import torch

from megatron_prune.scoring.data import ByteTokenizer, DataError, DataSpec, calibration_samples, data_fingerprint


def write_indexed(prefix: str, docs) -> None:
    """Write ``docs`` (lists of ids) with megatron.core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_item(torch.tensor(d, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _all_ids(samples):
    return samples.reshape(-1).tolist()


def test_indexed_dataset_read_back(tmp_path):
    docs = [list(range(100 * k, 100 * k + 10 + k)) for k in range(6)]  # distinct ids per doc
    prefix = str(tmp_path / "calib_text_document")
    write_indexed(prefix, docs)
    spec = DataSpec(prefix + ".bin", num_samples=4, seq_length=8, seed=3)
    assert spec.format == "indexed"
    s = calibration_samples(spec, vocab_size=1000)
    assert s.shape == (4, 8) and s.dtype == torch.int64
    flat = _all_ids(s)
    # documents appear whole and in the seed's permutation order, no separator by default
    order = np.random.default_rng(3).permutation(len(docs))
    expect = [t for i in order for t in docs[i]][:32]
    assert flat == expect
    # deterministic, and another seed gives another order
    assert torch.equal(s, calibration_samples(DataSpec(prefix, num_samples=4, seq_length=8, seed=3), 1000))
    assert not torch.equal(s, calibration_samples(DataSpec(prefix, num_samples=4, seq_length=8, seed=4), 1000))
    # an explicit end-of-document id is placed between documents
    with_eod = _all_ids(calibration_samples(DataSpec(prefix, 4, 8, seed=3, eod=999), 1000))
    first = docs[order[0]]
    assert with_eod[: len(first) + 1] == first + [999]


def test_indexed_vocab_and_size_errors(tmp_path):
    prefix = str(tmp_path / "d")
    write_indexed(prefix, [[1, 2, 3, 70]])
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        calibration_samples(DataSpec(prefix, 1, 4), vocab_size=64)
    folded = calibration_samples(DataSpec(prefix, 1, 4, vocab_overflow="fold"), vocab_size=64)
    assert folded.tolist() == [[1, 2, 3, 6]]
    clipped = calibration_samples(DataSpec(prefix, 1, 4, vocab_overflow="clip"), vocab_size=64)
    assert clipped.tolist() == [[1, 2, 3, 63]]
    with pytest.raises(DataError, match="fewer than"):
        calibration_samples(DataSpec(prefix, 2, 4), vocab_size=100)


def test_text_with_byte_tokenizer(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("hello world\nsecond line\n\nparagraph two\n\n\nthird é\n")
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("hé")) == "hé"
    spec = DataSpec(str(p), num_samples=3, seq_length=10, seed=0)
    assert spec.format == "text"
    with pytest.raises(DataError, match="choose vocab_overflow"):
        calibration_samples(spec, vocab_size=64)
    s = calibration_samples(spec, vocab_size=ByteTokenizer.vocab_size)
    paras = ["hello world\nsecond line", "paragraph two", "third é"]
    order = np.random.default_rng(0).permutation(3)
    stream = []
    for n, i in enumerate(order):
        if n:
            stream.append(ByteTokenizer.EOD)
        stream.extend(tok.encode(paras[i]).tolist())
    assert _all_ids(s) == stream[:30]
    folded = calibration_samples(DataSpec(str(p), 3, 10, vocab_overflow="fold"), vocab_size=64)
    assert torch.equal(folded, s % 64) and int(folded.max()) < 64


def test_jsonl(tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["abc", "defg", "hi"])) + "\n")
    s = calibration_samples(DataSpec(str(p), 2, 4, seed=1), vocab_size=300)
    assert s.shape == (2, 4)
    assert set(_all_ids(s)) <= {ByteTokenizer.EOD} | set(ByteTokenizer().encode("abcdefghi").tolist())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "abc"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        calibration_samples(DataSpec(str(bad), 1, 2), vocab_size=300)
    assert calibration_samples(DataSpec(str(bad), 1, 2, json_key="txt"), 300).shape == (1, 2)


def test_spec_validation_and_fingerprint(tmp_path):
    with pytest.raises(DataError, match="not found"):
        DataSpec(str(tmp_path / "missing"), 1, 1)
    p = tmp_path / "a.txt"
    p.write_text("some text here")
    with pytest.raises(DataError, match=">= 1"):
        DataSpec(str(p), 0, 4)
    with pytest.raises(DataError, match="vocab_overflow"):
        DataSpec(str(p), 1, 4, vocab_overflow="wrap")
    fp = data_fingerprint(DataSpec(str(p), 1, 4))
    p.write_text("other text here")
    assert data_fingerprint(DataSpec(str(p), 1, 4)) != fp
    assert data_fingerprint(DataSpec(str(p), 1, 4, seed=2))["spec"]["seed"] == 2


def test_named_hf_tokenizer_from_a_local_directory(tmp_path):
    """A tokenizer the user names (here a local directory; no download) tokenizes text data."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "hello": 2, "world": 3, "again": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path / "tok")
    p = tmp_path / "c.txt"
    p.write_text("hello world\n\nworld again zzz\n")
    spec = DataSpec(str(p), num_samples=2, seq_length=3, seed=0, tokenizer=str(tmp_path / "tok"))
    s = calibration_samples(spec, vocab_size=8)
    docs = [[2, 3], [3, 4, 0]]
    order = np.random.default_rng(0).permutation(2)
    stream = docs[order[0]] + [1] + docs[order[1]]  # the tokenizer's EOS separates documents
    assert _all_ids(s) == stream[:6]
    with pytest.raises(DataError, match="cannot load tokenizer"):
        calibration_samples(DataSpec(str(p), 1, 2, tokenizer=str(tmp_path / "missing_tok")), 8)
