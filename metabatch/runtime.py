"""Process settings for training loops: intra-op threads next to loader workers, and huge pages.

torch runs each operator on as many intra-op threads as the machine has
cores. Next to loader workers, or on a machine shared with other work, those
threads wait on each other: a small meta-step on 2 busy cores measured 10x
slower with torch's default than with one thread. [`default_threads`][metabatch.runtime.default_threads]
gives the count that does not oversubscribe the cores this process may use —
the cores minus the loader workers, at least 1 — and [`use_threads`][metabatch.runtime.use_threads]
applies it (`torch.set_num_threads`) and returns the previous count.

Huge pages: importing metabatch sets `THP_MEM_ALLOC_ENABLE=1` in the
environment unless it is already set (to anything: `THP_MEM_ALLOC_ENABLE=0`
keeps torch's default). torch reads it at its first large CPU allocation and
then backs every CPU tensor of 2 MB or more with transparent huge pages: a
freshly allocated activation then costs one page fault per 2 MB instead of
one per 4 KB. A vmapped meta-step over a batch of conv-net tasks allocates
hundreds of MB of such activations per step; on 2 cores this made the
Omniglot conv4 meta-step 1.3-1.5x faster and its peak memory lower
(`docs/performance.md`). It has no effect when torch already allocated a
large CPU tensor before metabatch was imported, nor where the kernel's
`/sys/kernel/mm/transparent_hugepage/enabled` is `never`.

Examples:
    >>> import metabatch as mb
    >>> n = mb.runtime.default_threads(num_workers=1)
    >>> 1 <= n <= mb.runtime.cpu_count()
    True
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import _validate

__all__ = ["cpu_count", "default_threads", "use_threads"]

# torch's CPU allocator reads this once, at its first large allocation (c10's alloc_cpu).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 `cpu.max`, v1 `cfs_quota`), in cores, if any."""
    try:
        max_quota, max_period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if max_quota == "max" else int(max_quota) / int(max_period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_count() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup quota (containers).

    Examples:
        >>> import metabatch as mb
        >>> mb.runtime.cpu_count() >= 1
        True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def default_threads(num_workers: int = 0) -> int:
    """Intra-op threads for a training loop next to `num_workers` loader workers.

    `max(1, cpu_count() - num_workers)`: each worker keeps a core busy
    building batches; the training loop takes the rest.

    Args:
        num_workers: the loader's worker processes (0 when batches are built in the loop).

    Returns:
        A thread count `>= 1`.

    Raises:
        TypeError: `num_workers` is not an int.
        ValueError: `num_workers < 0`.

    Examples:
        >>> import metabatch as mb
        >>> mb.runtime.default_threads(num_workers=10_000)
        1
    """
    num_workers = _validate.integer(num_workers, "num_workers", "default_threads", low=0)
    return max(1, cpu_count() - num_workers)


def use_threads(threads: int | None = None, *, num_workers: int = 0) -> int:
    """Set torch's intra-op threads for this process; returns the previous count.

    Args:
        threads: the count; `None` uses
            [`default_threads`][metabatch.runtime.default_threads] of `num_workers`.
        num_workers: the loader's worker processes (used when `threads` is `None`).

    Returns:
        The previous `torch.get_num_threads()`, to restore it later.

    Raises:
        TypeError: `threads` or `num_workers` is not an int.
        ValueError: `threads < 1` or `num_workers < 0`.

    Examples:
        >>> import torch, metabatch as mb
        >>> before = mb.runtime.use_threads(1)
        >>> torch.get_num_threads()
        1
        >>> _ = mb.runtime.use_threads(before)
    """
    if threads is None:
        threads = default_threads(num_workers)
    else:
        threads = _validate.integer(threads, "threads", "use_threads", low=1)
        _validate.integer(num_workers, "num_workers", "use_threads", low=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous
