"""Memory of a piece of work on CPU: peak tensor memory from PyTorch's own allocator (the CPU
analogue of ``torch.cuda.max_memory_allocated``), and the peak resident memory a step adds.

Under ``torch.profiler.profile(profile_memory=True)`` the CPU allocator reports every allocation
and free with the running total of the bytes allocated *since the profiler started*; the peak of
that total is the peak tensor memory of the profiled work above what was already live. It does
not count the compiler's own memory, what glibc keeps mapped, or buffers allocated outside
PyTorch's allocator (e.g. oneDNN scratch space).

:func:`step_rss_mib` counts those too: the growth of the kernel's resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) over one call, with glibc's heap first
trimmed and every buffer of 128 KiB or more in its own mapping (returned to the system when
freed). Without that, the resident size is glibc's heap high-water mark since the process
started: it includes the compiler's peak during the first compiled step, and the freed buffers
that glibc's dynamic mmap threshold (raised past the largest tensor freed so far) leaves in the
heap, which fragments differently for every allocation order (eager, each compiled graph).

Call :func:`mmap_large_buffers` first thing in a fresh process (before its first tensors):
glibc serves a request from a free chunk of its heap before it maps new memory, so once earlier
steps have left large freed buffers in the heap, later ones land there too, and every page a
step touches stays resident after the free. Set only after those steps (as this module did
until session 10), the "step RSS" was the union of the heap pages one step touched, about twice
the Poincaré step's live tensors and noisy (activation ratios 1.65–1.96× over four runs of one
configuration); set at the start, the resident set falls back after the backward, and the
step's peak is its live buffers plus small-allocation fragmentation.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import tempfile
from collections.abc import Callable

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


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


def mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt``; False where unavailable (non-glibc platforms)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))


def _status_mib(key: str) -> float:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mmap_large_buffers() -> bool:
    """From now on every allocation of 128 KiB or more is its own mapping, returned to the
    system when freed, and the heap is trimmed above 128 KiB of free space (glibc; False
    elsewhere). Slows large allocations (a page fault per page): not for timed steps."""
    return mallopt(M_MMAP_THRESHOLD, 128 * 1024) and mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def step_rss_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident memory that one call of ``fn()`` adds, in MiB; None off Linux/glibc.

    :func:`mmap_large_buffers` (meaningful only if it was already called before the process's
    first tensors: see the module's docstring), the heap trimmed, ``VmHWM`` reset, then
    ``VmHWM`` after ``fn()`` minus ``VmRSS`` before it.
    """
    if not mmap_large_buffers():
        return None
    gc.collect()
    _malloc_trim()
    if not _reset_hwm():
        return None
    before = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - before
