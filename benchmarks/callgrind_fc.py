"""Instruction counts of the native FC kernel (forward + backward), for callgrind.

Timings are not comparable on a loaded machine; instruction counts are. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
        --toggle-collect='*fc_forward*' --toggle-collect='*fc_backward*' \
        python benchmarks/callgrind_fc.py
    callgrind_annotate /tmp/cg.out | head -20

The kernel is built first; the measured section calls ``nn.fc_map.fc_tangent`` (the native
kernel) forward and backward on a fixed ``[8, 16, 32, 32]`` float32 map. Valgrind does not run
AVX-512 (its CPU reports AVX2), so this counts the AVX2 build of the kernels.
"""

from __future__ import annotations

import torch

from poincare_resnet import _cpp
from poincare_resnet.nn.fc_map import fc_tangent

ITERS = 3


def main() -> None:
    torch.manual_seed(0)
    assert _cpp.load_kernel("fc") is not None, "native FC kernel unavailable"
    dots = (0.3 * torch.randn(8, 16, 32, 32)).requires_grad_()
    sq = (0.5 * torch.rand(8, 1, 32, 32)).requires_grad_()
    znorm = (0.5 + torch.rand(16)).requires_grad_()
    bias = (0.1 * torch.randn(16)).requires_grad_()
    grad = torch.randn(8, 16, 32, 32)
    for _ in range(ITERS):
        out = fc_tangent(dots, sq, znorm, bias, c=0.1, dim=1)
        out.backward(grad)
    print(float(out.detach().sum()), float(dots.grad.sum()))


if __name__ == "__main__":
    main()
