"""``benchmarks/_memory.py``'s step RSS: the peak of a step's live buffers when large buffers are
mapped on their own from the process's start, and more than that when they are not (the heap
pages that earlier steps' freed buffers left behind stay resident once touched)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Twelve buffers of 2–6 MiB, at most three alive: a peak of 15 MiB of live buffers.
_PROBE = """
import sys
sys.path.insert(0, {benchmarks!r})
import torch
import _memory
if {early} and not _memory.mmap_large_buffers():
    print(None)
    sys.exit()
def work():
    keep = []
    for i in range(12):
        t = torch.empty((2 + i % 5) * 2**18)
        t.fill_(1.0)
        keep.append(t)
        if len(keep) > 2:
            keep.pop(0)
work(); work()
print(_memory.step_rss_mib(work))
"""
_LIVE_PEAK_MIB = 6 + 5 + 4


def _step_rss(early: bool) -> float | None:
    code = _PROBE.format(benchmarks=str(BENCHMARKS), early=early)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    value = out.stdout.strip().splitlines()[-1]
    return None if value == "None" else float(value)


def test_step_rss_counts_live_buffers_only_when_mapped_from_the_start():
    early = _step_rss(early=True)
    if early is None:
        pytest.skip("no glibc mallopt / clear_refs here")
    late = _step_rss(early=False)
    assert _LIVE_PEAK_MIB - 1 <= early <= _LIVE_PEAK_MIB + 1.5, early
    assert late >= early + 4, (early, late)  # the heap's touched pages: why train_step.py
    # measures the step RSS in a child process of its own
