"""Whole engines are lossless: at T = 0 token for token equal to `ar`; at T > 0 the law of the first
generated tokens equals the target's (chi-square, with a known-biased rule as the test of the test)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from conftest import assert_matches, make_tiny_hf, perturbed

from specbranch.backend import NativeBackend
from specbranch.backend_hf import HFBackend
from specbranch.config import GenerationConfig, SamplingConfig, SpeculationConfig
from specbranch.engines import ENGINE_CLASSES, AREngine, generate
from specbranch.engines import speculative
from specbranch.engines.specbranch import SpecBranchEngine
from specbranch.errors import ConfigError
from specbranch.policy import DraftPolicy
from specbranch.models.decoder import Decoder, DecoderConfig
from specbranch.models.linear import subset_head
from specbranch.sampling import probs_from_logits
from specbranch.verify import BranchVerdict, select_branch_sampled

SPECULATIVE = ("sd", "pearl", "specbranch")


def native(model, precision="fp64") -> NativeBackend:
    cfg = DecoderConfig.from_hf(model.config.to_dict())
    return NativeBackend(Decoder(cfg, model.state_dict(), precision), max_len=512)


@pytest.fixture(scope="module")
def greedy_pair():
    target = make_tiny_hf("qwen2", seed=5, tie=True, vocab_size=64, dtype=torch.float64)
    return target, perturbed(target, seed=6, scale=0.05)


def run(engine, prompt, n, sampling=SamplingConfig(), eos=()):
    return generate(engine, prompt, GenerationConfig(max_new_tokens=n), sampling, eos_ids=eos)


SETTINGS = [  # (gamma, branches, tau)
    (1, 1, 0.0),
    (2, 3, 0.15),
    (4, 3, 0.1),
    (5, 2, 0.2),
    (3, 4, 0.99),
]


@pytest.mark.parametrize("name", SPECULATIVE)
@pytest.mark.parametrize("gamma,branches,tau", SETTINGS)
def test_greedy_equals_ar(greedy_pair, name, gamma, branches, tau):
    target_model, draft_model = greedy_pair
    target, draft = native(target_model), native(draft_model)
    spec = SpeculationConfig(gamma=gamma, branches=branches, tau=tau)
    engine = ENGINE_CLASSES[name](target, draft, spec)
    ar_target = native(target_model)
    accepted = 0
    for seed, length in itertools.product(range(3), (1, 2, 9)):
        prompt = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = run(AREngine(ar_target), prompt, 40)
        got = run(engine, prompt, 40)
        assert got.tokens == want.tokens, (seed, length)
        m = got.metrics
        assert m.new_tokens == 40 and 0 <= m.num_accepted_tokens <= m.num_draft_tokens
        assert m.target_forwards <= want.metrics.target_forwards + 1
        accepted += m.num_accepted_tokens
    assert accepted > 0  # the draft is close enough that speculation really happens


@pytest.mark.parametrize("name", ("pearl", "specbranch"))
@pytest.mark.parametrize("gamma,branches,tau", [(2, 3, 0.15), (5, 2, 0.2)])
def test_waiting_after_a_rollback_equals_ar_and_saves_target_forwards(greedy_pair, name, gamma, branches, tau):
    """``after_rollback="wait"``: the first chain after the prompt and after each rollback is adopted
    unverified and verified whole by the next forward. Same tokens as ar; no round verifies a branch
    point alone (PEARL's pre-verify) unless a policy cut the block to nothing; fewer target forwards."""
    target_model, draft_model = greedy_pair
    ar = AREngine(native(target_model))
    forwards, alone = Counter(), Counter()
    for mode in ("preverify", "wait"):
        spec = SpeculationConfig(gamma=gamma, branches=branches, tau=tau, after_rollback=mode)
        engine = ENGINE_CLASSES[name](native(target_model), native(draft_model), spec)
        side, settle, last = engine.target_side, engine.target_side.settle, []

        def spy(proposal, logits, side=side, settle=settle, last=last, mode=mode):
            # the branch point alone after the prompt or a rollback (not after a block cut to nothing)
            alone[mode] += not side.pending and (not last or last[-1].branch is None)
            last.append(settle(proposal, logits))
            return last[-1]

        side.settle = spy
        for seed, length in itertools.product(range(3), (1, 2, 9)):
            prompt = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
            last.clear()
            got = run(engine, prompt, 40)
            assert got.tokens == run(ar, prompt, 40).tokens, (mode, seed, length)
            forwards[mode] += got.metrics.target_forwards
            assert 0 <= got.metrics.rollback_rate <= 1
    assert alone["wait"] == 0 < alone["preverify"]
    assert forwards["wait"] < forwards["preverify"]


def test_specbranch_branches_and_hits(greedy_pair):
    """With τ near the draft's typical confidence both blocks and branch points occur, and the
    metrics show branches being taken and hit."""
    target_model, draft_model = greedy_pair
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), SpeculationConfig(4, 3, 0.12))
    m = run(engine, [1, 2, 3], 60).metrics
    assert m.num_branch_points > 5 and 0 < m.num_branch_hits <= m.num_branch_points
    assert m.mean_accepted_length > 1.3
    assert m.branch_forwards > 0 and m.branch_rollback_tokens > 0
    assert 0 <= m.rollback_rate <= 1


def test_greedy_equals_ar_on_the_transformers_backend(greedy_pair):
    """The same engines run over the transformers backend (fork = copied cache rows)."""
    target_model, draft_model = greedy_pair
    want = run(AREngine(native(target_model)), [7, 8, 9], 30).tokens
    for name in SPECULATIVE:
        engine = ENGINE_CLASSES[name](HFBackend(target_model), HFBackend(draft_model), SpeculationConfig(3, 3, 0.9))
        assert run(engine, [7, 8, 9], 30).tokens == want, name


@pytest.mark.parametrize("name", SPECULATIVE)
def test_stops_at_eos_and_never_overshoots(greedy_pair, name):
    target_model, draft_model = greedy_pair
    engine = ENGINE_CLASSES[name](native(target_model), native(draft_model), SpeculationConfig(4, 3, 0.5))
    full = run(AREngine(native(target_model)), [4, 5], 30).tokens
    eos = full[11]
    cut = full[: full.index(eos)]
    got = run(engine, [4, 5], 30, eos=(eos,))
    assert got.tokens == cut and got.finish_reason == "stop"
    for n in (1, 2, 3, 7):
        got = run(engine, [4, 5], n)
        assert got.tokens == full[:n] and got.finish_reason == "length"


# ---------------------------------------------------------------- T > 0: the output law


VOCAB, STEPS, DRAWS = 5, 3, 20000


@pytest.fixture(scope="module")
def sampling_pair():
    """Tiny-vocabulary target and an unrelated draft (q far from p, so bias would show)."""
    small = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1)
    target = make_tiny_hf("qwen2", seed=11, tie=True, dtype=torch.float64, **small)
    draft = make_tiny_hf("qwen2", seed=12, tie=True, dtype=torch.float64, **small)
    return target, draft


def target_law(model, prompt, sampling) -> dict:
    """Exact law of the first STEPS tokens under the target, by enumeration."""
    backend = native(model)
    law = {}
    for seq in itertools.product(range(VOCAB), repeat=STEPS):
        prob = 1.0
        for i in range(STEPS):
            backend.reset()
            logits = backend.forward(torch.tensor([prompt + list(seq[:i])])).logits[0, -1]
            prob *= float(probs_from_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)[seq[i]])
        law[seq] = prob
    return law


def sample_engine(engine, prompt, sampling, draws) -> Counter:
    counts = Counter()
    gen = GenerationConfig(max_new_tokens=STEPS)
    for seed in range(draws):
        s = SamplingConfig(sampling.temperature, sampling.top_k, sampling.top_p, seed=seed)
        counts[tuple(generate(engine, prompt, gen, s).tokens)] += 1
    return counts


CASES = [  # (engine, draft_sampling, sampling)
    ("sd", "sample", SamplingConfig(temperature=1.0)),
    ("pearl", "sample", SamplingConfig(temperature=0.8, top_p=0.9)),
    ("specbranch", "sample", SamplingConfig(temperature=1.0)),
    ("specbranch", "greedy", SamplingConfig(temperature=1.2, top_k=4)),
]


@pytest.mark.parametrize("name,draft_sampling,sampling", CASES)
def test_sampled_output_follows_the_target(sampling_pair, name, draft_sampling, sampling):
    target_model, draft_model = sampling_pair
    spec = SpeculationConfig(gamma=2, branches=3, tau=0.99, draft_sampling=draft_sampling)
    engine = ENGINE_CLASSES[name](native(target_model), native(draft_model), spec)
    # specbranch adopts the chain after each rollback (after_rollback auto), pearl pre-verifies: both are tested here
    if name != "sd":
        assert engine.target_side.policy.wait_after_rollback == (name == "specbranch")
    prompt = [1, 3]
    counts = sample_engine(engine, prompt, sampling, DRAWS)
    assert_matches(counts, target_law(target_model, prompt, sampling), DRAWS)


class MaxPFirst(speculative.Speculator):
    """The reference code's branch rule: test candidates in order of target probability."""

    def _select(self, pos, logits):
        if len(pos.candidates) == 1:
            return super()._select(pos, logits)
        p = self.probs(logits)
        order = sorted(range(len(pos.candidates)), key=lambda b: -float(p[pos.candidates[b]]))
        v = select_branch_sampled([pos.candidates[b] for b in order], p, pos.q, self.rng, without_replacement=True)
        return BranchVerdict(None if v.branch is None else order[v.branch], v.token)


def test_chi_square_catches_the_reference_branch_rule(sampling_pair, monkeypatch):
    target_model, draft_model = sampling_pair
    monkeypatch.setattr(speculative, "Speculator", MaxPFirst)
    spec = SpeculationConfig(gamma=2, branches=3, tau=0.99)
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), spec)
    sampling = SamplingConfig(temperature=1.0)
    counts = sample_engine(engine, [1, 3], sampling, DRAWS)
    with pytest.raises(AssertionError):
        assert_matches(counts, target_law(target_model, [1, 3], sampling), DRAWS)


def with_subset_head(backend: NativeBackend, n: int) -> NativeBackend:
    dec = backend.decoder
    dec.lm_head = subset_head(dec.lm_head, torch.arange(n), dec.cfg.vocab_size)
    return backend


def test_reduced_vocabulary_draft_stays_lossless(greedy_pair, sampling_pair):
    """A draft that can only propose part of the vocabulary (the CPU speed lever) changes nothing:
    greedy output equals ar, and sampled output (rule C: q is zero outside the subset) keeps the law."""
    target_model, draft_model = greedy_pair
    want = run(AREngine(native(target_model)), [3, 1, 4], 30).tokens
    draft = with_subset_head(native(draft_model), 40)
    engine = ENGINE_CLASSES["specbranch"](native(target_model), draft, SpeculationConfig(3, 3, 0.2))
    got = run(engine, [3, 1, 4], 30)
    assert got.tokens == want and any(t >= 40 for t in want)  # the target used tokens the draft cannot
    target_model, draft_model = sampling_pair
    sampling = SamplingConfig(temperature=1.0)
    engine = ENGINE_CLASSES["sd"](native(target_model), with_subset_head(native(draft_model), 3), SpeculationConfig(2))
    counts = sample_engine(engine, [1, 3], sampling, 5000)
    assert_matches(counts, target_law(target_model, [1, 3], sampling), 5000)


def test_a_reduced_draft_proposes_the_tokens_of_its_context(greedy_pair):
    """The draft is the target itself, but its head ranks every token except one that the target copies from the
    prompt: the backend admits the prompt's tokens, so sd never misses; a new prompt without it drops it again."""
    target_model, _ = greedy_pair
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    want = run(AREngine(native(target_model)), prompt, 30).tokens
    copied = next(t for t in want if t in prompt)
    ranked = torch.tensor([t for t in range(64) if t != copied])
    draft = native(target_model)
    draft.decoder.lm_head = subset_head(draft.decoder.lm_head, ranked, 64)
    got = run(ENGINE_CLASSES["sd"](native(target_model), draft, SpeculationConfig(4)), prompt, 30)
    assert got.tokens == want
    assert got.metrics.num_accepted_tokens == got.metrics.num_draft_tokens > 0  # the copied token was proposed too
    draft.reset()
    logits = draft.forward(torch.tensor([[t for t in prompt if t != copied]])).logits
    assert torch.isinf(logits[..., copied]).all()  # admitted per context, not for good
    draft.forward(torch.tensor([[copied]]))
    assert torch.isfinite(draft.forward(torch.tensor([[prompt[0]]])).logits[..., copied]).all()


@pytest.mark.parametrize("name", SPECULATIVE)
def test_adaptive_blocks_shrink_for_a_poor_draft_and_keep_the_tokens(greedy_pair, name):
    """blocks="adaptive" (the default): an unrelated draft gets shorter blocks (fewer drafted tokens than fixed
    blocks, the same tokens as ar); a perfect draft (the target itself) keeps full blocks throughout."""
    target_model, _ = greedy_pair
    stranger = make_tiny_hf("qwen2", seed=11, tie=True, vocab_size=64, dtype=torch.float64)
    prompt = [5, 9, 2, 33]
    want = run(AREngine(native(target_model)), prompt, 40).tokens
    drafted = {}
    for draft_model, label in ((stranger, "poor"), (target_model, "perfect")):
        for blocks in ("adaptive", "fixed"):
            spec = SpeculationConfig(gamma=5, blocks=blocks, drafting="fixed")
            got = run(ENGINE_CLASSES[name](native(target_model), native(draft_model), spec), prompt, 40)
            assert got.tokens == want
            drafted[label, blocks] = got.metrics.drafted_tokens
    assert drafted["poor", "adaptive"] < drafted["poor", "fixed"]
    assert drafted["perfect", "adaptive"] == drafted["perfect", "fixed"]


def int4_draft(model, path):
    """``model`` as an int4 draft (int8 layers, int4 weights for decode steps, cached in ``path``)."""
    from specbranch.models.linear import Int4Linear
    from specbranch.models.loader import to_int4

    decoder = to_int4(Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), "int8"), path)
    converted = [isinstance(lin, Int4Linear) for lin in decoder.linears().values()]
    assert sum(converted) >= 3  # qkv, o, gate_up at least (inputs 64 wide); down stays int8 where 96 wide
    return NativeBackend(decoder, max_len=512)


@pytest.mark.parametrize("name", SPECULATIVE)
def test_int4_draft_stays_lossless(greedy_pair, name, tmp_path):
    """The int4 draft (the CPU speed lever) proposes with coarser weights; the fp64 target still
    decides, so every engine gives ar's tokens, and the cached int4 weights reload identically."""
    target_model, draft_model = greedy_pair
    path = tmp_path / "int4.safetensors"
    draft = int4_draft(draft_model, path)
    assert path.is_file()
    engine = ENGINE_CLASSES[name](native(target_model), draft, SpeculationConfig(4, 3, 0.2))
    ar_target = native(target_model)
    accepted = 0
    for seed in range(3):
        prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = run(engine, prompt, 30)
        assert got.tokens == run(AREngine(ar_target), prompt, 30).tokens, seed
        accepted += got.metrics.num_accepted_tokens
    assert accepted > 0
    again = int4_draft(draft_model, path)  # from the cache file this time
    draft.reset()
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(again.forward(x).logits, draft.forward(x).logits)


def test_int4_draft_keeps_the_output_law(tmp_path):
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1)
    target = make_tiny_hf("qwen2", seed=11, tie=True, dtype=torch.float64, **small)
    draft = int4_draft(make_tiny_hf("qwen2", seed=12, tie=True, **small), tmp_path / "int4.safetensors")
    sampling = SamplingConfig(temperature=1.0)
    engine = ENGINE_CLASSES["specbranch"](native(target), draft, SpeculationConfig(2, 2, 0.5))
    counts = sample_engine(engine, [1, 3], sampling, 5000)
    assert_matches(counts, target_law(target, [1, 3], sampling), 5000)


# ---------------------------------------------------------------- H-RAD drafting: never changes the output


def random_predictor(model, seed: int = 0):
    """An untrained H-RAD predictor for ``model``'s hidden size: its classes are arbitrary, which is
    the point: whatever it says, the output must not change."""
    from specbranch.hrad import HRADConfig, HRADPredictor

    torch.manual_seed(seed)
    pred = HRADPredictor(HRADConfig(hidden_size=model.config.hidden_size, num_layers=2, widths=(8,)))
    with torch.no_grad():
        pred.net[-1].weight.mul_(30.0)  # confident, varied classes
    return pred


@pytest.mark.parametrize("drafting", ["fixed", "hrad", "hybrid"])
def test_hrad_drafting_modes_equal_ar(greedy_pair, drafting):
    target_model, draft_model = greedy_pair
    pred = random_predictor(target_model) if drafting != "fixed" else None
    want = run(AREngine(native(target_model)), [5, 6, 7], 40).tokens
    for gamma, tau in ((4, 0.2), (6, 0.5)):
        spec = SpeculationConfig(gamma=gamma, branches=3, tau=tau, drafting=drafting)
        engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), spec, predictor=pred)
        got = run(engine, [5, 6, 7], 40)
        assert got.tokens == want, (drafting, gamma, tau)
    if pred is not None:  # every class was used, so every keep rule ran
        from specbranch.hrad import features

        side = engine.target_side
        assert side.lane.last_hidden.shape == (2, target_model.config.hidden_size)
        x = torch.randn(200, pred.cfg.in_features) * 3
        assert set(pred.logits(x).argmax(-1).tolist()) == {0, 1, 2}
        assert features(side.lane.last_hidden, side.lane.backend.embed(3)).shape == (pred.cfg.in_features,)


def test_hrad_sampled_output_follows_the_target(sampling_pair):
    target_model, draft_model = sampling_pair
    spec = SpeculationConfig(gamma=3, branches=3, tau=0.6, drafting="hybrid")
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), spec,
                                          predictor=random_predictor(target_model, seed=1))
    sampling = SamplingConfig(temperature=1.0)
    counts = sample_engine(engine, [1, 3], sampling, 5000)
    assert_matches(counts, target_law(target_model, [1, 3], sampling), 5000)


def test_trace_collection_labels_full_blocks(greedy_pair):
    from specbranch.hrad import HRADConfig

    target_model, draft_model = greedy_pair
    cfg = HRADConfig(hidden_size=target_model.config.hidden_size, num_layers=2, gamma=4)
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model),
                                          SpeculationConfig(gamma=4, tau=0.2, drafting="fixed"))
    traces = engine.target_side.record_traces(cfg)
    m = run(engine, [1, 2, 3], 60).metrics
    assert len(traces) > 5
    assert all(x.shape == (cfg.in_features,) and y in (0, 1, 2) for x, y in traces)
    assert {y for _, y in traces} >= {2}  # a close draft gets whole blocks accepted
    assert len(traces) < m.num_drafts  # the first round and rounds after a rollback have no label


# ---------------------------------------------------------------- inline hedges: never change the output


class AlwaysHedge(DraftPolicy):
    """Inline drafting that never forks at the branch point and hedges the first position of every
    block it drafts unforked: every other round carries a hedge, so its rare paths run often."""

    def candidates(self, conf: float, force: bool = False) -> int:
        return 1

    def hedge(self, conf: float) -> bool:
        return True


def hedging(target, draft, spec, policy=None):
    """A specbranch engine whose settle counts the rounds that verified a hedge and the swerves
    (a hedge candidate other than the block's own token won)."""
    engine = SpecBranchEngine(target, draft, spec, policy)
    seen = Counter()
    settle = engine.target_side.settle

    def spy(proposal, logits):
        verdict = settle(proposal, logits)
        if proposal.alternatives:
            seen["hedged"] += 1
            seen["swerves"] += verdict.branch not in (None, 0)
        return verdict

    engine.target_side.settle = spy
    return engine, seen


@pytest.mark.parametrize("gamma,branches", [(2, 2), (3, 3), (5, 3)])
def test_inline_hedges_equal_ar(greedy_pair, gamma, branches):
    target_model, draft_model = greedy_pair
    spec = SpeculationConfig(gamma=gamma, branches=branches, tau=0.15, drafting="inline")
    always = AlwaysHedge(gamma, branches, 0.0, "inline")
    ar_target = native(target_model)
    for policy in (always, None):  # forced hedges; then the real rule (top-1 <= tau inside a block)
        engine, seen = hedging(native(target_model), native(draft_model), spec, policy)
        rescues = 0
        for seed, length in itertools.product(range(3), (1, 4)):
            prompt = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
            got = run(engine, prompt, 40)
            assert got.tokens == run(AREngine(ar_target), prompt, 40).tokens, (policy, seed, length)
            rescues += got.metrics.num_branch_rescues
        assert seen["hedged"] > 3 and seen["swerves"] > 0 and rescues >= seen["swerves"], (policy, seen)


@pytest.mark.parametrize("draft_sampling", ["sample", "greedy"])  # rules C and B at the hedge
def test_inline_hedges_keep_the_output_law(sampling_pair, draft_sampling):
    target_model, draft_model = sampling_pair
    spec = SpeculationConfig(gamma=3, branches=3, draft_sampling=draft_sampling, drafting="inline")
    engine, seen = hedging(native(target_model), native(draft_model), spec, AlwaysHedge(3, 3, 0.0, "inline"))
    sampling = SamplingConfig(temperature=1.0)
    counts = sample_engine(engine, [1, 3], sampling, 5000)
    assert seen["swerves"] > 200, seen  # the hedge decided often within the first STEPS tokens
    assert_matches(counts, target_law(target_model, [1, 3], sampling), 5000)


def test_inline_hedges_stop_anywhere(greedy_pair):
    target_model, draft_model = greedy_pair
    engine, seen = hedging(native(target_model), native(draft_model), SpeculationConfig(gamma=4, branches=3),
                           AlwaysHedge(4, 3, 0.0, "inline"))
    full = run(AREngine(native(target_model)), [4, 5], 30).tokens
    for n in (1, 2, 3, 5, 8, 13):
        assert run(engine, [4, 5], n).tokens == full[:n]
    assert seen["hedged"] > 3


def resting_spy(engine) -> Counter:
    """Count ``rests`` (rounds the draft proposed nothing in) and the ``adopted`` chains that followed
    one; check every resting proposal carries no branch point."""
    side, settle, adopt, seen = engine.target_side, engine.target_side.settle, engine.target_side.adopt, Counter()
    last = []

    def spy_settle(proposal, logits):
        if proposal.rests:
            assert not proposal.candidates and not proposal.blocks and side.pending, proposal
            seen["rests"] += 1
        last[:] = [proposal.rests]
        return settle(proposal, logits)

    def spy_adopt(proposal):
        seen["adopted"] += bool(last and last[0])
        return adopt(proposal)

    side.settle, side.adopt = spy_settle, spy_adopt
    return seen


@pytest.mark.parametrize("gamma,branches,tau,rest", [(4, 3, 0.0, "always"), (3, 3, 0.15, "always"),
                                                     (5, 2, 0.2, "short"), (7, 3, 0.1, "short")])
def test_a_resting_draft_equals_ar(greedy_pair, gamma, branches, tau, rest):
    """``rest``: in the rounds it rests in, the draft proposes nothing past the pending block, the target
    takes the token after it, and the draft's next chain is adopted (sd's rhythm). Same tokens as ar, and
    as many forwards as sd where every round rests."""
    target_model, draft_model = greedy_pair
    spec = SpeculationConfig(gamma=gamma, branches=branches, tau=tau, rest=rest)
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), spec)
    seen = resting_spy(engine)
    sd = ENGINE_CLASSES["sd"](native(target_model), native(draft_model), SpeculationConfig(gamma=gamma - 1))
    ar = AREngine(native(target_model))
    for seed, length in itertools.product(range(3), (1, 2, 9)):
        prompt = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = run(engine, prompt, 40)
        assert got.tokens == run(ar, prompt, 40).tokens, (seed, length)
        assert 0 <= got.metrics.rollback_rate <= 1
        if rest == "always" and tau == 0:  # the first chain is adopted, then every round rests, and no
            # confidence cut shortens a chain: sd's rounds, one by one
            want = run(sd, prompt, 40).metrics
            m = got.metrics
            assert (m.draft_forwards, m.branch_forwards, m.target_forwards) == (
                want.draft_forwards, 0, want.target_forwards), (seed, length)
    # rests happened, and every one that did not end the generation was followed by an adopted chain
    assert seen["rests"] > 3 and seen["rests"] - 9 <= seen["adopted"] <= seen["rests"], seen


def test_an_adopted_hybrid_chain_ends_at_its_confidence_cut(greedy_pair):
    """A chain drafted for adoption (after a rollback or a rest) is kept only to its confidence cut, as no
    H-RAD class follows it (DraftPolicy.keep): the draft stops drafting it there rather than draft steps that
    are thrown away. Same tokens as ar."""
    target_model, draft_model = greedy_pair
    spec = SpeculationConfig(gamma=6, branches=3, tau=0.5, drafting="hybrid", rest="always")
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), spec,
                                          predictor=random_predictor(target_model))
    side, draft_round, chains = engine.draft_side, engine.draft_side.draft_round, []

    def spy():
        adopting, last = side.adopting, max(side.length.now - 1, 0)
        proposal = draft_round()
        if adopting and proposal.blocks:
            chains.append((len(proposal.blocks[0]), proposal.cut(0), last))
        return proposal

    side.draft_round = spy
    want = run(AREngine(native(target_model)), [5, 6, 7], 60).tokens
    assert run(engine, [5, 6, 7], 60).tokens == want
    assert all(n == cut for n, cut, _ in chains), chains  # nothing drafted past a cut
    assert any(n < last for n, _, last in chains), chains  # and the cut did end some chains early


def test_a_resting_draft_keeps_the_output_law(sampling_pair):
    """Resting changes the rounds' rhythm; its verification is sd's (rule C here, sampled drafts)."""
    target_model, draft_model = sampling_pair
    spec = SpeculationConfig(gamma=2, branches=3, tau=0.99, rest="always")
    engine = ENGINE_CLASSES["specbranch"](native(target_model), native(draft_model), spec)
    seen = resting_spy(engine)
    sampling = SamplingConfig(temperature=1.0)
    counts = sample_engine(engine, [1, 3], sampling, DRAWS)
    assert seen["rests"] > DRAWS // 2 and seen["adopted"] > 0, seen
    assert_matches(counts, target_law(target_model, [1, 3], sampling), DRAWS)

def test_rest_is_checked():
    from specbranch.engines.specbranch import draft_policy

    with pytest.raises(ConfigError, match="rest must be one of short, always, never"):
        SpeculationConfig(rest="sometimes")
    with pytest.raises(ConfigError, match="cannot always rest"):
        SpeculationConfig(rest="always", drafting="inline")
    policy = draft_policy("specbranch", SpeculationConfig(gamma=5))  # rest short: blocks shorter than 4 rest
    assert [policy.rests(n) for n in (1, 3, 4)] == [True, True, False]
    assert not draft_policy("specbranch", SpeculationConfig(gamma=5, blocks="fixed")).rests(4)
    assert not draft_policy("pearl", SpeculationConfig(rest="always")).rests(1)  # PEARL's rhythm stays PEARL's
