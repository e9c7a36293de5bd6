"""megatron_prune: activation-based importance estimation and pruning inside Megatron-Core.

Layers, with one-way imports:

* ``megatron_prune.math``: pure tensor functions (no distributed, no Megatron).
* ``megatron_prune.distributed``: reductions of statistics over explicit process groups.
* ``megatron_prune.hooks``: the hook contract and plain-torch hooks.
* ``megatron_prune.megatron``: adapters for Megatron-Core modules (the only code that imports
  ``megatron.core``).
* ``megatron_prune.scoring``: a session that owns hook handles.
* ``megatron_prune.masks`` / ``megatron_prune.convert``: the offline planner and converter.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
