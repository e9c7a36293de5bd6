"""Megatron hooks on Transformer-Engine-style modules, recognised by their public attributes.

Transformer Engine cannot be installed without CUDA, so these stand-ins expose the attributes
the hooks read from ``TELayerNormColumnParallelLinear`` (``layer_norm_weight``,
``layer_norm_bias``, ``zero_centered_gamma``, ``config``) and TE row-parallel linears
(``parallel_mode == "row"``). Groups are passed explicitly (size 1), so no parallel state.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_prune.distributed.reductions import ProcessGroups
from megatron_prune.hooks.channel import IndependentChannelContributionHook, LayerNormContributionHook
from megatron_prune.megatron.hooks import (
    MegatronIndependentChannelContributionHook,
    MegatronLayerNormContributionHook,
    is_fused_norm_linear,
    is_row_parallel,
)

KW = {"process_groups": ProcessGroups()}


class LayerNormLinear(torch.nn.Module):
    def __init__(self, h, out, normalization, zero_centered):
        super().__init__()
        self.config = SimpleNamespace(normalization=normalization, layernorm_epsilon=1e-5, sequence_parallel=False)
        self.zero_centered_gamma = zero_centered
        self.layer_norm_weight = torch.nn.Parameter(torch.rand(h) + 0.5)
        self.layer_norm_bias = torch.nn.Parameter(torch.randn(h) * 0.1) if normalization == "LayerNorm" else None
        self.weight = torch.nn.Parameter(torch.randn(out, h))

    def norm(self, x):
        w = self.layer_norm_weight + (1 if self.zero_centered_gamma else 0)
        if self.config.normalization == "RMSNorm":
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            return y * w
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w, self.layer_norm_bias, 1e-5)

    def forward(self, x):
        return self.norm(x) @ self.weight.T, None


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_fused_norm_linear_scores_the_norm_output(normalization, zero_centered):
    torch.manual_seed(0)
    m = LayerNormLinear(16, 8, normalization, zero_centered)
    assert is_fused_norm_linear(m)
    hook = MegatronLayerNormContributionHook(m, KW)
    handle = m.register_forward_hook(hook)
    xs = [torch.randn(6, 2, 16) for _ in range(3)]
    with torch.no_grad():
        for x in xs:
            m(x)
    handle.remove()
    want = sum(m.norm(x).abs().double().reshape(-1, 16).mean(0) for x in xs)
    torch.testing.assert_close(hook.accumulate(), want.detach(), rtol=1e-5, atol=1e-7)
    # and the same as the plain hook on an unfused norm module producing that output
    plain = LayerNormContributionHook(torch.nn.RMSNorm(16), {})
    for x in xs:
        plain(None, (x,), m.norm(x).detach())
    torch.testing.assert_close(hook.accumulate(), plain.accumulate(), rtol=1e-5, atol=1e-7)


def test_te_row_parallel_linear_by_parallel_mode():
    lin = torch.nn.Linear(12, 4, bias=False)
    assert not is_row_parallel(lin)
    lin.parallel_mode = "row"
    assert is_row_parallel(lin)
    h = MegatronIndependentChannelContributionHook(lin, KW)
    p = IndependentChannelContributionHook(lin)
    xs = [torch.randn(5, 2, 12) for _ in range(2)]
    for x in xs:
        h(lin, (x,), lin(x))
        p(lin, (x,), lin(x))
    for k, v in p.to_dict().items():
        torch.testing.assert_close(h.to_dict()[k], v)
