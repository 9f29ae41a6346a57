"""Memory snapshots: the CUDA caching allocator's counters on a GPU, the resident set on a CPU."""

from __future__ import annotations

import resource
import sys

import torch

from ampray.amp.records import MemoryStats


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: fall back to the peak, the best number available
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def memory_stats(device: torch.device | str | None = None) -> MemoryStats:
    """Read the memory counters of `device` (reads host-side allocator state: no GPU sync)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rss = _rss_bytes()
    # Linux updates ru_maxrss (the high-water mark) lazily, so it can lag the current RSS read from statm.
    peak_rss = max(_peak_rss_bytes(), rss)
    if device.type == "cuda" and torch.cuda.is_available():
        s = torch.cuda.memory_stats(device)
        return MemoryStats(
            device=str(device),
            allocated_bytes=int(s.get("allocated_bytes.all.current", 0)),
            reserved_bytes=int(s.get("reserved_bytes.all.current", 0)),
            peak_allocated_bytes=int(s.get("allocated_bytes.all.peak", 0)),
            peak_reserved_bytes=int(s.get("reserved_bytes.all.peak", 0)),
            rss_bytes=rss,
            peak_rss_bytes=peak_rss,
            alloc_retries=int(s.get("num_alloc_retries", 0)),
            ooms=int(s.get("num_ooms", 0)),
        )
    return MemoryStats(str(device), rss, rss, peak_rss, peak_rss, rss, peak_rss, 0, 0)


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new peak window (CUDA only: the process RSS peak cannot be reset)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def total_device_memory(device: torch.device | str | None = None) -> int:
    """Bytes of memory the device has (physical RAM for the CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
