"""Shared fixtures: persistent gloo worker pools (started once per test session)."""

import os
import shutil
import tempfile

# Distributed tests run 2 to 4 processes (and torchrun children) on a 2-core machine: one
# intra-op thread each, or OpenMP spin-waiting multiplies the run time.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402


class _LazyPool:
    """A worker pool started on first use and restarted if an earlier check broke it."""

    def __init__(self, size):
        self.size = size
        self.world_size = size
        self._pool = None

    def run(self, fn, *args, **kwargs):
        from megatron_prune.testing.workers import WorkerPool

        if self._pool is None or self._pool.broken:
            self._pool = WorkerPool(self.size, timeout=float(os.environ.get("MP_TEST_TIMEOUT", 600)))
        return self._pool.run(fn, *args, **kwargs)

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool = None


_POOLS = {2: _LazyPool(2), 4: _LazyPool(4)}


def pytest_unconfigure(config):
    for pool in _POOLS.values():
        pool.close()


@pytest.fixture(scope="session")
def pool2():
    """Two gloo CPU workers (reused across tests; `.run(fn, *args)` runs fn on every rank)."""
    return _POOLS[2]


@pytest.fixture(scope="session")
def pool4():
    """Four gloo CPU workers (reused across tests)."""
    return _POOLS[4]


@pytest.fixture(scope="session")
def session_tmp():
    d = tempfile.mkdtemp(prefix="mp_tests_")
    yield d
    shutil.rmtree(d, ignore_errors=True)
