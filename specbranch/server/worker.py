"""One generation at a time: a bounded queue in front of a single worker thread.

Generation is batch-size 1 and the KV caches belong to the pipeline, so two generations must never
overlap. The HTTP event loop only validates, submits and relays; the worker thread runs
``Pipeline.generate``. A cancelled job is skipped if it is still waiting and stopped within one
round if it is running (``should_stop``), so a client that leaves frees the engine promptly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..config import GenerationConfig, SamplingConfig, SpeculationConfig
from ..engines import GenerationResult
from ..pipeline import Pipeline

log = logging.getLogger("specbranch.server")


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests already."""


class WorkerClosed(Exception):
    """The server is shutting down."""


@dataclass
class Job:
    ids: list[int]
    gen: GenerationConfig
    sampling: SamplingConfig
    spec: SpeculationConfig
    on_tokens: Callable[[list[int]], None] | None = None  # called on the worker thread, once per round
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)  # -> GenerationResult; cancelled if never started
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def _tokens(self, tokens: list[int]) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.on_tokens is not None:
            self.on_tokens(tokens)


class Worker:
    def __init__(self, pipeline: Pipeline, max_queue: int) -> None:
        self.pipeline, self.max_queue = pipeline, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="specbranch-worker", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._running is not None)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises QueueFull when ``max_queue`` jobs wait besides the running one."""
        with self._cond:
            if self._closed:
                raise WorkerClosed()
            if len(self._waiting) + self.running > self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread (the running job stops within one round)."""
        with self._cond:
            self._closed = True
            for job in (*self._waiting, *([self._running] if self._running else [])):
                job.cancel()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
            job.future.cancel()  # its client left while it waited: do not spend a generation on it
            return
        job.started_at = time.perf_counter()
        try:
            result: GenerationResult = self.pipeline.generate(
                job.ids, job.gen, job.sampling, spec=job.spec, on_tokens=job._tokens, should_stop=job.cancelled.is_set
            )
        except Exception as e:  # reported to its request; the worker lives on
            log.debug("generation failed", exc_info=True)
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
