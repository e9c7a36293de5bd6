"""Shared fixtures: persistent gloo worker pools (started once per test session)."""

import os
import shutil
import tempfile

import pytest


def _pool(request, size):
    from megatron_prune.testing.workers import WorkerPool

    pools = request.config._mp_pools
    pool = pools.get(size)
    if pool is None or pool.broken:
        pool = WorkerPool(size, timeout=float(os.environ.get("MP_TEST_TIMEOUT", 600)))
        pools[size] = pool
    return pool


def pytest_configure(config):
    config._mp_pools = {}


def pytest_unconfigure(config):
    for pool in getattr(config, "_mp_pools", {}).values():
        pool.close()


@pytest.fixture
def pool2(request):
    """Two gloo CPU workers (reused across tests)."""
    return _pool(request, 2)


@pytest.fixture
def pool4(request):
    """Four gloo CPU workers (reused across tests)."""
    return _pool(request, 4)


@pytest.fixture(scope="session")
def session_tmp():
    d = tempfile.mkdtemp(prefix="mp_tests_")
    yield d
    shutil.rmtree(d, ignore_errors=True)
