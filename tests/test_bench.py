"""The benchmark harness on the tiny pair: interleaving, output checks, pass@1, report files."""

from __future__ import annotations

import gzip
import json

import pytest

from specbranch.bench.datasets import humaneval_path, load_prompts
from specbranch.bench.humaneval import extract_code, pass_at_1
from specbranch.bench.report import aggregate, write_report
from specbranch.bench.runner import Bench
from specbranch.config import BenchEngine, BenchConfig, ModelConfig, SamplingConfig, SpeculationConfig
from specbranch.errors import ConfigError
from specbranch.pipeline import Pipeline


def humaneval_problems(n: int) -> list[dict]:
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def test_pass_at_1_runs_the_unit_tests():
    problems = humaneval_problems(3)
    right = [(p, f"Here:\n```python\n{p['prompt']}{p['canonical_solution']}```\n") for p in problems]
    wrong = [(p, f"```python\ndef {p['entry_point']}(*args):\n    return None\n```") for p in problems]
    assert pass_at_1(right + wrong) == [True] * 3 + [False] * 3


def test_extract_code_takes_the_first_block_even_unterminated():
    assert extract_code("x\n```python\na = 1\n```\n```python\nb\n```") == "a = 1\n"
    assert extract_code("```py\ndef f():\n    return") == "def f():\n    return"
    assert extract_code("no fences") == "no fences"


def test_jsonl_prompt_fields(tmp_path):
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps({"question_id": 7, "turns": ["first", "second"]}) + "\n\n"
                    + json.dumps({"question": "q2"}) + "\n")
    name, prompts = load_prompts(str(path), 5)
    assert name == "mt" and [(p.id, p.text) for p in prompts] == [("7", "first"), ("1", "q2")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": 1}\n')
    with pytest.raises(ConfigError, match="prompt fields"):
        load_prompts(str(bad), 1)
    with pytest.raises(ConfigError, match="neither"):
        load_prompts(str(tmp_path / "missing.jsonl"), 1)


def test_bench_config_validates():
    with pytest.raises(ConfigError, match="unknown engine"):
        BenchConfig(engines="ar,warp")
    assert BenchConfig(engines="specbranch,ar,sd").engine_list == ["ar", "specbranch", "sd"]
    assert BenchConfig(engines="specbranch:fixed,specbranch:hybrid").engine_list[1:] == ["specbranch:fixed", "specbranch:hybrid"]
    with pytest.raises(ConfigError, match="unknown engine"):
        BenchConfig(engines="specbranch:warp")
    with pytest.raises(ConfigError, match="only specbranch takes a drafting mode"):
        BenchConfig(engines="sd:fixed")
    quick = BenchConfig(quick=True).resolved()
    assert (quick.num_prompts, quick.max_new_tokens, quick.dataset_list) == (3, 64, ["humaneval"])


def test_bench_engine_entries_take_per_engine_overrides():
    e = BenchEngine.parse("specbranch:fixed@gamma=6@tau=0.25")
    assert (e.label, e.name, e.drafting) == ("specbranch:fixed@gamma=6@tau=0.25", "specbranch", "fixed")
    spec = e.speculation(SpeculationConfig(gamma=3, branches=2))
    assert (spec.gamma, spec.tau, spec.drafting, spec.branches) == (6, 0.25, "fixed", 2)
    assert BenchEngine.parse("sd").speculation(spec) is spec  # nothing to change
    waiting = BenchEngine.parse("pearl@after_rollback=wait").speculation(spec)
    assert waiting.waits_after_rollback("pearl") and not spec.waits_after_rollback("pearl")
    assert spec.waits_after_rollback("specbranch")
    # two H-RAD predictors side by side in one run
    other = BenchEngine.parse("specbranch:hybrid@hrad_predictor=/x/new-hrad").speculation(spec)
    assert (other.hrad_predictor, other.drafting, spec.hrad_predictor) == ("/x/new-hrad", "hybrid", "")
    for bad, msg in [("pearl@gamma", "bad override"), ("pearl@speed=2", "bad override"),
                     ("pearl@gamma=x", "must be a number"), ("pearl@gamma=40", "gamma must be in"),
                     ("specbranch@tau=1.5", "tau must be in"), ("ar@gamma=3", "no speculation settings"),
                     ("hf-assisted@gamma=3", "no speculation settings"),
                     ("pearl@after_rollback=never", "after_rollback must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            BenchConfig(engines=bad)


def test_bench_overrides_reach_the_engine(tiny_pair, tmp_path):
    # the target drafts for itself, so every draft passes and a round's length is set by gamma alone
    models = ModelConfig(target=str(tiny_pair["target"]), draft=str(tiny_pair["target"]), precision="fp32")
    bench = BenchConfig(datasets="humaneval", num_prompts=1, engines="pearl,pearl@gamma=2", max_new_tokens=16,
                        warmup=0, out=str(tmp_path / "out"))
    result = Bench(Pipeline(models, progress=False), bench, SamplingConfig(), SpeculationConfig(gamma=5)).run(False)
    lengths = {r.engine: r.metrics["accepted_lengths"] for r in result.runs}
    assert max(lengths["pearl@gamma=2"]) <= 2 < max(lengths["pearl"])  # a round commits at most gamma tokens
    assert all(r.matches_ar for r in result.runs)


def test_bench_on_the_tiny_pair(tiny_pair, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("def add(a, b):", "Hello world", "x")))
    models = ModelConfig(target=str(tiny_pair["target"]), draft=str(tiny_pair["draft"]), precision="fp32")
    bench = BenchConfig(datasets=f"humaneval,{data}", num_prompts=2, engines="sd,pearl,specbranch",
                        max_new_tokens=12, warmup=1, repeats=2, out=str(tmp_path / "out"))
    result = Bench(Pipeline(models, progress=False), bench, SamplingConfig(), SpeculationConfig(3, 3, 0.3)).run(False)
    # interleaved: ar, sd, pearl, specbranch for each prompt and repeat, in that order
    assert [r.engine for r in result.runs[:8]] == ["ar", "sd", "pearl", "specbranch"] * 2
    assert len(result.runs) == 2 * 2 * 2 * 4
    assert all(r.matches_ar for r in result.runs)  # greedy: lossless engines equal ar
    assert all(r.passed is not None for r in result.runs if r.dataset == "humaneval")
    assert all(r.passed is None for r in result.runs if r.dataset == "d")
    aggs = {(a.dataset, a.engine): a for a in aggregate(result)}
    assert aggs[("d", "ar")].speedup == pytest.approx(1.0)
    assert aggs[("d", "sd")].mismatches == 0 and aggs[("d", "sd")].mean_accepted_length >= 1.0
    md, plots = write_report(result, tmp_path / "out")
    assert "| d | specbranch |" in md and "0/4" in md and "| speedup vs ar | pooled |" in md
    assert aggs[("d", "ar")].pooled_speedup == pytest.approx(1.0) and aggs[("d", "sd")].pooled_speedup > 0
    assert all(a.prefill_s > 0 for a in aggs.values()) and "| prefill |" in md
    assert result.config["weight_bytes"]["draft"] > 0 and aggs[("d", "sd")].weight_gb_per_token > 0
    from specbranch.kernels import code_in_use, cpu_model

    assert f"({cpu_model()}; kernels: {code_in_use()})" in md  # kernel speeds differ between CPUs: say which ran
    assert code_in_use() in ("AVX-512 VNNI", "AVX2") or code_in_use().startswith("none (")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["runs"]) == 32 and len(saved["aggregates"]) == 8
    assert [p.name for p in plots] == ["speedup.png", "accepted_length.png"] and all(p.stat().st_size > 1000 for p in plots)


def test_weights_read_count_every_decode_forward_once():
    from specbranch.bench.runner import BenchResult, Run

    def run(engine, tokens, tok_s, **counts):
        idle = {"target_idle_fraction": 0.0, "draft_idle_fraction": 0.0}
        return Run("d", "p0", engine, 0, [], "", {"new_tokens": tokens, "tokens_per_s": tok_s, **idle, **counts})

    runs = [run("ar", 10, 5.0, target_forwards=11, draft_forwards=0, branch_forwards=0),
            # prefill + 3 verifications; draft prefill + 12 steps + 2 batched branch steps
            run("sd", 12, 6.0, target_forwards=4, draft_forwards=13, branch_forwards=2),
            run("sd", 8, 2.0, target_forwards=3, draft_forwards=9, branch_forwards=0),
            run("hf-assisted", 10, 3.0)]
    result = BenchResult({"weight_bytes": {"target": 2e9, "draft": 1e8}}, {}, runs)
    aggs = {a.engine: a for a in aggregate(result)}
    assert aggs["ar"].weight_gb_per_token == pytest.approx(2.0) and aggs["ar"].weight_gb_per_s == pytest.approx(10.0)
    gb = (3 * 2 + 14 * 0.1) + (2 * 2 + 8 * 0.1)  # each model's prefill is not decoding
    assert aggs["sd"].weight_gb_per_token == pytest.approx(gb / 20)
    assert aggs["sd"].weight_gb_per_s == pytest.approx(gb / (12 / 6.0 + 8 / 2.0))
    # pooled: 20 tokens in 6 s of decoding against ar's 10 in 2 s (the median of per-prompt ratios 1.2 and 0.4: 0.8)
    assert aggs["sd"].pooled_speedup == pytest.approx((20 / 6) / 5.0) and aggs["sd"].speedup == pytest.approx(0.8)
    assert aggs["ar"].pooled_speedup == pytest.approx(1.0) and aggs["hf-assisted"].pooled_speedup == pytest.approx(0.6)
    assert aggs["hf-assisted"].weight_gb_per_token is None  # its own weights: not counted
    assert aggs["sd"].prefill_s is None  # runs without the key (results.json from older code)
    assert aggregate(BenchResult({}, {}, [run("hf-assisted", 10, 3.0, prefill_time_s=0.0)]))[0].prefill_s is None
    older = BenchResult({}, {}, runs)  # results.json from before the sizes were recorded
    assert all(a.weight_gb_per_token is None for a in aggregate(older))


def test_roofline_counts_only_the_rows_a_reduced_draft_head_reads(tiny_pair):
    from specbranch.bench.roofline import roofline
    from specbranch.pipeline import load_model

    full, reduced = (load_model(str(tiny_pair["draft"]), ModelConfig(draft_vocab=n), progress=False, vocab_subset=n)
                     for n in (0, 20))
    head = full.backend.decoder.lm_head
    saved = (head.out_features - len(reduced.backend.decoder.lm_head.ids)) * head.qweight.shape[1]
    assert full.backend.weight_bytes() - reduced.backend.weight_bytes() >= saved > 0
    lines = roofline(ModelConfig(target=str(tiny_pair["target"]), draft=str(tiny_pair["draft"]), draft_vocab=20),
                     num_prompts=1, tokens=4, window_s=0.1)
    assert "bandwidth bound" in lines[-2] and lines[-1].startswith("draft/target per-token cost")
    assert lines[1].startswith("measured read bandwidth: median") and "one thread: median" in lines[1]
    from specbranch.bench.roofline import read_bandwidth

    bw = read_bandwidth(gb=0.05, repeats=3)
    assert len(bw.rates) == 3 and 0 < bw.median <= bw.best  # the bound is stated against the median and the best
    longer = read_bandwidth(gb=0.05, repeats=1, seconds=0.2)  # reads until the window has passed
    assert len(longer.rates) > 1 and len((bw + longer).rates) == 3 + len(longer.rates)


def test_roofline_counts_the_int4_bytes_of_an_int4_draft(tiny_pair):
    from specbranch.pipeline import load_model

    int8, int4 = (load_model(str(tiny_pair["draft"]), ModelConfig(), progress=False, precision=p) for p in ("int8", "int4"))
    assert int4.backend.decoder.precision == "int4"
    qkv8, qkv4 = int8.backend.decoder.layers[0].qkv, int4.backend.decoder.layers[0].qkv
    saved = qkv8.qweight.numel() - (qkv4.packed.numel() + qkv4.scales.numel() * 4)
    assert saved > 0 and int8.backend.weight_bytes() - int4.backend.weight_bytes() >= saved
