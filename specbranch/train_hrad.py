"""`specbranch train-hrad collect | fit`: build the H-RAD predictor of a model pair.

collect
    Runs SpecBranch with full-length blocks (``drafting=fixed``, so every label is defined on
    ``gamma - 1`` tokens) over a prompt set and records, per verified round, the target's hidden
    states at the last verified position (last N layers), the target's embedding of the token fixed
    there, and how many of the next pending block's tokens the target accepted (bucketed).
    Traces go to ``<out>/traces-NNNNN.safetensors`` (one shard per prompt file) + ``meta.json``.
fit
    Trains the MLP on the traces (class-balanced, held-out split, early stopping), prints the
    held-out accuracy, per-class precision/recall and the confusion matrix, and saves the predictor
    (safetensors + JSON, tagged with the pair).

Never collect on the evaluation prompts (HumanEval, or the first prompts of GSM8K/MT-bench that the
benchmark uses): pass ``--skip`` to start further into a file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .bench.datasets import load_prompts
from .config import GenerationConfig, ModelConfig, SamplingConfig, SpeculationConfig
from .engines import generate
from .engines.specbranch import SpecBranchEngine
from .errors import ConfigError
from .hrad import HRADConfig, fit, load_traces, save_traces, shipped_path
from .pipeline import Pipeline

SHIPPED_PROMPTS = Path(__file__).parent / "data" / "hrad_prompts.jsonl"  # our own coding prompts


def collect(models: ModelConfig, prompt_files: list[str], out: Path, num_prompts: int, skip: int, max_new_tokens: int,
            spec: SpeculationConfig, num_layers: int, progress: bool = True) -> dict:
    from tqdm import tqdm

    if any(f.lower() == "humaneval" for f in prompt_files):
        raise ConfigError("HumanEval is an evaluation set: collect H-RAD traces on other prompts")
    pipe = Pipeline(models, progress=progress)
    gamma = spec.gamma_for("specbranch")
    cfg = HRADConfig(pipe.target_hidden_size, num_layers, gamma, target=models.target, draft=models.draft)
    spec = SpeculationConfig(gamma=gamma, branches=spec.branches, tau=spec.tau, drafting="fixed")
    engine = SpecBranchEngine(pipe.target.backend, pipe.draft.backend, spec)
    traces = engine.target_side.record_traces(cfg)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, engine="specbranch")
    counts = [0, 0, 0]
    sets = []
    for shard, path in enumerate(prompt_files):
        name, prompts = load_prompts(path, skip + num_prompts)
        prompts = prompts[skip:]
        traces.clear()
        for p in tqdm(prompts, desc=f"collect {name}", disable=not progress):
            generate(engine, pipe.encode(p.text), gen, SamplingConfig(), eos_ids=pipe.tokenizer.eos_token_ids)
        if not traces:
            continue
        x = torch.stack([f for f, _ in traces])  # [n, F]
        y = torch.tensor([label for _, label in traces])  # [n]
        for label in y.tolist():
            counts[label] += 1
        meta = {**asdict(cfg), "speculation": asdict(spec), "max_new_tokens": max_new_tokens}
        sets.append({"file": path, "name": name, "skip": skip, "prompts": len(prompts), "rounds": len(y)})
        meta["sets"] = sets
        save_traces(out, x, y, meta, shard)
    if not sets:
        raise ConfigError("no rounds were traced: use more prompts or more tokens")
    return {"rounds": sum(counts), "class_counts": counts, "sets": sets}


def fit_traces(traces: list[Path], out: Path | None, epochs: int, seed: int, progress: bool = True) -> tuple[str, Path]:
    """Train on one or more trace folders (they must come from the same pair and settings)."""
    loaded = [load_traces(t) for t in traces]
    meta = loaded[0][2]
    keys = ("hidden_size", "num_layers", "gamma", "target", "draft")
    for _, _, other in loaded[1:]:
        if any(other[k] != meta[k] for k in keys):
            raise ConfigError(f"trace folders disagree on {[k for k in keys if other[k] != meta[k]]}: "
                              "train on traces of one pair and one setting")
    x = torch.cat([t[0] for t in loaded])
    y = torch.cat([t[1] for t in loaded])
    meta["sets"] = [s for _, _, m in loaded for s in m.get("sets", [])]
    cfg = HRADConfig(meta["hidden_size"], meta["num_layers"], meta["gamma"], HRADConfig.widths,
                     meta["target"], meta["draft"])
    pred, report = fit(x, y, cfg, epochs=epochs, seed=seed, progress=progress)
    path = out or shipped_path(cfg.target, cfg.draft)
    weights, _ = pred.save(path)
    Path(str(weights).removesuffix(".safetensors") + ".report.json").write_text(json.dumps(asdict(report) | {"traces": meta.get("sets")},
                                                                      indent=1) + "\n")
    return report.text(), weights


def main(args) -> int:
    if args.action == "collect":
        files = args.prompts.split(",") if args.prompts else [str(SHIPPED_PROMPTS)]
        summary = collect(
            ModelConfig(target=args.target, draft=args.draft, precision=args.precision),
            files, Path(args.out), args.num_prompts, args.skip, args.max_new_tokens,
            SpeculationConfig(gamma=args.gamma, branches=args.branches, tau=args.tau), args.layers,
        )
        print(json.dumps(summary, indent=1))
        return 0
    folders = [Path(t) for t in args.traces.split(",") if t]
    text, path = fit_traces(folders, Path(args.out) if args.out else None, args.epochs, args.seed)
    print(text)
    print(f"saved {path} (+ .json, .report.json)", file=sys.stderr)
    return 0
