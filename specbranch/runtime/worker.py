"""The draft worker process (rank 1): ``python -m specbranch.runtime.worker '<json config>'``.

Started once by :class:`specbranch.runtime.process.DraftWorker`, it pins itself to its cores,
loads the draft model, says so through the rendezvous store, joins the gloo group and then serves
generations until told to shut down (protocol: :mod:`specbranch.runtime.messages`). Each
generation drives a :class:`~specbranch.engines.specbranch.DraftSide`, the same state machine the
sequential engine drives in one process.

It never outlives its parent: a watchdog thread exits the process as soon as the parent's end of
the stdin pipe closes (the parent exited, however it died) or the process is re-parented.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch.distributed as dist

from ..config import ModelConfig
from ..engines.specbranch import DraftSide, draft_policy
from ..metrics import Metrics
from ..profiling import profiled, region
from ..sampling import draft_generator
from .lending import CoreLender, CoreOffer
from .messages import (
    FOREVER,
    LOOPBACK,
    Channel,
    ChannelError,
    CounterTracker,
    Kind,
    Message,
    decode_start,
    decode_verdict,
    encode_proposal,
    make_group,
)
from .placement import Placement, apply_placement

def watch_parent() -> None:
    """Exit as soon as the parent is gone: EOF on stdin (the parent holds the pipe's other end) or
    a new parent process id (re-parented after the parent died)."""
    parent = os.getppid()
    fd = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if (ready and not os.read(fd, 4096)) or os.getppid() != parent:
            os._exit(0)


def send(channel: Channel, msg: Message, lender: CoreLender | None) -> None:
    """Send to the coordinator, first taking our claims off its cores (``lender``): the message wakes it."""
    if lender is not None:
        lender.reclaim()
    channel.send(msg)


def serve(channel: Channel, backend, offer: CoreOffer | None = None, lender: CoreLender | None = None) -> None:
    """Answer generations until SHUTDOWN (or until the coordinator is gone)."""
    while True:
        msg = channel.recv(FOREVER)
        if msg.kind == Kind.SHUTDOWN:
            return
        if msg.kind == Kind.STOP:  # nothing running: just confirm
            send(channel, Message(Kind.DONE), lender)
        elif msg.kind == Kind.START:
            generation(channel, backend, msg, offer, lender)
        else:
            raise ChannelError(f"protocol error: {msg.kind.name} while idle")


def generation(channel: Channel, backend, start: Message, offer: CoreOffer | None = None,
               lender: CoreLender | None = None) -> None:
    """One generation: draft, send the proposal, wait for the verdict, apply it, repeat until STOP (after a
    chain the target adopts, the draft adopts it too and goes on without waiting: nothing is decided).
    While it waits, ``offer`` lends its cores to the target; while the target waits, ``lender``'s helper
    computes part of the draft's linears on the target's cores."""
    metrics = Metrics()
    tracker = CounterTracker(metrics)
    rounds = 0
    try:
        req = decode_start(start)
        side = DraftSide(backend, draft_policy(req.engine, req.spec), req.spec.draft_sampling)
        with profiled("draft", lambda: rounds):
            side.start(req.prompt, req.sampling, draft_generator(req.sampling.seed), metrics)
            while True:
                proposal = side.draft_round()
                send(channel, encode_proposal(proposal, tracker.take()), lender)
                rounds += 1
                if side.adopting:  # a chain the target adopts whole, deciding nothing: adopt it here, go on
                    side.adopt(proposal)
                    continue
                t0 = time.perf_counter()
                with region("draft.wait"):
                    if offer:
                        offer.offer()
                    msg = channel.recv(FOREVER)
                    if offer:
                        offer.withdraw()
                tracker.idle_s += time.perf_counter() - t0  # waiting for the target: the draft's bubble
                if msg.kind == Kind.STOP:
                    break
                if msg.kind != Kind.VERDICT:
                    raise ChannelError(f"protocol error: {msg.kind.name} during a generation")
                side.apply(decode_verdict(msg))
        # DONE only after the profile (if any) is written: the coordinator may shut us down next
        send(channel, Message(Kind.DONE, extra=tracker.take().extra()), lender)
    except ChannelError:
        raise
    except Exception as e:  # this generation failed here; report it and go back to idle
        traceback.print_exc()
        send(channel, Message(Kind.ERROR, data=f"{type(e).__name__}: {e}".encode()), lender)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    # Ctrl-C in a terminal reaches the whole process group; the coordinator handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=watch_parent, daemon=True, name="watch-parent").start()
    # Pin first, so every thread started later (torch's pool, gloo's) inherits the cores.
    apply_placement(Placement(cfg["device"], tuple(cfg["cores"]), cfg["threads"]))
    store = dist.TCPStore(LOOPBACK, cfg["port"], 2, False, timeout=timedelta(seconds=cfg["startup_s"]))
    try:
        from ..pipeline import load_backend

        model = ModelConfig(**cfg["model"])  # draft_precision already resolved by the Pipeline
        backend = load_backend(cfg["folder"], model, cfg["device"], model.draft_vocab, model.draft_precision)
    except Exception as e:
        store.set("error", f"{type(e).__name__}: {e}")
        return 1
    lender = None
    if cfg.get("borrow_page"):  # our helper on the target's cores, for our linears while the target waits
        lender = CoreLender(tuple(cfg["borrow_cores"]), cfg["borrow_page"])
        lender.activate()
    store.set("ready", json.dumps({"vocab_size": backend.vocab_size, "weight_bytes": backend.weight_bytes()}))
    channel = Channel(make_group(store, 1, cfg["startup_s"]), peer=0, vocab_size=backend.vocab_size)
    try:
        serve(channel, backend, CoreOffer(cfg["lend_page"]) if cfg.get("lend_page") else None, lender)
    except ChannelError as e:  # the coordinator went away or broke the protocol: nothing left to serve
        print(f"specbranch draft worker: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
