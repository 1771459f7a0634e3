"""What the coordinator (rank 0: target + verification) and the draft worker (rank 1) say to each
other, and how it travels over a ``torch.distributed`` gloo process group.

Every message is a fixed-size int64 header, then the payloads the header announces, each on its
own tag so that a receiver always knows the shape of what it posts a receive for:

    header  int64[8]      [kind, n_ints, n_bytes, q_rows, extra0, extra1, extra2, extra3]
    ints    int64[n_ints]   token ids (proposal, verdict)
    bytes   uint8[n_bytes]  JSON or text (start request, worker error)
    q       float64[q_rows, V]  draft distributions (rule C proposals only)

One generation, seen from the worker::

    <- START {engine, prompt, sampling, spec}
    -> PROPOSAL   (round 1)          extras: counters since the last report
    <- VERDICT    (round 1's)
    -> PROPOSAL   (round 2) ...
    <- STOP                           the generation is over
    -> DONE                           idle again; extras: the last counters
    (-> ERROR instead of a PROPOSAL or DONE when the generation failed in the worker)

Gloo's receive blocks until the data arrives, forever if the peer hangs, so every wait here has a
deadline: a timed-out or broken pair raises :class:`ChannelError` and the channel is dead (gloo
closes the pair); the owner then kills the worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

from ..config import SamplingConfig, SpeculationConfig
from ..engines.specbranch import Proposal, Verdict
from ..metrics import Metrics

LOOPBACK = "127.0.0.1"
HEADER_LEN = 8
TAG_HEADER, TAG_INTS, TAG_BYTES, TAG_Q = 0, 1, 2, 3
FOREVER = 30 * 24 * 3600.0  # "no deadline" for an idle worker waiting for work (gloo needs one)


class Kind(IntEnum):
    START = 1  # coordinator -> worker: a new generation
    PROPOSAL = 2  # worker -> coordinator: one round's proposal
    VERDICT = 3  # coordinator -> worker: the round's verdict
    STOP = 4  # coordinator -> worker: the generation is over
    DONE = 5  # worker -> coordinator: back to idle
    ERROR = 6  # worker -> coordinator: the generation failed in the worker
    SHUTDOWN = 7  # coordinator -> worker: exit


@dataclass
class Message:
    kind: Kind
    ints: list[int] = field(default_factory=list)
    data: bytes = b""
    q: torch.Tensor | None = None  # float64 [rows, V]
    extra: tuple[int, int, int, int] = (0, 0, 0, 0)


class ChannelError(RuntimeError):
    """The peer died, hung past the deadline, or broke the protocol; the channel is unusable."""


def make_group(store: dist.Store, rank: int, timeout: float) -> dist.ProcessGroupGloo:
    """A two-rank gloo group on the loopback interface, separate from torch.distributed's default
    group (so a caller's own use of torch.distributed is untouched, and a worker can be restarted)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
    opts._timeout = timedelta(seconds=timeout)
    return dist.ProcessGroupGloo(store, rank, 2, opts)


class Channel:
    """Ordered messages to and from one peer over a gloo process group.

    Sends are asynchronous (gloo completes a send only once the peer has posted the matching
    receive, and neither side should stall on that); they are awaited, under the deadline, before
    the next receive, which is where a worker waits for its peer anyway.
    """

    def __init__(self, group, peer: int, vocab_size: int) -> None:
        self.group = group
        self.peer = peer
        self.vocab_size = vocab_size
        self._sending: list[tuple[object, torch.Tensor]] = []  # (work, tensor kept alive until sent)
        self.broken = False  # interrupted inside a message: the stream is out of step for good

    def send(self, msg: Message) -> None:
        q = None if msg.q is None else msg.q.detach().to("cpu", torch.float64).contiguous()  # [rows, V]
        if q is not None and (q.dim() != 2 or q.shape[1] != self.vocab_size):
            raise ValueError(f"q rows must be [rows, {self.vocab_size}], got {tuple(q.shape)}")
        header = torch.tensor(
            [int(msg.kind), len(msg.ints), len(msg.data), 0 if q is None else q.shape[0], *msg.extra], dtype=torch.int64
        )
        parts = [(header, TAG_HEADER)]
        if msg.ints:
            parts.append((torch.tensor(msg.ints, dtype=torch.int64), TAG_INTS))
        if msg.data:
            parts.append((torch.frombuffer(bytearray(msg.data), dtype=torch.uint8), TAG_BYTES))
        if q is not None and q.shape[0]:
            parts.append((q, TAG_Q))
        for tensor, tag in parts:
            self._sending.append((self._call(lambda: self.group.send([tensor], self.peer, tag)), tensor))

    def recv(self, timeout: float) -> Message:
        """The next message; raises :class:`ChannelError` if it has not fully arrived within ``timeout`` s."""
        if self.broken:
            raise ChannelError("the channel broke earlier (interrupted in the middle of a message)")
        try:
            return self._recv_message(timeout)
        except BaseException:  # ChannelError, or e.g. KeyboardInterrupt between header and payload
            self.broken = True
            raise

    def _recv_message(self, timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        sending, self._sending = self._sending, []
        for work, _ in sending:
            self._wait(work, deadline)
        header = self._recv(torch.empty(HEADER_LEN, dtype=torch.int64), TAG_HEADER, deadline).tolist()
        kind, n_ints, n_bytes, q_rows = header[:4]
        try:
            kind = Kind(kind)
        except ValueError:
            raise ChannelError(f"protocol error: unknown message kind {kind}") from None
        ints = self._recv(torch.empty(n_ints, dtype=torch.int64), TAG_INTS, deadline).tolist() if n_ints else []
        data = bytes(self._recv(torch.empty(n_bytes, dtype=torch.uint8), TAG_BYTES, deadline).numpy()) if n_bytes else b""
        q = None
        if q_rows:
            q = self._recv(torch.empty(q_rows, self.vocab_size, dtype=torch.float64), TAG_Q, deadline)
        return Message(kind, ints, data, q, tuple(header[4:]))

    def _recv(self, buf: torch.Tensor, tag: int, deadline: float) -> torch.Tensor:
        self._wait(self._call(lambda: self.group.recv([buf], self.peer, tag)), deadline)
        return buf

    @staticmethod
    def _call(fn):
        try:
            return fn()
        except RuntimeError as e:
            raise ChannelError(str(e)) from e

    @staticmethod
    def _wait(work, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelError("timed out")
        try:
            work.wait(timedelta(seconds=left))
        except RuntimeError as e:  # gloo: timeout, or "Connection closed by peer"
            raise ChannelError(str(e)) from e


# ---------------------------------------------------------------- counters the worker reports


@dataclass
class Counters:
    """Draft-side metrics accrued in the worker since its last report, carried in the extras."""

    draft_forwards: int = 0
    branch_forwards: int = 0
    busy_s: float = 0.0  # in draft forwards
    idle_s: float = 0.0  # waiting for the coordinator

    def extra(self) -> tuple[int, int, int, int]:
        return (self.draft_forwards, self.branch_forwards, round(self.busy_s * 1e9), round(self.idle_s * 1e9))

    @classmethod
    def from_extra(cls, extra: tuple[int, ...]) -> "Counters":
        return cls(extra[0], extra[1], extra[2] / 1e9, extra[3] / 1e9)

    def add_to(self, m: Metrics) -> None:
        m.draft_forwards += self.draft_forwards
        m.branch_forwards += self.branch_forwards
        m.draft_busy_s += self.busy_s
        m.draft_idle_s += self.idle_s


class CounterTracker:
    """Turns the worker's running Metrics into per-report deltas."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.reported = Counters()
        self.idle_s = 0.0

    def take(self) -> Counters:
        m = self.metrics
        now = Counters(m.draft_forwards, m.branch_forwards, m.draft_busy_s, self.idle_s)
        r = self.reported
        self.reported = now
        return Counters(now.draft_forwards - r.draft_forwards, now.branch_forwards - r.branch_forwards,
                        now.busy_s - r.busy_s, now.idle_s - r.idle_s)


# ---------------------------------------------------------------- encodings


@dataclass
class StartRequest:
    engine: str
    prompt: list[int]
    sampling: SamplingConfig
    spec: SpeculationConfig


def encode_start(req: StartRequest) -> Message:
    body = {"engine": req.engine, "prompt": list(req.prompt), "sampling": asdict(req.sampling), "spec": asdict(req.spec)}
    return Message(Kind.START, data=json.dumps(body).encode())


def decode_start(msg: Message) -> StartRequest:
    body = json.loads(msg.data)
    return StartRequest(body["engine"], body["prompt"], SamplingConfig(**body["sampling"]),
                        SpeculationConfig(**body["spec"]))


def encode_proposal(p: Proposal, counters: Counters) -> Message:
    # ints: [k, candidates (k), block lengths (k), confidence cuts (k), block tokens (sum of lengths),
    #        len(hedge), hedge ([index, candidates] or none), a = number of alternatives,
    #        alternative lengths (a), alternative tokens, rests]
    k = len(p.candidates)
    hedge, alts = p.hedge or [], p.alternatives or []
    ints = [k, *p.candidates, *(len(b) for b in p.blocks), *(p.cut(b) for b in range(k)),
            *(t for b in p.blocks for t in b), len(hedge), *hedge, len(alts), *(len(a) for a in alts),
            *(t for a in alts for t in a), int(p.rests)]
    return Message(Kind.PROPOSAL, ints, q=p.q, extra=counters.extra())


def decode_proposal(msg: Message) -> tuple[Proposal, Counters]:
    ints, at = msg.ints, 0

    def take(n: int) -> list[int]:
        nonlocal at
        if n < 0 or at + n > len(ints):
            raise ChannelError(f"protocol error: malformed proposal {ints}")
        at += n
        return ints[at - n : at]

    def split(lengths: list[int]) -> list[list[int]]:
        return [take(n) for n in lengths]

    k = take(1)[0]
    candidates, lengths, cuts = take(k), take(k), take(k)
    blocks = split(lengths)
    hedge = take(take(1)[0]) or None
    alternatives = split(take(take(1)[0])) or None
    rests = take(1)[0]
    if at != len(ints) or rests not in (0, 1):
        raise ChannelError(f"protocol error: malformed proposal {ints}")
    return Proposal(candidates, blocks, msg.q, cuts, hedge, alternatives, bool(rests)), Counters.from_extra(msg.extra)


def encode_verdict(v: Verdict) -> Message:
    # ints: [branch (-1: none), keep, force_branch, committed tokens]. Adopting a chain sends nothing: both
    # sides derive it from the chain and the policy (specbranch.adopted_keep).
    return Message(Kind.VERDICT, [-1 if v.branch is None else v.branch, v.keep, int(v.force_branch), *v.tokens])


def decode_verdict(msg: Message) -> Verdict:
    if len(msg.ints) < 3:
        raise ChannelError(f"protocol error: malformed verdict {msg.ints}")
    branch, keep, force = msg.ints[:3]
    return Verdict(msg.ints[3:], None if branch < 0 else branch, keep, bool(force))
