"""Calibration data: fixed-length token samples, deterministic from a seed.

Sources:

* a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, read with
  ``megatron.core.datasets.indexed_dataset.IndexedDataset``; pass the prefix or either file);
* plain text (``.txt``: one document per blank-line-separated paragraph) or JSONL (``.jsonl``:
  one document per line, the string under ``json_key``), tokenized with the built-in
  :class:`ByteTokenizer` (no downloads) or a Hugging Face tokenizer named by the user (lazy,
  optional: ``transformers`` must be installed and the name resolvable locally or online).

Sampling: the documents are visited in a permutation drawn from ``seed``, joined with an
end-of-document token (when one is known), and cut into consecutive windows of ``seq_length``
tokens; the first ``num_samples`` windows are the samples ``[num_samples, seq_length]``. Token ids
at or above the model's vocabulary are an error unless ``vocab_overflow`` is ``"fold"``
(``id % vocab``) or ``"clip"`` (``min(id, vocab - 1)``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = ["ByteTokenizer", "DataSpec", "calibration_samples", "data_fingerprint", "DataError"]

_OVERFLOW = ("error", "fold", "clip")


class DataError(ValueError):
    """Calibration data that cannot give the requested samples."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``id = byte + OFFSET``; specials ``EOD=0``, ``PAD=1``, ``BOS=2``.

    ``vocab_size`` is 259; models with a smaller vocabulary need ``vocab_overflow`` set.
    """

    EOD, PAD, BOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + self.OFFSET

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET).decode("utf-8", "replace")

    @property
    def eod(self) -> int:
        return self.EOD


class _HFTokenizer:
    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise DataError(f"tokenizer {name!r} needs the transformers package ({exc})") from exc
        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load tokenizer {name!r}: {exc}") from exc
        self.name = name
        self.vocab_size = len(self._tok)
        self.eod = self._tok.eos_token_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


@dataclass(frozen=True)
class DataSpec:
    """Where the samples come from and how many. ``format``: ``"auto"`` (by suffix),
    ``"indexed"``, ``"text"`` or ``"jsonl"``; ``tokenizer``: ``"bytes"`` or a Hugging Face name
    (text/JSONL only); ``eod``: end-of-document id placed between documents (default: the
    tokenizer's; none for indexed data unless given)."""

    path: str
    num_samples: int
    seq_length: int
    seed: int = 0
    format: str = "auto"
    tokenizer: str = "bytes"
    json_key: str = "text"
    vocab_overflow: str = "error"
    eod: Optional[int] = None

    def __post_init__(self):
        if self.num_samples < 1 or self.seq_length < 1:
            raise DataError(f"num_samples and seq_length must be >= 1 (got {self.num_samples}, {self.seq_length})")
        if self.vocab_overflow not in _OVERFLOW:
            raise DataError(f"vocab_overflow must be one of {_OVERFLOW}, got {self.vocab_overflow!r}")
        fmt = self.format if self.format != "auto" else _guess_format(self.path)
        if fmt not in ("indexed", "text", "jsonl"):
            raise DataError(f"unknown data format {self.format!r}")
        object.__setattr__(self, "format", fmt)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _prefix(path: str) -> str:
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _guess_format(path: str) -> str:
    p = _prefix(path)
    if Path(p + ".bin").exists() and Path(p + ".idx").exists():
        return "indexed"
    if path.endswith(".jsonl") or path.endswith(".json"):
        return "jsonl"
    if Path(path).is_file():
        return "text"
    raise DataError(f"calibration data {path!r} not found (expected PREFIX.bin/.idx, .txt or .jsonl)")


def _files(spec: DataSpec) -> list[Path]:
    if spec.format == "indexed":
        p = _prefix(spec.path)
        return [Path(p + ".idx"), Path(p + ".bin")]
    return [Path(spec.path)]


def data_fingerprint(spec: DataSpec) -> dict:
    """JSON facts identifying the samples (spec plus size and a hash of each file's head)."""
    files = {}
    for f in _files(spec):
        if not f.exists():
            raise DataError(f"calibration data file {f} not found")
        with open(f, "rb") as fh:
            head = hashlib.sha256(fh.read(4 << 20)).hexdigest()
        files[f.name] = {"size": f.stat().st_size, "sha256_head": head}
    return {"spec": spec.to_dict(), "files": files}


def _text_documents(spec: DataSpec) -> list[str]:
    path = Path(spec.path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if spec.format == "text":
        docs, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        if cur:
            docs.append("\n".join(cur))
        return docs
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(spec.json_key), str):
            raise DataError(f"{path}:{n}: no string field {spec.json_key!r}")
        docs.append(obj[spec.json_key])
    return docs


def _documents(spec: DataSpec) -> tuple[int, Iterator[np.ndarray], Optional[int], Optional[int]]:
    """(document count, documents in sampling order, eod id, tokenizer vocab or None)."""
    rng = np.random.default_rng(spec.seed)
    if spec.format == "indexed":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for f in _files(spec):
            if not f.exists():
                raise DataError(f"indexed dataset file {f} not found")
        ds = IndexedDataset(_prefix(spec.path), multimodal=False, mmap=True)
        order = rng.permutation(len(ds))
        return len(ds), (np.asarray(ds[int(i)], dtype=np.int64) for i in order), spec.eod, None
    tok = ByteTokenizer() if spec.tokenizer == "bytes" else _HFTokenizer(spec.tokenizer)
    docs = _text_documents(spec)
    order = rng.permutation(len(docs))
    eod = spec.eod if spec.eod is not None else tok.eod
    return len(docs), (tok.encode(docs[int(i)]) for i in order), eod, tok.vocab_size


def calibration_samples(spec: DataSpec, vocab_size: int) -> torch.Tensor:
    """Token samples ``[num_samples, seq_length]`` (int64), identical on every rank.

    ``vocab_size``: the model's (padded) vocabulary; ids must stay below it (see
    ``vocab_overflow``). Raises :class:`DataError` if the data holds too few tokens.
    """
    count, docs, eod, tok_vocab = _documents(spec)
    if count == 0:
        raise DataError(f"{spec.path} holds no documents")
    if tok_vocab is not None and tok_vocab > vocab_size and spec.vocab_overflow == "error":
        raise DataError(
            f"the {spec.tokenizer} tokenizer has {tok_vocab} ids but the model's vocabulary is "
            f"{vocab_size}; choose vocab_overflow 'fold' or 'clip' (--vocab-overflow) or another tokenizer"
        )
    need = spec.num_samples * spec.seq_length
    parts, have = [], 0
    for d in docs:
        if have >= need:
            break
        if parts and eod is not None:
            parts.append(np.asarray([eod], dtype=np.int64))
            have += 1
        parts.append(d)
        have += len(d)
    if have < need:
        raise DataError(
            f"{spec.path} holds {have} tokens ({count} documents), fewer than "
            f"{spec.num_samples} samples x {spec.seq_length} tokens = {need}"
        )
    flat = torch.from_numpy(np.concatenate(parts)[:need].copy())
    if flat.numel() and int(flat.min()) < 0:
        raise DataError(f"{spec.path} holds negative token ids")
    top = int(flat.max()) if flat.numel() else 0
    if top >= vocab_size:
        if spec.vocab_overflow == "fold":
            flat = flat % vocab_size
        elif spec.vocab_overflow == "clip":
            flat = flat.clamp_max(vocab_size - 1)
        else:
            raise DataError(
                f"token id {top} in {spec.path} is outside the model's vocabulary of {vocab_size} "
                f"(choose vocab_overflow 'fold' or 'clip')"
            )
    return flat.view(spec.num_samples, spec.seq_length)
