"""What every engine shares: the engine interface, stopping rules and the generation loop.

An engine is a small state machine: ``start`` runs the prompt through its model(s) and
``step`` runs one round and returns the tokens it committed (one for ``ar``, up to γ+1 for the
speculative engines). The loop here, not the engines, decides when to stop (EOS, stop strings,
max new tokens), so no engine can overshoot or emit past EOS, and timing is measured one way.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..config import GenerationConfig, SamplingConfig
from ..metrics import Metrics
from ..sampling import verify_generator


class Engine(ABC):
    name: str

    @abstractmethod
    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        """Prefill; afterwards :meth:`step` may be called repeatedly."""

    @abstractmethod
    def step(self) -> list[int]:
        """Run one round; return the newly committed tokens (at least one)."""

    def finish(self) -> None:
        """The generation is over (its loop stopped, or raised). Engines whose workers run ahead
        (the parallel runtime) bring them back to idle here; must not raise."""


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens, EOS excluded
    text: str  # decoded new text, cut before a stop string
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled" (should_stop fired)
    metrics: Metrics = field(default_factory=Metrics)


class StopChecker:
    """Accepts committed tokens until EOS, a stop string or the token budget ends generation."""

    def __init__(self, max_new_tokens: int, eos_ids: Sequence[int] = (), stop: Sequence[str] = (), decode=None):
        if stop and decode is None:
            raise ValueError("stop strings need a tokenizer to decode the output")
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.stop = tuple(stop)
        self.decode = decode
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def push(self, new: Sequence[int]) -> list[int]:
        """Append what may be kept of ``new``; returns the kept tokens."""
        kept = []
        for tok in new:
            if tok in self.eos_ids:
                self.finish_reason = "stop"
                break
            kept.append(tok)
            if len(self.tokens) + len(kept) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        self.tokens += kept
        if self.stop and self.cut_text() is not None:
            self.finish_reason = "stop"
        return kept

    def cut_text(self) -> str | None:
        """The output text cut before the first stop string, or None if none occurs."""
        text = self.decode(self.tokens)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(hits)] if hits else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def text(self) -> str:
        if self.decode is None:
            return ""
        cut = self.cut_text() if self.stop else None
        return self.decode(self.tokens) if cut is None else cut


class TextStreamer:
    """Turns committed tokens into text pieces for a callback, holding back an incomplete UTF-8
    character and any tail that could still turn into a stop string."""

    def __init__(self, decode, on_text: Callable[[str], None], stop: Sequence[str] = ()):
        self.decode, self.on_text = decode, on_text
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def update(self, text: str, final: bool = False) -> None:
        end = len(text) if final else len(text) - self.hold
        if not final and text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        if end > self.sent:
            self.on_text(text[self.sent : end])
            self.sent = end


def generate(
    engine: Engine,
    prompt: Sequence[int],
    gen: GenerationConfig,
    sampling: SamplingConfig,
    eos_ids: Sequence[int] = (),
    decode: Callable[[Sequence[int]], str] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Run ``engine`` on the prompt ids until a stopping rule fires.

    ``should_stop`` lets a caller abandon the generation (e.g. a server whose client went away):
    it is checked once per round, the unit of work that cannot be interrupted, and ends the
    generation with finish_reason "cancelled" and the tokens committed so far.
    """
    metrics = Metrics(prompt_tokens=len(prompt))
    rng = verify_generator(sampling.seed)  # the draft side derives its own stream from the seed
    stopper = StopChecker(gen.max_new_tokens, eos_ids, gen.stop, decode)
    streamer = TextStreamer(decode, on_text, gen.stop) if on_text and decode else None
    t0 = time.perf_counter()
    try:
        engine.start(prompt, sampling, rng, metrics)
        metrics.prefill_time_s = time.perf_counter() - t0
        while not stopper.done:
            if should_stop is not None and should_stop():
                stopper.finish_reason = "cancelled"
                break
            kept = stopper.push(engine.step())
            if on_tokens and kept:
                on_tokens(kept)
            if streamer:
                streamer.update(stopper.text(), final=stopper.done)
    finally:
        engine.finish()
    metrics.wall_time_s = time.perf_counter() - t0
    metrics.new_tokens = len(stopper.tokens)
    return GenerationResult(stopper.tokens, stopper.text(), stopper.finish_reason, metrics)
