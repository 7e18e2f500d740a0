r"""Instruction counts of the native batch-norm kernels (forward + backward), for callgrind.

Timings are not comparable on a loaded machine; instruction counts are. Build the AVX2 kernel
first (valgrind's CPU reports AVX2, so that is the build it runs), then count::

    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
    ATEN_CPU_CAPABILITY=avx2 python -c "import poincare_resnet._cpp as m; m.build_all()"
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg_bn.out \
        python benchmarks/callgrind_bn.py --mode train
    callgrind_annotate --inclusive=yes --threshold=100 /tmp/cg_bn.out \
        | grep -E 'bn_train_(forward|backward)\('

The measured section runs ``PoincareBatchNorm2d`` forward and backward ``ITERS`` times on a fixed
``[8, 16, 32, 32]`` float32 map: in train mode (batch statistics: the kernels
``bn_train_forward`` and ``bn_train_backward``) or, with ``--mode eval``, with running
statistics (``bn_out`` and ``bn_backward``; grep ``'bn_(out|backward)\('``). The inclusive
counts of those entry functions are the kernels' cost (their own reductions included).
"""

from __future__ import annotations

import argparse

import torch

from poincare_resnet import _cpp
from poincare_resnet.nn import PoincareBatchNorm2d

ITERS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    mode = parser.parse_args().mode
    torch.manual_seed(0)
    assert _cpp.load_kernel("batchnorm") is not None, "native batch-norm kernel unavailable"
    bn = PoincareBatchNorm2d(16, c=0.1)
    with torch.no_grad():
        bn.bias.copy_(0.1 * torch.randn(16))
        bn.weight.fill_(1.3)
    bn.train(mode == "train")
    v = (0.3 * torch.randn(8, 16, 32, 32)).requires_grad_()
    grad = torch.randn(8, 16, 32, 32)
    for _ in range(ITERS):
        out = bn(v)
        out.backward(grad)
    print(float(out.detach().sum()), float(v.grad.sum()), float(bn.bias.grad.sum()))


if __name__ == "__main__":
    main()
