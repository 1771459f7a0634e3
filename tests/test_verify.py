"""Exactness of the verification rules (DESIGN.md §2.4-2.5).

Three layers, each able to fail on its own:

1. Exact enumeration on tiny vocabularies: the output law of every T > 0 rule, marginalised over
   the draft's random candidates, must equal the target ``p`` to 1e-9.
2. Tests of the tests: the reference code's biased rules, pushed through the same harness, must
   be caught (deviation > 1e-3), so a harness that accepts everything cannot pass unnoticed.
3. Monte Carlo on the real samplers (fixed seeds, chi-square), so a bug in the sampling path
   cannot hide behind a correct ``*_distribution`` function.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from conftest import assert_matches, chi2_pvalue

from specbranch.sampling import (
    RESIDUAL_EPS,
    greedy_token,
    inverse_cdf,
    probs_from_logits,
    residual,
    sample,
    sample_rows,
    uniforms,
)
from specbranch.verify import (
    BranchVerdict,
    ChainVerdict,
    accept_prob,
    branch_distribution_match,
    branch_distribution_sampled,
    chain_distribution_match,
    chain_distribution_sampled,
    draw_candidates,
    select_branch_greedy,
    select_branch_match,
    select_branch_sampled,
    verify_chain_greedy,
    verify_chain_match,
    verify_chain_sampled,
)

F64 = torch.float64
EXACT = 1e-9
BIAS = 1e-3


def dist(*values: float) -> torch.Tensor:
    t = torch.tensor(values, dtype=F64)
    return t / t.sum()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_dist(vocab: int, g: torch.Generator, zeros: int = 0) -> torch.Tensor:
    """Softmax of scaled Gaussian logits (peaked or flat), with ``zeros`` entries forced to 0."""
    logits = torch.randn(vocab, generator=g, dtype=F64) * (3.0 * torch.rand((), generator=g, dtype=F64))
    logits[torch.randperm(vocab, generator=g)[:zeros]] = float("-inf")
    return torch.softmax(logits, dim=0)


def distribution_pairs(vocab: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, p, q) cases: dense, sparse (zeros in p, in q, in both), p == q, disjoint, one-hot."""
    g = gen(1000 + vocab)
    sparse = max(1, vocab // 2)
    cases = [(f"dense{i}", random_dist(vocab, g), random_dist(vocab, g)) for i in range(3)]
    cases += [
        ("sparse_p", random_dist(vocab, g, sparse), random_dist(vocab, g)),
        ("sparse_q", random_dist(vocab, g), random_dist(vocab, g, sparse)),
        ("sparse_both", random_dist(vocab, g, sparse), random_dist(vocab, g, sparse)),
    ]
    same = random_dist(vocab, g)
    one_hot = torch.zeros(vocab, dtype=F64)
    one_hot[-1] = 1.0
    disjoint_q = torch.zeros(vocab, dtype=F64)
    disjoint_q[:-1] = 1.0 / (vocab - 1)
    cases += [("p_eq_q", same, same.clone()), ("disjoint", one_hot, disjoint_q), ("onehot_q", same, one_hot)]
    return cases


def support(q: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(q > 0).flatten()]


def iid_draws(q: torch.Tensor, k: int):
    """Every candidate tuple drawn i.i.d. from q, with its probability."""
    for xs in itertools.product(support(q), repeat=k):
        yield xs, math.prod(float(q[x]) for x in xs)


def wr_draws(q: torch.Tensor, k: int):
    """Every ordered tuple drawn sequentially without replacement from q, with its probability
    (k capped by the support size, as in `draw_candidates`)."""
    supp = support(q)
    for xs in itertools.permutations(supp, min(k, len(supp))):
        weight, left = 1.0, 1.0
        for x in xs:
            weight *= float(q[x]) / left
            left -= float(q[x])
        yield xs, weight


def marginal_law(rule, p, q, k: int, without_replacement: bool) -> torch.Tensor:
    """Output token law of ``rule(candidates, p, q) -> [..., V]`` averaged over the candidate draws."""
    draws = wr_draws(q, k) if without_replacement else iid_draws(q, k)
    law, total_weight = torch.zeros_like(p), 0.0
    for xs, weight in draws:
        out = rule(list(xs), p, q)
        law += weight * (out.sum(0) if out.dim() == 2 else out)
        total_weight += weight
    assert abs(total_weight - 1.0) < 1e-12  # the enumeration itself is complete
    return law


def rule_c(wr: bool):
    return lambda xs, p, q: branch_distribution_sampled(xs, p, q, without_replacement=wr)


def max_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------- probs_from_logits


def test_probs_from_logits_temperature_matches_float64_softmax():
    logits = torch.randn(2, 3, 7, generator=gen(0))
    for t in (0.5, 1.0, 2.0):
        out = probs_from_logits(logits, t)
        assert out.dtype == F64 and out.shape == (2, 3, 7)
        assert torch.allclose(out, torch.softmax(logits.double() / t, -1), atol=0, rtol=1e-12)
    for dtype in (torch.float16, torch.bfloat16):
        assert probs_from_logits(logits.to(dtype), 1.0).dtype == F64


def test_temperature_zero_is_one_hot_with_lowest_index_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    out = probs_from_logits(logits, 0.0, top_k=1, top_p=0.1)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64))


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    assert support(probs_from_logits(logits, 1.0, top_k=1)) == [0]
    assert support(probs_from_logits(logits, 1.0, top_k=2)) == [0, 1, 2]  # tie at the 2nd value
    assert support(probs_from_logits(logits, 1.0, top_k=4)) == [0, 1, 2, 3]
    assert support(probs_from_logits(logits, 1.0, top_k=99)) == [0, 1, 2, 3, 4]
    kept = probs_from_logits(logits, 0.7, top_k=4)
    assert torch.allclose(kept[:4], torch.softmax(logits[:4].double() / 0.7, 0), rtol=1e-12)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert support(probs_from_logits(logits, 1.0, top_p=1e-9)) == [0]  # always at least one
    assert support(probs_from_logits(logits, 1.0, top_p=0.5)) == [0]  # 0.5 reaches 0.5
    assert support(probs_from_logits(logits, 1.0, top_p=0.75)) == [0, 1]
    assert support(probs_from_logits(logits, 1.0, top_p=0.9)) == [0, 1, 2]
    assert torch.allclose(probs_from_logits(logits, 1.0, top_p=0.75), dist(0.5, 0.3, 0, 0), rtol=1e-6)
    ties = torch.tensor([0.4, 0.3, 0.3]).log()
    assert support(probs_from_logits(ties, 1.0, top_p=0.5)) == [0, 1, 2]
    both = probs_from_logits(torch.tensor([4.0, 3.0, 2.0, 1.0]), 1.0, top_k=3, top_p=0.7)
    assert support(both) == [0, 1] and abs(float(both.sum()) - 1) < 1e-12


def test_probs_from_logits_is_row_independent():
    """The same transform applied to p's and q's rows, batched or not, gives the same rows."""
    logits = torch.randn(4, 9, generator=gen(1))
    batched = probs_from_logits(logits, 0.8, top_k=5, top_p=0.9)
    for row, out in zip(logits, batched):
        assert torch.equal(probs_from_logits(row, 0.8, top_k=5, top_p=0.9), out)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
     dict(temperature=1.0, top_k=-1), dict(temperature=1.0, top_k=2.5), dict(temperature=1.0, top_p=0.0),
     dict(temperature=1.0, top_p=1.5)],
)
def test_probs_from_logits_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        probs_from_logits(torch.zeros(3), **kwargs)


# ---------------------------------------------------------------- sampling primitives


def test_inverse_cdf_never_returns_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0, 0.0], dtype=F64)
    below_one = torch.tensor(1.0 - 2.0**-53, dtype=F64)
    assert int(inverse_cdf(probs, torch.tensor(0.0, dtype=F64))) == 1
    assert int(inverse_cdf(probs, below_one)) == 3
    assert int(inverse_cdf(probs * (1 + 1e-15), below_one)) == 3  # u * total may round up to total
    assert int(inverse_cdf(probs * 7, torch.tensor(0.5, dtype=F64))) == 3  # unnormalised is fine
    with pytest.raises(ValueError):
        inverse_cdf(torch.zeros(4, dtype=F64), torch.tensor(0.5, dtype=F64))


def test_residual_is_normalised_positive_part_with_guarded_fallback():
    p, q = dist(0.5, 0.3, 0.2), dist(0.2, 0.2, 0.6)
    assert torch.allclose(residual(p, q), dist(0.3, 0.1, 0.0), rtol=1e-12)
    assert torch.equal(residual(p, p), p)  # zero mass: p itself, no 0/0
    nearly = p + torch.tensor([1e-16, -1e-16, 0.0], dtype=F64)
    assert torch.equal(residual(p, nearly), p)  # mass under RESIDUAL_EPS: noise is not amplified
    assert torch.isfinite(residual(p, nearly)).all()
    rows = torch.stack([p, q])
    assert torch.equal(residual(rows, torch.stack([q, q]))[1], q)  # batched, per-row guard
    assert RESIDUAL_EPS <= 1e-12


def test_accept_prob_guards_zero_probabilities():
    p, q = dist(0.0, 0.5, 0.5), dist(0.5, 0.0, 0.5)
    tokens = torch.tensor([0, 1, 2])
    a = accept_prob(p.expand(3, 3), q.expand(3, 3), tokens)
    assert torch.equal(a, torch.tensor([0.0, 1.0, 1.0], dtype=F64))
    assert float(accept_prob(torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64), torch.tensor(0))) == 0.0


# ---------------------------------------------------------------- rule A: greedy


def test_greedy_chain_accepts_prefix_then_corrects_or_adds_bonus():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    assert verify_chain_greedy([1, 0], logits) == ChainVerdict(2, 2)  # all accepted: bonus
    assert verify_chain_greedy([1, 2], logits) == ChainVerdict(1, 0)
    assert verify_chain_greedy([0, 0], logits) == ChainVerdict(0, 1)  # first rejected
    assert verify_chain_greedy(torch.tensor([1, 0]), logits.argmax(-1)) == ChainVerdict(2, 2)  # ids work too
    assert verify_chain_greedy([], logits[:1]) == ChainVerdict(0, 1)  # n = 0: just the next token


def test_greedy_ties_resolve_to_the_lowest_index_everywhere():
    tied = torch.tensor([[1.0, 4.0, 4.0], [7.0, 7.0, 7.0]])
    assert verify_chain_greedy([2], tied) == ChainVerdict(0, 1)
    assert verify_chain_greedy([1], tied) == ChainVerdict(1, 0)
    assert select_branch_greedy([2, 1], tied[0]) == BranchVerdict(1, 1)
    probs = probs_from_logits(tied, 0.0)
    assert verify_chain_greedy([1], probs) == verify_chain_greedy([1], tied)


def test_greedy_token_is_torch_argmax():
    """greedy_token (numpy on the CPU) picks what torch.argmax picks: the first maximum, the first NaN, within -inf
    padding (a draft's vocabulary subset), on views, in float64, and through torch for other dtypes."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-3, 4, (64, 200), generator=g).float()  # many ties
    rows[::3, 50:] = float("-inf")
    rows[5, 7] = rows[9, 120] = float("nan")
    rows[11] = float("-inf")
    for row in (*rows, *rows.double(), *rows.bfloat16(), *rows.t()[:40]):  # the last: columns, strided views
        assert greedy_token(row) == int(row.argmax()), row
    assert greedy_token(torch.tensor([1.0, 4.0, 4.0])) == 1  # not the last of the tied


def test_greedy_branch_selection():
    row = torch.tensor([0.1, 0.2, 0.6, 0.1])
    assert select_branch_greedy([3, 2, 0], row) == BranchVerdict(1, 2)
    assert select_branch_greedy([3, 1], row) == BranchVerdict(None, 2)
    assert select_branch_greedy([], row) == BranchVerdict(None, 2)
    assert select_branch_greedy(torch.tensor([2, 2]), 2) == BranchVerdict(0, 2)  # first of duplicates
    assert not select_branch_greedy([1], 2).hit and select_branch_greedy([2], 2).hit


def test_rule_b_at_temperature_zero_is_rule_a():
    logits = torch.randn(4, 6, generator=gen(2))
    p = probs_from_logits(logits, 0.0)
    best = logits.argmax(-1).tolist()
    for draft in ([best[0], best[1], best[2]], [best[0], (best[1] + 1) % 6, best[2]]):
        for seed in range(5):
            assert verify_chain_match(draft, p, gen(seed)) == verify_chain_greedy(draft, logits)
    assert select_branch_match([5, best[0]], p[0], gen(0)) == select_branch_greedy([5, best[0]], logits[0])


# ---------------------------------------------------------------- exact enumeration: branch points


@pytest.mark.parametrize("vocab", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("wr", [False, True], ids=["iid", "without_replacement"])
def test_rule_c_branch_point_is_exact(vocab, k, wr):
    for name, p, q in distribution_pairs(vocab):
        law = marginal_law(rule_c(wr), p, q, k, wr)
        assert max_dev(law, p) < EXACT, name


@pytest.mark.parametrize("wr", [False, True])
def test_rule_c_joint_puts_each_branch_on_its_candidate(wr):
    g = gen(3)
    p, q = random_dist(5, g), random_dist(5, g)
    joint = branch_distribution_sampled([4, 1, 3], p, q, without_replacement=wr)
    assert joint.shape == (4, 5) and float(joint.min()) >= 0 and abs(float(joint.sum()) - 1) < 1e-12
    for b, x in enumerate([4, 1, 3]):
        assert float(joint[b].sum() - joint[b, x]) == 0.0


def test_rule_c_with_p_equal_q_always_keeps_the_first_candidate():
    p = dist(0.1, 0.2, 0.3, 0.4)
    for wr in (False, True):
        joint = branch_distribution_sampled([2, 0], p, p.clone(), without_replacement=wr)
        assert abs(float(joint[0, 2]) - 1) < 1e-12 and torch.isfinite(joint).all()
        assert all(select_branch_sampled([2, 0], p, p.clone(), gen(s), without_replacement=wr).branch == 0
                   for s in range(50))


@pytest.mark.parametrize("vocab", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rule_b_with_deterministic_candidates_is_exact(vocab, k):
    for name, p, q in distribution_pairs(vocab):
        top_k = q.topk(min(k, vocab)).indices.tolist()  # what a top-k brancher proposes
        for cands in (top_k, top_k[::-1] + top_k[:1]):  # also with a repeated candidate
            joint = branch_distribution_match(cands, p)
            assert max_dev(joint.sum(0), p) < EXACT, name
            hit = sum(float(p[x]) for x in set(cands))
            assert abs(float(joint[:-1].sum()) - hit) < EXACT, name


# ---------------------------------------------------------------- exact enumeration: chains


def random_tree(vocab: int, depth: int, g: torch.Generator, sparse: bool) -> dict[tuple[int, ...], torch.Tensor]:
    """A next-token law for every prefix of length < depth."""
    zeros = vocab // 2 if sparse else 0
    return {prefix: random_dist(vocab, g, zeros)
            for length in range(depth) for prefix in itertools.product(range(vocab), repeat=length)}


def chain_round_law(rule, drafts, target, draft_model, n: int) -> dict[tuple[int, ...], float]:
    """Law of the token sequence one verification round emits: ``drafts(n) -> [(xs, weight)]``;
    ``rule(xs, p_rows, q_rows) -> [n+1, V]`` with entry [j, v] = P(j accepted, next = v)."""
    emitted: Counter = Counter()
    for xs, weight in drafts(n):
        p_rows = torch.stack([target[xs[:i]] for i in range(n + 1)])  # [n+1, V]
        q_rows = torch.stack([draft_model[xs[:i]] for i in range(n)] or [p_rows[0]])[:n]  # [n, V]
        law = rule(list(xs), p_rows, q_rows)
        for (j, v), mass in zip(itertools.product(range(n + 1), range(law.shape[1])), law.flatten().tolist()):
            emitted[xs[:j] + (v,)] += weight * mass
    return emitted


def prefix_deviation(emitted: dict, target: dict, vocab: int, n: int) -> float:
    """Largest |P(stream starts with a) - p(a)| over all a of length 1..n+1. A round that emitted
    fewer tokens than len(a) is continued by the target itself (what the next rounds produce)."""
    def p_seq(seq, start=0):
        return math.prod(float(target[seq[:i]][seq[i]]) for i in range(start, len(seq)))

    worst = 0.0
    for length in range(1, n + 2):
        for a in itertools.product(range(vocab), repeat=length):
            got = sum(mass * (p_seq(a, len(s)) if len(s) < length else 1.0)
                      for s, mass in emitted.items() if s[:length] == a[:len(s)])
            worst = max(worst, abs(got - p_seq(a)))
    return worst


def sampled_drafts(draft_model, vocab: int):
    def drafts(n):
        for xs in itertools.product(range(vocab), repeat=n):
            yield xs, math.prod(float(draft_model[xs[:i]][xs[i]]) for i in range(n))
    return drafts


def greedy_drafts(draft_model):
    def drafts(n):
        xs = ()
        for _ in range(n):
            xs += (int(draft_model[xs].argmax()),)
        yield xs, 1.0
    return drafts


CHAIN_CASES = [(vocab, n, seed) for vocab in (2, 3) for n in (0, 1, 2, 3) for seed in range(3)]


@pytest.mark.parametrize("vocab,n,seed", CHAIN_CASES)
def test_rule_c_chain_is_exact(vocab, n, seed):
    g = gen(seed)
    target = random_tree(vocab, n + 1, g, sparse=seed == 1)
    draft_model = random_tree(vocab, n, g, sparse=seed == 2)
    emitted = chain_round_law(chain_distribution_sampled, sampled_drafts(draft_model, vocab), target, draft_model, n)
    assert abs(sum(emitted.values()) - 1) < 1e-12
    assert prefix_deviation(emitted, target, vocab, n) < EXACT


@pytest.mark.parametrize("vocab,n,seed", CHAIN_CASES)
def test_rule_b_chain_with_greedy_drafts_is_exact(vocab, n, seed):
    g = gen(seed)
    target = random_tree(vocab, n + 1, g, sparse=seed == 1)
    draft_model = random_tree(vocab, n, g, sparse=False)
    rule = lambda xs, p, q: chain_distribution_match(xs, p)  # noqa: E731
    emitted = chain_round_law(rule, greedy_drafts(draft_model), target, draft_model, n)
    assert prefix_deviation(emitted, target, vocab, n) < EXACT


# ---------------------------------------------------------------- tests of the tests


def biased_max_p_first(xs, p, q):
    """Reference bug: test the candidate with the highest target probability first."""
    return branch_distribution_sampled(sorted(xs, key=lambda x: -float(p[x])), p, q, without_replacement=False)


def biased_argmax_residual(xs, p, q):
    """Reference bug: emit the argmax of the final residual instead of sampling it."""
    joint = branch_distribution_sampled(xs, p, q, without_replacement=False)
    p_final = joint[-1] / joint[-1].sum().clamp_min(1e-300)
    out = joint.clone()
    out[-1] = 0.0
    out[-1, int(p_final.argmax())] = joint[-1].sum()
    return out


def biased_missing_q_renormalisation(xs, p, q):
    """Candidates drawn without replacement but verified as if i.i.d. (q not updated)."""
    return branch_distribution_sampled(xs, p, q, without_replacement=False)


def worst_case(rule, wr: bool, ks=(1, 2, 3)) -> float:
    return max(max_dev(marginal_law(rule, p, q, k, wr), p)
               for vocab in (3, 5) for k in ks for _, p, q in distribution_pairs(vocab))


def test_enumeration_catches_max_p_first_selection():
    assert worst_case(biased_max_p_first, wr=False, ks=(2, 3)) > BIAS


def test_enumeration_catches_argmax_of_the_residual():
    assert worst_case(biased_argmax_residual, wr=False) > BIAS


def test_enumeration_catches_without_replacement_verified_as_iid():
    assert worst_case(biased_missing_q_renormalisation, wr=True, ks=(2, 3)) > BIAS


def test_enumeration_catches_ratio_test_on_deterministic_top_k():
    """Reference bug: top-k proposals (not sampled from q) tested with min(1, p/q)."""
    worst = 0.0
    for vocab in (3, 5):
        for _, p, q in distribution_pairs(vocab):
            for k in (1, 2, 3):
                top_k = q.topk(k).indices.tolist()
                law = branch_distribution_sampled(top_k, p, q, without_replacement=True).sum(0)
                worst = max(worst, max_dev(law, p))
    assert worst > BIAS


def test_enumeration_catches_different_transforms_for_p_and_q():
    """Drafts sampled from a top-k-filtered q but verified against the unfiltered q."""
    logits = torch.randn(2, 5, generator=gen(4))
    p = probs_from_logits(logits[0], 1.0)
    q_drawn, q_verified = probs_from_logits(logits[1], 1.0, top_k=2), probs_from_logits(logits[1], 1.0)
    law = marginal_law(lambda xs, p, _: branch_distribution_sampled(xs, p, q_verified, without_replacement=False),
                       p, q_drawn, 2, False)
    assert max_dev(law, p) > BIAS


def test_chain_enumeration_catches_reused_uniforms_and_ratio_on_greedy_drafts():
    def shared_uniform(xs, p, q):  # one r for every position: P(accept first j) = min instead of product
        n = len(xs)
        a = accept_prob(p[:n], q, torch.tensor(xs, dtype=torch.long))
        reach = torch.cat([a.new_ones(1), a.cummin(0).values])
        rejected = (reach[:n] - reach[1:])[:, None] * residual(p[:n], q)
        return torch.cat([rejected, reach[n:, None] * p[n:]])

    worst_shared = worst_greedy = 0.0
    for seed in range(3):
        g = gen(seed)
        target, draft_model = random_tree(3, 3, g, sparse=False), random_tree(3, 2, g, sparse=False)
        for rule, drafts, name in ((shared_uniform, sampled_drafts(draft_model, 3), "shared"),
                                   (chain_distribution_sampled, greedy_drafts(draft_model), "greedy")):
            dev = prefix_deviation(chain_round_law(rule, drafts, target, draft_model, 2), target, 3, 2)
            if name == "shared":
                worst_shared = max(worst_shared, dev)
            else:
                worst_greedy = max(worst_greedy, dev)
    assert worst_shared > BIAS and worst_greedy > BIAS


# ---------------------------------------------------------------- Monte Carlo on the real samplers


def test_chi2_helper_has_power():
    expected = {0: 0.5, 1: 0.3, 2: 0.2}
    assert_matches(Counter({0: 5030, 1: 2980, 2: 1990}), expected, 10000)
    with pytest.raises(AssertionError):
        assert_matches(Counter({0: 5300, 1: 2800, 2: 1900}), expected, 10000)
    with pytest.raises(AssertionError):
        assert_matches(Counter({0: 5000, 1: 2999, 2: 2000, 3: 1}), expected, 10000)
    assert abs(chi2_pvalue(9.488, 4) - 0.05) < 0.005


MC_P = dist(0.05, 0.35, 0.1, 0.3, 0.0, 0.2)
MC_Q = dist(0.3, 0.05, 0.25, 0.1, 0.2, 0.1)


def test_sample_matches_its_distribution():
    g, draws = gen(10), 20000
    counts = Counter(sample(MC_P, g) for _ in range(draws))
    assert_matches(counts, dict(enumerate(MC_P.tolist())), draws)
    rows = torch.stack([MC_P, MC_Q])
    pairs = Counter(tuple(sample_rows(rows, g).tolist()) for _ in range(draws))
    assert_matches(pairs, {(a, b): float(MC_P[a] * MC_Q[b]) for a in range(6) for b in range(6)}, draws)


def branch_monte_carlo(select, draws: int, seed: int, wr: bool, k: int = 3):
    """Run draw_candidates + a selector like the engine does; count tokens, (branch, token), tuples."""
    g = gen(seed)
    tokens, joint, tuples = Counter(), Counter(), Counter()
    for _ in range(draws):
        cands = draw_candidates(MC_Q, k, g, without_replacement=wr).tolist()
        verdict = select(cands, MC_P, MC_Q, g)
        assert verdict.branch is None or cands[verdict.branch] == verdict.token
        tokens[verdict.token] += 1
        joint[(verdict.branch, verdict.token)] += 1
        tuples[tuple(cands)] += 1
    return tokens, joint, tuples


@pytest.mark.parametrize("wr", [False, True], ids=["iid", "without_replacement"])
def test_rule_c_branch_sampler_matches_target(wr):
    draws, k = 12000, 3
    select = lambda c, p, q, g: select_branch_sampled(c, p, q, g, without_replacement=wr)  # noqa: E731
    tokens, joint, tuples = branch_monte_carlo(select, draws, seed=11, wr=wr, k=k)
    assert_matches(tokens, dict(enumerate(MC_P.tolist())), draws)
    draws_law = dict(wr_draws(MC_Q, k) if wr else iid_draws(MC_Q, k))
    assert_matches(tuples, draws_law, draws)  # draw_candidates samples what the enumeration assumes
    expected_joint: Counter = Counter()  # (branch, token) law implied by the exact function
    for xs, weight in draws_law.items():
        law = branch_distribution_sampled(list(xs), MC_P, MC_Q, without_replacement=wr)
        for b in range(k + 1):
            for v in range(6):
                expected_joint[(b if b < k else None, v)] += weight * float(law[b, v])
    assert_matches(joint, dict(expected_joint), draws)


def test_monte_carlo_catches_max_p_first_sampler():
    def biased(cands, p, q, g):
        order = sorted(range(len(cands)), key=lambda b: -float(p[cands[b]]))
        verdict = select_branch_sampled([cands[b] for b in order], p, q, g, without_replacement=False)
        return BranchVerdict(None if verdict.branch is None else order[verdict.branch], verdict.token)

    draws = 12000
    law = marginal_law(biased_max_p_first, MC_P, MC_Q, 3, False)
    assert max_dev(law, MC_P) > 0.02  # large enough for this many draws to see
    tokens, _, _ = branch_monte_carlo(biased, draws, seed=11, wr=False)
    with pytest.raises(AssertionError):
        assert_matches(tokens, dict(enumerate(MC_P.tolist())), draws)


def test_rule_b_branch_sampler_matches_target():
    g, draws, cands = gen(12), 20000, [3, 1]
    joint = Counter()
    for _ in range(draws):
        verdict = select_branch_match(cands, MC_P, g)
        joint[(verdict.branch, verdict.token)] += 1
    expected = {(cands.index(v) if v in cands else None, v): float(MC_P[v]) for v in range(6)}
    assert_matches(joint, expected, draws)


TWO_STEP_P = {(): dist(0.5, 0.3, 0.2), (0,): dist(0.1, 0.1, 0.8), (1,): dist(0.6, 0.0, 0.4), (2,): dist(0.3, 0.3, 0.4)}
TWO_STEP_Q = {(): dist(0.2, 0.5, 0.3), (0,): dist(0.5, 0.4, 0.1), (1,): dist(0.3, 0.3, 0.4), (2,): dist(1, 1, 1)}
TWO_STEP_P.update({(a, b): dist(1, 2, 3) for a in range(3) for b in range(3)})


def chain_monte_carlo(verify_round, draws: int, seed: int) -> Counter:
    """Histogram of the first two stream tokens: one round over 2 drafts, continued by the target."""
    g, stream = gen(seed), Counter()
    for _ in range(draws):
        xs, emitted = verify_round(g)
        while len(emitted) < 2:
            emitted.append(sample(TWO_STEP_P[tuple(emitted)], g))
        stream[tuple(emitted[:2])] += 1
    return stream


def two_step_target_law() -> dict:
    return {(a, b): float(TWO_STEP_P[()][a] * TWO_STEP_P[(a,)][b]) for a in range(3) for b in range(3)}


def test_rule_c_chain_sampler_matches_target():
    def round_(g):
        xs = []
        for i in range(2):
            xs.append(sample(TWO_STEP_Q[tuple(xs)], g))
        p_rows = torch.stack([TWO_STEP_P[tuple(xs[:i])] for i in range(3)])  # [3, V]
        q_rows = torch.stack([TWO_STEP_Q[tuple(xs[:i])] for i in range(2)])  # [2, V]
        verdict = verify_chain_sampled(xs, p_rows, q_rows, g)
        return xs, xs[: verdict.num_accepted] + [verdict.next_token]

    draws = 12000
    assert_matches(chain_monte_carlo(round_, draws, seed=13), two_step_target_law(), draws)


def test_rule_b_chain_sampler_matches_target():
    def round_(g):
        xs = [int(TWO_STEP_Q[()].argmax())]
        xs.append(int(TWO_STEP_Q[tuple(xs)].argmax()))
        p_rows = torch.stack([TWO_STEP_P[tuple(xs[:i])] for i in range(3)])  # [3, V]
        verdict = verify_chain_match(xs, p_rows, g)
        return xs, xs[: verdict.num_accepted] + [verdict.next_token]

    draws = 12000
    assert_matches(chain_monte_carlo(round_, draws, seed=14), two_step_target_law(), draws)


# ---------------------------------------------------------------- generator discipline


def call_every_sampler(g: torch.Generator) -> list:
    p3 = torch.stack([MC_P, MC_Q, MC_P])
    return [
        sample(MC_P, g),
        verify_chain_match([1, 3], p3, g),
        verify_chain_sampled([1, 3], p3, p3[1:], g),
        select_branch_match([1, 3], MC_P, g),
        select_branch_sampled([0, 2], MC_P, MC_Q, g, without_replacement=False),
        select_branch_sampled([0, 2], MC_P, MC_Q, g, without_replacement=True),
        draw_candidates(MC_Q, 3, g, without_replacement=False).tolist(),
        draw_candidates(MC_Q, 3, g, without_replacement=True).tolist(),
    ]


def test_same_seed_same_verdicts_different_seeds_differ():
    runs = {seed: [call_every_sampler(gen(seed)) for _ in range(1)] for seed in range(8)}
    again = {seed: [call_every_sampler(gen(seed))] for seed in range(8)}
    assert runs == again
    assert len({repr(r) for r in runs.values()}) > 1
    g1, g2 = gen(0), gen(0)
    assert [call_every_sampler(g1) for _ in range(5)] == [call_every_sampler(g2) for _ in range(5)]
    g = gen(0)
    assert len({repr(call_every_sampler(g)) for _ in range(20)}) > 1  # the stream advances


@pytest.mark.parametrize(
    "call,uses",
    [
        (lambda g: sample(MC_P, g), 1),
        (lambda g: verify_chain_match([0, 0, 0], MC_P.expand(4, 6), g), 4),  # rejected early: still n + 1
        (lambda g: verify_chain_match([], MC_P.expand(1, 6), g), 1),
        (lambda g: verify_chain_sampled([4, 4], MC_P.expand(3, 6), MC_Q.expand(2, 6), g), 3),  # p(4) = 0
        (lambda g: verify_chain_sampled([1, 1], MC_P.expand(3, 6), MC_P.expand(2, 6), g), 3),  # all accepted
        (lambda g: select_branch_match([1], MC_P, g), 1),
        (lambda g: select_branch_sampled([1, 3, 5], MC_P, MC_P, g, without_replacement=True), 4),  # accepts 1st
        (lambda g: select_branch_sampled([4, 4], MC_P, MC_Q, g, without_replacement=False), 3),  # all rejected
        (lambda g: draw_candidates(MC_Q, 4, g, without_replacement=False), 4),
        (lambda g: draw_candidates(dist(1, 0, 0), 4, g, without_replacement=True), 4),  # only 1 comes back
        (lambda g: select_branch_greedy([1], MC_P), 0),
        (lambda g: verify_chain_greedy([1], MC_P.expand(2, 6)), 0),
    ],
)
def test_each_sampler_draws_a_fixed_number_of_uniforms(call, uses):
    """Outcome-independent consumption is what keeps two workers' generator copies in step."""
    g, reference = gen(5), gen(5)
    global_state = torch.get_rng_state()
    call(g)
    uniforms(uses, reference)
    assert torch.equal(g.get_state(), reference.get_state())
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never used


def test_generator_is_required():
    with pytest.raises(ValueError, match="Generator"):
        sample(MC_P, None)
    with pytest.raises(ValueError, match="Generator"):
        select_branch_match([0], MC_P, 7)


# ---------------------------------------------------------------- degenerate inputs and validation


def test_degenerate_residuals_stay_exact_and_finite():
    p, q = dist(0.2, 0.2, 0.6), dist(0.5, 0.5, 0.0)
    joint = branch_distribution_sampled([0, 1], p, q, without_replacement=True)  # q exhausted after two
    assert torch.isfinite(joint).all() and abs(float(joint.sum()) - 1) < 1e-12
    assert max_dev(marginal_law(rule_c(True), p, q, 3, True), p) < EXACT
    for s in range(30):
        verdict = select_branch_sampled([0, 1], p, q, gen(s), without_replacement=True)
        assert verdict.token != 2 or verdict.branch is None
    nearly = p + torch.tensor([1e-17, 0.0, -1e-17], dtype=F64)  # residual mass underflows the guard
    law = chain_distribution_sampled([2], torch.stack([p, p]), nearly[None])
    assert torch.isfinite(law).all() and max_dev(law.sum(0), p) < EXACT
    never = chain_distribution_sampled([2], torch.stack([dist(1, 1, 0), p]), dist(0, 0, 1)[None])
    assert float(never[1].sum()) == 0.0  # p(x) = 0: never accepted
    assert all(verify_chain_sampled([2], torch.stack([dist(1, 1, 0), p]), dist(0, 0, 1)[None], gen(s)).num_accepted == 0
               for s in range(30))


def test_draw_candidates_without_replacement_stops_at_the_support():
    q = dist(0.0, 0.7, 0.0, 0.3)
    for s in range(20):
        cands = draw_candidates(q, 3, gen(s), without_replacement=True).tolist()
        assert sorted(cands) == [1, 3]
    assert draw_candidates(q, 0, gen(0), without_replacement=False).numel() == 0
    assert set(draw_candidates(q, 50, gen(0), without_replacement=False).tolist()) == {1, 3}


@pytest.mark.parametrize(
    "call",
    [
        lambda: verify_chain_greedy([1, 2], torch.zeros(2, 4)),  # needs n + 1 rows
        lambda: verify_chain_greedy([1], torch.zeros(2)),  # float 1-D is ambiguous
        lambda: verify_chain_match([1], MC_P.expand(3, 6), gen(0)),
        lambda: verify_chain_sampled([1], MC_P.expand(2, 6), MC_Q.expand(2, 6), gen(0)),
        lambda: verify_chain_sampled([1], MC_P.expand(2, 6), torch.ones(1, 5), gen(0)),
        lambda: select_branch_sampled([1, 1], MC_P, MC_Q, gen(0), without_replacement=True),
        lambda: select_branch_sampled([9], MC_P, MC_Q, gen(0), without_replacement=False),
        lambda: select_branch_sampled([1], MC_P, MC_Q[:5], gen(0), without_replacement=False),
        lambda: select_branch_match([1], MC_P.expand(2, 6), gen(0)),
        lambda: select_branch_greedy([1], torch.zeros(2, 2)),
        lambda: draw_candidates(MC_Q, -1, gen(0), without_replacement=True),
        lambda: sample(MC_P.expand(2, 6), gen(0)),
        lambda: verify_chain_greedy(torch.tensor([[1]]), torch.zeros(2, 4)),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
