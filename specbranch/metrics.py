"""Generation metrics, defined once (DESIGN.md §2.6) and reported everywhere.

Counter names follow vLLM's speculative-decoding metrics where one exists
(``num_drafts``, ``num_draft_tokens``, ``num_accepted_tokens``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Metrics:
    new_tokens: int = 0
    prompt_tokens: int = 0
    wall_time_s: float = 0.0  # prefill + decode
    prefill_time_s: float = 0.0
    target_forwards: int = 0  # including the prefill
    draft_forwards: int = 0  # single-row draft steps, including the prefill
    branch_forwards: int = 0  # batched draft steps over k branch rows
    num_drafts: int = 0  # draft blocks submitted for verification
    num_draft_tokens: int = 0  # drafted tokens submitted for verification
    num_accepted_tokens: int = 0  # of those, accepted by the target
    drafted_tokens: int = 0  # every token the draft produced outside unselected branches
    rollback_tokens: int = 0  # drafted tokens discarded, excluding unselected branches
    branch_rollback_tokens: int = 0  # tokens of branches that were not selected
    num_branch_points: int = 0
    num_branch_hits: int = 0  # the target's token was one of the k candidates
    # hits on a candidate other than the draft's first: rounds a single chain would have rolled back
    num_branch_rescues: int = 0
    target_busy_s: float = 0.0  # time in target forwards
    draft_busy_s: float = 0.0  # time in draft forwards
    # Time each worker spent waiting for the other ("mutual waiting bubbles"). Parallel runtime:
    # measured around each worker's blocking wait for the other's message, round by round.
    # Sequential runtime: one process, so each worker waits exactly while the other computes.
    target_idle_s: float = 0.0
    draft_idle_s: float = 0.0
    # tokens committed by each verification (accepted drafts + correction/bonus): the histogram
    # behind mean accepted length, plotted by the benchmark
    accepted_lengths: list[int] = field(default_factory=list)

    @property
    def decode_time_s(self) -> float:
        return self.wall_time_s - self.prefill_time_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding (prefill excluded, as in the papers' tables)."""
        return self.new_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Committed tokens per target forward after the prefill (1.0 for ``ar``)."""
        steps = self.target_forwards - 1
        return self.new_tokens / steps if steps > 0 else float(self.new_tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def rollback_rate(self) -> float:
        """Discarded drafted tokens / drafted tokens (unselected branches not counted)."""
        return self.rollback_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def branch_hit_rate(self) -> float:
        return self.num_branch_hits / self.num_branch_points if self.num_branch_points else 0.0

    # Busy times include each worker's prefill, so idle fractions are taken over the whole wall time.
    @property
    def target_idle_fraction(self) -> float:
        """Share of the generation's wall time the target spent waiting for the draft."""
        return self.target_idle_s / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def draft_idle_fraction(self) -> float:
        """Share of the generation's wall time the draft spent waiting for the target."""
        return self.draft_idle_s / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def record_verification(self, submitted: int, accepted: int, drafted: int, discarded: int, committed: int) -> None:
        """Count one verification: ``submitted`` drafts checked, ``accepted`` kept, ``drafted``
        tokens produced this round (outside unselected branches), ``discarded`` rolled back,
        ``committed`` tokens emitted by it."""
        self.accepted_lengths.append(committed)
        self.num_drafts += 1
        self.num_draft_tokens += submitted
        self.num_accepted_tokens += accepted
        self.drafted_tokens += drafted
        self.rollback_tokens += discarded

    def summary(self) -> dict:
        """Counters plus derived rates, for JSON and printing."""
        out = asdict(self)
        for name in ("tokens_per_s", "mean_accepted_length", "acceptance_rate", "rollback_rate", "branch_hit_rate",
                     "target_idle_fraction", "draft_idle_fraction"):
            out[name] = getattr(self, name)
        return out

    def line(self) -> str:
        """One human line for the terminal."""
        parts = [
            f"{self.new_tokens} tokens in {self.decode_time_s:.2f}s = {self.tokens_per_s:.2f} tok/s",
            f"prefill {self.prompt_tokens} tokens {self.prefill_time_s:.2f}s",
            f"target forwards {self.target_forwards}",
        ]
        if self.num_draft_tokens:
            parts += [
                f"mean accepted length {self.mean_accepted_length:.2f}",
                f"acceptance {self.acceptance_rate:.1%}",
                f"rollback {self.rollback_rate:.1%}",
            ]
        if self.num_branch_points:
            parts.append(f"branch hits {self.branch_hit_rate:.1%}")
        if self.num_draft_tokens:
            parts.append(f"idle target {self.target_idle_fraction:.0%} / draft {self.draft_idle_fraction:.0%}")
        return " | ".join(parts)
