"""Load-independent cost of one train step: aten ops dispatched and passes over full-size maps.

On a loaded machine timings mean nothing; the number of kernel-level operations one train step
dispatches (each costs a fixed ≈ 10–30 µs of CPU dispatch in eager mode, whatever its size) and
the number of passes over full-size activation maps (what bounds a memory-bound step) do not
depend on the load. Counted with a ``TorchDispatchMode`` below autograd, forward and backward
(Adam's fused/foreach update excluded: it is the same for both models)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/op_counts.py --path torch
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/op_counts.py --path native --batch 16

An operation is a *full-size pass* when one of its tensors is an activation map with channels
(``[B, C, …]`` with ``C ≥ 2`` and at least ``B·16`` elements: conv/BN/residual maps, not the
per-pixel ``[B, 1, …]`` scalars); *per-pixel* when its largest tensor is a ``[B, 1, …]`` map;
everything else (per-channel statistics, weights, scalars) is *small*. ``--callgrind`` runs only
the measured steps (for ``valgrind --tool=callgrind --toggle-collect=_step_marker``, whose
instruction counts are the load-independent proxy of the time ratio).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_VIEWS = {
    "view",
    "_unsafe_view",
    "expand",
    "transpose",
    "t",
    "permute",
    "unsqueeze",
    "squeeze",
    "detach",
    "alias",
    "slice",
    "select",
    "as_strided",
    "split",
    "split_with_sizes",
    "unbind",
    "_reshape_alias",
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a piece of work dispatches, by kind (views excluded)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.kinds: collections.Counter[str] = collections.Counter()
        self.names: collections.Counter[str] = collections.Counter()
        self.full_elems = 0

    def _kind(self, tensors: list[torch.Tensor]) -> str:
        kind = "small"
        for t in tensors:
            if t.dim() >= 2 and t.shape[0] == self.batch:
                if t.shape[1] >= 2 and t.numel() >= 16 * self.batch and t.dim() >= 3:
                    return "full"
                if t.shape[1] == 1 and t.numel() >= 16 * self.batch:
                    kind = "pixel"
        return kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in _VIEWS:
            return out
        flat = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        kind = self._kind(flat)
        self.kinds[kind] += 1
        self.names[name] += 1
        if kind == "full":
            self.full_elems += sum(t.numel() for t in flat if t.dim() >= 3)
        return out


def _model(family: str, depth: int, widths: str):
    from poincare_resnet import create_model

    w = tuple(int(x) for x in widths.split("-"))
    return create_model(f"{family}_resnet{depth}", num_classes=10, in_chans=3, widths=w)


def _step_marker(model, x, y) -> None:
    """One forward + backward (the function callgrind's ``--toggle-collect`` names)."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()


def count(family: str, depth: int, widths: str, batch: int) -> dict:
    """Op counts of one forward + backward of ``family`` after one warm-up step."""
    torch.manual_seed(0)
    model = _model(family, depth, widths)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    _step_marker(model, x, y)  # warm-up: lazy builds, running statistics
    model.zero_grad(set_to_none=True)
    counter = OpCounter(batch)
    with counter:
        _step_marker(model, x, y)
    return {
        "family": family,
        "ops": sum(counter.kinds.values()),
        "full_size_ops": counter.kinds["full"],
        "per_pixel_ops": counter.kinds["pixel"],
        "small_ops": counter.kinds["small"],
        "full_size_elements_per_sample": counter.full_elems // batch,
        "top": counter.names.most_common(12),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--path", choices=("native", "torch"), default="torch")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--widths", default="8-16-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--family", choices=("both", "poincare", "euclidean"), default="both")
    p.add_argument("--callgrind", type=int, default=0, help="run N plain steps, no counting")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from poincare_resnet import _cpp

    _cpp.set_native(args.path == "native")
    families = ("euclidean", "poincare") if args.family == "both" else (args.family,)
    if args.callgrind:
        for family in families:
            torch.manual_seed(0)
            model = _model(family, args.depth, args.widths)
            x = torch.rand(args.batch, 3, 32, 32) * 2 - 1
            y = torch.randint(0, 10, (args.batch,))
            _step_marker(model, x, y)  # warm-up outside the collected region
            for _ in range(args.callgrind):
                _step_marker(model, x, y)
        return
    rows = [count(f, args.depth, args.widths, args.batch) for f in families]
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
