"""``conv_norm`` under ``torch.compile``: the compiled graph recomputes the FC output ``y`` in
batch norm's backward instead of keeping it (selective activation checkpointing,
``nn/_compile_recompute.py``), with the values and gradients of eager.

The compiled graphs are AOT autograd's with inductor's decompositions and min-cut partitioner
(what inductor partitions, without its code generation: seconds to compile), run as they are;
the bytes counted are those of the tensors the forward graph hands to the backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config
from _helpers import compile_counting_saved, native_switch
from torch import nn

from poincare_resnet.nn import (
    PoincareBatchNorm2d,
    PoincareConv2d,
    TangentReLU,
    conv_norm,
    fc_recompute_enabled,
    set_fc_recompute,
)
from poincare_resnet.nn.compile import PARTITIONER_OPTIONS


class _Pair(nn.Module):
    """``ReLU(BN(conv(u)))`` through :func:`conv_norm`."""

    def __init__(self, cin: int = 4, cout: int = 6, c: float = 0.7) -> None:
        super().__init__()
        self.conv = PoincareConv2d(cin, cout, 3, padding=1, c=c, init="hnn")
        self.bn = PoincareBatchNorm2d(cout, c=c)
        self.relu = TangentReLU()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.relu(conv_norm(self.conv, self.bn, u))


def _step(module: nn.Module, u: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Output and input gradient of one step ``(module(u) · g).sum()``; the parameters' gradients
    accumulate."""
    u = u.clone().requires_grad_(True)
    out = module(u)
    (out * g).sum().backward()
    return [out.detach(), u.grad]


def _grads_and_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters()] + [b.float() for b in module.buffers()]


def _compiled_vs_eager(
    recompute: bool, dtype: torch.dtype, c: float = 0.7
) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
    """Saved bytes of the compiled pair (recompute on or off) and the compiled and eager
    results (output, ∂u, parameter gradients, running statistics)."""
    before = fc_recompute_enabled()
    set_fc_recompute(recompute)
    try:
        torch.manual_seed(0)
        eager = _Pair(c=c).to(dtype)
        with torch.no_grad():
            eager.bn.bias.normal_(0.0, 0.1)
            eager.bn.weight.fill_(1.3)
        compiled_module = copy.deepcopy(eager)
        compiled, saved = compile_counting_saved(compiled_module)
        gen = torch.Generator().manual_seed(1)
        u = (0.5 * torch.randn(3, 4, 5, 7, generator=gen)).to(dtype)
        g = torch.randn(3, 6, 5, 7, generator=gen).to(dtype)
        with torch._functorch.config.patch(PARTITIONER_OPTIONS):
            got = _step(compiled, u, g)
        want = _step(eager, u, g)
    finally:
        set_fc_recompute(before)
    return sum(saved), got + _grads_and_buffers(compiled_module), want + _grads_and_buffers(eager)


def _assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"#{i}: {m}")


def _fc_output_bytes(dtype: torch.dtype) -> int:
    """Bytes of the pair's FC output ``y`` ([3, 6, 5, 7])."""
    return 3 * 6 * 5 * 7 * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_compiled_native_pair_recomputes_the_fc_output(dtype):
    """Native path: the compiled graph keeps ``y`` without the recompute, and not with it
    (the saved bytes fall by at least ``y``'s); both equal eager."""
    with native_switch(True):
        on, got, want = _compiled_vs_eager(True, dtype)
        _assert_all_close(got, want, 1e-10 if dtype == torch.float64 else 1e-5)
        if dtype == torch.float32:
            return  # the float64 case counts the bytes (one more compilation)
        off, got_off, want_off = _compiled_vs_eager(False, dtype)
    _assert_all_close(got_off, want_off, 1e-10)
    assert off - on >= _fc_output_bytes(dtype), (off, on)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_compiled_torch_pair_is_not_checkpointed(dtype):
    """PyTorch path (the FC map's autograd Function traced by dynamo): equal to eager, and no
    checkpointed region (the same saved bytes with the recompute on or off: there the
    partitioner recomputes ``y`` with :data:`PARTITIONER_OPTIONS`, and checkpointing made the
    compiled ResNet-20 slower with a higher peak). ~13 s per compilation; the PyTorch path's
    compiled values are also checked by
    ``test_nn_compile.py::test_model_fullgraph_on_torch_path``."""
    with native_switch(False):
        on, got, want = _compiled_vs_eager(True, dtype)
        off, got_off, want_off = _compiled_vs_eager(False, dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _assert_all_close(got, want, tol)
    _assert_all_close(got_off, want_off, tol)
    assert on == off, (on, off)


def test_checkpointing_follows_the_native_fc_kernel():
    """The selective checkpoint applies exactly where the FC map takes the native kernel."""
    from poincare_resnet.nn._compile_recompute import _applies

    pair = _Pair()
    u = torch.randn(2, 4, 5, 5)
    with native_switch(True):
        assert _applies(pair.conv, pair.bn, u)
        assert not _applies(pair.conv, pair.bn, u.to("meta"))  # a device the kernel lacks
    with native_switch(False):
        assert not _applies(pair.conv, pair.bn, u)


@pytest.mark.slow
@torch._inductor.config.patch({"cpp.vec_isa_ok": False})
def test_resnet8_inductor_native_path_matches_eager():
    """ResNet-8 on the native path compiled by inductor (``fullgraph=True``, the checkpointed
    convolutions lowered and the recomputed FC maps in the backward): forward, gradients,
    running statistics and eval as eager (minutes with a cold inductor cache)."""
    from test_nn_compile import _check_model_compiles

    with native_switch(True):
        _check_model_compiles("poincare_resnet20", "inductor", 1e-3, depth=8)
