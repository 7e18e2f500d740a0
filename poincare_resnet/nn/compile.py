"""``torch.compile`` settings for Poincaré models on the PyTorch path (native kernels off).

Two defaults of the compiler stack cost a Poincaré model much more than a Euclidean one:

* **Inductor's layout optimisation** (``layout_optimization``) stores every convolution output
  channels-last on the CPU. The Poincaré layers then read their ``[B, C, H·W]`` maps with the
  channels innermost: the per-pixel channel reductions become horizontal ones, the
  ``[K, C] @ [B, C, P]`` products strided, and with 8 channels half of each 16-lane vector is
  empty. Off, a compiled Poincaré block (16×16, batch 16, forward + backward, one thread,
  best of 30 steps on a loaded machine) took 0.64–0.77× the time with 8 channels, 0.91× with 16.
* **The min-cut partitioner's recompute bans** (``torch._functorch.config``). The hand-written
  backward passes recompute their intermediates from the saved inputs; in AOT autograd's joint
  graph those recomputations are the same expressions as the forward's and are merged with them,
  and the partitioner then decides per tensor whether to save or recompute. Its bans on
  recomputing a tensor that the backward materialises (a matmul input), that ends a long
  fusible chain or that is used far apart make it save the batch norm's centred map
  ``d = x − μ``, the FC map's ``√(1 + q²)`` and more: the compiled ResNet-8 (8-16-32) saved
  3.0× the Euclidean model's bytes, 1.35× with the bans lifted (eager: 1.78× peak memory;
  lifted for the Euclidean model too, its saved bytes fall to 0.60×).

:data:`INDUCTOR_OPTIONS` and :data:`PARTITIONER_OPTIONS` lift both; :func:`compile_model` applies
them (the partitioner options only while a graph is compiled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["INDUCTOR_OPTIONS", "PARTITIONER_OPTIONS", "compile_model"]

# passed as ``torch.compile(..., options=INDUCTOR_OPTIONS)``
INDUCTOR_OPTIONS: dict[str, Any] = {"layout_optimization": False}

# ``torch._functorch.config`` values used while a graph is partitioned
PARTITIONER_OPTIONS: dict[str, Any] = {
    "ban_recompute_materialized_backward": False,
    "ban_recompute_long_fusible_chains": False,
    "ban_recompute_used_far_apart": False,
}


def compile_model(model: torch.nn.Module, **kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(model, **kwargs)`` with :data:`INDUCTOR_OPTIONS` (for the inductor
    backend) and :data:`PARTITIONER_OPTIONS` in force whenever the model is (re)compiled.

    Parameters
    ----------
    model : torch.nn.Module
        The model (any; the options matter for Poincaré layers on the PyTorch path).
    **kwargs
        Further ``torch.compile`` arguments (``fullgraph``, ``backend``, ``options``: its entries
        override :data:`INDUCTOR_OPTIONS`).

    Returns
    -------
    callable
        Calls the compiled model under ``torch._functorch.config.patch(**PARTITIONER_OPTIONS)``
        (a Python-level switch: no tensor work, no host synchronisation).
    """
    backend = kwargs.get("backend", "inductor")
    if backend == "inductor":
        kwargs["options"] = {**INDUCTOR_OPTIONS, **(kwargs.get("options") or {})}
    compiled = torch.compile(model, **kwargs)

    def run(*args: Any, **kw: Any) -> Any:
        with torch._functorch.config.patch(PARTITIONER_OPTIONS):
            return compiled(*args, **kw)

    run.compiled = compiled  # type: ignore[attr-defined]
    return run
