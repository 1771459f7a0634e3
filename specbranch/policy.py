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


DRAFTING = ("confidence", "fixed", "hrad", "hybrid", "inline")
RESTS = ("short", "always", "never")  # when specbranch's draft rests (DraftPolicy.rests)


class BlockLength:
    """How many tokens the next block drafts: ``top``, or with ``adaptive`` a length that grows by 2
    after a block the target accepted whole and shrinks by 1 after a rejection, within [1, top]
    (transformers' heuristic for assisted generation). Where the draft agrees less (chat prose) a long
    block costs draft steps, and in the parallel engines target rows, that the next verdict throws away.
    It is moved by past verdicts only, never by ``p``, so no engine's output can depend on it."""

    def __init__(self, top: int, adaptive: bool) -> None:
        self.top, self.adaptive, self.now = top, adaptive, top

    def update(self, accepted_whole: bool) -> None:
        if self.adaptive:
            self.now = min(self.now + 2, self.top) if accepted_whole else max(self.now - 1, 1)


def resolve_drafting(drafting: str, has_predictor: bool = False) -> str:
    """``auto`` -> ``hybrid`` (H-RAD + the confidence cut) where an H-RAD predictor exists for the
    pair, else the confidence cut alone (as DESIGN.md §2.3 and the H-RAD issue ask). Measured, the
    two are level on this CPU: hybrid 2.29x ar against 2.04x for the cut on 10 HumanEval prompts
    (parallel runtime, γ 7, one run), then 2.00x against 2.07x on 20 prompts (another run)."""
    if drafting != "auto":
        return drafting
    return "hybrid" if has_predictor else "confidence"


@dataclass
class DraftPolicy:
    """Where a drafted block ends and where the draft hedges (DESIGN.md §2.3).

    ``mode`` says who ends a block:

    - ``confidence`` (SpecBranch's implicit rule): the draft stops extending a branch before its
      first position whose top-1 probability is ``<= tau``; that position is the next branch point.
    - ``fixed``: every block is ``gamma - 1`` tokens.
    - ``hrad``: blocks are drafted in full and the target-side H-RAD class decides how much of the
      surviving one is submitted: reject-soon -> none (branch right away), partial -> half,
      accept-all -> all.
    - ``hybrid`` (H-RAD + confidence): as ``hrad``, but *partial* submits up to the confidence cut.
    - ``inline``: blocks are drafted in full, and the first position inside a block whose top-1
      probability is ``<= tau`` is hedged where it lies instead of ending the block: the draft forks
      ``branches`` rows there and keeps drafting all of them until that block is verified. A cut
      makes a short round, and a round costs about the same whatever its length on a memory-bound
      machine; a hedge costs only batch rows of the draft.

    At a branch point ``candidates(conf)`` forks ``branches`` rows when the draft's top-1
    probability is ``<= tau`` (or when H-RAD said reject-soon), else continues with one.
    ``tau = 0`` and ``branches = 1`` with ``mode = confidence``: that is PEARL.

    ``wait_after_rollback``: the round after a rollback (and the first one) does not pre-verify: the
    draft drafts one chain, and the target takes it whole as the pending block, unverified, to verify
    it with the next round's forward (see :meth:`~specbranch.engines.specbranch.TargetSide.adopt`).

    ``adaptive``: blocks are at most ``gamma - 1`` tokens, and shorter after rollbacks (:class:`BlockLength`).
    Not with ``inline``, whose hedged blocks go out whole.

    ``rest`` (never, short, always): when the draft drafts nothing past the pending block and sits out its
    verification; the target takes the token after the block (sd's bonus or a correction) and adopts the
    draft's next chain, as after a rollback (:meth:`rests`).
    """

    gamma: int  # no defaults here: SpeculationConfig holds them (engines.specbranch.draft_policy)
    branches: int
    tau: float
    mode: str = "confidence"
    wait_after_rollback: bool = False
    adaptive: bool = False
    rest: str = "never"

    def __post_init__(self) -> None:
        if self.mode not in DRAFTING:
            raise ValueError(f"unknown drafting mode {self.mode!r}; choose one of {', '.join(DRAFTING)}")
        if self.adaptive and self.mode == "inline":
            raise ValueError("inline drafting submits whole blocks: it cannot adapt their length")
        if self.rest not in RESTS or (self.rest == "always" and self.mode == "inline"):
            raise ValueError(f"rest {self.rest!r} does not fit drafting {self.mode!r}")

    def hedge(self, conf: float) -> bool:
        """Fork here, inside the block being drafted (``inline``: its top-1 probability is ``<= tau``)."""
        return self.mode == "inline" and conf <= self.tau

    @property
    def uses_hrad(self) -> bool:
        return self.mode in ("hrad", "hybrid")

    def candidates(self, conf: float, force: bool = False) -> int:
        return self.branches if force or conf <= self.tau else 1

    def cut(self, conf: float, adopting: bool = False) -> bool:
        """Stop drafting a branch here: the confidence mode always does; hybrid does in a chain drafted for
        adoption, which no H-RAD class follows, so that :meth:`keep` ends it at its confidence cut anyway
        (the steps past the cut would be thrown away)."""
        return conf <= self.tau and (self.mode == "confidence" or (adopting and self.mode == "hybrid"))

    def rests(self, length: int) -> bool:
        """Propose nothing past the pending block this round (the next block would be ``length`` tokens):
        always, never, or (short) while blocks are shorter than their longest, i.e. after rollbacks.

        Why: where most rounds roll back (chat prose), what the draft drafts past the pending block is
        mostly thrown away, and on a machine whose two workers share the cores and the memory bus those
        steps slow the verification beside them. Resting, the draft lends its core to the verification
        instead, and drafts the next block while the target waits (lending the target's core): SD's
        rhythm, in the parallel runtime. Fixed blocks are never short."""
        return self.rest == "always" or (self.rest == "short" and length < self.max_block())

    def max_block(self) -> int:
        return self.gamma - 1

    def keep(self, block: int, cut: int, hrad_class: int | None) -> int:
        """Tokens of the surviving ``block``-token branch to submit next round; ``cut``: its
        confidence cut (first position with top-1 <= tau, or ``block``); ``hrad_class``: 0/1/2."""
        if not self.uses_hrad:
            return block  # confidence mode already cut while drafting; fixed keeps everything
        if hrad_class == 0:
            return 0
        if hrad_class == 2:
            return block
        return cut if self.mode == "hybrid" else (block + 1) // 2
