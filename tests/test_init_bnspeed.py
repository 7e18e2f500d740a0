"""The norm-keeping conv init (``identity-compensated``) and the fair ``bn-speed`` comparison."""

from __future__ import annotations

import math

import pytest
import torch

from poincare_resnet import ball
from poincare_resnet.ball.frechet import frechet_mean
from poincare_resnet.experiments import run_experiment
from poincare_resnet.experiments.bn_speed import (
    SPEEDUPS,
    VARIANTS,
    allocator_peak_mib,
    implementation,
)
from poincare_resnet.experiments.init_norms import (
    _layer_stack,
    _random_tangents,
    interior,
    norm_profile,
)
from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d, PoincareLinear, compensated_gain
from poincare_resnet.nn.init import COMPENSATED_NORM, beta_concat_scale, init_poincare_weight


def _final_ratio(init: str, channels: int, dtype: torch.dtype, depth: int = 50) -> float:
    """Mean tangent norm after ``depth`` 3×3 convs over the input's (norm 0.5 per pixel)."""
    gen = torch.Generator().manual_seed(0)
    u = _random_tangents((4, channels, 16, 16), 1, COMPENSATED_NORM, gen).to(dtype)
    torch.manual_seed(0)
    layers = [m.to(dtype) for m in _layer_stack("conv", init, False, depth, channels, 0.1)]
    return norm_profile(layers, u, 1)[0][-1]


@pytest.mark.parametrize(
    ("channels", "dtype"), [(16, torch.float64), (64, torch.float32), (16, torch.float32)]
)
def test_compensated_init_keeps_norms_through_50_convs(channels, dtype):
    # the must-show: within 10 % after 50 3×3 convolutions; the paper's flat ½·I drains to ~0
    # and the plain centre tap shrinks by s ≈ 1/3 per layer
    assert 0.9 <= _final_ratio("identity-compensated", channels, dtype) <= 1.1
    assert _final_ratio("identity", channels, dtype) < 1e-3
    assert _final_ratio("center", channels, dtype, depth=10) < 1e-3


@pytest.mark.parametrize("init", ["identity-compensated", "center"])
def test_widening_convs_start_with_no_dead_output(init):
    # a stem 1 → 8 and a stage's 8 → 16: outputs beyond C_in read shifted taps (centre first)
    for c_in, c_out in ((1, 8), (8, 16)):
        w = PoincareConv2d(c_in, c_out, 3, padding=1, init=init).weight.detach()
        nonzero = w.flatten(1) != 0
        assert nonzero.sum(1).tolist() == [1] * c_out  # one tap per output, none dead
        assert w.flatten(1).abs().amax(1).unique().numel() == 1  # all of one value
        o = torch.arange(c_out)
        assert (w[o, o % c_in] != 0).flatten(1).any(1).all()  # output o reads channel o mod C_in
        assert (w[:c_in, :, 1, 1] != 0).sum() == c_in  # the first C_in: the centre tap
    assert (w[8:, :, 1, 1] == 0).all() and (w[8:, :, 0, 1] != 0).sum() == 8  # then a neighbour


def test_interior_is_the_central_half():
    u = torch.arange(2 * 3 * 16 * 12, dtype=torch.float64).view(2, 3, 16, 12)
    torch.testing.assert_close(interior(u), u[:, :, 4:12, 3:9])
    v = torch.ones(5, 7)
    assert interior(v) is v


def _one_patch_ratio(channels: int, c: float, norm: float, gain: float) -> float:
    """Output over input tangent norm of a centre tap ``gain/2`` on 3×3 patches of norm ``norm``
    at every pixel (no padding: one interior pixel), isotropic directions, float64."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4000, channels, 3, 3, generator=gen, dtype=torch.float64)
    u = norm * u / u.norm(dim=1, keepdim=True)
    conv = PoincareConv2d(channels, channels, 3, c=c, init="center").double()
    with torch.no_grad():
        conv.weight.mul_(gain)
        return conv(u).norm(dim=1).mean().item() / norm


@pytest.mark.parametrize(
    ("channels", "c", "norm"), [(16, 0.1, 0.5), (64, 0.1, 1.0), (16, 1.0, 0.3)]
)
def test_compensated_gain_keeps_one_layer_norm(channels, c, norm):
    # the layer itself (independent of the derivation) keeps the norm at the operating norm,
    # while the naive compensation 1/s (β-ratio only, no non-linearity term) does not
    gain = compensated_gain(channels, 9, c, norm)
    assert _one_patch_ratio(channels, c, norm, gain) == pytest.approx(1.0, abs=2e-4)
    naive = _one_patch_ratio(channels, c, norm, 1 / beta_concat_scale(channels, 9))
    assert abs(naive - 1) > 1e-3


def test_compensated_gain_limits_and_errors():
    # a → 0: 1/s; a linear layer (K = 1, s = 1): exactly 1, so the init is the paper's ½·I
    s = beta_concat_scale(16, 9)
    assert compensated_gain(16, 9, 0.1, 1e-6) == pytest.approx(1 / s, rel=1e-9)
    assert compensated_gain(32, 1, 0.1, COMPENSATED_NORM) == pytest.approx(1.0, abs=1e-12)
    lin = PoincareLinear(6, 6, init="identity-compensated").double()
    u = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(lin(u), u, rtol=1e-9, atol=1e-9)
    conv = PoincareConv2d(3, 3, 3, padding=1, init="identity-compensated")
    w = conv.weight.detach()
    gain = compensated_gain(3, 9, 0.1, 0.5)
    torch.testing.assert_close(w[:, :, 1, 1], torch.eye(3) * gain / 2)
    assert int((w != 0).sum()) == 3  # the centre taps only
    for bad in ({"c": 0.0}, {"norm": -1.0}, {"norm": math.nan}):
        kw = {"c": 0.1, "norm": 0.5, **bad}
        with pytest.raises(ValueError, match="c > 0 and norm > 0"):
            init_poincare_weight(torch.empty(4, 4, 3, 3), "identity-compensated", **kw)


# --- bn-speed: the same-implementation comparison and the implementation speed-up -------------


def _bn_map(dtype=torch.float64, shape=(6, 4, 5, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return (0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


@pytest.fixture
def no_host_reads(monkeypatch):
    """Any read of a tensor's value into Python (``float``, ``item``, ``bool``) raises; returns
    the ``monkeypatch`` (``.undo()`` lifts it)."""

    def refuse(self, *args):
        raise AssertionError("host read of a tensor value")

    for name in ("__float__", "item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    return monkeypatch


def test_fixed_step_frechet_equals_frechet_py_without_host_reads(no_host_reads):
    # the same-implementation Fréchet batch norm: fixed steps, no host read in forward or
    # backward, and the mean it uses is ball/frechet.py's converged one (float64, 1e-8)
    u = _bn_map().requires_grad_(True)
    bn = PoincareBatchNorm2d(4, mean="frechet", momentum=None, frechet_iters=8, frechet_tol=0.0)
    bn = bn.double()
    with implementation("reference"):
        bn(u).pow(2).mean().backward()
    no_host_reads.undo()
    assert torch.isfinite(u.grad).all()
    points = ball.expmap0(u.detach(), c=0.1, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    expected = ball.logmap0(frechet_mean(points, c=0.1), c=0.1)  # tol-based, 50 steps at most
    torch.testing.assert_close(bn.running_mean, expected, rtol=0, atol=1e-8)
    # it is the Fréchet mean, not the midpoint it starts from
    midpoint = ball.logmap0(ball.gyromidpoint(points, c=0.1, dim=-1, reduce_dim=0), c=0.1)
    assert (bn.running_mean - midpoint).abs().max() > 1e-6


def test_tol_based_frechet_reads_the_host(no_host_reads):
    # the check above can fail: the early-stopping Karcher loop reads each step's norm
    bn = PoincareBatchNorm2d(4, mean="frechet", frechet_tol=1e-7).double()
    with pytest.raises(AssertionError, match="host read"):
        bn(_bn_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_midpoint_reference_equals_torch_path_and_fused_statistics(dtype):
    # (b) compares implementations of one map: reference chain, PyTorch path, fused kernel
    outs, stats = {}, {}
    for impl in ("reference", "torch", "fused"):
        u = _bn_map(dtype).requires_grad_(True)
        bn = PoincareBatchNorm2d(4, momentum=None).to(dtype)
        with implementation(impl):
            out = bn(u)
            out.pow(2).mean().backward()
        outs[impl], stats[impl] = (out.detach(), u.grad), (bn.running_mean, bn.running_var)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for impl in ("torch", "fused"):
        torch.testing.assert_close(stats[impl], stats["reference"], **tol)
        torch.testing.assert_close(outs[impl], outs["reference"], **tol)


def test_implementation_switch_restores_and_rejects():
    from poincare_resnet import _cpp
    from poincare_resnet.nn import _dispatch

    def switches():
        return _cpp.native_enabled(), _dispatch.triton_enabled(), ball.manual_backward_enabled()

    before = switches()
    with implementation("torch"):
        assert switches() == (False, False, True)
    with implementation("reference"):
        assert not ball.manual_backward_enabled()
    with implementation("fused"):
        assert switches() == before
    assert switches() == before
    with pytest.raises(ValueError, match="unknown implementation 'native'"):
        with implementation("native"):
            pass


def test_allocator_peak_counts_live_tensors():
    def work():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**21)  # 8 MiB: 12 live
        del a
        c = torch.empty(2**20)  # 12 live again
        return b, c

    assert allocator_peak_mib(work, torch.device("cpu")) == pytest.approx(12.0, abs=0.01)


def test_bn_speed_table_has_both_comparisons(tmp_path):
    rows = run_experiment(
        "bn-speed", tmp_path, tiny=True, train_runs=False, repeats=1, threads=1, log=lambda m: None
    )
    (r,) = rows
    assert r["frechet_iters"] == 5 and r["frechet_step_norm"] < 1e-6  # converged in 5 steps
    for prefix, _, _ in VARIANTS:
        assert r[f"{prefix}_ms"] > 0 and r[f"{prefix}_peak_mib"] > 0
    for name, slow, fast in SPEEDUPS:
        assert r[f"{name}_speedup"] == pytest.approx(r[f"{slow}_ms"] / r[f"{fast}_ms"])
        assert r[f"{name}_memory_ratio"] == pytest.approx(
            r[f"{slow}_peak_mib"] / r[f"{fast}_peak_mib"]
        )
    # allocator bytes do not depend on load: the fused kernel keeps far less than the chain
    assert r["implementation_memory_ratio"] > 2
    table = (tmp_path / "bn_speed.md").read_text()
    assert "algorithmic_speedup" in table and "implementation_speedup" in table


def test_bn_speed_training_over_seeds_reports_mean_and_std_and_reuses_runs(tmp_path):
    """``seeds``: each mean trained once per seed, the training table's mean ± std over them
    (the mean of the per-seed accuracies), the per-seed rows in the summary; a second call
    reuses the finished runs."""
    import json
    import statistics

    opts = {"tiny": True, "repeats": 1, "memory": False, "threads": 1, "seeds": "0,1"}
    rows = run_experiment("bn-speed", tmp_path, log=lambda m: None, **opts)
    train = {r["bn_mean"]: r for r in rows if r["part"] == "train"}
    per_seed = json.loads((tmp_path / "bn_speed_summary.json").read_text())["train_per_seed"]
    assert sorted((r["bn_mean"], r["seed"]) for r in per_seed) == [
        ("frechet", 0),
        ("frechet", 1),
        ("midpoint", 0),
        ("midpoint", 1),
    ]
    for mean, row in train.items():
        accs = [r["test_top1"] for r in per_seed if r["bn_mean"] == mean]
        assert row["n_seeds"] == 2 and row["test_top1"] == pytest.approx(statistics.fmean(accs))
        assert row["test_top1_seeds_std"] == pytest.approx(statistics.stdev(accs))
    assert (tmp_path / "runs" / "frechet-seed1" / "best.safetensors").is_file()
    assert "±" in (tmp_path / "bn_speed_train.md").read_text()
    again: list[str] = []
    run_experiment("bn-speed", tmp_path, log=again.append, **opts)
    assert sum("reusing the finished run" in m for m in again) == 4
