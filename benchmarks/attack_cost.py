"""Work of the robustness table (``poincare-resnet attack``), counted in image passes.

Counts, per attack and ε, how many images go through the network with autograd (a gradient
pass: forward + backward to the input) and without (a forward pass), on a model whose labels are
its own predictions (every image clean-correct: the upper bound of the work).  The counts do not
depend on the machine's load; ``--time`` also times the table (run it alone).

    python benchmarks/attack_cost.py --model poincare_resnet20 --size 28 --images 64 --json OUT
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from poincare_resnet import create_model
from poincare_resnet.evaluation.attacks import PAPER_FGSM_EPS, predict
from poincare_resnet.evaluation.commands import ROBUSTNESS_ATTACKS, ROBUSTNESS_STEPS, attack_rows
from poincare_resnet.evaluation.square_attack import SQUARE_QUERIES


def count_passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> dict:
    """Image passes through ``model.stem`` (gradient / forward) per attack over ``eps``."""
    counts: Counter = Counter()
    where = {"attack": "clean"}

    def hook(_module, args):
        kind = "grad" if torch.is_grad_enabled() else "forward"
        counts[(where["attack"], kind)] += int(args[0].shape[0])

    handle = model.stem.register_forward_pre_hook(hook)
    try:
        for name in kw.pop("attacks"):
            where["attack"] = name
            attack_rows(model, x, y, (name,), **kw)
    finally:
        handle.remove()
    n = x.shape[0]
    return {f"{a}/{k}": v / n for (a, k), v in sorted(counts.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="poincare_resnet20")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=ROBUSTNESS_STEPS)
    p.add_argument("--queries", type=int, default=SQUARE_QUERIES)
    p.add_argument("--time", action="store_true", help="also time the whole table (run alone)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=1).eval()
    x = torch.rand(args.images, 1, args.size, args.size) * 2 - 1
    y = predict(model, x)
    kw = {"eps": PAPER_FGSM_EPS, "steps": args.steps, "queries": args.queries}
    out = {
        "model": args.model,
        "images": args.images,
        "passes_per_image": count_passes(model, x, y, attacks=ROBUSTNESS_ATTACKS, **kw),
        **kw,
    }
    if args.time:
        t0 = time.perf_counter()
        attack_rows(model, x, y, ROBUSTNESS_ATTACKS, worst_case=True, **kw)
        out["seconds_per_image"] = (time.perf_counter() - t0) / args.images
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
