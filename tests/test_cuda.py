"""GPU checks: skipped cleanly on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poincare_resnet import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_forward_backward_matches_cpu():
    torch.manual_seed(0)
    cpu = create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=8)
    gpu = create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=8)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = torch.randint(0, 10, (8,))
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    F.cross_entropy(out_cpu, y).backward()
    F.cross_entropy(out_gpu, y.cuda()).backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_cuda_bf16_autocast_trains_without_nan():
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=8).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(16, 3, 16, 16, device="cuda") * 2 - 1
    y = torch.randint(0, 10, (16,), device="cuda")
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
