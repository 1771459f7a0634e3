"""Plain autoregressive decoding of the target: the denominator of every speedup."""

from __future__ import annotations

from typing import Sequence

import torch

from ..backend import Backend, prefill
from ..config import SamplingConfig
from ..metrics import Metrics
from ..sampling import greedy_token, probs_from_logits, sample
from .base import Engine


def next_token(logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator) -> int:
    """Greedy argmax at T = 0 (integer result, no probabilities needed), else a sample of p."""
    if sampling.greedy:
        return greedy_token(logits)
    return sample(probs_from_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p), rng)


class AREngine(Engine):
    name = "ar"

    def __init__(self, target: Backend) -> None:
        self.target = target

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        self.sampling, self.rng, self.metrics = sampling, rng, metrics
        self.logits = prefill(self.target, prompt).logits[0, -1]
        metrics.target_forwards += 1
        self.pending: int | None = None  # emitted but not yet run through the target

    def step(self) -> list[int]:
        # The forward for a token is deferred to the next step, so the last token of a
        # generation never costs a forward whose logits nobody reads.
        if self.pending is not None:
            self.logits = self.target.forward(torch.tensor([[self.pending]])).logits[0, -1]
            self.metrics.target_forwards += 1
        self.pending = next_token(self.logits, self.sampling, self.rng)
        return [self.pending]
