"""GPU checks: hooks never synchronise with the host inside a forward (skipped without CUDA)."""

import pytest
import torch

from megatron_prune.hooks import (
    IndependentChannelContributionHook,
    IndependentKvHeadContributionHook,
    L2NormHook,
    LayerNormContributionHook,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _Cfg:
    num_attention_heads, num_query_groups, kv_channels = 8, 4, 16


def test_additive_hooks_do_not_sync_and_match_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    norm = torch.nn.RMSNorm(128)
    xs = [torch.randn(32, 4, 128) for _ in range(3)]
    makers = {
        "l2": lambda: (L2NormHook(), "lin"),
        "ind": lambda: (IndependentChannelContributionHook(lin_dev), "lin"),
        "kv": lambda: (IndependentKvHeadContributionHook(lin_dev, {"config": _Cfg}), "lin"),
        "ln": lambda: (LayerNormContributionHook(norm_dev, {}), "norm"),
    }
    results = {}
    for device in ("cpu", "cuda"):
        lin_dev = lin.to(device=device, dtype=torch.bfloat16)
        norm_dev = norm.to(device=device, dtype=torch.bfloat16)
        for name, make in makers.items():
            hook, which = make()
            mod = lin_dev if which == "lin" else norm_dev
            handle = mod.register_forward_hook(hook)
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad():
                    for x in xs:
                        mod(x.to(device=device, dtype=torch.bfloat16))
            finally:
                torch.cuda.set_sync_debug_mode("default")
            handle.remove()
            results[(device, name)] = hook.accumulate().cpu()
    for name in makers:
        torch.testing.assert_close(results[("cuda", name)], results[("cpu", name)], rtol=2e-2, atol=1e-3)
