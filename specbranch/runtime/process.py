"""The draft worker process as the coordinator (rank 0) sees it: start, health, messages, stop.

The worker is a plain ``python -m specbranch.runtime.worker`` child rather than a
``multiprocessing`` spawn: spawn re-imports the caller's ``__main__`` module in the child, which
runs the top-level code of any script that does not guard it with ``if __name__ == "__main__"``
(a library must not demand that), and it starts a resource-tracker process besides.

Failure model: any broken exchange (peer closed, deadline passed, protocol error) kills the worker
and raises a :class:`~specbranch.errors.WorkerError`; the next generation starts a fresh worker.
An exception inside the worker's generation is reported back (the worker stays up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..config import ModelConfig
from ..engines.specbranch import Proposal, Verdict
from ..errors import ModelError, WorkerDiedError, WorkerError, WorkerTimeoutError
from .lending import CoreLender, CoreOffer
from .messages import (
    LOOPBACK,
    Channel,
    ChannelError,
    Counters,
    Kind,
    Message,
    StartRequest,
    decode_proposal,
    encode_start,
    encode_verdict,
    make_group,
)
from .placement import Placement

STARTUP_LIMIT_S = 600.0  # loading (first int8 quantization included) is waited for while the worker lives
SHUTDOWN_GRACE_S = 5.0


class DraftWorker:
    """One draft worker process and the gloo channel to it.

    ``state`` tracks where the worker is in the protocol, so the coordinator can always bring it
    back to idle: ``down`` (no process), ``starting`` (loading), ``idle``, ``drafting`` (owes us a
    proposal) or ``waiting`` (waits for a verdict or STOP).
    """

    def __init__(self, folder: Path, models: ModelConfig, placement: Placement, timeout: float,
                 lender: CoreLender | None = None, offer: CoreOffer | None = None) -> None:
        self.folder = Path(folder)
        self.models = models
        self.placement = placement
        self.timeout = timeout
        self.lender = lender  # borrows this worker's cores for the target while it waits (lending.py)
        self.offer = offer  # lends the target's cores to this worker while the target waits for a proposal
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.state = "down"
        self.vocab_size: int | None = None
        self.weight_bytes: int | None = None  # what one draft forward streams (the worker's model, as loaded)
        self.starts = 0

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the process (returns at once; :meth:`wait_ready` waits for the model to load)."""
        self.kill()
        self.store = dist.TCPStore(LOOPBACK, 0, 2, True, timeout=timedelta(seconds=STARTUP_LIMIT_S),
                                   wait_for_workers=False)
        p = self.placement
        config = {
            "port": self.store.port,
            "folder": str(self.folder),
            "model": asdict(self.models),
            "device": p.device,
            "cores": list(p.cores),
            "threads": p.threads,
            "startup_s": STARTUP_LIMIT_S,
            "lend_page": self.lender.path if self.lender else None,
            "borrow_page": self.offer.path if self.offer else None,
            "borrow_cores": list(self.offer.cores) if self.offer else [],
        }
        env = dict(os.environ)
        # The child must import this very package, wherever the caller imported it from.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specbranch.runtime.worker", json.dumps(config)],
            stdin=subprocess.PIPE,  # its EOF tells the worker we are gone
            stdout=subprocess.DEVNULL,  # our stdout carries generated text; the worker's stderr is ours
            env=env,
        )
        self.state = "starting"
        self.starts += 1

    def wait_ready(self) -> None:
        """Wait until the worker has loaded the draft and joined the group."""
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not self.store.check(["ready"]):
            if self.store.check(["error"]):
                msg = self.store.get("error").decode()
                self.kill()
                raise ModelError(f"the draft worker could not load {self.folder}: {msg}")
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.kill()
                raise WorkerDiedError(f"the draft worker exited while starting ({_status(code)}); see its messages above")
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerTimeoutError(f"the draft worker did not load its model within {STARTUP_LIMIT_S:.0f} s")
            time.sleep(0.02)
        ready = json.loads(self.store.get("ready"))
        self.vocab_size, self.weight_bytes = ready["vocab_size"], ready["weight_bytes"]
        try:
            group = make_group(self.store, 0, self.timeout)
        except RuntimeError as e:
            raise self._failure(ChannelError(str(e))) from e
        self.channel = Channel(group, peer=1, vocab_size=self.vocab_size)
        self.state = "idle"

    def ensure_ready(self) -> None:
        """A live, idle worker: finish starting it, or start a fresh one if it is gone."""
        if self.state == "starting":
            self.wait_ready()
        elif self.state == "down" or not self.alive or self.channel.broken:
            self.start()
            self.wait_ready()
        elif self.state != "idle":
            self.end()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def kill(self) -> None:
        """Stop the process now and reap it (no zombie, no orphan)."""
        if self.lender is not None:
            self.lender.reclaim()  # a worker that died waiting leaves the bit set
        proc, self.proc, self.channel, self.state = self.proc, None, None, "down"
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdin:
            proc.stdin.close()

    def close(self) -> None:
        """Shut the worker down: politely if it is idle, else (or if that takes too long) by force."""
        if self.alive and self.state == "idle":
            try:
                self.channel.send(Message(Kind.SHUTDOWN))
                self.proc.stdin.close()
                self.proc.wait(SHUTDOWN_GRACE_S)
            except (ChannelError, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()
        if self.lender is not None:
            self.lender.close()
        if self.offer is not None:
            self.offer.close()

    # -- the protocol --------------------------------------------------------------------------
    def begin(self, req: StartRequest) -> None:
        self._send(encode_start(req))
        self.state = "drafting"

    def send_verdict(self, verdict: Verdict) -> None:
        self._send(encode_verdict(verdict))
        self.state = "drafting"

    def recv_proposal(self) -> tuple[Proposal, Counters]:
        """The round's proposal; meanwhile the target's cores are the worker's (``offer``)."""
        if self.offer is not None:
            self.offer.offer()
        try:
            msg = self._recv(Kind.PROPOSAL)
        finally:
            if self.offer is not None:
                self.offer.withdraw()  # the worker cleared it before sending; also when it failed or hung
        self.state = "waiting"
        return decode_proposal(msg)

    def end(self) -> Counters:
        """Bring the worker back to idle after a generation; returns the counters it still reports."""
        total = Counters()
        if self.channel is not None and self.channel.broken:  # cannot resynchronise: start afresh next time
            self.kill()
            return total
        if self.state == "drafting":  # a round is under way: take (and drop) its proposal
            _, counters = self.recv_proposal()
            total = counters
        if self.state == "waiting":
            self._send(Message(Kind.STOP))
            done = Counters.from_extra(self._recv(Kind.DONE).extra)
            self.state = "idle"
            total = Counters(total.draft_forwards + done.draft_forwards, total.branch_forwards + done.branch_forwards,
                             total.busy_s + done.busy_s, total.idle_s + done.idle_s)
        return total

    def _send(self, msg: Message) -> None:
        if self.lender is not None:
            self.lender.reclaim()  # the message wakes the worker: its cores are its own again from here
        try:
            self.channel.send(msg)
        except ChannelError as e:
            raise self._failure(e) from e

    def _recv(self, want: Kind) -> Message:
        try:
            msg = self.channel.recv(self.timeout)
        except ChannelError as e:
            raise self._failure(e) from e
        if msg.kind == Kind.ERROR:
            self.state = "idle"  # the worker reported a failure of this generation and waits for work
            raise WorkerError(f"the draft worker failed: {msg.data.decode()}")
        if msg.kind != want:
            raise self._failure(ChannelError(f"protocol error: expected {want.name}, got {msg.kind.name}"))
        return msg

    def _failure(self, err: ChannelError) -> WorkerError:
        """Kill the worker and say what happened to it: it died, or it stopped answering."""
        proc = self.proc
        hung = "timed out" in str(err).lower()
        if proc is not None and not hung:
            try:  # a peer that closed the connection is usually exiting: give it a moment to be seen
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        code = None if proc is None else proc.poll()
        self.kill()
        if code is not None:
            return WorkerDiedError(f"the draft worker died ({_status(code)})")
        if hung:
            return WorkerTimeoutError(
                f"the draft worker did not answer within {self.timeout:g} s (raise --worker-timeout if it is just slow)"
            )
        return WorkerError(f"lost the draft worker: {err}")


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
