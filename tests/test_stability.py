"""No NaN/Inf over 200 float32 train steps on random data at learning rate 1e-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from poincare_resnet import create_model


def test_200_steps_random_data_lr_1e2_stay_finite():
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.rand(16, 3, 8, 8, generator=gen) * 2 - 1
        y = torch.randint(0, 10, (16,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    state = model.state_dict().values()
    assert all(torch.isfinite(t).all() for t in state if t.is_floating_point())
