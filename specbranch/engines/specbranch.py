"""SpecBranch (arXiv 2506.01979) and PEARL (arXiv 2408.11850), DESIGN.md §2.2-2.3.

State between rounds: the committed tokens and a *pending block* of drafted, not yet verified
tokens. Every round the two workers do independent work that a concurrent runtime can overlap:

- **target** (`target_round`): one forward over the pending block, giving ``p`` at each pending
  position and at the *branch point* right after it;
- **draft** (`draft_round`): at the branch point, pick candidate tokens (k of them when the
  draft's top-1 probability is <= τ, else 1), fork one cache row per candidate and extend every
  branch with one batched forward per step, cutting each branch's block before its first
  low-confidence position (that position, whose ``q`` is already computed, is the next branch
  point).

`settle` then verifies pending tokens and the branch point left to right with the rule in force.
If everything passes, the branch whose candidate the target settled on survives and its block
becomes the pending block; otherwise the correction is committed and the draft starts over from
it. With an empty pending block the round is PEARL's pre-verify; with one it is post-verify.

PEARL is this engine with one candidate per branch point and no confidence cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backend import Backend
from ..config import SpeculationConfig
from ..policy import DraftPolicy, top1_confidence
from .speculative import Position, SpeculativeEngine


@dataclass
class Branches:
    """What the draft produced in one round: the branch point, one block per candidate, and the
    draft logits at the end of each block (the next branch point's ``q``, reused)."""

    point: Position
    blocks: list[list[Position]]
    ends: list[torch.Tensor]

    def size(self, b: int) -> int:
        """Tokens of branch ``b``: its candidate plus its block."""
        return 1 + len(self.blocks[b])


class SpecBranchEngine(SpeculativeEngine):
    name = "specbranch"

    def __init__(
        self, target: Backend, draft: Backend, spec: SpeculationConfig | None = None, policy: DraftPolicy | None = None
    ) -> None:
        super().__init__(target, draft, spec)
        self.policy = policy or DraftPolicy(self.spec.gamma, self.spec.branches, self.spec.tau)

    def start(self, *args, **kwargs) -> None:
        super().start(*args, **kwargs)
        self.pending: list[Position] = []

    def pending_tokens(self) -> list[int]:
        return self.committed + [pos.candidates[0] for pos in self.pending]

    def draft_round(self) -> Branches:
        """Draft worker: branch at the position after the pending block and extend every branch."""
        logits = self.draft.feed(self.pending_tokens())[0]  # [V]: q at the branch point
        point = self.speculator.candidates(logits, self.policy.candidates(float(top1_confidence(logits))))
        k = len(point.candidates)
        self.draft.fork(k)
        rows = list(point.candidates)  # the token each branch row feeds next
        blocks: list[list[Position]] = [[] for _ in range(k)]
        ends: list[torch.Tensor | None] = [None] * k
        for step in range(self.policy.max_block() + 1):
            logits = self.draft.feed_rows(rows)  # [k, V]: q after each branch's last token
            conf = top1_confidence(logits).tolist()  # [k]
            for b in range(k):
                if ends[b] is not None:
                    continue  # finished: this row only runs along with the others until all are done
                if step == self.policy.max_block() or self.policy.cut(conf[b]):
                    ends[b] = logits[b]
                    continue
                blocks[b].append(self.speculator.candidates(logits[b], 1))
                rows[b] = blocks[b][-1].candidates[0]
            if all(end is not None for end in ends):
                break
        return Branches(point, blocks, ends)

    def target_round(self) -> torch.Tensor:
        """Target worker: ``p`` logits at each pending position and the branch point ``[n+1, V]``."""
        return self.target.feed(self.pending_tokens(), rows=len(self.pending) + 1)

    def step(self) -> list[int]:
        branches = self.draft_round()
        logits = self.target_round()
        return self.settle(branches, logits)

    def settle(self, br: Branches, logits: torch.Tensor) -> list[int]:
        n = len(self.pending)
        out = self.speculator.verify(self.pending + [br.point], logits)
        hit = out.num_accepted == n + 1
        kept = out.branch if hit else 0  # for the counts: PEARL's single branch is branch 0
        discarded = 0 if hit else (n - out.num_accepted) + br.size(0)
        self.record(n + 1, out.num_accepted, br.size(kept), discarded, len(out.tokens))
        self.metrics.branch_rollback_tokens += sum(br.size(b) for b in range(len(br.blocks)) if b != kept)
        if len(br.blocks) > 1 and out.num_accepted >= n:  # the branch point itself was reached
            self.metrics.num_branch_points += 1
            self.metrics.num_branch_hits += hit
        self.committed += out.tokens
        if hit:  # the surviving branch's block is the next pending block
            self.draft.select(kept, keep=br.size(kept), last_logits=br.ends[kept])
            self.pending = br.blocks[kept]
        else:  # the draft restarts from the correction (its lane re-syncs next round)
            self.pending = []
        return out.tokens


class PearlEngine(SpecBranchEngine):
    """PEARL: pre-verify / post-verify with a single chain (no branches, no confidence cut)."""

    name = "pearl"

    def __init__(self, target: Backend, draft: Backend, spec: SpeculationConfig | None = None) -> None:
        spec = spec or SpeculationConfig()
        super().__init__(target, draft, spec, DraftPolicy(spec.gamma, branches=1, tau=0.0))
