"""The hybrid models' head (``hybrid_head``): the uncapped MLR head by default, the older FC head
(whose logits the ball's clip caps) on request and for every config that predates the option."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poincare_resnet.api import rebuild_model
from poincare_resnet.ball.config import max_tangent_radius
from poincare_resnet.models import create_model
from poincare_resnet.models.registry import build_from_config, defaults_when_absent
from poincare_resnet.nn import PoincareLinear, PoincareMLR

TINY = {"depth": 8, "widths": (8, 16, 32)}


def _loss_floor(c: float, num_classes: int) -> float:
    """``−log p_max`` for logits of norm ≤ ``R = artanh(1 − ε)/√c`` (float32's clip).

    The largest softmax entry with ``‖l‖ ≤ R`` puts ``a`` on the class and ``−a/(K − 1)`` on
    the others (Lagrange), ``a − b = R √(K/(K − 1))``, so
    ``p_max = 1/(1 + (K − 1) exp(−R √(K/(K − 1))))``; every sample's loss is at least
    ``−log p_max``.
    """
    k = num_classes
    radius = max_tangent_radius(torch.float32) / math.sqrt(c)
    return math.log1p((k - 1) * math.exp(-radius * math.sqrt(k / (k - 1))))


def test_loss_floor_formula_matches_a_numerical_minimum():
    """The closed form against gradient descent on logits of norm R (an independent check)."""
    for k in (10, 100):
        radius = max_tangent_radius(torch.float32)
        raw = torch.randn(k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        raw.requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=0.1)
        for _ in range(150):
            loss = F.cross_entropy((radius * raw / raw.norm())[None], torch.zeros(1).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
        floor = _loss_floor(1.0, k)
        assert floor - 1e-9 <= float(loss.detach()) < floor + 2e-3
    assert math.exp(-_loss_floor(1.0, 10)) == pytest.approx(0.746, abs=1e-3)
    assert math.exp(-_loss_floor(1.0, 100)) == pytest.approx(0.187, abs=1e-3)


def _fit(head: str, num_classes: int = 100, steps: int = 80) -> tuple[float, float]:
    """Adam on one fixed batch (one image per class): the last training loss and the final c."""
    torch.manual_seed(0)
    model = create_model(
        "hybrid_resnet20", num_classes=num_classes, in_chans=1, hybrid_head=head, **TINY
    )
    x = torch.randn(num_classes, 1, 8, 8, generator=torch.Generator().manual_seed(1)).tanh()
    y = torch.arange(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach()), float(model.curvature().detach())


def test_mlr_hybrid_trains_below_the_old_heads_loss_floor_at_100_classes():
    """The FC head's logits have norm ≤ artanh(1 − ε)/√c, so its loss never goes below
    :func:`_loss_floor` at its (learnt) c; the MLR head's logits are uncapped and its loss goes
    well below that floor."""
    mlr_loss, mlr_c = _fit("mlr")
    fc_loss, fc_c = _fit("fc")
    assert fc_loss >= _loss_floor(fc_c, 100) - 1e-4
    assert mlr_loss < 0.5 * _loss_floor(mlr_c, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlr_head_logits_are_the_hyperplane_distances(dtype):
    """``forward_head`` = SPEC §3's MLR scores of ``expmap0(f)``, written out here."""
    torch.manual_seed(0)
    model = create_model("hybrid_resnet20", num_classes=5, in_chans=1, **TINY).to(dtype)
    head = model.fc
    assert isinstance(head, PoincareMLR) and head.curvature is model.curvature
    with torch.no_grad():
        head.bias.uniform_(-0.3, 0.3)
        f = torch.rand(4, 32, dtype=dtype) * 0.1
        c = model.curvature()
        sc = c.sqrt()
        n = f.norm(dim=1, keepdim=True)
        x = torch.tanh(sc * n) * f / (sc * n)
        lam = 2 / (1 - c * x.pow(2).sum(1, keepdim=True))
        z = head.weight
        zn = z.norm(dim=1)
        two_sr = 2 * sc * head.bias
        q = sc * lam * (x @ (z / zn[:, None]).t()) * torch.cosh(two_sr) - (lam - 1) * torch.sinh(
            two_sr
        )
        want = 2 * zn / sc * torch.asinh(q)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(model.forward_head(f), want, **tol)


def test_mlr_head_stays_in_float32_under_bf16_autocast():
    """The backbone's bf16 features are upcast; the scores are those of the float32 features."""
    torch.manual_seed(0)
    model = create_model("hybrid_resnet20", num_classes=5, in_chans=1, **TINY)
    f = (torch.rand(4, 32) * 3).bfloat16()
    with torch.no_grad():
        want = model.forward_head(f.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.forward_head(f)
            full = model(torch.randn(2, 1, 8, 8).tanh())
    assert got.dtype == full.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hybrid_resnet20", "hybrid_resnet18"])
def test_new_hybrids_record_the_mlr_head_and_old_configs_rebuild_the_fc_head(name):
    """A new model's config says ``hybrid_head="mlr"``; a config (or format-1 ``model_kwargs``)
    written before the option rebuilds the FC head it was trained with, same outputs."""
    small = TINY if name.endswith("20") else {"widths": (4, 4, 8, 8)}
    torch.manual_seed(0)
    new = create_model(name, num_classes=3, in_chans=1, **small)
    assert new.model_config["hybrid_head"] == "mlr" and isinstance(new.fc, PoincareMLR)
    old = create_model(name, num_classes=3, in_chans=1, hybrid_head="fc", **small)
    assert isinstance(old.fc, PoincareLinear) and old.fc.init == "identity"
    assert defaults_when_absent(name) == {"hybrid_head": "fc"}
    # what such a config held: no hybrid_head, and init "identity" (then its default)
    config = {k: v for k, v in old.model_config.items() if k != "hybrid_head"}
    config["init"] = "identity"
    with pytest.warns(UserWarning, match="lacks argument.*hybrid_head.*hybrid_head='fc'"):
        rebuilt = build_from_config(name, config)
    meta = {"model_name": name, "model_kwargs": {"num_classes": 3, "in_chans": 1, **small}}
    with pytest.warns(UserWarning, match="format < 2"):
        format1 = rebuild_model(meta)
    x = torch.randn(2, 1, 16, 16).tanh()
    assert rebuilt.model_config == {**config, "hybrid_head": "fc"}
    assert format1.model_config == old.model_config
    for model in (rebuilt, format1):
        assert isinstance(model.fc, PoincareLinear)
        model.load_state_dict(old.state_dict())
        with torch.no_grad():
            assert torch.equal(model.eval()(x), old.eval()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = build_from_config(name, new.model_config)
    assert isinstance(again.fc, PoincareMLR)


def test_bad_hybrid_head_options_are_named():
    with pytest.raises(ValueError, match="unknown hybrid_head 'linear'.*'mlr', 'fc'"):
        create_model("hybrid_resnet20", hybrid_head="linear")
    with pytest.raises(ValueError, match="init='kaiming' is the FC head's"):
        create_model("hybrid_resnet18", init="kaiming")
    fc = create_model("hybrid_resnet20", hybrid_head="fc", init="kaiming", **TINY)
    assert isinstance(fc.fc, PoincareLinear) and fc.fc.init == "kaiming"
    assert all(isinstance(p, nn.Parameter) for p in fc.parameters())
