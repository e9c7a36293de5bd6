"""Demo text that ships with Python, as separate domains, byte-tokenised (vocab 256).

Domains:
* ``stdlib``: source files of the Python standard library (``sysconfig`` stdlib path);
* ``pydoc``: the ``pydoc_data.topics`` help text;
* ``arith``: synthetic additions (``"37+58=95;"``) and string reversals (``"rev abc=cba;"``),
  the rare domain of the training mixture.

Each domain has disjoint ``train``/``calib``/``eval`` splits; everything is deterministic.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch

__all__ = ["DOMAINS", "domain_bytes", "domain_samples", "mixture"]

DOMAINS = ("stdlib", "pydoc", "arith")
_SPLITS = ("train", "calib", "eval")


def _stdlib_text(limit: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    out, n = [], 0
    for p in files:
        data = p.read_bytes()
        out.append(data)
        n += len(data)
        if n >= limit:
            break
    if n < limit:
        raise RuntimeError(f"the Python standard library at {root} holds too little source text")
    return b"".join(out)[:limit]


def _pydoc_text(limit: int) -> bytes:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", "replace")
    while len(text) < limit:
        text = text + text
    return text[:limit]


def _arith_text(limit: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    parts, n = [], 0
    letters = "abcdefghijklmnopqrstuvwxyz"
    while n < limit:
        if rng.random() < 0.5:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            s = f"{a}+{b}={a + b};"
        else:
            w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
            s = f"rev {w}={w[::-1]};"
        parts.append(s)
        n += len(s)
    return "".join(parts).encode()[:limit]


def domain_bytes(domain: str, num_bytes: int) -> bytes:
    if domain == "stdlib":
        return _stdlib_text(num_bytes)
    if domain == "pydoc":
        return _pydoc_text(num_bytes)
    if domain == "arith":
        return _arith_text(num_bytes)
    raise ValueError(f"unknown demo domain {domain!r}; known: {', '.join(DOMAINS)}")


def domain_samples(domain: str, split: str, num_samples: int, seq_length: int) -> torch.Tensor:
    """``[num_samples, seq_length + 1]`` token ids (inputs and shifted labels) of one split.

    The domain's text is cut into three disjoint regions (train 80%, calib 10%, eval 10%).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}")
    per = num_samples * (seq_length + 1)
    total = per * 10 if split != "train" else int(per * 1.25) + 1
    text = domain_bytes(domain, max(total, 10 * per))
    cut = [0, int(len(text) * 0.8), int(len(text) * 0.9), len(text)]
    region = text[cut[_SPLITS.index(split)] : cut[_SPLITS.index(split) + 1]]
    if len(region) < per:
        region = region * (per // len(region) + 1)
    t = torch.frombuffer(bytearray(region[:per]), dtype=torch.uint8).long()
    return t.view(num_samples, seq_length + 1)


def mixture(split: str, num_samples: int, seq_length: int, weights=(0.6, 0.3, 0.1), seed: int = 0) -> torch.Tensor:
    """Samples of every domain in the given proportions, shuffled deterministically."""
    counts = [int(round(w * num_samples)) for w in weights]
    counts[0] += num_samples - sum(counts)
    parts = [domain_samples(d, split, c, seq_length) for d, c in zip(DOMAINS, counts) if c > 0]
    data = torch.cat(parts)
    g = torch.Generator().manual_seed(seed)
    return data[torch.randperm(len(data), generator=g)]
