"""Mixed precision: bf16 autocast keeps the hyperbolic maths in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from poincare_resnet import create_model


def _model_and_data():
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", num_classes=10, in_chans=1, depth=8)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (32,), generator=gen)
    return model, x, y


def test_bf16_logits_match_float32_at_the_start():
    model, x, _ = _model_and_data()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    # convolutions run in bf16 (8-bit mantissa), the hyperbolic maths in float32
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3


def test_bf16_autocast_trains_50_steps_without_nan():
    model, x, y = _model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]  # it actually learns the batch


def test_hyperbolic_kernels_are_upcast_under_autocast():
    from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d

    conv, bn = PoincareConv2d(2, 4, 3, padding=1), PoincareBatchNorm2d(4)
    u = torch.randn(2, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(conv(u))
    assert out.dtype == torch.float32
