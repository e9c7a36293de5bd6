"""Process-local workarounds that let Megatron-Core (0.14-0.16) run on CPU with gloo.

This is support code for tests, the demo and CPU runs of the CLI. It is **never** applied on
import of the library: callers invoke :func:`apply_cpu_workarounds` explicitly, and it does
nothing when CUDA is available.

What it changes (each measured to break on CPU with megatron-core 0.16.1):

* ``torch.cuda.current_device()`` returns the CPU device (rotary embeddings, the global memory
  buffer, the router move their tensors there).
* ``device="cuda"`` literals in ``pipeline_parallel/schedules.py`` and
  ``transformer/utils.py`` are redirected to CPU through a thin proxy of the ``torch`` module
  seen by those two modules.
* ``torch.cuda.synchronize()`` becomes a no-op (asynchronous checkpoint save path).
* ``moe_utils.te_general_gemm`` is set to ``None`` when Transformer Engine is absent (a
  ``NameError`` in that release).
* The model-parallel RNG tracker is created as the inference tracker, whose ``fork()`` is a
  null context (core attention enters it).

Sequence parallelism needs a norm that accepts ``sequence_parallel``; :class:`SequenceParallelTorchNorm`
is that norm (``megatron_prune.megatron.model.TorchNorm``), used by the model builder.
"""

from __future__ import annotations

import functools
import types

import torch

__all__ = ["apply_cpu_workarounds", "cpu_workarounds_applied", "SequenceParallelTorchNorm"]

_APPLIED = False


def cpu_workarounds_applied() -> bool:
    return _APPLIED


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int):
        return "cpu"
    return device


class _TorchOnCpu(types.ModuleType):
    """A stand-in for the ``torch`` module whose tensor factories map CUDA devices to CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "triu", "tril", "rand", "randn")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


def apply_cpu_workarounds() -> bool:
    """Patch the CUDA-only spots of Megatron-Core for this process; returns whether it patched.

    Idempotent. Does nothing (returns ``False``) when CUDA is available. Must run before a model
    is built.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]

    proxy = _TorchOnCpu()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    schedules.torch = proxy
    transformer_utils.torch = proxy

    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _APPLIED = True
    return True


from megatron_prune.megatron.model import TorchNorm as SequenceParallelTorchNorm  # noqa: E402
