"""Instant-runoff (ranked-choice) elimination over compact ballots, in O(E·T) work.

Semantics (the same as the round-by-round recount): every round each ballot votes for its
``topk`` most preferred experts still standing; the standing expert with the fewest votes is
eliminated (ties: lowest id), so experts nobody votes for go first; the last one standing wins.

Instead of recounting all ``T x E`` ballot entries every round (``O(E²·T)`` work and a widened
copy of the ballots), each ballot keeps a threshold position: its votes are the standing experts
at ballot positions ``0..thr``. Eliminating expert ``x`` only touches ballots that voted for
``x`` (``pos[t, x] <= thr[t]``), which advance their threshold to their next standing expert.
Extra memory: the inverse permutation (same dtype as the ballots) and one int32 per ballot.
"""

from __future__ import annotations

import torch

__all__ = ["instant_runoff_order"]


def _inverse_positions(ballots: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``pos[t, e]`` = position of expert ``e`` on ballot ``t`` (same dtype as ``ballots``)."""
    t, e = ballots.shape
    pos = torch.empty_like(ballots)
    ar = torch.arange(e, device=ballots.device).to(ballots.dtype).expand(min(chunk, t), e)
    for s in range(0, t, chunk):
        b = ballots[s : s + chunk].long()
        pos[s : s + chunk].scatter_(1, b, ar[: b.shape[0]])
    return pos


def instant_runoff_order(ballots: torch.Tensor, num_experts: int, topk: int) -> torch.Tensor:
    """Elimination order ``[E]`` int64, least important first (the winner last).

    ``ballots``: ``[T, E]`` integer tensor (uint8 when ``E <= 256``), each row a permutation of
    expert ids, most preferred first. Runs on the ballots' device; one host read per round.
    """
    if ballots.dim() != 2 or (ballots.numel() and ballots.shape[1] != num_experts):
        raise ValueError(f"ballots must be [tokens, {num_experts}], got {tuple(ballots.shape)}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in 1..{num_experts}, got {topk}")
    dev = ballots.device
    e = num_experts
    alive = torch.ones(e, dtype=torch.bool, device=dev)
    ids = torch.arange(e, device=dev)
    big = torch.iinfo(torch.int64).max
    t = ballots.shape[0]
    if t == 0:
        votes = torch.zeros(e, dtype=torch.int64, device=dev)
    else:
        votes = torch.bincount(ballots[:, :topk].reshape(-1).long(), minlength=e)
        pos = _inverse_positions(ballots)
        thr = torch.full((t,), topk - 1, dtype=torch.int32, device=dev)
    order = []
    for _ in range(e):
        key = torch.where(alive, votes * e + ids, torch.full_like(votes, big))
        loser = int(torch.argmin(key))
        order.append(loser)
        alive[loser] = False
        if t == 0 or not bool(alive.any()):
            continue
        hit = (pos[:, loser].to(torch.int32) <= thr).nonzero().squeeze(1)  # ballots that voted for it
        cand = thr[hit] + 1
        while hit.numel():
            inside = cand < e
            hit, cand = hit[inside], cand[inside]  # ballots past their end have no further choice
            if not hit.numel():
                break
            expert = ballots[hit, cand.long()].long()
            ok = alive[expert]
            votes += torch.bincount(expert[ok], minlength=e)
            thr[hit[ok]] = cand[ok]
            hit, cand = hit[~ok], cand[~ok] + 1
    return torch.tensor(order, dtype=torch.int64)
