"""Draft policies: how long a drafted block is and where the draft branches (DESIGN.md §2.3).

A policy only ever sees draft-side confidences (and, for H-RAD, target features about the
already-verified prefix). It decides *how much* is drafted and *where* to hedge, never which
token is accepted, so no policy can change the output distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def top1_confidence(logits: torch.Tensor) -> torch.Tensor:
    """The draft's top-1 probability per row of ``logits [..., V]`` (at temperature 1, whatever the
    sampling temperature: it measures how sure the draft model is, not how the text is sampled)."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


@dataclass
class DraftPolicy:
    """Fixed block length ``gamma`` with SpecBranch's implicit confidence rule.

    - ``candidates(conf)``: how many candidate tokens to fork at a branch point whose draft top-1
      probability is ``conf``: ``branches`` when ``conf <= tau`` (the draft is unsure: hedge),
      else 1 (a plain continuation, as in PEARL).
    - ``cut(conf)``: stop extending a block before a position whose top-1 probability is ``<= tau``;
      that position becomes the next branch point.
    - ``max_block()``: most tokens drafted after a branch point in one round.
    - ``observe(features)``: hook for policies that read target features after each verification
      (H-RAD); the fixed policy ignores them.

    ``tau = 0`` never cuts and ``branches = 1`` never forks: that is PEARL.
    """

    gamma: int = 4
    branches: int = 3
    tau: float = 0.4

    def candidates(self, conf: float) -> int:
        return self.branches if conf <= self.tau else 1

    def cut(self, conf: float) -> bool:
        return conf <= self.tau

    def max_block(self) -> int:
        return self.gamma - 1

    def observe(self, features: torch.Tensor | None) -> None:
        """Target hidden features at the last verified position (unused by this policy)."""
