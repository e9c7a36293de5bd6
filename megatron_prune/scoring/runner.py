"""The calibration loop: global batches through Megatron-Core's forward-only schedule.

Data layout: a global batch ``[G, s]`` is cut into global micro-batches of
``micro_batch_size × DP`` samples; data-parallel rank ``r`` takes rows
``[r·mbs, (r+1)·mbs)`` of each. So one hook call (one micro-batch on every DP rank) sees the
same samples at every layout with the same ``micro_batch_size × DP``, and scores do not depend on
TP, PP, EP or how DP splits that product.

Collective functions (every rank of the default group): :func:`forward_only`,
:func:`run_calibration`, :meth:`StopSignal.agreed`.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["dp_micro_shard", "forward_only", "StopSignal", "run_calibration"]


def dp_micro_shard(batch: torch.Tensor, micro_batch_size: int, dp_size: int, dp_rank: int) -> torch.Tensor:
    """This DP rank's rows of a global batch ``[G, s]`` -> ``[G / dp, s]`` (see module doc)."""
    g = batch.shape[0]
    step = micro_batch_size * dp_size
    if g % step:
        raise ValueError(f"global batch {g} is not a multiple of micro_batch_size × DP = {step}")
    return batch.view(g // step, dp_size, micro_batch_size, -1)[:, dp_rank].reshape(-1, batch.shape[1])


@torch.no_grad()
def forward_only(chunks, tokens: torch.Tensor, micro_batch_size: int) -> None:
    """Run this rank's tokens ``[b, s]`` through the model chunks with Megatron's forward-only
    pipeline schedule (outputs discarded; hooks observe the forwards)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune.megatron.model import causal_mask

    b, s = tokens.shape
    if b % micro_batch_size:
        raise ValueError(f"local batch {b} is not a multiple of micro batch {micro_batch_size}")
    device = next(chunks[0].parameters()).device
    micro = list(tokens.to(device).split(micro_batch_size))
    mask = causal_mask(s, device=device)
    pos = torch.arange(s, device=device)[None].expand(micro_batch_size, s)

    def forward_step(data_iterator, model):
        out = model(next(data_iterator), pos, mask)

        def no_loss(output_tensor, non_loss_data=False):
            return torch.zeros((), device=device), {}

        return out, no_loss

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=b // micro_batch_size,
        seq_length=s,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )


class StopSignal:
    """Turns SIGTERM/SIGINT into a request checked between global batches (handlers restored on
    :meth:`restore`). :meth:`agreed` is collective: every rank learns if any rank was signalled."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum: Optional[int] = None
        self._old = {}
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> Optional[int]:
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def run_calibration(
    session,
    chunks,
    samples: torch.Tensor,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    state_dir=None,
    save_interval: int = 0,
    progress: bool = True,
    throttle_seconds: float = 0.0,
    stop: Optional[StopSignal] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> dict:
    """Score ``samples`` ``[N, s]`` (identical on every rank) from ``session.steps`` onwards.

    Saves state every ``save_interval`` global batches and when a stop signal arrives (then
    returns early with ``"signal"`` set). Returns ``{"steps", "tokens", "signal", "seconds"}``.
    """
    from megatron.core import parallel_state as ps

    n, s = samples.shape
    if n % global_batch_size:
        raise ValueError(f"{n} samples are not a multiple of the global batch size {global_batch_size}")
    total = n // global_batch_size
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    bar = None
    if progress and rank0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=session.steps, unit="batch", file=sys.stderr, dynamic_ncols=True)
    t0, tokens0, got = time.perf_counter(), session.tokens, None
    try:
        while session.steps < total:
            k = session.steps
            batch = samples[k * global_batch_size : (k + 1) * global_batch_size]
            forward_only(chunks, dp_micro_shard(batch, micro_batch_size, dp, dp_rank), micro_batch_size)
            session.step(tokens=global_batch_size * s)
            if on_step is not None:
                on_step(session.steps)
            if throttle_seconds:
                time.sleep(throttle_seconds)
            if bar is not None:
                rate = (session.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                bar.update(1)
            got = stop.agreed() if stop is not None else None
            periodic = save_interval and session.steps % save_interval == 0 and session.steps < total
            if state_dir is not None and (got or periodic):
                session.save_state(state_dir)
            if got:
                break
    finally:
        if bar is not None:
            bar.close()
    return {"steps": session.steps, "tokens": session.tokens, "signal": got,
            "seconds": time.perf_counter() - t0, "total_steps": total}
