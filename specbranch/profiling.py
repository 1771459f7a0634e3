"""Operator profiles of each worker (``specbranch generate --profile DIR``).

Why an environment variable: the draft worker of the parallel runtime is another process, started
by the runtime rather than by the command line; it inherits the environment, so one switch turns
profiling on in both processes. Each role writes ``DIR/<role>.txt``: the torch profiler's table of
operators and of the regions below, so time per round can be read off as region time / rounds.

Regions (``region(name)``) mark the phases of a round: ``target.forward`` / ``draft.forward``
(model forwards), ``target.settle`` (verification), ``target.wait`` / ``draft.wait`` (waiting for
the other worker: the bubbles). Outside a profile they cost a few microseconds per round.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

ENV = "SPECBRANCH_PROFILE"


def region(name: str):
    """A named span in the profile (a no-op context when no profile is being taken)."""
    return torch.profiler.record_function(name) if os.environ.get(ENV) else nullcontext()


@contextmanager
def profiled(role: str, rounds: "callable | None" = None) -> Iterator[None]:
    """Profile the enclosed work when ``$SPECBRANCH_PROFILE`` names a folder; write ``<role>.txt``.
    ``rounds()``, if given, is called afterwards for the round count printed in the header."""
    folder = os.environ.get(ENV)
    if not folder:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    n = rounds() if rounds else 0
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    path = Path(folder) / f"{role}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"{role}: {n} rounds (divide totals by this for per-round figures)\n" if n else f"{role}\n"
    path.write_text(header + table + "\n")
