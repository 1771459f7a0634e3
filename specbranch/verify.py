"""Verification rules A/B/C (DESIGN.md §2.5): pure functions from distributions to verdicts.

Which rule applies depends on how the drafts were produced, never on the engine:

- **A, greedy (T = 0)**: accept a token iff it equals ``argmax p`` (integer comparison).
- **B, deterministic drafts at T > 0** (greedy continuations, top-k branch tokens): *match
  sampling*: draw ``y ~ p`` and accept iff the draft equals ``y``; otherwise emit ``y``. The output
  is ``y`` either way, so it is distributed as ``p`` whatever was drafted; needs no ``q``.
- **C, drafts sampled from q at T > 0**: the ratio test ``r < min(1, p(x)/q(x))`` and a *sampled*
  residual; at a branch point, recursive rejection over k sampled candidates in their drawn order
  (the order must not depend on ``p``).

The reference code mixed these up (ratio test on deterministic proposals, max-p branch first,
argmax of the residual); each of those biases the output, and ``tests/test_verify.py`` shows by
exact enumeration that they do while these rules do not.

Every rule comes twice, built from the same helpers (`accept_prob`, `residual`, `_after_rejection`):
a sampler returning a verdict, and a ``*_distribution`` function returning the exact law of that
verdict given fixed drafts, used by the exactness tests.

Randomness contract: every sampler draws a *fixed* number of uniforms from the generator passed
in, whatever the outcome (chain of n drafts: n + 1; branch point with k candidates: 1 for rule B,
k + 1 for rule C; `draw_candidates`: k). Two workers holding copies of one generator therefore
stay in step by making the same calls, without telling each other what happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specbranch.sampling import greedy_token, inverse_cdf, residual, sample, sample_rows, uniforms

Tokens = Sequence[int] | Tensor


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    """Outcome of verifying drafted tokens ``x_1..x_n`` left to right.

    ``num_accepted`` drafts are kept (0..n); ``next_token`` follows them: the correction at
    position ``num_accepted`` if a draft was rejected, else the bonus token from ``p_{n+1}``.
    """

    num_accepted: int
    next_token: int


@dataclass(frozen=True, slots=True)
class BranchVerdict:
    """Outcome at a branch point: the surviving branch (index into the candidates) or ``None``,
    and the token fixed there (``candidates[branch]``, or the correction when ``branch`` is None)."""

    branch: int | None
    token: int

    @property
    def hit(self) -> bool:
        return self.branch is not None


# ---------------------------------------------------------------- rule A: greedy (T = 0)


def verify_chain_greedy(draft_tokens: Tokens, target: Tensor) -> ChainVerdict:
    """Rule A on a chain. ``target``: logits/probs ``[n+1, V]`` or their argmax ids ``[n+1]``."""
    draft = _token_list(draft_tokens)
    if target.dim() == 2:
        best = [greedy_token(row) for row in target]  # [n+1]; ties -> lowest index
    elif target.dim() == 1 and not target.is_floating_point():
        best = target.tolist()
    else:
        raise ValueError(f"target must be scores [n+1, V] or integer argmax ids [n+1], got {tuple(target.shape)}")
    if len(best) != len(draft) + 1:
        raise ValueError(f"{len(draft)} draft tokens need {len(draft) + 1} target positions, got {len(best)}")
    accepted = _leading_matches(draft, best)
    return ChainVerdict(accepted, best[accepted])


def select_branch_greedy(candidates: Tokens, target: Tensor | int) -> BranchVerdict:
    """Rule A at a branch point. ``target``: a score row ``[V]`` or the argmax id itself."""
    if not isinstance(target, Tensor):
        best = int(target)
    elif target.dim() == 1:
        best = greedy_token(target)  # ties -> lowest index
    elif target.dim() == 0 and not target.is_floating_point():
        best = int(target)
    else:
        raise ValueError(f"target must be a score row [V] or an integer token id, got {tuple(target.shape)}")
    return BranchVerdict(_index_of(_token_list(candidates), best), best)


# ---------------------------------------------------------------- rule B: match sampling (T > 0)


def verify_chain_match(draft_tokens: Tokens, p: Tensor, generator: torch.Generator) -> ChainVerdict:
    """Rule B on a chain of deterministic drafts; ``p [n+1, V]``. Draws n + 1 uniforms.

    Every position gets its own ``y_i ~ p_i`` up front (one vectorised draw); those after the first
    mismatch are simply unused, which does not change the law of what is emitted.
    """
    draft = _token_list(draft_tokens)
    _check_rows(p, len(draft) + 1, "p")
    drawn = sample_rows(p, generator).tolist()  # [n+1]: y_i ~ p_i
    accepted = _leading_matches(draft, drawn)
    return ChainVerdict(accepted, drawn[accepted])


def select_branch_match(candidates: Tokens, p: Tensor, generator: torch.Generator) -> BranchVerdict:
    """Rule B at a branch point: ``y ~ p``; the branch starting with ``y`` survives. One uniform."""
    cands = _token_list(candidates)
    _check_row(p, "p")
    _check_ids(cands, p.shape[-1])
    token = sample(p, generator)
    return BranchVerdict(_index_of(cands, token), token)


def chain_distribution_match(draft_tokens: Tokens, p: Tensor) -> Tensor:
    """Exact law of `verify_chain_match`: ``[n+1, V]``, entry ``[j, v]`` = P(j accepted, next = v)."""
    draft = _token_tensor(draft_tokens, p.device)  # [n]
    n = draft.numel()
    _check_rows(p, n + 1, "p")
    hit = p[:n].gather(-1, draft[:, None]).squeeze(-1)  # [n]: P(y_i == x_i)
    reach = _prefix_products(hit)  # [n+1]: P(first j drafts accepted)
    miss = p[:n].scatter(-1, draft[:, None], 0.0)  # [n, V]: y_i = v != x_i
    return torch.cat([reach[:n, None] * miss, reach[n:, None] * p[n:]])


def branch_distribution_match(candidates: Tokens, p: Tensor) -> Tensor:
    """Exact law of `select_branch_match`: ``[k+1, V]``; row b < k: branch b survives with token v;
    row k: no branch survives, correction v."""
    cands = _token_list(candidates)
    _check_row(p, "p")
    _check_ids(cands, p.shape[-1])
    out = p.new_zeros(len(cands) + 1, p.shape[-1])
    for b, x in enumerate(cands):
        if _index_of(cands, x) == b:  # a repeated candidate can never be the first match
            out[b, x] = p[x]
    out[-1] = p
    out[-1, cands] = 0.0
    return out


# ---------------------------------------------------------------- rule C: sampled drafts (T > 0)


def accept_prob(p: Tensor, q: Tensor, tokens: Tensor) -> Tensor:
    """``min(1, p(x)/q(x))`` for ``tokens [...]`` under rows ``p, q [..., V]`` -> ``[...]``.

    Samplers accept iff a uniform ``r`` in [0, 1) satisfies ``r < accept_prob``, which has
    probability exactly ``accept_prob`` and never accepts a token with ``p(x) = 0``. ``q(x) = 0``
    cannot happen for a token drawn from ``q``; the guard only keeps it finite, with the limit of
    ``r * q(x) < p(x)``: accept iff ``p(x) > 0``.
    """
    index = tokens.unsqueeze(-1)  # [..., 1]
    p_x = p.gather(-1, index).squeeze(-1)  # [...]
    q_x = q.gather(-1, index).squeeze(-1)  # [...]
    ratio = (p_x / q_x.clamp_min(torch.finfo(q.dtype).tiny)).clamp(max=1.0)
    return torch.where(q_x > 0, ratio, (p_x > 0).to(p.dtype))


def verify_chain_sampled(draft_tokens: Tokens, p: Tensor, q: Tensor, generator: torch.Generator) -> ChainVerdict:
    """Rule C on a chain ``x_i ~ q_i``; ``p [n+1, V]``, ``q [n, V]``. Draws n + 1 uniforms
    (n ratio tests, then one for the sampled residual or the bonus token)."""
    draft = _token_tensor(draft_tokens, p.device)  # [n]
    n = draft.numel()
    _check_rows(p, n + 1, "p")
    _check_rows(q, n, "q", vocab=p.shape[-1])
    u = uniforms(n + 1, generator).to(p.device)  # [n+1]
    passed = u[:n] < accept_prob(p[:n], q, draft)  # [n]
    accepted = int(passed.long().cumprod(dim=0).sum())
    last = residual(p[accepted], q[accepted]) if accepted < n else p[n]
    return ChainVerdict(accepted, int(inverse_cdf(last, u[n])))


def chain_distribution_sampled(draft_tokens: Tokens, p: Tensor, q: Tensor) -> Tensor:
    """Exact law of `verify_chain_sampled`: ``[n+1, V]``, entry ``[j, v]`` = P(j accepted, next = v)."""
    draft = _token_tensor(draft_tokens, p.device)  # [n]
    n = draft.numel()
    _check_rows(p, n + 1, "p")
    _check_rows(q, n, "q", vocab=p.shape[-1])
    accept = accept_prob(p[:n], q, draft)  # [n]
    reach = _prefix_products(accept)  # [n+1]: P(first j drafts accepted)
    rejected = (reach[:n] * (1.0 - accept))[:, None] * residual(p[:n], q)  # [n, V]
    return torch.cat([rejected, reach[n:, None] * p[n:]])


def draw_candidates(q: Tensor, k: int, generator: torch.Generator, *, without_replacement: bool) -> Tensor:
    """Draft side of rule C: k branch candidates from ``q [V]`` -> LongTensor ``[k']``. Draws k uniforms.

    i.i.d. draws may repeat a token. Without replacement, each draw comes from ``q`` with the earlier
    picks removed (renormalised), so fewer than k come back when ``q`` has fewer than k tokens with
    mass (e.g. under top-k/top-p); the verifier must then be called with the same flag.
    """
    _check_row(q, "q")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    u = uniforms(k, generator)  # [k]
    if not without_replacement:
        return inverse_cdf(q.expand(k, -1), u)  # [k]
    remaining = q.clone()
    picks = []
    for i in range(min(k, int((q > 0).sum()))):
        picks.append(int(inverse_cdf(remaining, u[i])))
        remaining[picks[-1]] = 0.0  # inverse_cdf renormalises implicitly
    return torch.tensor(picks, dtype=torch.long, device=q.device)


def select_branch_sampled(
    candidates: Tokens, p: Tensor, q: Tensor, generator: torch.Generator, *, without_replacement: bool
) -> BranchVerdict:
    """Rule C at a branch point: recursive rejection over candidates drawn from ``q`` (rows ``[V]``).

    Candidates are tested in the order given (their draw order, which does not depend on ``p``);
    after each rejection ``(p, q)`` move on as in `_after_rejection`; if all are rejected the token is
    sampled from the final residual. ``without_replacement`` must say how the candidates were drawn
    (see `draw_candidates`). Draws k + 1 uniforms.
    """
    cands = _checked_candidates(candidates, p, q, without_replacement)
    u = uniforms(len(cands) + 1, generator).to(p.device)  # [k+1]
    for b, x in enumerate(cands):
        if bool(u[b] < accept_prob(p, q, _scalar(x, p))):
            return BranchVerdict(b, x)
        p, q = _after_rejection(p, q, x, without_replacement)
    return BranchVerdict(None, int(inverse_cdf(p, u[-1])))


def branch_distribution_sampled(candidates: Tokens, p: Tensor, q: Tensor, *, without_replacement: bool) -> Tensor:
    """Exact law of `select_branch_sampled` for fixed candidates: ``[k+1, V]``; row b < k: branch b
    survives (its mass sits at ``candidates[b]``); row k: all rejected, correction v."""
    cands = _checked_candidates(candidates, p, q, without_replacement)
    out = p.new_zeros(len(cands) + 1, p.shape[-1])
    reach = p.new_ones(())  # P(all earlier candidates rejected)
    for b, x in enumerate(cands):
        accept = accept_prob(p, q, _scalar(x, p))
        out[b, x] = reach * accept
        reach = reach * (1.0 - accept)
        p, q = _after_rejection(p, q, x, without_replacement)
    out[-1] = reach * p
    return out


def _after_rejection(p: Tensor, q: Tensor, x: int, without_replacement: bool) -> tuple[Tensor, Tensor]:
    """The ``(p, q)`` the next candidate is tested against once ``x`` was rejected.

    ``p <- norm(max(p - q, 0))`` in both variants: given a rejection, the output must follow exactly
    that residual for the total to come out as ``p``. The next candidate is a draw from ``q`` (i.i.d.)
    or from ``q`` without ``x`` (without replacement); in the latter case ``q`` loses ``x`` and is
    renormalised (a rejected ``x`` has ``q(x) >= p(x)``, so the new ``p`` gives it no mass either).
    """
    p_next = residual(p, q)  # uses q *before* x is removed
    if without_replacement:
        q = q.clone()
        q[x] = 0.0
        q = q / q.sum().clamp_min(torch.finfo(q.dtype).tiny)  # all-zero only if no candidate can follow
    return p_next, q


# ---------------------------------------------------------------- small helpers


def _token_list(tokens: Tokens) -> list[int]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"token ids must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        return tokens.tolist()
    return [int(t) for t in tokens]


def _token_tensor(tokens: Tokens, device: torch.device) -> Tensor:
    return torch.tensor(_token_list(tokens), dtype=torch.long, device=device)


def _scalar(x: int, like: Tensor) -> Tensor:
    return torch.tensor(x, dtype=torch.long, device=like.device)


def _leading_matches(draft: list[int], target: list[int]) -> int:
    """Length of the prefix where ``draft`` agrees with ``target``."""
    for i, (x, y) in enumerate(zip(draft, target)):
        if x != y:
            return i
    return len(draft)


def _index_of(cands: list[int], token: int) -> int | None:
    return cands.index(token) if token in cands else None


def _prefix_products(x: Tensor) -> Tensor:
    """``[n] -> [n+1]``: ``1, x_0, x_0 x_1, ...``."""
    return torch.cat([x.new_ones(1), x.cumprod(dim=0)])


def _check_row(t: Tensor, name: str, vocab: int | None = None) -> None:
    if t.dim() != 1 or (vocab is not None and t.shape[0] != vocab):
        want = f"[{vocab}]" if vocab is not None else "[V]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_rows(t: Tensor, rows: int, name: str, vocab: int | None = None) -> None:
    if t.dim() != 2 or t.shape[0] != rows or (vocab is not None and t.shape[1] != vocab):
        raise ValueError(f"{name} must have shape [{rows}, {vocab or 'V'}], got {tuple(t.shape)}")


def _check_ids(cands: list[int], vocab: int) -> None:
    bad = [x for x in cands if not 0 <= x < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab})")


def _checked_candidates(candidates: Tokens, p: Tensor, q: Tensor, without_replacement: bool) -> list[int]:
    cands = _token_list(candidates)
    _check_row(p, "p")
    _check_row(q, "q", vocab=p.shape[0])
    _check_ids(cands, p.shape[0])
    if without_replacement and len(set(cands)) != len(cands):
        raise ValueError(f"candidates drawn without replacement cannot repeat, got {cands}")
    return cands
