"""A pool of persistent gloo worker processes for distributed checks on CPU.

Spawning processes and importing Megatron-Core costs seconds; a pool is started once and reused
for many checks. Each check is a module-level function ``fn(*args, **kwargs)`` run on every rank
at once (so it may issue collectives over the default group); the pool returns the per-rank
results in rank order, or raises :class:`WorkerError` with every failing rank's traceback.

Inside a check, :func:`megatron_prune.megatron.model.initialize_parallel` sets the parallel layout;
the pool tears Megatron's parallel state down after each check.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import traceback
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp

__all__ = ["WorkerPool", "WorkerError", "get_rank", "get_world_size"]


class WorkerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_rank() -> int:
    return torch.distributed.get_rank()


def get_world_size() -> int:
    return torch.distributed.get_world_size()


def _worker_main(rank: int, world_size: int, port: int, tasks, results, threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        from megatron_prune.testing.megatron_cpu import apply_cpu_workarounds

        apply_cpu_workarounds()
    except BaseException:  # pragma: no cover - start-up failure is reported to the parent
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            out = fn(*args, **kwargs)
            results.put((rank, True, out))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            _release_groups()
    torch.distributed.destroy_process_group()


def _release_groups() -> None:
    """Tear down Megatron's parallel state and every process group a check created.

    ``destroy_model_parallel`` only forgets Megatron's groups; each gloo group keeps its
    sockets and threads, so a long-lived worker would gather thousands of them over a test
    session (measured: 2,000 threads and 3,000 file descriptors per worker after a few
    minutes) until a collective stalls.
    """
    from megatron_prune.megatron.model import _current_groups, _destroy_groups, destroy_parallel

    try:
        destroy_parallel()
    except Exception:  # pragma: no cover
        pass
    world = torch.distributed.distributed_c10d._get_default_group()
    _destroy_groups([g for g in _current_groups() if g is not world])


class WorkerPool:
    """``world_size`` gloo processes that run checks together."""

    def __init__(self, world_size: int, timeout: float = 600.0, threads: int = 1):
        self.world_size = world_size
        self.timeout = timeout
        for attempt in range(3):
            self._start(threads)
            try:
                self._collect("start-up")
                return
            except WorkerError as exc:
                # another process may take the chosen port between probing and binding
                if "EADDRINUSE" not in str(exc) or attempt == 2:
                    raise
                self.close(force=True)

    def _start(self, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, self.world_size, port, self._tasks[r], self._results, threads),
                daemon=False,  # checkpoint saving starts a multiprocessing manager
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        atexit.register(self.close, force=True)
        self.broken = False

    def _collect(self, what: str) -> list:
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(out) + len(errors) < self.world_size:
            # Once a rank failed, the others may be stuck in a collective it never entered.
            wait = min(self.timeout, 30.0) if errors else self.timeout
            try:
                rank, ok, value = self._results.get(timeout=wait)
            except queue.Empty:
                self.broken = True
                self.close(force=True)
                if not errors:
                    raise WorkerError(f"{what}: a worker gave no answer within {wait:.0f}s") from None
                break
            (out if ok else errors)[rank] = value
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise WorkerError(f"{what} failed on rank(s) {sorted(errors)}:\n{text}")
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; per-rank results in rank order."""
        if self.broken:
            raise WorkerError("the worker pool is broken (an earlier check hung)")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__qualname__", str(fn)))

    def close(self, force: bool = False) -> None:
        if not any(p.is_alive() for p in self._procs):
            return
        if not force:
            for q in self._tasks:
                try:
                    q.put(None)
                except Exception:  # pragma: no cover
                    pass
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def maybe_barrier(group: Optional[Any] = None) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)
