"""Which cores and threads each worker of the parallel runtime gets.

On a CPU the two workers compete for cores: left alone, two torch thread pools of "all cores"
each would oversubscribe the machine and both would slow down. So by default each worker is
pinned to its own half of the cores this process may use (one core each on a 2-core machine) with
one torch thread per core. The sequential runtime and ``ar`` keep every core: they compute one
model at a time, so pinning would only leave cores idle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..config import RuntimeConfig, parse_cores
from ..errors import ConfigError

if TYPE_CHECKING:  # lending imports this module
    from .lending import CoreLender


@dataclass(frozen=True)
class Placement:
    """One worker's share of the machine: device, pinned cores (empty = no pinning), torch threads
    (0 = leave as is)."""

    device: str = "cpu"
    cores: tuple[int, ...] = ()
    threads: int = 0


def available_cores() -> list[int]:
    """Cores this process may run on (all of ``os.cpu_count()`` where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def worker_placements(cfg: RuntimeConfig) -> tuple[Placement, Placement]:
    """(target, draft) placements for the parallel runtime."""
    available = available_cores()
    target = parse_cores(cfg.target_cores, "target_cores")
    draft = parse_cores(cfg.draft_cores, "draft_cores")
    unknown = sorted(set(target + draft) - set(available))
    if unknown:
        raise ConfigError(f"cores {unknown} are not available to this process (it may use {available}): "
                          "fix --target-cores / --draft-cores")
    if not target and not draft:
        half = (len(available) + 1) // 2  # the target, the bigger model, gets the odd core
        target, draft = available[:half], available[half:] or available
    elif not target:
        target = [c for c in available if c not in draft] or available
    elif not draft:
        draft = [c for c in available if c not in target] or available
    return (
        Placement(cfg.target_device, tuple(target), cfg.target_threads or len(target)),
        Placement(cfg.draft_device, tuple(draft), cfg.draft_threads or len(draft)),
    )


def apply_placement(p: Placement, lender: CoreLender | None = None) -> Callable[[], None]:
    """Pin the calling thread (and the threads it starts later) to ``p.cores``, set torch's thread
    count and activate ``lender`` (a :class:`~.lending.CoreLender`: borrow the draft's cores while it
    waits); returns a function that restores all three (safe to call more than once)."""
    can_pin = bool(p.cores) and hasattr(os, "sched_setaffinity")
    old_cores = os.sched_getaffinity(0) if can_pin else None
    old_threads = torch.get_num_threads()
    if can_pin:
        os.sched_setaffinity(0, p.cores)
    if p.threads:
        torch.set_num_threads(p.threads)
    if lender is not None:
        lender.activate()
    done = False

    def restore() -> None:
        nonlocal done
        if done:
            return
        done = True
        if lender is not None:
            lender.deactivate()
        if old_cores is not None:
            os.sched_setaffinity(0, old_cores)
        torch.set_num_threads(old_threads)

    return restore
