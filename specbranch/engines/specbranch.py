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
from ..policy import DraftPolicy, resolve_drafting, top1_confidence
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


def draft_policy(engine: str, spec: SpeculationConfig) -> DraftPolicy:
    """The draft policy an engine name implies: PEARL never forks and never cuts."""
    if engine == "pearl":
        return DraftPolicy(spec.gamma_for(engine), branches=1, tau=0.0)
    return DraftPolicy(spec.gamma_for(engine), spec.branches, spec.tau, resolve_drafting(spec.drafting))


class DraftSide(Side):
    """The draft worker's state machine: drafts past the pending block, applies verdicts."""

    def __init__(self, draft: Backend, policy: DraftPolicy, draft_sampling: str) -> None:
        super().__init__(draft, "draft", draft_sampling)
        self.policy = policy

    def start(self, prompt: Sequence[int], sampling: SamplingConfig, rng: torch.Generator, metrics: Metrics) -> None:
        super().start(prompt, sampling, rng, metrics)
        self.pending: list[Position] = []
        self.branches: Branches | None = None
        self.force_branch = False  # the last verdict asked for k candidates at the next branch point

    def pending_tokens(self) -> list[int]:
        return self.committed + [pos.candidates[0] for pos in self.pending]

    def draft_round(self) -> Proposal:
        """Branch at the position after the pending block and extend every branch."""
        lane, spec, policy = self.lane, self.speculator, self.policy
        logits = lane.feed(self.pending_tokens())[0]  # [V]: q at the branch point
        point = spec.candidates(logits, policy.candidates(float(top1_confidence(logits)), self.force_branch))
        k = len(point.candidates)
        lane.fork(k)
        rows = list(point.candidates)  # the token each branch row feeds next
        blocks: list[list[Position]] = [[] for _ in range(k)]
        ends: list[list[torch.Tensor]] = [[] for _ in range(k)]
        cuts: list[int | None] = [None] * k
        done = [False] * k
        for step in range(policy.max_block() + 1):
            logits = lane.feed_rows(rows)  # [k, V]: q after each branch's last token
            conf = top1_confidence(logits).tolist()  # [k]
            for b in range(k):
                if done[b]:
                    continue  # finished: this row only runs along with the others until all are done
                ends[b].append(logits[b])
                if cuts[b] is None and conf[b] <= policy.tau:
                    cuts[b] = step  # where the confidence rule would end this block
                if step == policy.max_block() or policy.cut(conf[b]):
                    done[b] = True
                    continue
                blocks[b].append(spec.candidates(logits[b], 1))
                rows[b] = blocks[b][-1].candidates[0]
            if all(done):
                break
        self.branches = Branches(point, blocks, ends)
        q = None
        if spec.rule == "C":
            q = torch.stack([pos.q for pos in self.pending] + [point.q])  # [n+1, V]
        return Proposal(list(point.candidates), [[pos.candidates[0] for pos in blk] for blk in blocks], q,
                        [len(blk) if c is None else min(c, len(blk)) for blk, c in zip(blocks, cuts)])

    def apply(self, verdict: Verdict) -> None:
        """Commit the verdict's tokens; keep the surviving branch (as the pending block) or roll back."""
        br = self.branches
        self.committed += verdict.tokens
        self.force_branch = verdict.force_branch
        if verdict.branch is None:  # the lane re-syncs to the correction next round
            self.pending = []
            return
        b = verdict.branch
        self.lane.select(b, keep=1 + verdict.keep, last_logits=br.ends[b][verdict.keep])
        self.pending = br.blocks[b][: verdict.keep]


class TargetSide(Side):
    """The target worker's state machine: verifies the pending block and the branch point, and
    decides the round (the only place where anything is decided)."""

    def __init__(
        self, target: Backend, draft_sampling: str, policy: DraftPolicy | None = None,
        predictor: HRADPredictor | None = None,
    ) -> None:
        super().__init__(target, "target", draft_sampling)
        self.policy = policy or DraftPolicy()
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
        self.features: torch.Tensor | None = None  # H-RAD features of the last round, awaiting a label

    def target_round(self) -> torch.Tensor:
        """``p`` logits at each pending position and at the branch point ``[n+1, V]``."""
        return self.lane.feed(self.committed + self.pending, rows=len(self.pending) + 1)

    def settle(self, proposal: Proposal, logits: torch.Tensor) -> Verdict:
        """Verify the pending block and the branch point against ``logits [n+1, V]``."""
        n = len(self.pending)
        q = None if proposal.q is None else proposal.q.to(logits.device)  # [n+1, V] under rule C
        if (q is None) != (self.speculator.rule != "C") or (q is not None and q.shape[0] != n + 1):
            raise ValueError(f"proposal q rows {None if q is None else tuple(q.shape)} do not fit rule "
                             f"{self.speculator.rule} with {n} pending tokens")
        positions = [Position([tok], None if q is None else q[i]) for i, tok in enumerate(self.pending)]
        positions.append(Position(proposal.candidates, None if q is None else q[n]))
        out = self.speculator.verify(positions, logits)
        hit = out.num_accepted == n + 1
        kept = out.branch if hit else 0  # for the counts: PEARL's single branch is branch 0
        m = self.metrics
        discarded = 0 if hit else (n - out.num_accepted) + proposal.size(0)
        m.record_verification(n + 1, out.num_accepted, proposal.size(kept), discarded, len(out.tokens))
        m.branch_rollback_tokens += sum(proposal.size(b) for b in range(len(proposal.blocks)) if b != kept)
        if len(proposal.blocks) > 1 and out.num_accepted >= n:  # the branch point itself was reached
            m.num_branch_points += 1
            m.num_branch_hits += hit
        self.committed += out.tokens
        self._trace(n, out.num_accepted)
        if not hit:
            self.pending = []
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
        return Verdict(out.tokens, kept, keep, cls == 0)

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
