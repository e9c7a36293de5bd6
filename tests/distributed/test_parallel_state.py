"""Re-initialising the parallel layout does not leak process groups (each gloo group holds
sockets and threads), and groups created by the caller are left alone."""

import os

from megatron_prune.model_config import ParallelLayout


def _threads_and_groups():
    from torch.distributed import distributed_c10d as c10d

    return len(os.listdir(f"/proc/{os.getpid()}/task")), len(c10d._world.pg_map)


def w_reinit(rounds):
    import torch

    from megatron.core import parallel_state as ps

    from megatron_prune.megatron.model import destroy_parallel, initialize_parallel

    mine = torch.distributed.new_group([0, 1], backend="gloo")
    layouts = [ParallelLayout(tp=2), ParallelLayout(ep=2), ParallelLayout(pp=2), ParallelLayout()]
    seen = []
    for i in range(rounds):
        initialize_parallel(layouts[i % len(layouts)])
        t = torch.ones(2)
        torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        seen.append(_threads_and_groups())
    destroy_parallel()
    after = _threads_and_groups()
    t = torch.ones(2)
    torch.distributed.all_reduce(t, group=mine)  # the caller's own group still works
    return seen, after, t.tolist()


def test_reinitialising_does_not_leak_groups(pool2):
    for seen, after, t in pool2.run(w_reinit, 12):
        assert t == [2.0, 2.0]
        # rounds 4..11 repeat rounds 0..3 layout for layout: same threads and groups
        assert [s[1] for s in seen[4:8]] == [s[1] for s in seen[8:]] == [s[1] for s in seen[:4]], seen
        assert max(s[0] for s in seen[4:]) <= max(s[0] for s in seen[:4]) + 2, seen
        # only the default group and the caller's group are left
        assert after[1] == 2, after
