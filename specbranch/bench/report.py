"""Benchmark runs -> aggregates, a Markdown table, PNG plots and results.json.

Rates are pooled over a dataset's runs (sum of numerators / sum of denominators), so long and short
generations weigh by their tokens; tokens/s and speedups are medians, the speedup being the median
over prompts of (engine tokens/s) / (ar tokens/s) on the same prompt and repeat.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..config import SpeculationConfig
from ..vocab import AUTO_SIZE
from .runner import BenchResult, Run


@dataclass(frozen=True)
class Aggregate:
    dataset: str
    engine: str
    runs: int
    tokens_per_s: float  # median
    speedup: float  # median of per-prompt ratios to ar
    pooled_speedup: float  # the dataset's decode rate (all its tokens over all its decode time) over ar's
    prefill_s: float | None  # median seconds of the engine's start: the prompt through the target (and the draft)
    mean_accepted_length: float
    acceptance_rate: float
    rollback_rate: float
    branch_hit_rate: float | None
    target_idle: float | None
    draft_idle: float | None
    mismatches: int | None  # T = 0: runs whose tokens differ from ar's
    pass_at_1: float | None
    # Weights streamed from memory while decoding (prefill excluded), pooled: per committed token, and per
    # second of decoding. On a CPU, where streaming weights is the limit, the first decides the speed.
    weight_gb_per_token: float | None = None
    weight_gb_per_s: float | None = None


def speculation_line(config: dict) -> str:
    """The settings that shape speed (never output): γ per engine, k, τ, drafting, draft vocabulary."""
    sp = SpeculationConfig(**config.get("speculation", {}))
    vocab = config.get("models", {}).get("draft_vocab", 0)
    vocab = {-1: f"auto ({AUTO_SIZE} ranked tokens if a ranking ships for the draft's tokenizer)",
             0: "full"}.get(vocab, str(vocab))
    gammas = ", ".join(f"{e} {sp.gamma_for(e)}" for e in ("sd", "pearl", "specbranch"))
    return (f"γ {gammas}; k {sp.branches}, τ {sp.tau}, drafting {sp.drafting}; draft vocabulary {vocab}")


def _pooled(runs: list[Run], num: str, den: str) -> float:
    d = sum(r.metrics.get(den, 0) for r in runs)
    return sum(r.metrics.get(num, 0) for r in runs) / d if d else 0.0


def _weight_bytes(run: Run, sizes: dict) -> float | None:
    """Bytes of weights ``run`` streamed while decoding: every forward after the prefill reads its model's
    weights once, whatever its rows (a verified block, k branch rows)."""
    m, target, draft = run.metrics, sizes.get("target"), sizes.get("draft")
    if run.engine == "hf-assisted" or not target or "target_forwards" not in m:
        return None
    steps = m.get("draft_forwards", 0) + m.get("branch_forwards", 0)
    if steps and not draft:
        return None
    return (m["target_forwards"] - 1) * target + max(steps - 1, 0) * (draft or 0)  # - 1: each model's prefill


def _weight_rates(runs: list[Run], sizes: dict) -> tuple[float | None, float | None]:
    """(GB per committed token, GB per second of decoding), pooled over ``runs``."""
    read = [_weight_bytes(r, sizes) for r in runs]
    if any(b is None for b in read):
        return None, None
    tokens, seconds = sum(r.metrics["new_tokens"] for r in runs), _decode_seconds(runs)
    return (sum(read) / 1e9 / tokens if tokens else None), (sum(read) / 1e9 / seconds if seconds else None)


def _decode_seconds(runs: list[Run]) -> float:
    """Seconds of decoding (prefill excluded, as in tok/s), summed over ``runs``."""
    return sum(r.metrics["new_tokens"] / r.tokens_per_s for r in runs if r.tokens_per_s)


def _decode_rate(runs: list[Run]) -> float:
    """Tokens per second of decoding, pooled: a long generation weighs by its tokens, so a phase of the shared
    memory bus that slowed one prompt moves it less than it moves a median of per-prompt ratios."""
    seconds = _decode_seconds(runs)
    return sum(r.metrics["new_tokens"] for r in runs if r.tokens_per_s) / seconds if seconds else float("nan")


def aggregate(result: BenchResult) -> list[Aggregate]:
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    ar: dict[tuple[str, str, int], float] = {}
    for r in result.runs:
        groups[(r.dataset, r.engine)].append(r)
        if r.engine == "ar":
            ar[(r.dataset, r.prompt_id, r.repeat)] = r.tokens_per_s
    ar_rate = {dataset: _decode_rate(runs) for (dataset, engine), runs in groups.items() if engine == "ar"}
    out = []
    for (dataset, engine), runs in groups.items():
        native = engine != "hf-assisted"
        ratios = [r.tokens_per_s / ar[(dataset, r.prompt_id, r.repeat)] for r in runs
                  if ar.get((dataset, r.prompt_id, r.repeat))]
        forwards = sum(r.metrics.get("target_forwards", 0) - 1 for r in runs)
        checked = [r for r in runs if r.matches_ar is not None]
        graded = [r for r in runs if r.passed is not None]
        per_token, per_s = _weight_rates(runs, result.config.get("weight_bytes", {}))
        idle = lambda key: statistics.median(r.metrics[key] for r in runs) if native and engine != "ar" else None  # noqa: E731
        out.append(Aggregate(
            dataset=dataset,
            engine=engine,
            runs=len(runs),
            tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
            speedup=statistics.median(ratios) if ratios else float("nan"),
            pooled_speedup=_decode_rate(runs) / ar_rate[dataset] if dataset in ar_rate else float("nan"),
            prefill_s=statistics.median(r.metrics["prefill_time_s"] for r in runs)
            if native and all("prefill_time_s" in r.metrics for r in runs) else None,  # hf-assisted: not split
            mean_accepted_length=sum(r.metrics["new_tokens"] for r in runs) / forwards if native and forwards else float("nan"),
            acceptance_rate=_pooled(runs, "num_accepted_tokens", "num_draft_tokens"),
            rollback_rate=_pooled(runs, "rollback_tokens", "drafted_tokens"),
            # None (shown as "–") where no branch point was ever reached, rather than a misleading 0%
            branch_hit_rate=_pooled(runs, "num_branch_hits", "num_branch_points")
            if any(r.metrics.get("num_branch_points") for r in runs) else None,
            target_idle=idle("target_idle_fraction"),
            draft_idle=idle("draft_idle_fraction"),
            mismatches=sum(not r.matches_ar for r in checked) if checked else None,
            pass_at_1=sum(r.passed for r in graded) / len(graded) if graded else None,
            weight_gb_per_token=per_token,
            weight_gb_per_s=per_s,
        ))
    return out


def _fmt(x: float | None, pct: bool = False, unit: str = "", digits: int = 2) -> str:
    if x is None or x != x:  # None or NaN
        return "–"
    return f"{x:.1%}" if pct else f"{x:.{digits}f}{unit}"


def markdown(result: BenchResult, aggs: list[Aggregate]) -> str:
    b, s = result.config["bench"], result.config["sampling"]
    env = result.environment
    lines = [
        "# specbranch bench",
        "",
        f"{b['max_new_tokens']} new tokens, temperature {s['temperature']}, {b['num_prompts']} prompts per dataset, "
        f"{b['repeats']} repeat(s), engines interleaved per prompt; models {result.config['models']['target']} / "
        f"{result.config['models']['draft']} at {result.config['models']['precision']} "
        f"(draft at {result.config['models'].get('draft_precision', result.config['models']['precision'])}), "
        f"{result.config.get('runtime', {}).get('runtime', 'sequential')} runtime for pearl/specbranch; "
        f"{speculation_line(result.config)}; "
        f"torch {env['torch']}, {env['cpu_count']} CPUs ({env.get('processor', '?')}; kernels: "
        f"{env.get('int8_kernel', '?')}), commit {env['git_commit']}, {env['time']}.",
        "",
        "| dataset | engine | tok/s (median) | speedup vs ar | pooled | prefill | mean accepted length | acceptance "
        "| rollback | branch hits | target idle | draft idle | weights read per token | weight read rate | mismatches vs ar "
        "| pass@1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in aggs:
        lines.append(
            f"| {a.dataset} | {a.engine} | {_fmt(a.tokens_per_s)} | {_fmt(a.speedup)}× | {_fmt(a.pooled_speedup)}× "
            f"| {_fmt(a.prefill_s, unit=' s')} | {_fmt(a.mean_accepted_length)} "
            f"| {_fmt(a.acceptance_rate, True) if a.engine not in ('ar', 'hf-assisted') else '–'} "
            f"| {_fmt(a.rollback_rate, True) if a.engine not in ('ar', 'hf-assisted') else '–'} "
            f"| {_fmt(a.branch_hit_rate, True)} | {_fmt(a.target_idle, True)} | {_fmt(a.draft_idle, True)} "
            f"| {_fmt(a.weight_gb_per_token, unit=' GB', digits=3)} "
            f"| {_fmt(a.weight_gb_per_s, unit=' GB/s', digits=1)} "
            f"| {'–' if a.mismatches is None else f'{a.mismatches}/{a.runs}'} | {_fmt(a.pass_at_1, True)} |"
        )
    lines += ["", "Speedup: median over prompts of engine tok/s ÷ ar tok/s on the same prompt in this run; pooled: "
              "the engine's decode rate over all the dataset's prompts (tokens ÷ decode seconds, prefill excluded "
              "as in tok/s) ÷ ar's. Prefill: median seconds of the engine's start, the prompt through the target "
              "and, in one process, through the draft (the parallel runtime's draft worker prefills beside it). "
              "Rates are pooled over the dataset's runs. Weights read: the bytes of weights every decode forward "
              "streams (one read per forward, whatever its rows), per committed token and per second of decoding; "
              "where streaming weights is the limit (a CPU) the first decides the order of the engines. "
              "hf-assisted is transformers' generate with its own "
              "weights at --hf-precision (int8 there is torch dynamic quantization, numerically another model), so "
              "its mismatches against our ar measure that difference, not a loss in speculation."]
    return "\n".join(lines) + "\n"


def plots(result: BenchResult, aggs: list[Aggregate], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    datasets = list(dict.fromkeys(a.dataset for a in aggs))
    engines = list(dict.fromkeys(a.engine for a in aggs))
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(datasets), 4))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        ys = [next((a.speedup for a in aggs if a.dataset == d and a.engine == engine), 0.0) for d in datasets]
        ax.bar([x + i * width for x in range(len(datasets))], ys, width, label=engine)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(datasets))], datasets)
    ax.set_ylabel("speedup vs ar (median)")
    paths.append(_save(fig, ax, out / "speedup.png"))

    lengths: dict[str, list[int]] = defaultdict(list)
    for r in result.runs:
        lengths[r.engine] += r.metrics.get("accepted_lengths", [])
    spec = [e for e in engines if lengths.get(e)]
    if spec:
        fig, ax = plt.subplots(figsize=(6, 4))
        top = max(max(v) for v in lengths.values() if v)
        bins = [x - 0.5 for x in range(1, top + 2)]
        for engine in spec:
            ax.hist(lengths[engine], bins=bins, alpha=0.5, label=engine, density=True)
        ax.set_xlabel("tokens committed per target forward")
        ax.set_ylabel("fraction of rounds")
        paths.append(_save(fig, ax, out / "accepted_length.png"))
    return paths


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: BenchResult, out: Path) -> tuple[str, list[Path]]:
    """results.json + report.md + plots in ``out``; returns the Markdown and the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    aggs = aggregate(result)
    data = result.to_json()
    data["aggregates"] = [a.__dict__ for a in aggs]
    (out / "results.json").write_text(json.dumps(data, indent=1))
    md = markdown(result, aggs)
    (out / "report.md").write_text(md)
    return md, plots(result, aggs, out)
