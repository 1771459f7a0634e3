"""H-RAD predictor: labels, training on separable data, files, pair check."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specbranch.errors import ConfigError
from specbranch.hrad import HRADConfig, HRADPredictor, bucket, calibrate, decide, fit, load_traces, save_traces


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
    pred, report = fit(x, y, cfg, epochs=60, patience=10, progress=False)
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
    save_traces(tmp_path, x[:20], y[:20], {"gamma": 4}, shard=0)
    save_traces(tmp_path, x[20:], y[20:], {"gamma": 4}, shard=1)
    x2, y2, meta = load_traces(tmp_path)
    assert torch.allclose(x2, x, atol=1e-2) and torch.equal(y2, y) and meta == {"gamma": 4}
    with pytest.raises(ConfigError, match="no H-RAD traces"):
        load_traces(tmp_path / "none")
    cfg = HRADConfig(hidden_size=3, num_layers=1)
    with pytest.raises(ConfigError, match="collect more"):
        fit(x[:10], y[:10], cfg, progress=False)


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
                 "--layers", "2", "--tau", "0.2", "--gamma", "3", "--out", str(traces), *pair]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rounds"] >= 20 and sum(summary["class_counts"]) == summary["rounds"]
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
