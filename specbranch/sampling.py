"""Logits -> probabilities, and probabilities -> tokens (DESIGN.md §2.4-2.5).

One module owns both directions so that the target distribution ``p`` and the draft distribution
``q`` always go through *the same* transform (the reference code used different transforms for the
two, which by itself breaks losslessness). Exactness choices:

- Probabilities are float64: ratio tests and residuals subtract nearly equal numbers.
- Every random decision is an inverse-CDF lookup of a float64 uniform drawn from an explicit
  ``torch.Generator``: exactly one uniform per sampled token, so a caller can say how far a
  generator advanced (two workers holding copies of one generator stay in step), and the global
  RNG is never touched or reseeded.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import Tensor

from specbranch.errors import ConfigError

#: Residual mass at or below which the residual distribution is replaced by ``p`` (see `residual`).
RESIDUAL_EPS = 1e-12


def greedy_token(logits: Tensor) -> int:
    """The index of the largest of ``logits [V]``: the first one on ties (and the first NaN), as ``torch.argmax``.

    Why numpy on the CPU: over the 151,936 logits of the default pair, ``torch.argmax`` took 140 us on one thread
    (150 on two), numpy's 13 us (Zen 4); every drafted token takes one and every verified position one more."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and logits.dim() == 1:
        return int(np.argmax(logits.detach().numpy()))
    return int(logits.argmax())


def probs_from_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Turn logits ``[..., V]`` into float64 probabilities ``[..., V]``.

    Use this one function for the target and the draft alike: the rules of ``verify`` are exact
    only when ``p`` and ``q`` come from the same transform.

    - ``temperature == 0``: one-hot at ``argmax`` (ties go to the lowest index, as ``torch.argmax``);
      top-k/top-p cannot change the argmax, so they are irrelevant here.
    - ``top_k`` (0 = off): keep the tokens whose logit is at least the k-th largest. Tokens tied with
      the k-th are all kept, so the result depends on the values only, never on a sort order.
    - ``top_p`` (1 = off): keep the smallest set of most probable tokens whose mass reaches
      ``top_p`` (always at least one token), again keeping every token tied with the last one kept.
    """
    _check_sampling_params(temperature, top_k, top_p)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if temperature == 0:
        best = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros(logits.shape, dtype=torch.float64, device=logits.device).scatter_(-1, best, 1.0)
    scores = logits.to(torch.float64) / temperature  # [..., V]
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return _nucleus(probs, top_p) if top_p < 1.0 else probs


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Top-p filtering of normalised ``probs [..., V]``, renormalised."""
    ranked = probs.sort(dim=-1, descending=True).values  # [..., V]
    mass_before = ranked.cumsum(dim=-1) - ranked  # [..., V]; exactly 0 for the first token
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True)  # [..., 1], >= 1
    cutoff = ranked.gather(-1, num_kept - 1)  # [..., 1]: probability of the last token kept
    kept = probs.masked_fill(probs < cutoff, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def _check_sampling_params(temperature: float, top_k: int, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0 (got {temperature!r}); use 0 for greedy")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (got {top_k!r}); use 0 to disable it")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1] (got {top_p!r}); use 1 to disable it")


def uniforms(n: int, generator: torch.Generator) -> Tensor:
    """``n`` float64 uniforms in [0, 1) from ``generator``, on the generator's device.

    The only place this package draws randomness: callers pass the generator explicitly so that
    the stream is seeded once and advanced identically wherever a decision is made.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"an explicit torch.Generator is required (got {type(generator).__name__})")
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)


def verify_generator(seed: int) -> torch.Generator:
    """The verification stream: every decision the target side makes (ratio tests, residual and
    bonus samples, match sampling, ``ar`` sampling). Seeded with ``seed`` itself."""
    return torch.Generator().manual_seed(seed)


def draft_generator(seed: int) -> torch.Generator:
    """The drafting stream: every random choice the draft side makes (rule C drafts and branch
    candidates). Seeded with the first 63 bits of BLAKE2b(``"specbranch-draft:<seed>"``).

    Why a second stream: with one generator shared by both sides, the draws would interleave in
    whatever order the two workers happen to run, so a concurrent runtime could not reproduce the
    sequential one. With one stream per side, each side advances its own generator the same way in
    any runtime. Losslessness does not need the two to be related: the rules only require the
    verification uniforms to be independent of the drafts, which separate streams are. A hash (not
    ``seed + 1``) keeps seed s's draft stream from being seed s+1's verification stream.
    """
    digest = hashlib.blake2b(f"specbranch-draft:{seed}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Token ids ``[...]`` at uniforms ``u [...]`` under (possibly unnormalised) ``probs [..., V]``.

    Returns the first token whose cumulative mass exceeds ``u * total``. A token of probability 0
    can never be returned: its CDF step is empty, and the target is clamped strictly below the total
    so that rounding of ``u * total`` cannot run past the last token that has mass.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [..., V]; non-decreasing even in floating point
    total = cdf[..., -1:]  # [..., 1]
    if not bool((total > 0).all()):  # also catches NaN
        raise ValueError("cannot sample from a probability vector with no (or NaN) mass")
    below_total = torch.nextafter(total, torch.zeros_like(total))  # [..., 1]
    target = torch.minimum(u.to(cdf).unsqueeze(-1) * total, below_total)  # [..., 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [...]


def sample_rows(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of ``probs [..., V]`` -> LongTensor ``[...]``; draws one uniform per row."""
    u = uniforms(probs[..., 0].numel(), generator).view(probs.shape[:-1])  # [...]
    return inverse_cdf(probs, u)


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """One token from a 1-D probability vector ``[V]``; draws exactly one uniform."""
    if probs.dim() != 1:
        raise ValueError(f"sample() takes a 1-D probability vector, got shape {tuple(probs.shape)}")
    return int(sample_rows(probs, generator))


def residual(p: Tensor, q: Tensor) -> Tensor:
    """``norm(max(p - q, 0))`` over the last dim: what to sample after a ratio-test rejection.

    The unnormalised mass ``sum max(p - q, 0)`` equals the total rejection probability (for
    normalised p and q it is the total-variation distance). If it is <= ``RESIDUAL_EPS`` the
    residual is never needed in exact arithmetic (it is reached only when p == q, i.e. with
    probability 0) and at most with probability ``RESIDUAL_EPS`` in floating point; normalising it
    would only blow rounding noise up into an arbitrary distribution. We return ``p`` instead:
    it is exactly right when p == q, stays on p's support, and moves the output law by at most
    ``RESIDUAL_EPS``.
    """
    excess = (p - q).clamp_min(0.0)  # [..., V]
    mass = excess.sum(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(mass > RESIDUAL_EPS, excess / mass.clamp_min(RESIDUAL_EPS), p)
