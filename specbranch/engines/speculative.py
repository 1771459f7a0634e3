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
from ..sampling import draft_generator, greedy_token, probs_from_logits, sample
from ..verify import (
    BranchVerdict,
    draw_candidates,
    select_branch_greedy,
    select_branch_match,
    select_branch_sampled,
)
from .ar import next_token
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
    at the last accepted position."""

    tokens: list[int] = field(default_factory=list)
    num_accepted: int = 0
    branch: int | None = None


class Speculator:
    """Draft-side token choice and target-side verification under one rule (A, B or C).

    The two halves draw from separate generators (see :func:`specbranch.sampling.draft_generator`):
    ``draft_rng`` for rule C drafts and candidates, ``rng`` for verification. A worker that only
    drafts (or only verifies) holds a speculator with just its own generator; using the other half
    then fails loudly instead of falling back to the global RNG.
    """

    def __init__(
        self,
        sampling: SamplingConfig,
        draft_sampling: str,
        rng: torch.Generator | None,
        draft_rng: torch.Generator | None = None,
    ) -> None:
        self.sampling = sampling
        self.rng = rng
        self.draft_rng = draft_rng
        self.rule = "A" if sampling.greedy else ("C" if draft_sampling == "sample" else "B")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        return probs_from_logits(logits, s.temperature, s.top_k, s.top_p)

    # -- draft side ----------------------------------------------------------------------------
    def propose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Next chain token from draft logits ``[V]``, and the ``q`` it was drawn from (rule C)."""
        if self.rule != "C":
            return greedy_token(logits), None
        q = self.probs(logits)
        return sample(q, self.draft_rng), q

    def candidates(self, logits: torch.Tensor, k: int) -> Position:
        """``k`` branch candidates from draft logits ``[V]``: the top-k tokens (rules A, B) or k
        draws from ``q`` without replacement (rule C; fewer if ``q`` has a smaller support)."""
        if k == 1:
            token, q = self.propose(logits)
            return Position([token], q)
        if self.rule != "C":
            return Position(logits.topk(k).indices.tolist())
        q = self.probs(logits)
        return Position(draw_candidates(q, k, self.draft_rng, without_replacement=True).tolist(), q)

    # -- target side ---------------------------------------------------------------------------
    def verify(self, positions: list[Position], target_logits: torch.Tensor, bonus: bool = False) -> Outcome:
        """Verify ``positions`` left to right against target logits ``[len(positions) (+1), V]``;
        stop at the first position where no candidate survives, or where a candidate other than the
        first survives before the last position (an inline hedge: the later positions followed the
        first). With ``bonus`` (classic SD) an extra token is drawn from the last row when every
        position was accepted."""
        out = Outcome()
        for i, pos in enumerate(positions):
            verdict = self._select(pos, target_logits[i])
            out.tokens.append(verdict.token)
            if not verdict.hit:
                return out
            out.num_accepted += 1
            out.branch = verdict.branch
            if verdict.branch and i < len(positions) - 1:
                return out  # an inline hedge's other row takes over: later positions are row 0's
        if bonus:
            out.tokens.append(self.next_token(target_logits[len(positions)]))
        return out

    def next_token(self, logits: torch.Tensor) -> int:
        """A token straight from the target (the bonus token): argmax at T = 0, else a sample of p, as ``ar`` takes it."""
        return next_token(logits, self.sampling, self.rng)

    def _select(self, pos: Position, logits: torch.Tensor) -> BranchVerdict:
        if self.rule == "A":
            return select_branch_greedy(pos.candidates, logits)
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
        self.speculator = Speculator(sampling, self.spec.draft_sampling, rng, draft_generator(sampling.seed))


class Side:
    """One worker's half of a speculative engine: its lane, its copy of the committed tokens, and a
    speculator holding only the generator that half draws from.

    The draft half and the target half of :class:`~specbranch.engines.specbranch.SpecBranchEngine`
    are Sides; they share no objects, only messages (a proposal one way, a verdict the other), so
    they can run in one process or in two.
    """

    def __init__(self, backend: Backend, role: str, draft_sampling: str) -> None:
        self.lane = Lane(backend, role)
        self.role = role
        self.draft_sampling = draft_sampling

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        """Prefill this side's model. ``rng`` is this side's own stream: the verification
        generator for the target, :func:`~specbranch.sampling.draft_generator` for the draft."""
        self.metrics = metrics
        self.committed = list(prompt)
        self.lane.reset(prompt, metrics)
        rngs = (None, rng) if self.role == "draft" else (rng, None)
        self.speculator = Speculator(sampling, self.draft_sampling, *rngs)
