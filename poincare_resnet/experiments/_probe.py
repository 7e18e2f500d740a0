"""Peak-memory probe, run in its own process by :func:`.common.run_probe`.

Usage: ``python -m poincare_resnet.experiments._probe '<json spec>'``; prints one JSON line.

Method (CPU): after building the configuration and running one warm-up pass on a batch of 2
(which loads the kernels and allocates the parameter gradients), the process records its peak
resident set size (Linux ``VmHWM``, else ``ru_maxrss``); it then runs one forward + backward
pass on the full batch and reports ``peak_mib = peak(after) − peak(before)``: the growth of the
process's high-water mark caused by that pass (activations, saved tensors, gradients of the
inputs). Growth below what the allocator already holds reads as 0, so tiny configurations
report ~0. On CUDA it reports ``torch.cuda.max_memory_allocated`` above the memory allocated
before the pass.

Kind: ``"resnet_step"`` (one cross-entropy train step of a :class:`PoincareResNet`, optionally with
plain autograd, also reporting the number of autograd graph nodes and median step times).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _maxrss_mib() -> float:
    """Peak resident set size of this process (MiB).

    On Linux ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own
    address space. ``ru_maxrss`` is not used there because it carries over the parent's RSS
    at ``fork`` through ``exec``, which would hide growth below the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KiB elsewhere


def _measure(step: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Peak memory growth (MiB) of one call of ``step`` and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, result
    before = _maxrss_mib()
    result = step()
    return max(0.0, _maxrss_mib() - before), result


def _resnet_step(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from .. import ball
    from ..experiments.common import count_graph_nodes
    from ..models import PoincareResNet

    torch.manual_seed(int(spec.get("seed", 0)))
    b, size, chans = int(spec["batch"]), int(spec["size"]), int(spec.get("in_chans", 3))
    model = PoincareResNet(
        int(spec["depth"]), tuple(spec.get("widths", (8, 16, 32))), num_classes=10, in_chans=chans
    ).to(device)
    model.train()

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (torch.rand(n, chans, size, size) * 2 - 1).to(device)
        return x, torch.randint(0, 10, (n,)).to(device)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
        for p in model.parameters():
            p.grad = None
        saved: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # bytes held by the graph: each storage once (views and re-saves are free)
            st = t.untyped_storage()
            saved[(st.data_ptr(), st.nbytes())] = st.nbytes()
            return t.detach()  # not t: no reference cycle (torch's saved-tensor-hook docs)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        nodes = count_graph_nodes(loss.grad_fn)
        loss.backward()
        return nodes, sum(saved.values()) / 2**20

    with ball.manual_backward(bool(spec["manual"])):
        step(*batch(2))
        x, y = batch(b)
        peak, (nodes, saved_mib) = _measure(lambda: step(x, y), device)
        times = []
        for _ in range(int(spec.get("repeats", 1))):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "peak_mib": peak,
        "saved_mib": saved_mib,
        "graph_nodes": nodes,
        "step_time_s": times[len(times) // 2],
    }


KINDS = {"resnet_step": _resnet_step}


def main(argv: list[str] | None = None) -> int:
    """Run the probe described by the JSON argument and print its JSON result.

    Parameters
    ----------
    argv : list of str, optional
        ``[spec JSON]`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0.
    """
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    result = KINDS[spec["kind"]](spec, device)
    result["method"] = "cuda_max_allocated" if device.type == "cuda" else "peak_rss_growth"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
