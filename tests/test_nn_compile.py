"""Every Poincaré layer works under ``torch.compile`` with the default (inductor) backend.

One residual block, compiled once for a train step (forward + backward), compared with eager
over two steps (the eval path is checked under ``aot_eager`` in ``test_nn.py``). Inductor's C++
is generated without SIMD (``cpp.vec_isa_ok=False``): the same graphs, lowerings and fusions,
but g++ builds the kernels in ~30-50 s instead of ~100-130 s on a shared 2-core machine with a
cold cache (a warm ``/tmp/torchinductor_*`` cache takes ~10 s either way).
"""

from __future__ import annotations

import copy

import torch
import torch._inductor.config
from torch import nn

from poincare_resnet.nn import (
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareResidual,
    TangentReLU,
)


class _Block(nn.Module):
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


@torch._inductor.config.patch({"cpp.vec_isa_ok": False})
def test_block_compiled_with_inductor_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Block()
    with torch.no_grad():  # non-trivial BN parameters
        for bn in (eager.bn1, eager.bn2):
            bn.weight.fill_(1.5)
            bn.bias.normal_(0.0, 0.3)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)  # default backend: inductor
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4, 4, 8, 8, generator=gen)
    g = torch.randn(4, 4, 8, 8, generator=gen)

    for step in range(2):  # the second step reuses the compiled graphs (running stats updated)
        u_e, u_c = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
        out_e, out_c = eager(u_e), compiled(u_c)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        (out_e * g).sum().backward()
        (out_c * g).sum().backward()
        torch.testing.assert_close(u_c.grad, u_e.grad, rtol=1e-4, atol=1e-4)
        for (name, p_e), p_c in zip(
            eager.named_parameters(), compiled_module.parameters(), strict=True
        ):
            torch.testing.assert_close(
                p_c.grad, p_e.grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
            )
        u = u * 0.5 + 0.1 * step

    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_module.buffers(), strict=True):
        torch.testing.assert_close(
            b_c, b_e, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert int(compiled_module.bn1.num_batches_tracked) == 2
