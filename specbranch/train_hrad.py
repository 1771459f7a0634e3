"""`specbranch train-hrad collect | fit`: build the H-RAD predictor of a model pair.

collect
    Decodes each prompt greedily (with ``sd``, which emits exactly the target's greedy tokens,
    only faster), then replays the finished sequence teacher-forced: one target forward gives its
    hidden states at every position, and the draft, fed the same tokens a few at a time as in
    decoding, gives its greedy guess after every position. Every generated position ``i`` then
    stands for a round that fixed token ``i + 1`` there: the features are the target's hidden states
    at ``i`` (last N layers) and its embedding of token ``i + 1``; the label is how many of the
    ``gamma - 1`` tokens the draft would chain after it the target accepts (greedy), bucketed.
    Why positions and not engine rounds: one decode yields a trace per token instead of one per
    round (116 per prompt against 32 for the default pair), and the label does not depend on the policy
    that happened to run (an engine's pending block may be cut short by τ; here every block is full).
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
from typing import Sequence

import torch

from .backend import Backend, prefill
from .bench.datasets import load_prompts
from .config import GenerationConfig, ModelConfig, SamplingConfig, SpeculationConfig
from .engines import generate
from .errors import ConfigError
from .hrad import HRADConfig, bucket, distinct_groups, features, fit, load_traces, save_traces, shipped_path
from .pipeline import Pipeline

SHIPPED_PROMPTS = Path(__file__).parent / "data" / "hrad_prompts.jsonl"  # our own coding prompts
DRAFT_CHUNK = 4  # tokens per replayed draft forward: as many rows as a decode step ever has


@torch.inference_mode()
def sequence_traces(target: Backend, draft: Backend, seq: Sequence[int], start: int,
                    cfg: HRADConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced traces of one greedy decode ``seq`` (prompt ``seq[:start]``, then the target's
    greedy tokens) -> features ``[n, F]`` and labels ``[n]``, one per generated position that has a
    full block of ``gamma - 1`` tokens after it. Resets both backends' caches."""
    block = cfg.gamma - 1
    n = len(seq) - start - block  # fixed tokens seq[start .. len - 1 - block]
    if start < 1 or n <= 0:
        return torch.empty(0, cfg.in_features), torch.empty(0, dtype=torch.long)
    target.reset()
    hidden = target.forward(torch.tensor([list(seq)]), hidden_layers=cfg.hidden_layers,
                            last_only=True).hidden[:, 0]  # [N, T, H]
    # The draft's guess after seq[:j + 1] for j = start - 1 .. T - 2. It is fed a few tokens per
    # forward because a long forward takes the prefill kernels, which round differently from the
    # decode kernels the engines' drafts run on.
    guesses = [int(prefill(draft, seq[:start]).logits[0, -1].argmax())]
    for i in range(start, len(seq) - 1, DRAFT_CHUNK):
        chunk = torch.tensor([list(seq[i : min(i + DRAFT_CHUNK, len(seq) - 1)])])
        guesses += draft.forward(chunk).logits[0].argmax(-1).tolist()
    hits = torch.tensor(guesses) == torch.tensor(list(seq[start:]))  # hits[k]: seq[start + k] guessed
    xs, ys = [], []
    for k in range(n):  # fixed token seq[start + k], predicted at position start + k - 1
        run = hits[k + 1 : k + 1 + block]  # the block after it: seq[start + k + 1 ..]
        accepted = int(run.long().cumprod(0).sum())  # leading hits: a greedy chain stops at its first miss
        xs.append(features(hidden[:, start + k - 1], target.embed(seq[start + k])))
        ys.append(bucket(accepted, cfg.gamma))
    return torch.stack(xs), torch.tensor(ys)


def _recorded(path: str) -> str:
    """A prompt file as meta.json (and so a fit's report) records it: one inside the package (the shipped prompts,
    the default) by its place there, so a shipped report names no machine's absolute path; others as given."""
    root = SHIPPED_PROMPTS.resolve().parents[2]  # the folder holding the specbranch package
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return path


def collect(models: ModelConfig, prompt_files: list[str], out: Path, num_prompts: int, skip: int, max_new_tokens: int,
            gamma: int, num_layers: int, progress: bool = True) -> dict:
    """Trace ``num_prompts`` prompts of each file (after the first ``skip``) into ``out``; labels are
    buckets of blocks of ``gamma - 1`` tokens, for a predictor that drafts at that γ."""
    from tqdm import tqdm

    if any(f.lower() == "humaneval" for f in prompt_files):
        raise ConfigError("HumanEval is an evaluation set: collect H-RAD traces on other prompts")
    pipe = Pipeline(models, progress=progress)
    cfg = HRADConfig(pipe.target_hidden_size, num_layers, gamma, target=models.target, draft=models.draft)
    engine = pipe.engine("sd")  # lossless: the target's greedy decode, faster than ar
    gen = GenerationConfig(max_new_tokens=max_new_tokens, engine="sd")
    counts = [0, 0, 0]
    sets = []
    for shard, path in enumerate(prompt_files):
        name, prompts = load_prompts(path, skip + num_prompts)
        prompts = prompts[skip:]
        xs, ys, groups = [], [], []
        for i, p in enumerate(tqdm(prompts, desc=f"collect {name}", disable=not progress)):
            ids = pipe.encode(p.text)
            result = generate(engine, ids, gen, SamplingConfig(), eos_ids=pipe.tokenizer.eos_token_ids)
            x, y = sequence_traces(pipe.target.backend, pipe.draft.backend, ids + result.tokens, len(ids), cfg)
            xs.append(x)
            ys.append(y)
            groups.append(torch.full_like(y, i))
        y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
        if not len(y):
            continue
        for label, c in enumerate(torch.bincount(y, minlength=3).tolist()):
            counts[label] += c
        meta = {**asdict(cfg), "labels": "teacher-forced greedy decode, one per generated position",
                "max_new_tokens": max_new_tokens}
        sets.append({"file": _recorded(path), "name": name, "skip": skip, "prompts": len(prompts), "positions": len(y)})
        meta["sets"] = sets
        save_traces(out, torch.cat(xs), y, torch.cat(groups), meta, shard)
    if not sets:
        raise ConfigError("no positions were traced: use more prompts or more tokens")
    return {"positions": sum(counts), "class_counts": counts, "sets": sets}


def fit_traces(traces: list[Path], out: Path | None, epochs: int, seed: int, progress: bool = True) -> tuple[str, Path]:
    """Train on one or more trace folders (they must come from the same pair and settings)."""
    loaded = [load_traces(t) for t in traces]
    meta = loaded[0][3]
    keys = ("hidden_size", "num_layers", "gamma", "target", "draft")
    for *_, other in loaded[1:]:
        if any(other[k] != meta[k] for k in keys):
            raise ConfigError(f"trace folders disagree on {[k for k in keys if other[k] != meta[k]]}: "
                              "train on traces of one pair and one setting")
    x = torch.cat([t[0] for t in loaded])
    y = torch.cat([t[1] for t in loaded])
    groups = distinct_groups([t[2] for t in loaded])  # one id per prompt: a prompt stays in one split
    meta["sets"] = [s for *_, m in loaded for s in m.get("sets", [])]
    cfg = HRADConfig(meta["hidden_size"], meta["num_layers"], meta["gamma"], HRADConfig.widths,
                     meta["target"], meta["draft"])
    pred, report = fit(x, y, cfg, groups, epochs=epochs, seed=seed, progress=progress)
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
            SpeculationConfig(gamma=args.gamma).gamma_for("specbranch"), args.layers,
        )
        print(json.dumps(summary, indent=1))
        return 0
    folders = [Path(t) for t in args.traces.split(",") if t]
    text, path = fit_traces(folders, Path(args.out) if args.out else None, args.epochs, args.seed)
    print(text)
    print(f"saved {path} (+ .json, .report.json)", file=sys.stderr)
    return 0
