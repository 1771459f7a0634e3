"""A model lane: one backend plus the token ids its KV cache holds.

Engines think in token sequences ("the committed text plus the pending block"); the cache thinks
in positions. The lane keeps the two in step, so an engine never does position arithmetic: it
asks for the logits at the end of a sequence and the lane rolls back to the longest cached prefix
and feeds only what is missing. It also counts forwards and busy time for the metrics.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..backend import Backend
from ..metrics import Metrics
from ..profiling import region


class Lane:
    def __init__(self, backend: Backend, role: str) -> None:
        if role not in ("target", "draft"):
            raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
        self.backend = backend
        self.role = role
        self.tokens: list[int] = []  # trunk tokens in the cache, in order
        self.branches: list[list[int]] = []  # per-branch suffix tokens while forked
        self._last: torch.Tensor | None = None  # logits at the last trunk position, if known
        self.metrics = Metrics()
        # H-RAD: layers whose hidden states each forward returns, and those of its last position
        self.hidden_layers: tuple[int, ...] = ()
        self.last_hidden: torch.Tensor | None = None  # [N, H]

    # -- bookkeeping ---------------------------------------------------------------------------
    def reset(self, prompt: Sequence[int], metrics: Metrics) -> None:
        """Start a generation: cache the prompt minus its last token, so that every round of an
        engine has at least one token to feed (the first round feeds the last prompt token)."""
        self.metrics = metrics
        self.backend.reset()
        self.tokens, self.branches, self._last = [], [], None
        if len(prompt) > 1:
            self._run(torch.tensor([list(prompt[:-1])]), last_only=True)
            self.tokens = list(prompt[:-1])

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` trunk tokens (drops any branches)."""
        if self.branches:
            self.unfork()
        if n < len(self.tokens):
            self.backend.truncate(n)
            del self.tokens[n:]
            self._last = None

    def sync(self, seq: Sequence[int]) -> list[int]:
        """Roll back to the longest cached prefix of ``seq``; return the tokens still to feed."""
        if self.branches:
            self.unfork()
        n = min(len(seq), len(self.tokens))
        if self.tokens[:n] != list(seq[:n]):
            n = next(i for i, (a, b) in enumerate(zip(self.tokens, seq)) if a != b)
        self.truncate(n)
        return list(seq[n:])

    # -- forwards ------------------------------------------------------------------------------
    def feed(self, seq: Sequence[int], rows: int = 1) -> torch.Tensor:
        """Make the cache hold ``seq`` and return logits ``[rows, V]`` of its last ``rows``
        positions (row ``i`` predicts the token after ``seq[len(seq) - rows + i]``)."""
        tail = self.sync(seq)
        if len(tail) < rows:
            if rows == 1 and not tail and self._last is not None:
                return self._last[None]
            # The logits of cached positions are not kept: re-run the last `rows` tokens.
            cut = len(seq) - rows
            self.truncate(cut)
            tail = list(seq[cut:])
        logits = self._run(torch.tensor([tail]))[0]  # [t, V]
        self.tokens += tail
        self._last = logits[-1]
        return logits[-rows:]

    def fork(self, k: int) -> None:
        """Branch the trunk into ``k`` rows (no copy for the native cache); k == 1 stays unforked."""
        if k > 1:
            self.backend.fork(k)
            self.branches = [[] for _ in range(k)]

    def feed_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Append one token per row (per branch, or to the trunk when not forked) -> logits ``[rows, V]``."""
        if len(ids) != max(len(self.branches), 1):
            raise ValueError(f"{len(ids)} tokens for {max(len(self.branches), 1)} rows")
        logits = self._run(torch.tensor(list(ids))[:, None])[:, -1]  # [rows, V]
        if self.branches:
            for b, tok in enumerate(ids):
                self.branches[b].append(tok)
        else:
            self.tokens.append(ids[0])
            self._last = logits[0]
        return logits

    def select(self, b: int, keep: int, last_logits: torch.Tensor | None) -> None:
        """Keep the first ``keep`` tokens of branch ``b`` (on the trunk when not forked) and
        remember ``last_logits``, the logits at the new end, so the next round need not recompute them."""
        if self.branches:
            suffix = self.branches[b]
            self.backend.select(b)
            self.tokens += suffix
            self.branches = []
            self.truncate(len(self.tokens) - len(suffix) + keep)
        self._last = last_logits

    def unfork(self) -> None:
        """Drop every branch; the trunk is unchanged."""
        self.backend.select(0)
        self.backend.truncate(len(self.tokens))
        self.branches = []

    def _run(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        t0 = time.perf_counter()
        with region(f"{self.role}.forward"):
            out = self.backend.forward(tokens, hidden_layers=self.hidden_layers, last_only=last_only)
        if self.hidden_layers:
            self.last_hidden = out.hidden[:, 0, -1]  # [N, rows, t, H] -> [N, H] of row 0's last token
        logits = out.logits
        busy = time.perf_counter() - t0
        m = self.metrics
        if self.role == "target":
            m.target_forwards += 1
            m.target_busy_s += busy
        else:
            m.draft_busy_s += busy
            if tokens.shape[0] > 1:
                m.branch_forwards += 1
            else:
                m.draft_forwards += 1
        return logits
