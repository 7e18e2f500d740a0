"""Direct unit tests of one training step and its NaN policies (no data set, no run directory).

:func:`~poincare_resnet.training.trainer.train_step` on a small Euclidean network with a batch
norm: a finite step, a NaN loss and a non-finite gradient under ``--nan-policy stop`` and
``skip``, with fused and unfused optimizers; then the loop's policy helpers
(:func:`nan_event_seen`, :func:`halve_lr_for_skipped`, :func:`scale_lr`). The fp16 grad-scaler
cases are in ``test_precision.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poincare_resnet.training.distributed import DistInfo
from poincare_resnet.training.trainer import (
    LateFlags,
    StepState,
    TrainConfig,
    build_optimizer,
    halve_lr_for_skipped,
    make_grad_scaler,
    nan_event_seen,
    scale_lr,
    train_step,
)

CPU = torch.device("cpu")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _state(policy: str, fused: bool, **cfg) -> StepState:
    config = TrainConfig(nan_policy=policy, lr=0.1, weight_decay=0.0, **cfg)
    model = _net()
    if fused:
        optimizer = build_optimizer(config, model)
        assert optimizer.defaults["fused"]
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = make_grad_scaler(config, CPU)
    return StepState.create(config, model, model, optimizer, scaler, CPU, DistInfo())


def _snapshot(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    return params, buffers


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_finite_step_updates_and_counts_the_batch(policy, fused):
    st = _state(policy, fused)
    x, y = _batch()
    params, buffers = _snapshot(st.model)
    with torch.no_grad():
        logits = _net()(x)  # the same initial network, evaluated independently
    loss = F.cross_entropy(logits, y)
    event = train_step(st, x, y)
    assert event.shape == () and not bool(event) and not bool(st.bad)
    assert not _same(params, [p.detach() for p in st.model.parameters()])
    assert not _same(buffers, list(st.model.buffers()))  # batch norm statistics moved
    expected = [float(loss) * len(y), float((logits.argmax(1) == y).sum()), float(len(y))]
    assert st.sums.tolist() == pytest.approx(expected, rel=1e-6)


def _nan_input_step(policy: str, fused: bool):
    """One step on a batch with one NaN pixel: (state, params and buffers before, event)."""
    st = _state(policy, fused)
    x, y = _batch()
    x[3, 2] = float("nan")
    params, buffers = _snapshot(st.model)
    return st, params, buffers, train_step(st, x, y)


@pytest.mark.parametrize("fused", [True, False])
def test_stop_policy_a_nan_loss_flags_the_run_and_skips_the_update(fused):
    st, params, _, event = _nan_input_step("stop", fused)
    assert bool(event) and bool(st.bad) and nan_event_seen(st)
    # a fused optimizer skips the update on the device; an unfused one under ``stop`` takes it
    # (deciding would cost a host sync per step) and the loop stops at its next check
    assert _same(params, [p.detach() for p in st.model.parameters()]) == fused
    assert st.sums.tolist() == [0.0, 0.0, 0.0]  # a NaN event is left out of the sums
    if fused:  # the flag stays set: the next finite step does not clear it
        assert not bool(train_step(st, *_batch()))
        assert nan_event_seen(st)


@pytest.mark.parametrize("fused", [True, False])
def test_skip_policy_a_nan_loss_restores_batchnorm_and_does_not_flag_the_run(fused):
    st, params, buffers, event = _nan_input_step("skip", fused)
    assert bool(event) and not bool(st.bad) and not nan_event_seen(st)
    assert _same(params, [p.detach() for p in st.model.parameters()])
    assert _same(buffers, list(st.model.buffers()))  # running stats not poisoned by the NaN
    assert st.sums.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_gradient_with_a_finite_loss_is_a_nan_event(policy):
    st = _state(policy, fused=True)
    first = next(st.model.parameters())
    first.register_hook(lambda g: g * float("inf"))
    params, _ = _snapshot(st.model)
    event = train_step(st, *_batch())
    assert bool(event)
    assert bool(st.bad) == (policy == "stop")
    assert _same(params, [p.detach() for p in st.model.parameters()])


def test_grad_clip_bounds_the_update():
    st = _state("stop", fused=True, grad_clip=1e-3)
    sgd = torch.optim.SGD(st.params, lr=1.0)  # plain SGD: update = lr * clipped gradient
    st.optimizer = sgd
    before, _ = _snapshot(st.model)
    train_step(st, *_batch())
    steps = [(p.detach() - b).norm() for p, b in zip(st.model.parameters(), before, strict=True)]
    moved = torch.linalg.vector_norm(torch.stack(steps))
    assert 0 < float(moved) <= 1e-3 * (1 + 1e-5)


def test_halve_lr_for_skipped_halves_once_per_skipped_step_and_logs_it():
    state = {"lr_scale": 1.0}
    flags = LateFlags(CPU)
    for step, bad in enumerate([False, True, False, True]):
        flags.push(step, torch.tensor(bad))
    messages: list[str] = []
    assert halve_lr_for_skipped(state, flags, 0.1, messages.append) == [1, 3]
    assert state["lr_scale"] == 0.25
    assert len(messages) == 2 and "skipped step 3" in messages[1]
    assert "scaled by 0.25 to 0.025" in messages[1]
    assert halve_lr_for_skipped(state, flags, 0.1, messages.append, flush=True) == []
    assert state["lr_scale"] == 0.25


def test_halve_lr_waits_for_the_lag_unless_flushed():
    state = {"lr_scale": 1.0}
    flags = LateFlags(CPU, lag=1)
    flags.push(0, torch.tensor(True))
    assert halve_lr_for_skipped(state, flags, 1.0, lambda _m: None) == []
    assert state["lr_scale"] == 1.0
    assert halve_lr_for_skipped(state, flags, 1.0, lambda _m: None, flush=True) == [0]
    assert state["lr_scale"] == 0.5


def test_scale_lr_multiplies_every_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 0.4}])
    scale_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    scale_lr(opt, 1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
