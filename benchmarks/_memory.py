"""Peak tensor memory of a piece of work on CPU, from PyTorch's own allocator (the CPU analogue
of ``torch.cuda.max_memory_allocated``).

Under ``torch.profiler.profile(profile_memory=True)`` the CPU allocator reports every allocation
and free with the running total of the bytes allocated *since the profiler started*; the peak of
that total is the peak tensor memory of the profiled work above what was already live. It does
not count the compiler's own memory, what glibc keeps mapped, or buffers allocated outside
PyTorch's allocator (e.g. oneDNN scratch space).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable


def profiled_peak_mib(fn: Callable[[], object]) -> float:
    """Run ``fn()`` once under the profiler and return its peak extra tensor memory in MiB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return trace_peak_mib(prof)


def trace_peak_mib(prof) -> float:
    """Peak of the allocator's running total in a finished ``profile(profile_memory=True)``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    ]
    return max(totals, default=0) / 2**20
