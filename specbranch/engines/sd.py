"""Classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023), DESIGN.md §2.1.

One round: the draft proposes γ tokens one by one, then the target scores them all in one
forward and verification keeps the accepted prefix plus a correction (or a bonus token when all
γ pass). The target waits for the draft and vice versa: that mutual waiting is what PEARL and
SpecBranch remove. With ``blocks="adaptive"`` (the default) γ moves between rounds
(:class:`~specbranch.policy.BlockLength`).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..config import SamplingConfig
from ..metrics import Metrics
from ..policy import BlockLength
from .speculative import Position, SpeculativeEngine


class SDEngine(SpeculativeEngine):
    name = "sd"

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        super().start(prompt, sampling, rng, metrics)
        self.length = BlockLength(self.spec.gamma_for("sd"), self.spec.blocks == "adaptive")

    def draft_round(self) -> list[Position]:
        """Draft worker: γ chain tokens after the committed text."""
        logits = self.draft.feed(self.committed)[0]  # [V]: q at the first new position
        block: list[Position] = []
        gamma = self.length.now
        for i in range(gamma):
            block.append(self.speculator.candidates(logits, 1))
            if i + 1 < gamma:  # the last token is fed next round, if it survives
                logits = self.draft.feed_rows(block[-1].candidates)[0]
        return block

    def step(self) -> list[int]:
        t0 = time.perf_counter()
        block = self.draft_round()
        t1 = time.perf_counter()
        drafted = [pos.candidates[0] for pos in block]
        # target worker: p at every drafted position plus the bonus position -> [γ+1, V]
        logits = self.target.feed(self.committed + drafted, rows=len(block) + 1)
        out = self.speculator.verify(block, logits, bonus=True)
        self.metrics.target_idle_s += t1 - t0  # each waits while the other computes
        self.metrics.draft_idle_s += time.perf_counter() - t1
        self.metrics.record_verification(len(block), out.num_accepted, len(block), len(block) - out.num_accepted,
                                         len(out.tokens))
        self.committed += out.tokens
        self.length.update(out.num_accepted == len(block))
        return out.tokens
