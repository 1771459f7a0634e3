"""What the speculative engines share: the verification rule in force, how the draft picks its
tokens under that rule, and how the target verifies them (DESIGN.md §2.5).

The rule follows from how drafts are produced, never from the engine:

- temperature 0 -> **A** (greedy drafts, accept iff equal to ``argmax p``);
- temperature > 0 with ``draft_sampling="greedy"`` -> **B** (argmax / top-k drafts, match sampling);
- temperature > 0 with ``draft_sampling="sample"`` -> **C** (drafts and branch candidates sampled
  from ``q``, ratio test and sampled residual; candidates drawn without replacement).

Every position the target verifies is treated as a branch point: a chain token is a branch point
with one candidate. That single code path covers SD, PEARL and SpecBranch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..backend import Backend
from ..config import SamplingConfig, SpeculationConfig
from ..metrics import Metrics
from ..sampling import probs_from_logits, sample
from ..verify import (
    BranchVerdict,
    draw_candidates,
    select_branch_greedy,
    select_branch_match,
    select_branch_sampled,
)
from .base import Engine
from .lane import Lane


@dataclass
class Position:
    """One position submitted for verification: candidate tokens (one for a chain token, k at a
    branch point) and, under rule C, the draft distribution ``q [V]`` they were drawn from."""

    candidates: list[int]
    q: torch.Tensor | None = None


@dataclass
class Outcome:
    """What verifying a list of positions fixed: ``tokens`` to commit (accepted drafts then the
    correction or the selected candidate), how many positions were accepted, and the branch chosen
    at the last position when every position was accepted."""

    tokens: list[int] = field(default_factory=list)
    num_accepted: int = 0
    branch: int | None = None


class Speculator:
    """Draft-side token choice and target-side verification under one rule (A, B or C)."""

    def __init__(self, sampling: SamplingConfig, draft_sampling: str, rng: torch.Generator) -> None:
        self.sampling = sampling
        self.rng = rng
        self.rule = "A" if sampling.greedy else ("C" if draft_sampling == "sample" else "B")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        return probs_from_logits(logits, s.temperature, s.top_k, s.top_p)

    # -- draft side ----------------------------------------------------------------------------
    def propose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Next chain token from draft logits ``[V]``, and the ``q`` it was drawn from (rule C)."""
        if self.rule != "C":
            return int(logits.argmax()), None
        q = self.probs(logits)
        return sample(q, self.rng), q

    def candidates(self, logits: torch.Tensor, k: int) -> Position:
        """``k`` branch candidates from draft logits ``[V]``: the top-k tokens (rules A, B) or k
        draws from ``q`` without replacement (rule C; fewer if ``q`` has a smaller support)."""
        if k == 1:
            token, q = self.propose(logits)
            return Position([token], q)
        if self.rule != "C":
            return Position(logits.topk(k).indices.tolist())
        q = self.probs(logits)
        return Position(draw_candidates(q, k, self.rng, without_replacement=True).tolist(), q)

    # -- target side ---------------------------------------------------------------------------
    def verify(self, positions: list[Position], target_logits: torch.Tensor, bonus: bool = False) -> Outcome:
        """Verify ``positions`` left to right against target logits ``[len(positions) (+1), V]``;
        stop at the first position where no candidate survives. With ``bonus`` (classic SD) an
        extra token is drawn from the last row when every position was accepted."""
        out = Outcome()
        for i, pos in enumerate(positions):
            verdict = self._select(pos, target_logits[i])
            out.tokens.append(verdict.token)
            if not verdict.hit:
                return out
            out.num_accepted += 1
            out.branch = verdict.branch
        if bonus:
            out.tokens.append(self.next_token(target_logits[len(positions)]))
        return out

    def next_token(self, logits: torch.Tensor) -> int:
        """A token straight from the target (the bonus token): argmax at T = 0, else a sample of p."""
        return int(logits.argmax()) if self.rule == "A" else sample(self.probs(logits), self.rng)

    def _select(self, pos: Position, logits: torch.Tensor) -> BranchVerdict:
        if self.rule == "A":
            return select_branch_greedy(pos.candidates, int(logits.argmax()))
        if self.rule == "B":
            return select_branch_match(pos.candidates, self.probs(logits), self.rng)
        return select_branch_sampled(pos.candidates, self.probs(logits), pos.q, self.rng, without_replacement=True)


class SpeculativeEngine(Engine):
    """Base of the draft + target engines: two lanes, the committed tokens, one speculator."""

    def __init__(self, target: Backend, draft: Backend, spec: SpeculationConfig | None = None) -> None:
        if target.vocab_size != draft.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
        self.spec = spec or SpeculationConfig()
        self.target = Lane(target, "target")
        self.draft = Lane(draft, "draft")

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        self.metrics = metrics
        self.committed = list(prompt)
        self.target.reset(prompt, metrics)
        self.draft.reset(prompt, metrics)
        self.speculator = Speculator(sampling, self.spec.draft_sampling, rng)

    def record(self, submitted: int, accepted: int, drafted: int, discarded: int, committed: int) -> None:
        """Count one verification: ``submitted`` drafts checked, ``accepted`` kept, ``drafted``
        tokens produced this round (outside unselected branches), ``discarded`` rolled back,
        ``committed`` tokens emitted by it."""
        m = self.metrics
        m.accepted_lengths.append(committed)
        m.num_drafts += 1
        m.num_draft_tokens += submitted
        m.num_accepted_tokens += accepted
        m.drafted_tokens += drafted
        m.rollback_tokens += discarded
