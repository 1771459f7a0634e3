"""Lending a waiting worker's core to the other (runtime/lending.py, kernels/lend.c).

In one process: a helper thread pinned to another core computes chunks of the int8 linears (the target's) and
of the int4 linears (the draft's) exactly while the page's bit is set, with the same bits whoever computed
what, and never while it is clear; flipping the bit at random moments in the middle of calls changes no result
and hangs nothing; a helper started on a page a dead process left behind ignores that process's job.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import sys
import threading

import pytest
import torch

from conftest import torch_threads
from specbranch.kernels import unavailable
from specbranch.models.linear import Int4Linear, Int8Linear
from specbranch.runtime.lending import CoreLender, CoreOffer, new_page
from specbranch.runtime.placement import available_cores

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or unavailable() is not None,
                                reason="lending needs Linux and the native kernels")


@pytest.fixture
def lent():
    """(lender, offer): the helper on the last core this process may use, the caller pinned to the first."""
    cores = available_cores()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cores[0]})
    lender = CoreLender((cores[-1],))
    offer = CoreOffer(lender.path)
    lender.activate()
    try:
        with torch_threads(1):
            yield lender, offer
    finally:
        lender.close()
        os.sched_setaffinity(0, before)
    assert not os.path.exists(lender.path)  # close removes the shared page


def fbgemm(lin: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    lin.use_kernel = False
    try:
        return lin(x)
    finally:
        lin.use_kernel = True


def helped_only_while_offered(lender: CoreLender, offer: CoreOffer, lin, xs: dict, want: dict) -> None:
    """Offer the core: ``lin`` gives ``want`` on every input while the helper takes chunks; withdraw it: the same
    results and no more chunks."""
    offer.offer()
    for _ in range(500):  # the helper needs a moment to be scheduled on its core
        for m, x in xs.items():
            assert torch.equal(lin(x), want[m]), f"{m} rows differ with the core lent"
        if lender.chunks_helped > 0:
            break
    assert lender.chunks_helped > 0, f"the helper never computed a chunk of {type(lin).__name__} while offered"
    offer.withdraw()
    helped = lender.chunks_helped
    for m, x in xs.items():
        assert torch.equal(lin(x), want[m])
    assert lender.chunks_helped == helped  # no claim without the bit


def test_the_lent_core_takes_chunks_only_while_offered_and_changes_no_bit(lent):
    lender, offer = lent
    torch.manual_seed(0)
    lin = Int8Linear.from_float(torch.randn(4099, 384) * 0.05, torch.randn(4099))  # ~1.6 MB, a partial block
    xs = {m: torch.randn(m, 384) * torch.logspace(-2, 2, m)[:, None] for m in (1, 8, 100)}
    want = {m: fbgemm(lin, x) for m, x in xs.items()}

    helped_only_while_offered(lender, offer, lin, xs, want)
    lender.deactivate()
    assert torch.equal(lin(xs[100]), want[100])  # prompts back on FBGEMM, the same bits


def test_the_draft_int4_linears_take_a_quietly_offered_core(lent):
    """The other direction: the draft's helper on the target's core while the target waits for a block. The
    int4 kernel hands out chunks with the same bits as without a helper, and a quiet offer (no wake-up: the
    owner's next call wakes the helper) is taken up all the same."""
    lender, _ = lent
    quiet = CoreOffer(lender.path, wake=False)
    torch.manual_seed(2)
    lin = Int4Linear.from_int8(Int8Linear.from_float(torch.randn(4100, 448) * 0.05, torch.randn(4100)).pack())
    xs = {m: torch.randn(m, 448) for m in (1, 3, 4)}
    lender.deactivate()
    want = {m: lin(x) for m, x in xs.items()}  # plain OpenMP, no helper
    lender.activate()
    for m, x in xs.items():
        assert torch.equal(lin(x), want[m])
    assert lender.chunks_helped == 0  # nothing offered yet
    helped_only_while_offered(lender, quiet, lin, xs, want)
    quiet.close()


def test_a_new_helper_ignores_a_dead_owners_job():
    """A draft worker killed in the middle of a linear leaves its job on the page (and the target's bit may be
    set); the next worker's helper maps the same page and must not run that job (its function is not there)."""
    path = new_page()
    try:
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), 16)
            # LEND, job 5, chunks 3..49 (the owner's half) and 50..99 (the helper's) unclaimed
            m[:8] = struct.pack("<Q", (1 << 63) | (5 << 48) | (100 << 36) | (50 << 24) | (50 << 12) | 3)
            lender = CoreLender((available_cores()[-1],), str(path))
            try:
                assert struct.unpack("<Q", m[:8])[0] == 0
                offer = CoreOffer(str(path))
                offer.offer()  # the helper wakes, finds no job, and claims nothing
                threading.Event().wait(0.05)
                assert lender.chunks_helped == 0
                offer.close()
            finally:
                lender.close()
            m.close()
        assert path.exists()  # a page the lender did not create is not its to remove
    finally:
        path.unlink(missing_ok=True)


def test_flipping_the_bit_mid_call_changes_nothing(lent):
    """The draft wakes and sleeps at any moment relative to the target's calls: claims racing the bit, a helper
    finishing a chunk after the bit is gone, the next job published while it spins."""
    lender, offer = lent
    torch.manual_seed(1)
    lin = Int8Linear.from_float(torch.randn(2048, 512) * 0.05, None)
    x = torch.randn(8, 512)
    want = fbgemm(lin, x)
    stop = threading.Event()

    def flip() -> None:
        rng = random.Random(0)
        while not stop.is_set():
            (offer.offer if rng.random() < 0.5 else offer.withdraw)()
            stop.wait(rng.random() * 2e-4)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for i in range(300):
            assert torch.equal(lin(x), want), f"call {i} differs"
    finally:
        stop.set()
        flipper.join()


def test_a_closed_lender_is_inert_and_a_forked_child_does_not_use_it(lent):
    lender, offer = lent
    lin = Int8Linear.from_float(torch.randn(512, 256) * 0.05, None)
    x = torch.randn(1, 256)
    want = fbgemm(lin, x)
    offer.offer()
    pid = os.fork()
    if pid == 0:  # the child has no helper: its calls must not be published on the shared page
        from specbranch.kernels import library

        os._exit(0 if not library().lend_active() and torch.equal(lin(x), want) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    offer.withdraw()
    lender.close()
    lender.reclaim()  # after close: no page to touch, no crash
    lender.activate()
    assert torch.equal(lin(x), want)
