r"""Instruction counts of the native residual kernel (forward + backward), for callgrind.

Timings are not comparable on a loaded machine; instruction counts are. Build the AVX2 kernel
first (valgrind's CPU reports AVX2, so that is the build it runs), then count::

    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
    ATEN_CPU_CAPABILITY=avx2 python -c "import poincare_resnet._cpp as m; m.build_all()"
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg_res.out \
        python benchmarks/callgrind_residual.py
    callgrind_annotate --inclusive=yes --threshold=100 /tmp/cg_res.out \
        | grep -E 'residual_(forward|backward)\('

The measured section runs ``PoincareResidual`` (``f ⊕ res`` with a learnable SkipInit scale)
forward and backward ``ITERS`` times on fixed ``[8, 16, 32, 32]`` float32 maps.
"""

from __future__ import annotations

import torch

from poincare_resnet import _cpp
from poincare_resnet.nn import PoincareResidual

ITERS = 3


def main() -> None:
    torch.manual_seed(0)
    assert _cpp.load_kernel("residual") is not None, "native residual kernel unavailable"
    residual = PoincareResidual(c=0.1)
    f = (0.3 * torch.randn(8, 16, 32, 32)).requires_grad_()
    res = (0.3 * torch.randn(8, 16, 32, 32)).requires_grad_()
    alpha = torch.tensor(0.7, requires_grad=True)
    grad = torch.randn(8, 16, 32, 32)
    for _ in range(ITERS):
        out = residual(f, res, alpha)
        out.backward(grad)
    print(float(out.detach().sum()), float(f.grad.sum()), float(alpha.grad))


if __name__ == "__main__":
    main()
