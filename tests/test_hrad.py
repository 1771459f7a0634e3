"""H-RAD predictor: labels, training on separable data, files, pair check."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specbranch.config import GenerationConfig
from specbranch.errors import ConfigError
from specbranch.hrad import HRADConfig, HRADPredictor, bucket, calibrate, decide, fit, load_traces, save_traces, split


def test_bucket_edges_follow_gamma():
    assert [bucket(a, 4) for a in range(4)] == [0, 1, 1, 2]
    assert [bucket(a, 2) for a in range(2)] == [0, 2]
    with pytest.raises(ValueError):
        bucket(4, 4)


def synthetic(n: int, cfg: HRADConfig, seed: int = 0):
    """Three classes told apart by one direction, buried under large outlier dimensions
    (as in real hidden states) and noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, cfg.in_features, generator=g)
    x[:, 0] += 3.0 * (y.float() - 1)  # the signal
    x[:, 1:4] *= 500.0  # outliers that must not drown it
    return x, y


def test_fit_learns_and_files_round_trip(tmp_path):
    cfg = HRADConfig(hidden_size=8, num_layers=2, widths=(16, 8), target="t", draft="d")
    x, y = synthetic(1500, cfg)
    pred, report = fit(x, y, cfg, epochs=60, patience=10, lr=1e-3, progress=False)  # 900 traces: larger steps than the default
    assert report.accuracy > 0.8 and report.balanced_accuracy > 0.8, report.text()
    assert sum(map(sum, report.confusion)) == report.val_size == 300
    assert "accept-all" in report.text()
    pred.save(tmp_path / "p")
    again = HRADPredictor.load(tmp_path / "p")
    xt, _ = synthetic(50, cfg, seed=1)
    # fp16 storage: predictions agree (logits within fp16 rounding)
    assert torch.allclose(pred.logits(xt), again.logits(xt), atol=0.05)
    again.check_pair("t", "d", 8)
    with pytest.raises(ConfigError, match="trained for target 't'"):
        again.check_pair("t", "other", 8)


def test_traces_round_trip_and_errors(tmp_path):
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    groups = torch.arange(30) // 5  # 6 prompts of 5 traces
    save_traces(tmp_path, x[:20], y[:20], groups[:20], {"gamma": 4}, shard=0)
    save_traces(tmp_path, x[20:], y[20:], groups[20:] - 4, {"gamma": 4}, shard=1)  # each shard counts from 0
    x2, y2, g2, meta = load_traces(tmp_path)
    assert torch.allclose(x2, x, atol=1e-2) and torch.equal(y2, y) and meta == {"gamma": 4}
    assert torch.equal(g2, groups)  # shard 1's prompts 0, 1 are told apart from shard 0's
    with pytest.raises(ConfigError, match="no H-RAD traces"):
        load_traces(tmp_path / "none")
    cfg = HRADConfig(hidden_size=3, num_layers=1)
    with pytest.raises(ConfigError, match="collect more"):
        fit(x[:10], y[:10], cfg, progress=False)
    with pytest.raises(ConfigError, match="group ids"):
        fit(x, y, HRADConfig(hidden_size=3, num_layers=1), groups[:10], progress=False)


def test_split_keeps_each_group_in_one_split():
    groups = torch.arange(1000) // 10  # 100 prompts of 10 traces
    test, val, train = split(groups, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([test, val, train]).tolist()) == list(range(1000))
    sets = [set(groups[s].tolist()) for s in (test, val, train)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(test) == len(val) == 200  # whole groups of 10 fill 20% exactly


def test_position_traces_agree_with_the_engine_rounds(close_pair):
    """The teacher-forced replay labels every position the way a real round starting there is
    labelled: each round SpecBranch records (full blocks, fixed drafting) has a position trace with
    the same features and the same label."""
    from specbranch.config import ModelConfig, SamplingConfig, SpeculationConfig
    from specbranch.engines import generate
    from specbranch.engines.specbranch import SpecBranchEngine
    from specbranch.pipeline import Pipeline
    from specbranch.train_hrad import sequence_traces

    pipe = Pipeline(ModelConfig(target=close_pair.target, draft=close_pair.draft, precision="fp64"), progress=False)
    cfg = HRADConfig(pipe.target_hidden_size, num_layers=2, gamma=4)
    # pre-verify after rollbacks: an adopted block is gamma long, and only gamma - 1 blocks are labelled
    spec = SpeculationConfig(gamma=4, drafting="fixed", after_rollback="preverify")
    engine = SpecBranchEngine(pipe.target.backend, pipe.draft.backend, spec)
    rounds = engine.target_side.record_traces(cfg)
    labels, checked = [], 0
    for text in ("def add(a, b):", "class Stack:", "import os"):
        ids = pipe.encode(text, chat_template=False)
        rounds.clear()
        out = generate(engine, ids, GenerationConfig(max_new_tokens=48), SamplingConfig())
        x, y = sequence_traces(pipe.target.backend, pipe.draft.backend, ids + out.tokens, len(ids), cfg)
        assert len(y) == len(out.tokens) - (cfg.gamma - 1)
        for feats, label in rounds:
            dist = (x - feats).abs().amax(1)
            i = int(dist.argmin())
            if float(dist[i]) > 1e-6:  # a round whose block runs past the end has no position trace
                continue
            assert int(y[i]) == label
            checked += 1
        labels += y.tolist()
    assert checked >= 10
    assert set(labels) == {0, 1, 2}  # every class occurs, so the comparison could fail


def test_collect_fit_and_use_on_the_tiny_pair(close_pair, tmp_path, capsys):
    """The whole pipeline through the CLI: traces -> predictor files -> generation with it, which
    equals ar's output; HumanEval is refused as a trace source."""
    import json

    from specbranch.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(x):"}) + "\n" for i in range(12)))
    pair = ["--target", close_pair.target, "--draft", close_pair.draft, "--precision", "fp64"]
    traces = tmp_path / "traces"
    assert main(["train-hrad", "collect", "--prompts", str(prompts), "--num-prompts", "12", "--max-new-tokens", "40",
                 "--layers", "2", "--gamma", "3", "--out", str(traces), *pair]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["positions"] >= 100 and sum(summary["class_counts"]) == summary["positions"]
    out = tmp_path / "pred"
    assert main(["train-hrad", "fit", "--traces", str(traces), "--out", str(out), "--epochs", "20"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["target"] == close_pair.target and meta["num_layers"] == 2 and meta["gamma"] == 3
    # H-RAD drafting runs at the gamma its classes were bucketed for, unless gamma is given
    from specbranch.config import ModelConfig, SpeculationConfig
    from specbranch.pipeline import Pipeline

    pipe = Pipeline(ModelConfig(target=close_pair.target, draft=close_pair.draft, precision="fp64"), progress=False)
    spec, predictor = pipe.speculation(SpeculationConfig(drafting="hybrid", hrad_predictor=str(out)))
    assert spec.gamma == 3 and predictor is not None
    assert pipe.speculation(SpeculationConfig(gamma=5, drafting="hybrid", hrad_predictor=str(out)))[0].gamma == 5
    assert pipe.speculation(SpeculationConfig(drafting="confidence"))[0].gamma == 0  # the engine default
    # auto: hybrid where a predictor exists (here the one given), the confidence cut where none does
    spec, predictor = pipe.speculation(SpeculationConfig(hrad_predictor=str(out)))
    assert (spec.drafting, spec.gamma, predictor is not None) == ("hybrid", 3, True)
    assert pipe.speculation(SpeculationConfig()) == (SpeculationConfig(drafting="confidence"), None)
    assert out.with_suffix(".safetensors").stat().st_size < 2_000_000
    base = ["generate", "def add(a, b):", "--no-chat-template", "--max-new-tokens", "20", "-q", *pair]
    assert main(base + ["--engine", "ar"]) == 0
    want = capsys.readouterr().out
    assert main(base + ["--engine", "specbranch", "--drafting", "hybrid", "--hrad-predictor", str(out)]) == 0
    assert capsys.readouterr().out == want
    assert main(["train-hrad", "collect", "--prompts", "humaneval", "--out", str(tmp_path / "x"), *pair]) == 2
    assert "evaluation set" in capsys.readouterr().err


def test_calibrate_maximises_the_net_gain_of_each_class():
    # reject-soon probabilities, best first; label 0 = reject-soon was right
    p0 = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    y = torch.tensor([0, 0, 2, 0, 0, 1, 2, 2])
    probs = torch.stack([p0, torch.zeros(8), 1 - p0], dim=1)
    # cost 1: net gain from the top 1, 2, 1, 2, 3, 2, 1, 0 -> fire down to 0.5
    reject, accept = calibrate(probs, y, reject_cost=1.0)
    assert reject == pytest.approx(0.5)
    decided = decide(probs, reject, accept)
    assert decided.tolist()[:5] == [0] * 5 and 0 not in decided.tolist()[5:]
    # accept-all among the rest (p2 = .6, .7, .8 for labels 1, 2, 2): gains 1, 2, 1 -> fire down to .7
    assert accept == pytest.approx(0.7)
    # a false alarm costing 3 right calls: 1, 2, -1, 0, 1, ... -> only the top two pay
    assert calibrate(probs, y, reject_cost=3.0)[0] == pytest.approx(0.8)
    # a class that never pays is switched off
    assert calibrate(probs, torch.full((8,), 2))[0] > 1


def test_predict_follows_the_thresholds():
    cfg = HRADConfig(hidden_size=3, num_layers=1, widths=(4,))
    x = torch.randn(cfg.in_features)
    assert HRADPredictor(replace(cfg, reject_threshold=1.01, accept_threshold=1.01)).predict(x) == 1
    assert HRADPredictor(replace(cfg, reject_threshold=0.0)).predict(x) == 0
    assert HRADPredictor(replace(cfg, reject_threshold=1.01, accept_threshold=0.0)).predict(x) == 2
