"""GPU checks: skipped cleanly on machines without CUDA (the gpu_check CPU smoke mode runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _cli_helpers import autocast_adam_steps, one_epoch_digits

from poincare_resnet import create_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parents[1]


def _gpu_check(
    tmp_path: Path, *args: str, timeout: int = 900
) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, out


def test_gpu_check_cpu_smoke_mode(tmp_path):
    proc, out = _gpu_check(tmp_path, "--device", "cpu", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["mode"] == "cpu smoke" and table["failed"] == []
    names = {(r["section"], r["name"]) for r in table["rows"]}
    assert ("layers", "PoincareBatchNorm2d train") in names
    assert ("layers", "poincare_resnet20 depth 8") in names
    for model in ("poincare_resnet20", "euclidean_resnet20"):
        for precision in ("fp32", "bf16", "fp16"):
            assert ("train", f"{model} {precision}") in names
    assert any(r["section"] == "triton" for r in table["rows"])
    layers = [r for r in table["rows"] if r["section"] == "layers"]
    assert all(r["value_rel_err"] <= 1e-4 and r["grad_rel_err"] <= 1e-3 for r in layers)
    assert "| name |" in proc.stdout


def test_gpu_check_without_cuda_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, out = _gpu_check(tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "CUDA is not available on this machine" in proc.stderr and "--device cpu" in proc.stderr
    assert not out.exists()


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _fake_triton(residual_error: float) -> types.ModuleType:
    """A stand-in for poincare_resnet.nn._triton: the PyTorch path, residual perturbed."""
    from poincare_resnet import ball
    from poincare_resnet.nn import _closed_forms

    fake = types.ModuleType("poincare_resnet.nn._triton")
    fake.available = lambda: True
    fake.applicable = lambda *tensors: True
    fake.fc_tangent = lambda dots, sq, znorm, bias, c, dim: ball.fc_tangent(
        dots, sq, znorm, bias, c=c, dim=dim
    )
    fake.batchnorm = lambda *args: _closed_forms.batchnorm_forward(*args, None)
    fake.residual = lambda *args: _closed_forms.residual_forward(*args) * (1 + residual_error)
    return fake


@pytest.mark.parametrize("error", [0.0, 1e-3])
def test_gpu_check_compares_triton_kernels_with_the_pytorch_path(error, monkeypatch):
    gpu_check = _load_gpu_check()
    monkeypatch.setitem(sys.modules, "poincare_resnet.nn._triton", _fake_triton(error))
    rows = {r["name"]: r for r in gpu_check.check_triton(torch.device("cpu"), gpu_check.SMOKE)}
    assert set(rows) == {"fc_tangent", "batchnorm", "residual"}
    for name in ("fc_tangent", "batchnorm"):
        assert rows[name]["ok"] and rows[name]["value_rel_err"] == 0.0, rows[name]
        assert rows[name]["grad_rel_err"] == 0.0
    residual = rows["residual"]
    assert residual["value_rel_err"] == pytest.approx(error, rel=1e-3, abs=1e-12)
    assert residual["ok"] == (error == 0.0)


@needs_cuda
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


@needs_cuda
def test_cuda_bf16_autocast_trains_without_nan():
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=8).cuda()
    x = torch.rand(16, 3, 16, 16, device="cuda") * 2 - 1
    y = torch.randint(0, 10, (16,), device="cuda")
    for loss in autocast_adam_steps(model, x, y, 20, "cuda"):
        assert torch.isfinite(loss)


# ------------------------------------------------------------------ mixed precision, no syncs


def _cuda_cfg(out, **overrides):
    from poincare_resnet.training.trainer import TrainConfig

    base = one_epoch_digits(limit_train=128, log_every=1000, device="cuda", out=str(out))
    return TrainConfig(**{**base, **overrides})


@needs_cuda
@pytest.mark.parametrize(
    "precision,policy", [("fp32", "stop"), ("bf16", "stop"), ("fp16", "stop"), ("fp16", "skip")]
)
def test_cuda_training_steps_do_not_synchronise(precision, policy, tmp_path, monkeypatch):
    """Every training step runs under ``set_sync_debug_mode("error")``: a host sync raises."""
    from poincare_resnet.training import trainer

    original = trainer.train_step
    steps = []

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        steps.append(1)
        return out

    monkeypatch.setattr(trainer, "train_step", strict)
    cfg = _cuda_cfg(tmp_path / "run", precision=precision, nan_policy=policy, grad_clip=1.0)
    summary = trainer.train(cfg, log=lambda _m: None)
    assert len(steps) == 4 and 0.0 <= summary["test_top1"] <= 1.0


@needs_cuda
def test_cuda_fp16_resume_restores_the_scaler_state(tmp_path):
    from poincare_resnet.training.checkpoint import load_checkpoint
    from poincare_resnet.training.trainer import TrainConfig, train

    a, b = tmp_path / "a", tmp_path / "b"
    train(_cuda_cfg(a, precision="fp16", ckpt_every_steps=1), log=lambda _m: None)
    train(_cuda_cfg(b, precision="fp16", ckpt_every_steps=1, max_steps=2), log=lambda _m: None)
    train(TrainConfig(progress=False), resume=str(b), log=lambda _m: None)
    ca = load_checkpoint(a / "checkpoints" / "ckpt-00000004.safetensors")
    cb = load_checkpoint(b / "checkpoints" / "ckpt-00000004.safetensors")
    assert ca.scaler_state == cb.scaler_state and ca.scaler_state["_growth_tracker"] > 0
    wa = load_checkpoint(a / "last.safetensors").model_state
    wb = load_checkpoint(b / "last.safetensors").model_state
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_cuda
def test_gpu_check_runs_on_cuda(tmp_path):
    proc, out = _gpu_check(tmp_path, "--no-compile")
    table = json.loads(out.read_text())
    assert proc.returncode == 0, (table["failed"], proc.stderr[-2000:])
    assert all(r["sync_free"] for r in table["rows"] if r["section"] == "train" and r["ok"])
