"""CPU binding of the ranks on one node: each local rank gets its own physical cores.

Left to the OS scheduler, the busy threads of two ranks (each rank's Python thread and its autograd
thread) can land on the two hardware threads of one core: the rank that drew a shared core launches its
kernels more slowly for as long as it lives, and in DDP every rank waits for the slowest. Binding splits
the node's physical cores (sibling sets from /sys) into one contiguous block per local rank. Where the
OS shows no sibling sets (a VM guest often sees every virtual CPU as a core of its own), the blocks are
ranges of virtual CPUs, which keeps ranks apart from each other's CPUs but cannot know which of them
share a physical core on the host.

The blocks are per job on a node: two jobs (or two packed Tune trials) on one node would be bound to
the same blocks, which is why `ampray tune` refuses `scaling.bind_cpus`.

Pure Python (Linux /proc and /sys); no Ray here, so that torchrun scripts can bind the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list"


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11} (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _siblings_from_sys(cpu: int) -> set[int]:
    try:
        return parse_cpu_list(Path(_TOPOLOGY.format(cpu)).read_text())
    except (OSError, ValueError):
        return {cpu}


def physical_cores(cpus: Iterable[int], siblings: Callable[[int], set[int]] = _siblings_from_sys) -> list[list[int]]:
    """The given CPUs grouped into physical cores (hardware threads that share one), by lowest id."""
    allowed = set(cpus)
    cores: dict[int, list[int]] = {}
    for cpu in sorted(allowed):
        group = sorted(siblings(cpu) & allowed) or [cpu]
        cores.setdefault(group[0], group)
    return [cores[k] for k in sorted(cores)]


def rank_cpus(local_rank: int, local_world_size: int, cpus: Iterable[int],
              siblings: Callable[[int], set[int]] = _siblings_from_sys) -> set[int]:
    """This local rank's share of `cpus`: an equal, contiguous block of whole physical cores. With fewer
    physical cores than ranks there is nothing to split: all of `cpus`."""
    cpus = set(cpus)
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank={local_rank!r} is not allowed: expected 0 <= local_rank < "
                         f"local_world_size={local_world_size}")
    cores = physical_cores(cpus, siblings)
    per = len(cores) // local_world_size
    if per == 0:
        return set(cpus)
    return {cpu for core in cores[local_rank * per:(local_rank + 1) * per] for cpu in core}


def bind_process(cpus: set[int]) -> int:
    """Bind every thread of this process (Linux sets affinity per thread; threads started later inherit
    it from their creator) to `cpus`. Returns how many threads were bound. The thread list is read again
    until it holds no thread not yet seen: one started meanwhile by an unbound thread is caught too."""
    seen: set[str] = set()
    bound = 0
    while todo := set(os.listdir("/proc/self/task")) - seen:
        for tid in todo:
            try:
                os.sched_setaffinity(int(tid), cpus)
                bound += 1
            except ProcessLookupError:  # the thread ended in between
                pass
        seen |= todo
    return bound


def bind_local_rank(local_rank: int, local_world_size: int) -> set[int] | None:
    """Bind this process to its local rank's physical cores; None where the OS offers no binding."""
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        return None
    cpus = rank_cpus(local_rank, local_world_size, os.sched_getaffinity(0))
    bind_process(cpus)
    return cpus
