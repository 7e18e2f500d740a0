"""What the three map modules share: the Triton switch, the precision policy, the scalar checks.

Each layer map has one module that picks its implementation (:mod:`.fc_map`,
:mod:`.batchnorm_map`, :mod:`.residual_map`); every one of them tries, in order:

0. the Triton kernels (:mod:`._triton`) for CUDA tensors in eager mode, when ``triton`` is
   importable and not switched off (``POINCARE_RESNET_TRITON=0`` or :func:`set_triton`); under
   ``torch.compile`` the PyTorch path below runs instead, and inductor writes its own fused
   Triton code for it;
1. the native kernels (:mod:`poincare_resnet._cpp` through :mod:`._native_fc`,
   :mod:`._native_batchnorm`, :mod:`._native_residual`): CPU float32/float64 maps, fixed
   curvature;
2. the PyTorch path (``FullyConnectedTangent`` in :mod:`poincare_resnet.ball._autograd`,
   :mod:`._torch_batchnorm`, :mod:`._torch_residual`): autograd Functions with hand-written
   backward passes, the same algebra as the native kernels, on any device (GPUs, or the CPU with
   ``POINCARE_RESNET_NATIVE=0``), for a fixed curvature or a curvature tensor that needs no
   gradient;
3. the autograd closed forms of :mod:`._closed_forms` only where 2 does not apply: a learnable
   curvature that needs its gradient, and synchronised batch norm across processes (its
   all-reduce of the statistics is differentiable there; the Function does not all-reduce).

All compute the same values (the tests compare them). Under autocast the hyperbolic maths is
upcast to float32. Names: a map is called ``fc_tangent``, ``batchnorm`` or ``residual``
everywhere; its implementations are ``native_<map>`` (``_native_<map>.py``), ``torch_<map>``
(``_torch_<map>.py``; for the FC map ``fc_map.torch_fc_tangent``) and ``_triton.<map>``, each
with a ``<impl>_<map>_applicable`` test where one is needed.

Process-wide switches and what a compiled graph bakes in
--------------------------------------------------------
Three settings change which implementation a compiled graph holds or which constants it bakes
in, and an environment variable seeds one of them:

* :func:`poincare_resnet.ball.set_eps` (the projection ε per dtype, and with it the tangent
  radius ``artanh(1 − ε)``);
* :func:`poincare_resnet.ball.set_manual_backward` (hand-written backward passes or plain
  autograd);
* :func:`poincare_resnet._cpp.set_native`, seeded by ``POINCARE_RESNET_NATIVE`` (read once, at
  import: setting the variable later has no effect).

``torch.compile`` reads each of them while it traces, and dynamo guards the values it read:
changing one after compiling makes the next call recompile instead of running a stale graph
(``tests/test_dispatch.py`` checks each). Set them before compiling all the same: every change
costs a recompilation, and ``torch._dynamo.config.recompile_limit`` bounds how many a function
gets. Whether a native kernel *could be built* is asked once per process and kernel
(:func:`poincare_resnet._cpp.native_available`) and is a constant of the graph.
:func:`set_triton` (seeded by ``POINCARE_RESNET_TRITON``) affects eager calls only: a traced
graph never takes the Triton kernels, and is not guarded on the switch.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from . import _triton

_REDUCED = (torch.float16, torch.bfloat16)
_TRITON = {"enabled": os.environ.get("POINCARE_RESNET_TRITON", "1") != "0", "available": None}
# tests only: let CPU tensors take the Triton path under TRITON_INTERPRET=1
_TRITON_ON_CPU = False


def set_triton(enabled: bool) -> None:
    """Switch the Triton kernels of CUDA tensors on or off (process-wide).

    Parameters
    ----------
    enabled : bool
        ``True`` (the default unless ``POINCARE_RESNET_TRITON=0``) lets eager CUDA calls take
        the Triton kernels; ``False`` sends them to the PyTorch path.
    """
    _TRITON["enabled"] = bool(enabled)


def triton_enabled() -> bool:
    """Whether eager CUDA calls may take the Triton kernels (the switch of :func:`set_triton`)."""
    return bool(_TRITON["enabled"])


def use_triton(*tensors: Tensor, c, kind: str | None = None) -> bool:
    """Whether the Triton kernels take this call: enabled, eager, CUDA (or, for tests, CPU
    tensors under the interpreter), and :func:`._triton.applicable`."""
    # is_compiling first: a traced graph never takes Triton, so it must not guard on the switch
    if torch.compiler.is_compiling() or not _TRITON["enabled"]:
        return False
    t = tensors[0]
    if not (t.is_cuda or (_TRITON_ON_CPU and t.device.type == "cpu")):
        return False
    if _TRITON["available"] is None:
        _TRITON["available"] = _triton.available()
    return bool(_TRITON["available"]) and _triton.applicable(*tensors, c=c, kind=kind)


def check_scalar(value, what: str) -> None:
    """``ValueError`` unless a tensor ``value`` has one element (Python numbers pass); ``what``
    names it in the message (e.g. ``"residual: alpha"``). Reads the shape only (no host sync)."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(
            f"{what} has {value.numel()} elements (shape {tuple(value.shape)}), expected a scalar"
        )


def check_curvature(c) -> None:
    """``ValueError`` for a curvature tensor that is not a scalar."""
    check_scalar(c, "curvature c")


def full_precision(t: Tensor) -> Tensor:
    """Hyperbolic maths runs in float32 even under autocast: upcast half-precision tensors.

    Parameters
    ----------
    t : Tensor
        Any tensor.

    Returns
    -------
    Tensor
        ``t.float()`` for float16/bfloat16, else ``t`` itself.
    """
    return t.float() if t.dtype in _REDUCED else t


def no_autocast(t: Tensor) -> AbstractContextManager:
    """A context with autocast off on ``t``'s device type (the maps run at full precision)."""
    return torch.autocast(t.device.type, enabled=False)


_MAPS = {"fc_tangent": "fc_map", "batchnorm": "batchnorm_map", "residual": "residual_map"}


def __getattr__(name: str):
    """Deprecated: ``_dispatch.fc_tangent``, ``.batchnorm`` and ``.residual`` now live in
    :mod:`.fc_map`, :mod:`.batchnorm_map` and :mod:`.residual_map` (kept here as aliases)."""
    if name in _MAPS:
        import importlib

        return getattr(importlib.import_module(f".{_MAPS[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
