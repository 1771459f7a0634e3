"""Lending a waiting worker's cores to the other worker of the parallel runtime.

The parallel runtime pins each worker to its own cores, and each round one of them finishes first and waits
for the other. With lending, each process runs a helper thread pinned to the other worker's cores, which
computes chunks of its own process's linears exactly while the other waits (``kernels/lend.c`` has the
protocol and why it is safe):

- the target's helper, on the draft's cores, takes the target's int8 linears while the draft waits for a
  verdict (``--lend-draft-cores``): every round's tail, and the target's prefill of the prompt;
- the draft's helper, on the target's cores, takes the draft's int4 linears while the target waits for a
  proposal (``--lend-target-cores``): after a rollback the target waits for the draft's next block.

The results are bit-identical: which thread computed an output block does not change it. Each direction has
one small shared file, the *page*: the process whose linears are shared (the *owner*) runs the helper on it
(:class:`CoreLender`), the waiting one sets its bit (:class:`CoreOffer`). The target process creates both
pages and removes them at close, so a draft worker that is killed leaves nothing behind.
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

    def close(self, remove: bool = False) -> None:
        """Unmap it; ``remove``: also delete the file (whoever created it)."""
        del self._anchor
        self.map.close()
        if remove:
            self.path.unlink(missing_ok=True)


def new_page() -> Path:
    """A fresh shared page (in /dev/shm where it can be written)."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    fd, name = tempfile.mkstemp(prefix="specbranch-lend-", dir=shm)
    os.ftruncate(fd, PAGE_BYTES)
    os.close(fd)
    return Path(name)


class CoreLender:
    """Owner side: the page, the helper thread on the other worker's ``cores``, and whether this process's
    kernels use it. ``path``: a page the other process created (else a new one, removed at :meth:`close`)."""

    def __init__(self, cores: tuple[int, ...], path: str | None = None) -> None:
        self.lib = optional_library()
        self.owns_page = path is None
        self.page = _Page(new_page() if path is None else Path(path))
        ids = (ctypes.c_int * len(cores))(*cores)
        self.handle = self.lib.lend_start(self.page.address, ids, len(cores))
        if not self.handle:
            self.page.close(remove=self.owns_page)
            raise OSError("could not start the lending helper thread")

    @property
    def path(self) -> str:
        return str(self.page.path)

    def activate(self) -> None:
        """From now on the kernels of this process hand chunks to the helper (while the bit is set)."""
        if self.handle:
            self.lib.lend_activate(self.handle)

    def deactivate(self) -> None:
        self.lib.lend_activate(None)

    def reclaim(self) -> None:
        """Clear the bit: called before anything is sent to the other worker, which that wakes. (After
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
            self.page.close(remove=self.owns_page)


class CoreOffer:
    """Lender side: :meth:`offer` the cores before waiting for the other worker, :meth:`withdraw` once woken.

    ``wake``: wake the helper at once, to join the owner's current call (the target's linears take
    milliseconds), or let the owner's next call wake it (the draft's take well under one). ``cores``: the
    cores offered (what the owner's :class:`CoreLender` pins its helper to). Made by :meth:`create`, it
    owns its page and removes it at :meth:`close`."""

    def __init__(self, path: str, wake: bool = True, cores: tuple[int, ...] = ()) -> None:
        self.lib = optional_library()
        self.page = _Page(Path(path))
        self.wake = wake
        self.cores = tuple(cores)
        self.owns_page = False
        self.closed = False

    @classmethod
    def create(cls, cores: tuple[int, ...], wake: bool = True) -> "CoreOffer":
        """An offer of ``cores`` over a new page, for the owner process to map (:attr:`path`)."""
        offer = cls(str(new_page()), wake, cores)
        offer.owns_page = True
        return offer

    @property
    def path(self) -> str:
        return str(self.page.path)

    def offer(self) -> None:
        if not self.closed:  # after close the page is unmapped: nothing to offer through
            (self.lib.lend_offer if self.wake else self.lib.lend_offer_quiet)(self.page.address)

    def withdraw(self) -> None:
        if not self.closed:  # the owner has cleared it already; this is a safety net
            self.lib.lend_reclaim(self.page.address)

    def close(self) -> None:
        """Unmap the page (and remove it if this offer made it); idempotent."""
        if not self.closed:
            self.withdraw()
            self.closed = True
            self.page.close(remove=self.owns_page)
