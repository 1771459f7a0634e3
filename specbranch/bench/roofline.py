"""`specbranch roofline`: how close AR decoding is to the memory-bandwidth bound.

Decoding one token reads every weight once, so ``weight bytes / read bandwidth`` is a floor on the
per-token time. This measures both on this machine, times AR decoding of the target and the draft
(median over prompts and repeats) and prints the ratios the performance goals are stated in.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..config import GenerationConfig, ModelConfig, SamplingConfig
from ..engines import AREngine, generate
from ..pipeline import LoadedModel, Pipeline
from .datasets import load_prompts


@dataclass(frozen=True)
class Bandwidth:
    """Streaming-read rates in bytes/s over ``repeats`` reads of one buffer. On a shared VM single reads
    burst far above the sustained rate (best-of-5 readings of 47-55 GB/s beside medians of 30-32 on the
    same 2-core machine within minutes), so bounds are stated against both."""

    median: float
    best: float


def read_bandwidth(gb: float = 1.0, repeats: int = 9) -> Bandwidth:
    """Sums over a buffer far larger than any cache, on torch's current threads."""
    x = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    n = x.numel() * 4
    return Bandwidth(n / statistics.median(times), n / min(times))


@dataclass
class Speed:
    name: str
    ms_per_token: float  # median decode time per token
    tokens_per_s: float
    weight_gb: float
    bound_ms: float  # weight bytes / the median bandwidth reading
    best_bound_ms: float  # weight bytes / the best reading

    def line(self) -> str:
        return (f"{self.name:8s} {self.tokens_per_s:6.2f} tok/s = {self.ms_per_token:6.1f} ms/token | weights read "
                f"per token {self.weight_gb:.3f} GB -> bandwidth bound {self.bound_ms:.1f} ms at the median "
                f"reading ({self.best_bound_ms:.1f} at the best) | {self.ms_per_token / self.bound_ms:.2f}x the bound "
                f"({self.ms_per_token / self.best_bound_ms:.2f}x)")


def ar_speed(model: LoadedModel, pipe: Pipeline, prompts: list[str], tokens: int, repeats: int,
             bw: Bandwidth) -> Speed:
    times = []
    for _ in range(repeats):
        for text in prompts:
            r = generate(AREngine(model.backend), pipe.encode(text), GenerationConfig(max_new_tokens=tokens),
                         SamplingConfig(), eos_ids=())
            times.append(r.metrics.decode_time_s / r.metrics.new_tokens)
    ms = statistics.median(times) * 1e3
    gb = model.backend.weight_bytes() / 1e9
    return Speed(model.name, ms, 1e3 / ms, gb, gb * 1e9 / bw.median * 1e3, gb * 1e9 / bw.best * 1e3)


def roofline(models: ModelConfig, num_prompts: int = 3, tokens: int = 128, repeats: int = 1) -> list[str]:
    t0 = time.perf_counter()
    pipe = Pipeline(models, progress=False)
    lines = [f"load (warm if the int8 cache exists): {time.perf_counter() - t0:.1f} s "
             f"(target {pipe.target.load_time_s:.1f} s, draft {pipe.draft.load_time_s if pipe.draft else 0:.1f} s)"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = read_bandwidth()  # what each worker of the parallel runtime has alone
    finally:
        torch.set_num_threads(threads)
    bw = read_bandwidth()
    lines.append(f"measured read bandwidth: median {bw.median / 1e9:.1f} GB/s, best {bw.best / 1e9:.1f} GB/s "
                 f"({threads} threads); one thread: median {one.median / 1e9:.1f} GB/s")
    prompts = [p.text for p in load_prompts("humaneval", num_prompts)[1]]
    speeds = [ar_speed(m, pipe, prompts, tokens, repeats, bw) for m in (pipe.target, pipe.draft) if m]
    lines += [s.line() for s in speeds]
    if len(speeds) == 2:
        lines.append(f"draft/target per-token cost: {speeds[1].ms_per_token / speeds[0].ms_per_token:.2f}")
    return lines
