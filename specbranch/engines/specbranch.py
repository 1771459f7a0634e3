"""SpecBranch (arXiv 2506.01979) and PEARL (arXiv 2408.11850), DESIGN.md §2.2-2.3.

State between rounds: the committed tokens and a *pending block* of drafted, not yet verified
tokens. Every round the two workers do independent work, each on its own half of the state:

- **target** (`TargetSide.target_round`): one forward over the pending block, giving ``p`` at each
  pending position and at the *branch point* right after it;
- **draft** (`DraftSide.draft_round`): at the branch point, pick candidate tokens (k of them when
  the draft's top-1 probability is <= τ, else 1), fork one cache row per candidate and extend every
  branch with one batched forward per step, cutting each branch's block before its first
  low-confidence position (that position, whose ``q`` is already computed, is the next branch
  point). It hands the target a `Proposal`: candidates, blocks, and under rule C the ``q`` rows.

`TargetSide.settle` then verifies pending tokens and the branch point left to right with the rule
in force, the one place where anything is decided, and returns a `Verdict`. If everything passes,
the branch whose candidate the target settled on survives and its block becomes the pending block;
otherwise the correction is committed and the draft starts over from it. Both sides apply the
verdict to their own copy of the state. With an empty pending block the round is PEARL's
pre-verify; with one it is post-verify.

**Waiting after a rollback** (``after_rollback="wait"``, specbranch's default): after a rollback (and
before the first round) the target does not pre-verify the new branch point alone. It waits for the
draft's first chain, adopts it whole as the pending block (`TargetSide.adopt`: nothing is verified or
committed), and the next round verifies it while the draft drafts past it. On a CPU a pre-verify
forward reads every target weight to fix one token while slowing the draft on the shared memory bus.

**Inline hedges** (``drafting="inline"``): instead of cutting a block at its first low-confidence
position, the draft forks k rows *there* and drafts on with all of them; the block goes out whole
with the hedge's index and candidates. The next round the target verifies that block with k
candidates at the hedge, while the draft extends every row (row 0, the block's own, past the branch
point). If another candidate wins at the hedge, its row's tokens become the pending block and the
round that PEARL would spend on pre-verify after a rollback is saved.

`SpecBranchEngine` drives both sides in one process, one after the other (the sequential runtime);
:mod:`specbranch.runtime.parallel` drives the same two sides in two processes, concurrently.

PEARL is this engine with one candidate per branch point and no confidence cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..backend import Backend
from ..config import SamplingConfig, SpeculationConfig
from ..metrics import Metrics
from ..hrad import HRADConfig, HRADPredictor, bucket
from ..hrad import features as hrad_features
from ..policy import BlockLength, DraftPolicy, resolve_drafting, top1_confidence
from ..sampling import draft_generator
from .base import Engine
from .speculative import Position, Side


@dataclass
class Branches:
    """What the draft produced in one round: the branch point, one block per candidate, and per
    branch the draft logits after the candidate and after each block token (``ends[b][i]`` is ``q``
    at the position after ``i`` block tokens: whichever becomes the next branch point is reused)."""

    point: Position
    blocks: list[list[Position]]
    ends: list[list[torch.Tensor]]


@dataclass
class Proposal:
    """What the draft hands the verifier each round, and all it hands it.

    ``candidates``: the branch point's candidate tokens (k >= 1); ``blocks[b]``: the tokens drafted
    after candidate b. ``q`` (rule C only): the draft distributions ``[n+1, V]`` the verifier needs
    this round, at the n pending positions (drafted last round) and at the branch point. Sending
    the pending rows now rather than last round means only the surviving branch's rows travel.
    """

    candidates: list[int]
    blocks: list[list[int]]
    q: torch.Tensor | None = None
    cuts: list[int] | None = None  # per branch: its confidence cut (first position with top-1 <= tau)
    # inline hedging: ``hedge`` = [i, candidates...] when block 0's position i forked there (the first
    # candidate is the block's own token); ``alternatives[b - 1]``: the tokens drafted so far after
    # candidate b of the hedge inside the *pending* block (they become the pending block if b wins)
    hedge: list[int] | None = None
    alternatives: list[list[int]] | None = None
    rests: bool = False  # the draft rests: no branch point (no candidates, no blocks); the target takes the next token

    def size(self, b: int) -> int:
        return 1 + len(self.blocks[b])

    def cut(self, b: int) -> int:
        return len(self.blocks[b]) if self.cuts is None else self.cuts[b]


@dataclass
class Verdict:
    """What verification fixed: ``tokens`` to commit, and the surviving ``branch`` (its block is
    the next pending block) or None (rollback: the draft restarts after the correction)."""

    tokens: list[int]
    branch: int | None
    keep: int = 0  # tokens of the surviving branch's block that stay pending (the policy's cut)
    force_branch: bool = False  # H-RAD said reject-soon: fork k candidates at the next branch point


def adopted_keep(policy: DraftPolicy, proposal: Proposal) -> int:
    """How many block tokens of an adopted chain stay pending (the policy's cut, as after a verification).
    A function of the proposal and the policy only: both sides compute it, so no message has to say it."""
    return policy.keep(len(proposal.blocks[0]), proposal.cut(0), None)


def draft_policy(engine: str, spec: SpeculationConfig) -> DraftPolicy:
    """The draft policy an engine name implies: PEARL never forks, never cuts and never rests."""
    wait, adaptive = spec.waits_after_rollback(engine), spec.blocks == "adaptive"
    if engine == "pearl":
        return DraftPolicy(spec.gamma_for(engine), branches=1, tau=0.0, wait_after_rollback=wait, adaptive=adaptive)
    mode = resolve_drafting(spec.drafting)
    return DraftPolicy(spec.gamma_for(engine), spec.branches, spec.tau, mode, wait,
                       adaptive=adaptive and mode != "inline", rest=spec.rest)


class DraftSide(Side):
    """The draft worker's state machine: drafts past the pending block, applies verdicts."""

    def __init__(self, draft: Backend, policy: DraftPolicy, draft_sampling: str) -> None:
        super().__init__(draft, "draft", draft_sampling)
        self.policy = policy

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        super().start(prompt, sampling, rng, metrics)
        self.pending: list[Position] = []
        self.branches: Branches | None = None  # this round's rows, forked at the branch point
        self.hedge: Branches | None = None  # the rows forked at an inline hedge (DraftPolicy.hedge)
        self.hedge_at: int | None = None  # the hedge's index in the pending block, once the block is pending
        self.force_branch = False  # the last verdict asked for k candidates at the next branch point
        self.adopting = self.policy.wait_after_rollback  # this round's block will be adopted whole: draft one chain
        self.rested = False  # the last proposal rested: nothing past the pending block (DraftPolicy.rests)
        self.length = BlockLength(self.policy.max_block(), self.policy.adaptive)  # tokens after the next branch point

    def pending_tokens(self) -> list[int]:
        return self.committed + [pos.candidates[0] for pos in self.pending]

    def draft_round(self) -> Proposal:
        """Branch at the position after the pending block and extend every branch. While the
        pending block holds an inline hedge, its rows are extended instead (row 0, the pending
        block's own, drafts the branch point and the next block)."""
        if self.hedge_at is not None:
            return self._extend_hedge()
        lane, spec, policy = self.lane, self.speculator, self.policy
        if self.pending and not self.adopting and policy.rests(self.length.now):
            self.rested = True  # nothing to draft: the target verifies the pending block and takes the token after it
            return Proposal([], [], self._q(None), rests=True)
        logits = lane.feed(self.pending_tokens())[0]  # [V]: q at the branch point
        k = 1 if self.adopting else policy.candidates(float(top1_confidence(logits)), self.force_branch)
        point = spec.candidates(logits, k)
        k = len(point.candidates)
        lane.fork(k)
        rows = list(point.candidates)  # the token each branch row feeds next
        blocks: list[list[Position]] = [[] for _ in range(k)]
        ends: list[list[torch.Tensor]] = [[] for _ in range(k)]
        cuts: list[int | None] = [None] * k
        done = [False] * k
        # an adopted chain (the point and its block) is as long as a pending block: the next round verifies as many
        last = max(self.length.now - 1, 0) if self.adopting else self.length.now
        # a chain the next round rests on is verified with the target's own token after it, as in sd: its last
        # token is never fed, so the draft needs no q there
        feeds = last if self.adopting and policy.rests(self.length.now) else last + 1
        for step in range(feeds):
            logits = lane.feed_rows(rows)  # [k, V]: q after each branch's last token
            conf = top1_confidence(logits).tolist()  # [k]
            for b in range(k):
                if done[b]:
                    continue  # finished: this row only runs along with the others until all are done
                ends[b].append(logits[b])
                if cuts[b] is None and conf[b] <= policy.tau:
                    cuts[b] = step  # where the confidence rule would end this block
                if step == last or policy.cut(conf[b], self.adopting):
                    done[b] = True
                    continue
                if k == 1 and not self.adopting and policy.hedge(conf[0]):
                    # hedge here, inside the block: fork and draft every candidate's row to the round's end
                    fork = spec.candidates(logits[0], policy.branches)
                    n = len(fork.candidates)
                    self.hedge = Branches(fork, [[] for _ in range(n)], [[] for _ in range(n)])
                    blocks[0].append(fork)
                    lane.fork(n)
                    self._grow(self.hedge, policy.max_block() - step)
                    blocks[0] += self.hedge.blocks[0]
                    ends[0] += self.hedge.ends[0]
                    done[0] = True
                    break
                blocks[b].append(spec.candidates(logits[b], 1))
                rows[b] = blocks[b][-1].candidates[0]
            if all(done):
                break
        self.branches = Branches(point, blocks, ends)
        hedge = None
        if self.hedge is not None:  # [its index in block 0, its candidates]
            hedge = [self._hedge_index(blocks[0]), *self.hedge.point.candidates]
        return Proposal(list(point.candidates), [[pos.candidates[0] for pos in blk] for blk in blocks], self._q(point),
                        [len(blk) if c is None else min(c, len(blk)) for blk, c in zip(blocks, cuts)], hedge)

    def adopt(self, proposal: Proposal) -> int:
        """Make ``proposal``, the chain this side just drafted while ``adopting``, the pending block as the
        target does (:meth:`TargetSide.adopt`), without waiting to be told: adopting decides nothing, and the
        kept length follows from the proposal and the policy alone (returned). The parallel runtime's draft
        so drafts on at once (or rests, lending its core from the start of the verification)."""
        if not self.adopting:
            raise RuntimeError("adopt() after a proposal that was not drafted for adoption")
        keep, br = adopted_keep(self.policy, proposal), self.branches
        self.pending = [br.point, *br.blocks[0][:keep]]  # unverified, one unforked chain
        ends = br.ends[0]  # shorter by one when the chain's last token was not fed (the next round rests)
        self.lane.select(0, keep=1 + keep, last_logits=ends[keep] if keep < len(ends) else None)
        self.force_branch = self.adopting = False
        return keep

    def _extend_hedge(self) -> Proposal:
        """A round while the pending block holds an inline hedge: every hedge row drafts on. Row 0
        runs past the pending block: the branch point (one candidate: the cache is forked already)
        and the next block."""
        spec, hedge = self.speculator, self.hedge
        for b, blk in enumerate(hedge.blocks):
            blk.append(spec.candidates(hedge.ends[b][-1], 1))
        point = hedge.blocks[0][-1]
        self._grow(hedge, self.policy.max_block() + 1)
        block = hedge.blocks[0][len(hedge.blocks[0]) - self.policy.max_block():]
        alternatives = [[pos.candidates[0] for pos in blk] for blk in hedge.blocks[1:]]
        return Proposal(list(point.candidates), [[pos.candidates[0] for pos in block]], self._q(point),
                        alternatives=alternatives)

    def _grow(self, rows: Branches, feeds: int) -> None:
        """Feed every row of ``rows`` its next token ``feeds`` times (one batched forward each),
        drafting each row's next token after every feed but the last. A row's one unfed token is
        always its last: its candidate before the first feed, then what was drafted last."""
        for step in range(feeds):
            tokens = [blk[-1].candidates[0] if blk else rows.point.candidates[b] for b, blk in enumerate(rows.blocks)]
            logits = self.lane.feed_rows(tokens)  # [rows, V]
            for b, blk in enumerate(rows.blocks):
                rows.ends[b].append(logits[b])
                if step < feeds - 1:
                    blk.append(self.speculator.candidates(logits[b], 1))

    def _hedge_index(self, block: list[Position]) -> int:
        """Where the hedge lies in ``block``: the block ends with the hedge and its row 0's tokens."""
        return len(block) - 1 - len(self.hedge.blocks[0])

    def _q(self, point: Position | None) -> torch.Tensor | None:
        """Rule C: the draft distributions at the pending positions and the branch point ``[n+1, V]`` (resting,
        with no branch point: ``[n, V]``)."""
        if self.speculator.rule != "C":
            return None
        return torch.stack([pos.q for pos in self.pending] + ([] if point is None else [point.q]))

    def apply(self, verdict: Verdict) -> None:
        """Commit the verdict's tokens; keep the surviving branch (as the pending block) or roll back."""
        self.committed += verdict.tokens
        self.force_branch = verdict.force_branch
        rested, self.rested = self.rested, False
        if rested:  # the pending block was verified, then the target's own token: whole iff that token follows it
            self.length.update(len(verdict.tokens) > len(self.pending))
        else:
            self.length.update(verdict.branch is not None)
        # after a rest the draft's next chain is adopted whatever the verdict, as after a rollback
        self.adopting = rested or (verdict.branch is None and self.policy.wait_after_rollback)
        if verdict.branch is None:  # the lane re-syncs to the correction next round
            self.pending, self.hedge, self.hedge_at = [], None, None
            return
        b, hedge = verdict.branch, self.hedge
        if self.hedge_at is not None:  # the pending block's hedge is settled: row b survives
            keep = verdict.keep
            if b == 0:  # past the hedge: the rest of the old pending block, the branch point, then `keep`
                keep += len(self.pending) - self.hedge_at
            self.lane.select(b, keep=1 + keep, last_logits=hedge.ends[b][keep])
            self.pending = hedge.blocks[b][keep - verdict.keep : keep]
            self.hedge = self.hedge_at = None
            return
        br = self.branches
        self.pending = br.blocks[b][: verdict.keep]
        if hedge is not None:  # the block with the hedge is pending now, whole: its rows stay forked
            self.hedge_at = self._hedge_index(self.pending)
            return
        self.lane.select(b, keep=1 + verdict.keep, last_logits=br.ends[b][verdict.keep])


class TargetSide(Side):
    """The target worker's state machine: verifies the pending block and the branch point, and
    decides the round (the only place where anything is decided)."""

    def __init__(
        self, target: Backend, draft_sampling: str, policy: DraftPolicy, predictor: HRADPredictor | None = None,
    ) -> None:
        super().__init__(target, "target", draft_sampling)
        self.policy = policy
        if self.policy.uses_hrad and predictor is None:
            raise ValueError(f"drafting mode {self.policy.mode!r} needs an H-RAD predictor")
        self.predictor = predictor
        self.traces: list[tuple[torch.Tensor, int]] | None = None  # set to a list to record H-RAD traces
        if predictor is not None:
            self.lane.hidden_layers = predictor.cfg.hidden_layers

    def record_traces(self, cfg: HRADConfig) -> list[tuple[torch.Tensor, int]]:
        """Record (features, label) per round from now on: what a real round sees, the reference
        that ``train-hrad collect``'s teacher-forced replays are tested against."""
        self.lane.hidden_layers = cfg.hidden_layers
        self.traces = []
        return self.traces

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        super().start(prompt, sampling, rng, metrics)
        self.pending: list[int] = []
        self.hedge: tuple[int, list[int]] | None = None  # the pending block's inline hedge: (index, candidates)
        self.features: torch.Tensor | None = None  # H-RAD features of the last round, awaiting a label
        self.adopting = self.policy.wait_after_rollback  # the next proposal is adopted, not verified (see adopt)

    def adopt(self, proposal: Proposal) -> int:
        """The round after a rollback (and the first one) with ``wait_after_rollback``: take the
        draft's chain whole as the pending block, unverified, instead of verifying its first token
        alone while the draft drafts past it (PEARL's pre-verify). The next forward verifies it all.

        Why: pre-verify spends a target forward, on a CPU a whole read of the weights, to fix one
        token, while the draft, sharing the memory bus, slows down. Waiting for the draft's block
        costs the draft's steps alone. Nothing is decided here (no token is committed), so the rule
        in force and the output are unchanged. Returns how many block tokens were kept."""
        if len(proposal.candidates) != 1 or proposal.hedge or proposal.alternatives:
            raise ValueError(f"an adopted proposal must be one chain without hedges, got candidates "
                             f"{proposal.candidates} and hedge {proposal.hedge}")
        block, keep = proposal.blocks[0], adopted_keep(self.policy, proposal)
        self.pending = [proposal.candidates[0], *block[:keep]]
        self.metrics.drafted_tokens += proposal.size(0)
        self.adopting = False
        return keep

    def target_round(self) -> torch.Tensor:
        """``p`` logits at each pending position and at the branch point ``[n+1, V]``."""
        return self.lane.feed(self.committed + self.pending, rows=len(self.pending) + 1)

    def settle(self, proposal: Proposal, logits: torch.Tensor) -> Verdict:
        """Verify the pending block (with its inline hedge, if any) and the branch point against
        ``logits [n+1, V]``."""
        if proposal.rests:
            return self._settle_rest(proposal, logits)
        n = len(self.pending)
        q, positions = self._pending_positions(proposal, n + 1, logits.device)  # q: [n+1, V] under rule C
        hedge, self.hedge = self.hedge, None
        alternatives = proposal.alternatives or []
        if len(alternatives) != (0 if hedge is None else len(hedge[1]) - 1):
            raise ValueError(f"proposal has {len(alternatives)} hedge rows; the pending block's hedge "
                             f"{hedge} needs one per candidate after the first")
        if hedge is not None:
            positions[hedge[0]] = Position(hedge[1], positions[hedge[0]].q)
        positions.append(Position(proposal.candidates, None if q is None else q[n]))
        out = self.speculator.verify(positions, logits)
        hit = out.num_accepted == n + 1
        swerve = not hit and bool(out.branch)  # the hedge's candidate `out.branch` won inside the block
        kept = out.branch if hit else 0  # for the counts: PEARL's single branch is branch 0
        m = self.metrics
        discarded = 0 if hit else (n - out.num_accepted) + proposal.size(0)
        m.record_verification(n + 1, out.num_accepted, proposal.size(kept), discarded, len(out.tokens))
        m.branch_rollback_tokens += sum(proposal.size(b) for b in range(len(proposal.blocks)) if b != kept)
        m.branch_rollback_tokens += sum(1 + len(alt) for b, alt in enumerate(alternatives, 1)
                                        if not (swerve and b == out.branch))
        if len(proposal.blocks) > 1 and out.num_accepted >= n:  # the branch point itself was reached
            m.num_branch_points += 1
            m.num_branch_hits += hit
        if hedge is not None and out.num_accepted >= hedge[0]:  # the hedge was reached
            m.num_branch_points += 1
            m.num_branch_hits += out.num_accepted > hedge[0]
        m.num_branch_rescues += bool(kept) or swerve
        self.committed += out.tokens
        self._trace(n, out.num_accepted)
        if swerve:  # the hedge row's tokens become the pending block
            keep = min(len(alternatives[out.branch - 1]), self.policy.max_block())
            self.pending = list(alternatives[out.branch - 1][:keep])
            return Verdict(out.tokens, out.branch, keep)
        if not hit:
            self.pending = []
            self.adopting = self.policy.wait_after_rollback
            return Verdict(out.tokens, None)
        block = proposal.blocks[kept]
        cls = None
        if self.predictor is not None or self.traces is not None:
            # the target's view of the position just fixed: its hidden states there + that token
            self.features = hrad_features(self.lane.last_hidden, self.lane.backend.embed(out.tokens[-1]))
            if self.predictor is not None:
                cls = self.predictor.predict(self.features)
        keep = self.policy.keep(len(block), proposal.cut(kept), cls)
        self.pending = list(block[:keep])
        if proposal.hedge is not None:  # verified next round, with its candidates (DraftSide keeps its rows)
            if keep != len(block):
                raise RuntimeError(f"kept {keep} of a hedged block's {len(block)} tokens: a drafting mode "
                                   "that hedges must submit whole blocks")
            self.hedge = (proposal.hedge[0], proposal.hedge[1:])
        return Verdict(out.tokens, kept, keep, cls == 0)

    def _settle_rest(self, proposal: Proposal, logits: torch.Tensor) -> Verdict:
        """The draft rested (:meth:`DraftPolicy.rests`): verify the pending block against ``logits [n+1, V]``
        and take the token after it from the target, a correction or sd's bonus token. Either way the draft's
        next chain is adopted (the verdict is a rollback's: no branch survives)."""
        n = len(self.pending)
        if proposal.candidates or proposal.blocks or proposal.hedge or not n or self.hedge is not None:
            raise ValueError(f"a resting proposal has no branch point and needs a plain pending block; got "
                             f"candidates {proposal.candidates} with {n} pending tokens")
        _, positions = self._pending_positions(proposal, n, logits.device)  # no branch point: q is [n, V]
        out = self.speculator.verify(positions, logits, bonus=True)
        self.metrics.record_verification(n, out.num_accepted, 0, n - out.num_accepted, len(out.tokens))
        self.committed += out.tokens
        self._trace(n, out.num_accepted)
        self.pending, self.adopting = [], True
        return Verdict(out.tokens, None)

    def _pending_positions(self, proposal: Proposal, rows: int, device) -> tuple[torch.Tensor | None, list[Position]]:
        """The proposal's ``q`` (rule C: ``[rows, V]``, checked, on ``device``; else None) and the pending
        block's positions, each with its ``q`` row."""
        q, n = proposal.q, len(self.pending)
        if (q is None) != (self.speculator.rule != "C") or (q is not None and q.shape[0] != rows):
            raise ValueError(f"proposal q rows {None if q is None else tuple(q.shape)} do not fit rule "
                             f"{self.speculator.rule} with {n} pending tokens")
        q = None if q is None else q.to(device)
        return q, [Position([tok], None if q is None else q[i]) for i, tok in enumerate(self.pending)]

    def _trace(self, n: int, accepted: int) -> None:
        """Label last round's features with how many of this round's pending tokens passed (only
        full blocks are labelled: the buckets are defined on ``gamma - 1`` tokens)."""
        if self.traces is not None and self.features is not None and n == self.policy.max_block():
            self.traces.append((self.features, bucket(min(accepted, n), self.policy.gamma)))
        self.features = None


class SpecBranchEngine(Engine):
    """Both sides in one process, one after the other: the sequential runtime."""

    name = "specbranch"

    def __init__(
        self, target: Backend, draft: Backend, spec: SpeculationConfig | None = None, policy: DraftPolicy | None = None,
        predictor: HRADPredictor | None = None,
    ) -> None:
        if target.vocab_size != draft.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
        self.spec = spec or SpeculationConfig()
        policy = policy or draft_policy(self.name, self.spec)
        self.target_side = TargetSide(target, self.spec.draft_sampling, policy, predictor)
        self.draft_side = DraftSide(draft, policy, self.spec.draft_sampling)

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        self.metrics = metrics
        self.target_side.start(prompt, sampling, rng, metrics)
        self.draft_side.start(prompt, sampling, draft_generator(sampling.seed), metrics)

    def step(self) -> list[int]:
        if self.target_side.adopting:  # the draft's chain becomes the pending block; the target waits
            t0 = time.perf_counter()
            chain = self.draft_side.draft_round()
            keep = self.target_side.adopt(chain)
            if self.draft_side.adopt(chain) != keep:  # each side adopts on its own (as in the parallel runtime)
                raise RuntimeError(f"the sides adopted the chain differently: the target kept {keep} tokens")
            self.metrics.target_idle_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        proposal = self.draft_side.draft_round()
        t1 = time.perf_counter()
        verdict = self.target_side.settle(proposal, self.target_side.target_round())
        t2 = time.perf_counter()
        self.draft_side.apply(verdict)
        t3 = time.perf_counter()
        # One process: each worker waits exactly while the other computes.
        self.metrics.target_idle_s += (t1 - t0) + (t3 - t2)
        self.metrics.draft_idle_s += t2 - t1
        return verdict.tokens


class PearlEngine(SpecBranchEngine):
    """PEARL: pre-verify / post-verify with a single chain (no branches, no confidence cut)."""

    name = "pearl"
