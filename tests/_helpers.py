"""Helpers several test files share (imported as ``_helpers``: pytest puts ``tests/`` on
``sys.path``): batch-norm cases, a small Poincaré residual block, the tiny training run,
comparisons of checkpoint weights."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from poincare_resnet import _cpp, ball
from poincare_resnet.ball import get_eps, max_tangent_radius
from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d, PoincareResidual, TangentReLU
from poincare_resnet.training.checkpoint import load_checkpoint
from poincare_resnet.training.trainer import TrainConfig

F64 = torch.float64


@contextlib.contextmanager
def native_switch(enabled: bool) -> Iterator[None]:
    """The native kernels switched on or off (``_cpp.set_native``) inside the block."""
    previous = _cpp.native_enabled()
    _cpp.set_native(enabled)
    try:
        yield
    finally:
        _cpp.set_native(previous)


def model_meta(model: nn.Module, dataset: str = "digits", dtype: str = "float32") -> dict:
    """A checkpoint's ``meta`` for a registry ``model``: its name, kwargs and config."""
    return {
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "model_config": model.model_config,
        "dataset": dataset,
        "dtype": dtype,
    }


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bn_inputs(shape, c, scale, dtype, seed, train, equal=False):
    """``(v, bias, weight, μ, σ², grad)`` of a batch-norm case: ``v`` of scale ``scale/√c``,
    running statistics only in eval mode (``train`` false); ``equal``: every position the same
    point, ``x = μ``."""
    g = gen(seed)
    v = torch.randn(shape, generator=g, dtype=F64) * (scale / math.sqrt(c))
    if equal:
        v = v[:1, :, :1, :1].expand(shape).contiguous()
    bias = torch.randn(shape[1], generator=g, dtype=F64) * 0.4
    weight = torch.tensor([1.3], dtype=F64)
    mu = var = None
    if not train:
        mu = ball.expmap0(torch.randn(shape[1], generator=g, dtype=F64) * 0.6, c=c).to(dtype)
        var = torch.tensor([0.7], dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    return v.to(dtype), bias.to(dtype), weight.to(dtype), mu, var, grad


def bn_run(fn, v, bias, weight, mu, var, grad, c, like=None, grad_mu=False):
    """``fn``'s ``(out, μ, σ², ∂v, ∂bias, ∂weight[, ∂μ])`` and its count ``N`` (``None`` with
    running statistics); ``like``: the dtype whose eps and clip radius to use; ``grad_mu``: also
    the gradient of a given μ."""
    v, bias, weight = (t.clone().requires_grad_(True) for t in (v, bias, weight))
    if grad_mu and mu is not None:
        mu = mu.clone().requires_grad_(True)
    like = v.dtype if like is None else like
    out, m, s2, n = fn(v, mu, bias, weight, var, c, 1e-5, get_eps(like), max_tangent_radius(like))
    (out * grad).sum().backward()
    count = None if n is None else float(n.detach())
    res = [out.detach(), m.detach(), s2.detach(), v.grad, bias.grad, weight.grad]
    return res + ([mu.grad] if grad_mu and mu is not None else []), count


# 96 images, batch 32: 3 steps per epoch, 6 steps in all
TINY = dict(dataset="digits", limit_train=96, batch_size=32, epochs=2, progress=False, log_every=1)


class PoincareBlock(nn.Module):
    """conv → BN → ReLU → conv → BN, Poincaré residual, ReLU."""

    def __init__(self, ch: int = 4, c: float = 0.1) -> None:
        super().__init__()
        self.conv1 = PoincareConv2d(ch, ch, 3, padding=1, c=c, init="hnn")
        self.bn1 = PoincareBatchNorm2d(ch, c=c)
        self.relu1 = TangentReLU()
        self.conv2 = PoincareConv2d(ch, ch, 3, padding=1, c=c, init="hnn")
        self.bn2 = PoincareBatchNorm2d(ch, c=c)
        self.res = PoincareResidual(c=c)
        self.relu2 = TangentReLU()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        f = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(u)))))
        return self.relu2(self.res(f, u))


def compile_counting_saved(module: nn.Module) -> tuple[nn.Module, list[int]]:
    """``module`` compiled (``fullgraph=True``) by AOT autograd with inductor's decompositions
    and min-cut partitioner, the graphs run as traced (no code generation); and the list that
    receives, per compiled graph, the bytes its forward hands to the backward (the saved
    tensors and the outputs)."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    saved: list[int] = []

    def fw_compiler(gm, _):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        vals = [n.meta.get("val") for n in outputs if isinstance(n, torch.fx.Node)]
        saved.append(sum(v.numel() * v.element_size() for v in vals if torch.is_tensor(v)))
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=fw_compiler,
            bw_compiler=lambda g, _: make_boxed_func(g),
            partition_fn=min_cut_rematerialization_partition,
            decompositions=select_decomp_table(),
        )

    torch._dynamo.reset()
    return torch.compile(module, backend=backend, fullgraph=True), saved


def tiny_config(out: Path, **overrides) -> TrainConfig:
    """The tiny run (:data:`TINY`) into directory ``out``, with ``overrides``."""
    return TrainConfig(**{**TINY, "out": str(out), **overrides})


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint file."""
    return load_checkpoint(path).model_state


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Both states hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
