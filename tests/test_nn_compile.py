"""Every Poincaré layer works under ``torch.compile`` with the default (inductor) backend.

One residual block, compiled once for a train step (forward + backward), compared with eager
over two steps (the eval path is checked under ``aot_eager`` in ``test_nn.py``). Inductor's C++
is generated without SIMD (``cpp.vec_isa_ok=False``): the same graphs, lowerings and fusions,
but g++ builds the kernels in ~30-50 s instead of ~100-130 s on a shared 2-core machine with a
cold cache (a warm ``/tmp/torchinductor_*`` cache takes ~10 s either way).
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch._inductor.config
from _helpers import PoincareBlock, compile_counting_saved, native_switch
from torch._inductor.utils import run_and_get_code


@torch._inductor.config.patch({"cpp.vec_isa_ok": False})
def test_block_compiled_with_inductor_matches_eager(compile_fn=torch.compile, codes=None):
    """``compile_fn`` compiles the block (default ``torch.compile``); ``codes``: a list that
    receives inductor's generated code of the first step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = PoincareBlock()
    with torch.no_grad():  # non-trivial BN parameters
        for bn in (eager.bn1, eager.bn2):
            bn.weight.fill_(1.5)
            bn.bias.normal_(0.0, 0.3)
    compiled_module = copy.deepcopy(eager)
    compiled = compile_fn(compiled_module)  # default backend: inductor
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4, 4, 8, 8, generator=gen)
    g = torch.randn(4, 4, 8, 8, generator=gen)

    for step in range(2):  # the second step reuses the compiled graphs (running stats updated)
        u_e, u_c = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
        out_e = eager(u_e)
        (out_e * g).sum().backward()

        def compiled_step(u_c=u_c):
            out = compiled(u_c)
            (out * g).sum().backward()
            return out

        if step == 0 and codes is not None:
            out_c, step_codes = run_and_get_code(compiled_step)
            codes.extend(step_codes)
        else:
            out_c = compiled_step()
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
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


# ------------------------------------------------------------------ whole models, PyTorch path
# With the native kernels off every Poincaré layer runs the PyTorch path a GPU runs (the
# hand-written autograd Functions of nn/_torch_batchnorm.py, nn/_torch_residual.py and the FC
# map). ``fullgraph=True`` refuses graph breaks; AOT autograd traces each custom backward ahead
# of time, which a host read (``.item()``, a Python branch on a tensor value) would break.
# ``aot_eager`` runs those traced graphs as they are (seconds to compile); inductor also lowers
# them (its C++ build of a whole ResNet takes minutes to tens of minutes on a loaded 2-core
# machine: the inductor runs are ``slow``; the block test above covers inductor on this path).
_FAMILY_REPRESENTATIVES = [
    "euclidean_resnet20",
    "hybrid_resnet20",
    "poincare_resnet20",
    "poincare_resnet20_nf",
]


def _all_models() -> list[str]:
    from poincare_resnet.models import list_models

    return list_models()


@pytest.fixture
def torch_path():
    with native_switch(False):
        yield


def _check_model_compiles(name: str, backend: str, tol: float, **kwargs) -> None:
    from poincare_resnet import create_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3, **kwargs).train()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    g = torch.randn(2, 10, generator=gen)
    out_e, out_c = model(x), compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol)
    (out_e * g).sum().backward()
    (out_c * g).sum().backward()
    for (pname, p_e), p_c in zip(
        model.named_parameters(), compiled_model.parameters(), strict=True
    ):
        if p_e.grad is None:
            assert p_c.grad is None, pname
            continue
        scale = max(float(p_e.grad.abs().max()), 1e-6)
        err = float((p_c.grad - p_e.grad).abs().max()) / scale
        assert err <= tol, f"{name} {pname}: relative gradient error {err:.3g}"
    for (bname, b_e), b_c in zip(model.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b_c, b_e, rtol=tol, atol=tol, msg=lambda m, n=bname: n + m)
    model.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", _FAMILY_REPRESENTATIVES)
def test_model_fullgraph_on_torch_path(name, torch_path):
    """One model per family, train step (forward, gradients, running statistics) and eval, at
    depth 8 (one block per stage: every layer kind and the downsampling shortcuts, at a third
    of the tracing time; the slow tests below take every registered model at its own depth)."""
    _check_model_compiles(name, "aot_eager", 1e-4, depth=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in _all_models() if n not in _FAMILY_REPRESENTATIVES])
def test_every_model_fullgraph_on_torch_path(name, torch_path):
    _check_model_compiles(name, "aot_eager", 1e-4)


@pytest.mark.slow
@torch._inductor.config.patch({"cpp.vec_isa_ok": False})
@pytest.mark.parametrize("name", _all_models())
def test_every_model_inductor_on_torch_path(name, torch_path):
    _check_model_compiles(name, "inductor", 1e-3)


# 92 s with a cold inductor cache; the inductor equality is covered by the native-path block test
# and the PyTorch path's compile by test_model_fullgraph_on_torch_path
@pytest.mark.slow
@torch._inductor.config.patch({"cpp.vec_isa_ok": False})
def test_block_inductor_on_torch_path(torch_path):
    """The block test above with the PyTorch path's Functions lowered by inductor, compiled by
    :func:`poincare_resnet.nn.compile.compile_model`: its maps stay in the NCHW layout (no
    channels-last buffer in the generated code, which inductor's layout optimisation makes of
    every convolution output on the CPU)."""
    from poincare_resnet.nn.compile import compile_model

    codes: list[str] = []
    test_block_compiled_with_inductor_matches_eager(compile_model, codes)
    assert len(codes) == 2  # forward, backward
    assert not [c for c in codes if _channels_last_buffers(c)], "a channels-last buffer"


def _channels_last_buffers(code: str) -> list[str]:
    """The 4-D buffers of inductor's generated code whose channel stride is 1 (channels-last)."""
    sizes_strides = r"empty_strided_cpu\(\((\d+), (\d+), (\d+), (\d+)\), \(\d+, (\d+),"
    found = re.findall(sizes_strides, code)
    return [m for m in found if int(m[1]) > 1 and int(m[2]) * int(m[3]) > 1 and m[4] == "1"]


# ------------------------------------------------------------- what the compiled graph saves
def _saved_bytes_compiled(module: torch.nn.Module, x: torch.Tensor, partitioner: dict) -> int:
    """Bytes the forward graph hands to the backward (AOT autograd, inductor's decompositions
    and min-cut partitioner, no code generation), under the ``torch._functorch.config`` values
    ``partitioner``."""
    compiled, saved = compile_counting_saved(module)
    with torch._functorch.config.patch(partitioner):
        compiled(x).sum().backward()
    return sum(saved)


def _saved_bytes_eager(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors eager autograd saves for the backward."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, t.shape)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(seen.values())


# two compilations of a block with a cold inductor cache: minutes on a fresh CI machine (CI went
# from 9 to 18 min with it); run it with -m slow after changing the Functions or compile_model
@pytest.mark.slow
def test_compiled_block_saves_no_more_than_eager(torch_path):
    """With :data:`PARTITIONER_OPTIONS` the compiled Poincaré block keeps at most what eager
    autograd keeps (its Functions save their inputs only). With the partitioner's defaults it
    keeps the recomputed intermediates too (the batch norm's ``d = x − μ``, the FC map's
    ``√(1 + q²)``): 1.4× as much here (``SAVED_DEFAULT=1`` also checks that)."""
    from poincare_resnet.nn.compile import PARTITIONER_OPTIONS

    torch.manual_seed(0)
    block = PoincareBlock(8)
    x = torch.randn(4, 8, 8, 8).mul_(0.3).requires_grad_(True)
    eager = _saved_bytes_eager(block, x)
    tuned = _saved_bytes_compiled(block, x, PARTITIONER_OPTIONS)
    assert tuned <= 1.05 * eager, (tuned, eager)
    if os.environ.get("SAVED_DEFAULT") == "1":
        default = _saved_bytes_compiled(block, x, dict.fromkeys(PARTITIONER_OPTIONS, True))
        print(f"saved bytes: eager {eager}, compiled {tuned}, compiled with defaults {default}")
        assert default >= 1.3 * eager, (default, eager)
