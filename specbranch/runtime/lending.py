"""Lending the draft worker's cores to the target while the draft waits for a verdict.

The parallel runtime pins each worker to its own cores. Each round the draft usually finishes drafting
before the target finishes verifying, and its cores then sit idle. With lending, a helper thread of the
target process, pinned to the draft's cores, computes chunks of the target's int8 linears exactly while the
draft waits (``kernels/lend.c`` has the protocol and why it is safe). The results are bit-identical: which
thread computed an output block does not change it.

Both processes map one small shared file, the *page*: the target side (:class:`CoreLender`) creates it and
runs the helper; the draft side (:class:`CoreOffer`) sets the page's bit while it waits.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import tempfile
from pathlib import Path

from ..kernels import optional_library, unavailable
from .placement import Placement

PAGE_BYTES = 4096


def lending_unavailable(target: Placement, draft: Placement) -> str | None:
    """None if the target can borrow the draft's cores here, else why not."""
    if target.device != "cpu" or draft.device != "cpu":
        return "both workers must run on the CPU"
    if not sys.platform.startswith("linux"):
        return "lending needs Linux (futexes, thread affinity)"
    if not draft.cores or set(draft.cores) & set(target.cores):
        return "the draft worker needs cores of its own"
    return unavailable()


class _Page:
    """The shared file, mapped: its address is what the kernels take."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), PAGE_BYTES)
        self._anchor = ctypes.c_char.from_buffer(self.map)  # keeps the mapping alive while C holds its address
        self.address = ctypes.addressof(self._anchor)

    def close(self) -> None:
        del self._anchor
        self.map.close()


class CoreLender:
    """Target side: the page, the helper thread on ``draft_cores``, and whether the kernels use it."""

    def __init__(self, draft_cores: tuple[int, ...]) -> None:
        self.lib = optional_library()
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        fd, name = tempfile.mkstemp(prefix="specbranch-lend-", dir=shm)
        os.ftruncate(fd, PAGE_BYTES)
        os.close(fd)
        self.page = _Page(Path(name))
        cores = (ctypes.c_int * len(draft_cores))(*draft_cores)
        self.handle = self.lib.lend_start(self.page.address, cores, len(draft_cores))
        if not self.handle:
            self.page.close()
            self.page.path.unlink(missing_ok=True)
            raise OSError("could not start the lending helper thread")

    @property
    def path(self) -> str:
        return str(self.page.path)

    def activate(self) -> None:
        """From now on the int8 kernels of this process hand chunks to the helper (while the bit is set)."""
        if self.handle:
            self.lib.lend_activate(self.handle)

    def deactivate(self) -> None:
        self.lib.lend_activate(None)

    def reclaim(self) -> None:
        """Clear the bit: called before anything is sent to the draft worker, which that wakes. (After
        :meth:`close` the page is gone and there is nothing to clear.)"""
        if self.handle:
            self.lib.lend_reclaim(self.page.address)

    @property
    def chunks_helped(self) -> int:
        """Chunks of linears the helper has computed so far (diagnostics, tests)."""
        return self.lib.lend_helped(self.handle)

    def close(self) -> None:
        """Stop the helper and remove the page (idempotent)."""
        if self.handle:
            self.reclaim()
            self.lib.lend_stop(self.handle)  # also deactivates it if it is the active one
            self.handle = None
            self.page.close()
            self.page.path.unlink(missing_ok=True)


class CoreOffer:
    """Draft side: :meth:`offer` the cores before waiting for the verdict, :meth:`withdraw` once woken."""

    def __init__(self, path: str) -> None:
        self.lib = optional_library()
        self.page = _Page(Path(path))

    def offer(self) -> None:
        self.lib.lend_offer(self.page.address)

    def withdraw(self) -> None:
        self.lib.lend_reclaim(self.page.address)  # the target has cleared it already; this is a safety net
