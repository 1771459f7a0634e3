"""The parallel runtime's engine: PEARL / SpecBranch with the two workers computing at once.

This process is rank 0: it runs the target (a :class:`TargetSide`) and decides every round; the
draft worker process (rank 1) runs a :class:`DraftSide`. One round::

    rank 0 (target)                              rank 1 (draft)
    send last round's VERDICT  ───────────────►  apply it
    forward over the pending block               draft past it: branch point + branches
    wait for the PROPOSAL      ◄───────────────  send the PROPOSAL, wait for the verdict
    settle (verify, decide)

After a rollback with ``after_rollback="wait"`` (and after a round the draft rested in) the target first
waits for the draft's chain and adopts it as the pending block, then runs the round above. Adopting
decides nothing, so no message says it: the draft applies the same adoption as soon as it has sent the
chain, and goes on (drafting past it, or resting and lending its core from the start of the
verification). Both halves apply the same verdict to their own copy of the state, so they stay in step
without sharing anything else. The verdict goes out at the start of the next round rather than at the end
of this one so that the generation loop can stop in between (EOS, stop string, budget) without the
worker drafting a round nobody wants; :meth:`finish` then sends STOP instead.

If the worker dies or hangs, the generation raises a :class:`~specbranch.errors.WorkerError`, or,
with ``on_worker_failure="ar"``, finishes as plain decoding on the target (still exact).
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from ..backend import Backend
from ..config import RuntimeConfig, SamplingConfig, SpeculationConfig
from ..engines.ar import next_token
from ..engines.base import Engine
from ..engines.specbranch import Proposal, TargetSide, Verdict, draft_policy
from ..hrad import HRADPredictor
from ..errors import WorkerError
from ..metrics import Metrics
from ..profiling import region
from .messages import StartRequest
from .placement import Placement, apply_placement
from .process import DraftWorker


class ParallelEngine(Engine):
    """``pearl`` or ``specbranch`` with the draft in :class:`DraftWorker`'s process."""

    def __init__(
        self,
        name: str,
        target: Backend,
        worker: DraftWorker,
        runtime: RuntimeConfig,
        placement: Placement,
        spec: SpeculationConfig | None = None,
        predictor: HRADPredictor | None = None,
    ) -> None:
        if name not in ("pearl", "specbranch"):
            raise ValueError(f"the parallel runtime runs pearl and specbranch, not {name!r}")
        self.name = name
        self.spec = spec or SpeculationConfig()
        self.target_side = TargetSide(target, self.spec.draft_sampling, draft_policy(name, self.spec), predictor)
        self.worker = worker
        self.runtime = runtime
        self.placement = placement
        self._restore = lambda: None

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        self.metrics, self.sampling, self.rng = metrics, sampling, rng
        self.fallback = False
        self.held: Verdict | None = None  # this round's verdict, sent when the next round starts
        self._restore = apply_placement(self.placement, self.worker.lender)
        try:
            self.worker.ensure_ready()
            self.worker.begin(StartRequest(self.name, list(prompt), sampling, self.spec))
        except WorkerError as e:
            self._worker_failed(e)
        self.target_side.start(prompt, sampling, rng, metrics)  # the worker prefills meanwhile

    def step(self) -> list[int]:
        if self.fallback:
            return self._ar_step()
        try:
            if self.held is not None:
                self.worker.send_verdict(self.held)
                self.held = None
            if self.target_side.adopting:  # after a rollback: the draft's first chain becomes the pending block
                self.target_side.adopt(self._wait_for_proposal())  # the draft adopted it on its side already
            logits = self.target_side.target_round()
            proposal = self._wait_for_proposal()
        except WorkerError as e:
            self._worker_failed(e)
            return self._ar_step()
        with region("target.settle"):
            self.held = self.target_side.settle(proposal, logits)
        return self.held.tokens

    def _wait_for_proposal(self) -> Proposal:
        t0 = time.perf_counter()
        with region("target.wait"):
            proposal, counters = self.worker.recv_proposal()
        self.metrics.target_idle_s += time.perf_counter() - t0  # waiting for the draft: the target's bubble
        counters.add_to(self.metrics)
        return proposal

    def finish(self) -> None:
        try:
            if not self.fallback and self.worker.state != "down":
                t0 = time.perf_counter()
                self.worker.end().add_to(self.metrics)
                self.metrics.target_idle_s += time.perf_counter() - t0
        except WorkerError as e:  # the tokens are all in; the next generation starts a fresh worker
            warnings.warn(f"{e}; it will be restarted for the next generation", RuntimeWarning, stacklevel=2)
        finally:
            self._restore()

    def _worker_failed(self, err: WorkerError) -> None:
        self._restore()  # the target alone may use every core again
        if self.runtime.on_worker_failure != "ar":
            raise err
        warnings.warn(f"{err}; finishing this generation with ar on the target", RuntimeWarning, stacklevel=3)
        self.fallback = True

    def _ar_step(self) -> list[int]:
        """Plain decoding from the committed tokens (pending drafts are dropped): exact, just slower."""
        ts = self.target_side
        logits = ts.lane.feed(ts.committed)[0]  # [V]
        token = next_token(logits, self.sampling, self.rng)
        ts.committed.append(token)
        return [token]
