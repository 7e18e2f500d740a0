"""Native CPU kernels: fused, vectorised loops for the element-wise hyperbolic layer maths.

Eager PyTorch runs each element-wise operation as its own pass over memory; a Poincaré layer's
tangent maths is ~50 of them. The kernels here (C++ with ATen's SIMD ``Vectorized`` types and
SLEEF transcendental functions, parallel over batch and pixel blocks) do the work of one layer in
two or three passes over its activations. They are compiled on first use with
:func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ``ninja``; the build is cached
in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for the SIMD level that
PyTorch itself detected. When they cannot be built, or with ``POINCARE_RESNET_NATIVE=0``, the
layers use their pure-PyTorch closed forms, which compute the same values (the tests compare
both).

Why not ``torch.compile``: on CPU, inductor's code for these layers (channel reductions in NCHW
next to transcendental chains) measured slower than the hand-written backward passes here.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_enabled = os.environ.get("POINCARE_RESNET_NATIVE", "1").lower() not in ("0", "false", "off", "")

_ARCH_FLAGS = {
    "AVX512": (["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "AVX512"),
    "AVX2": (["-mavx2", "-mfma"], "AVX2"),
}


def native_enabled() -> bool:
    """Whether the native kernels are allowed (they are still built lazily).

    Returns
    -------
    bool
        The switch of :func:`set_native` (initially ``POINCARE_RESNET_NATIVE``, read at import).
    """
    return _enabled


def set_native(enabled: bool) -> None:
    """Allow (``True``, default) or forbid the native CPU kernels (process-wide).

    A ``torch.compile`` graph traced before the change recompiles on its next call (dynamo
    guards the switch); a recorded autograd graph still runs its backward with the kernels it
    was built with (:func:`require_kernel`).

    Parameters
    ----------
    enabled : bool
        ``False`` sends every map to the PyTorch path.
    """
    global _enabled
    _enabled = bool(enabled)


def kernel_loaded(name: str) -> bool:
    """Whether ``name`` has been built and loaded in this process (no build is attempted)."""
    return _enabled and _modules.get(name) is not None


@torch.compiler.assume_constant_result
def native_available(name: str) -> bool:
    """Whether kernel ``name`` can run (building it on first use). Under ``torch.compile`` the
    call runs once at trace time and its answer is a constant of the compiled graph.

    Parameters
    ----------
    name : str
        ``"fc"``, ``"batchnorm"`` or ``"residual"`` (a source ``_cpp/<name>.cpp``).

    Returns
    -------
    bool
    """
    return load_kernel(name) is not None


def require_kernel(name: str) -> ModuleType:
    """The built module ``name`` for an op about to run it (also after ``set_native(False)``,
    so that a graph recorded with the native kernels can still run its backward)."""
    module = _modules.get(name) or load_kernel(name)
    if module is None:
        raise RuntimeError(f"native kernel {name!r} is not available")
    return module


def _build_flags() -> tuple[list[str], str]:
    capability = torch.backends.cpu.get_cpu_capability()
    flags, tag = _ARCH_FLAGS.get(capability, ([], "DEFAULT"))
    cflags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast"]
    if tag != "DEFAULT":
        cflags += flags + [f"-DCPU_CAPABILITY={tag}", f"-DCPU_CAPABILITY_{tag}"]
    return cflags, tag.lower()


def load_kernel(name: str) -> ModuleType | None:
    """Build (once, cached) and return the extension ``poincare_resnet/_cpp/{name}.cpp``.

    Parameters
    ----------
    name : str
        The kernel's source name (see :func:`available_kernels`).

    Returns
    -------
    ModuleType or None
        The loaded extension; ``None`` (after one warning) when it cannot be built or the
        native kernels are off.
    """
    if not _enabled:
        return None
    if name in _modules:
        return _modules[name]
    with _lock:
        if name in _modules:
            return _modules[name]
        module = None
        try:
            from torch.utils import cpp_extension

            source = _HERE / f"{name}.cpp"
            cflags, tag = _build_flags()
            headers = [h.read_text() for h in sorted(_HERE.glob("*.h"))]  # shared includes
            key = "|".join([source.read_text(), *headers, *cflags, torch.__version__])
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            module = cpp_extension.load(
                name=f"poincare_resnet_{name}_{tag}_{digest}",
                sources=[str(source)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, unsupported platform
            warnings.warn(
                f"poincare_resnet: native kernel {name!r} unavailable, using the PyTorch path "
                f"({type(exc).__name__}: {str(exc)[:300]})",
                stacklevel=2,
            )
        _modules[name] = module
        return module


def native_op(name: str, schema: str):
    """``torch.library.custom_op("poincare_resnet::<name>")`` with an explicit ``schema`` (so
    that the scalar arguments several ops share are written once, as a schema fragment) and no
    mutated arguments: the decorator of every native op in ``*_ops.py``."""
    return torch.library.custom_op(f"poincare_resnet::{name}", mutates_args=(), schema=schema)


def scalar_arg(t: torch.Tensor, name: str) -> float:
    """The value of a one-element tensor argument of an op (``ValueError`` for another size).

    Scalars that are tensors in the model (the batch-norm ``weight``, the rescale ``r``, the
    residual scale ``alpha``) travel into the ops as tensors and are read here, inside the op,
    so that a traced program has no host reads."""
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return float(t.reshape(-1)[0])


def check_same_device(op: str, lead: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first tensor in ``tensors`` on another device than the
    one named ``lead``: the custom ops' fake (meta) implementations run this, since a meta
    tensor among CPU ones sends the op there instead of to the kernel's own checks."""
    device = tensors[lead].device
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (that of {lead})")


def available_kernels() -> list[str]:
    """Names of the native kernel sources shipped with the package."""
    return sorted(p.stem for p in _HERE.glob("*.cpp"))


def build_all(strict: bool = False) -> dict[str, bool]:
    """Build every native kernel now (instead of on first use).

    Parameters
    ----------
    strict : bool
        Raise ``RuntimeError`` naming the kernels that could not be built.

    Returns
    -------
    dict
        ``{name: built}`` for every shipped kernel.
    """
    built = {name: load_kernel(name) is not None for name in available_kernels()}
    if strict and not all(built.values()):
        missing = ", ".join(name for name, ok in built.items() if not ok)
        raise RuntimeError(f"native kernels could not be built: {missing} (see the warnings)")
    return built
