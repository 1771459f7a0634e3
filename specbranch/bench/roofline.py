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
    """Streaming-read rates in bytes/s, one per read of one buffer. On a shared VM single reads burst far above the
    sustained rate (best-of-5 readings of 47-55 GB/s beside medians of 30-32 on the same 2-core machine within
    minutes; 8 s of back-to-back reads swung between 26 and 44 GB/s in phases of 1-3 s), so bounds are stated
    against the median and the best."""

    rates: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)

    def __add__(self, other: "Bandwidth") -> "Bandwidth":
        return Bandwidth(self.rates + other.rates)


def read_bandwidth(gb: float = 1.0, repeats: int = 9, seconds: float = 0.0) -> Bandwidth:
    """Sums over a buffer far larger than any cache, on torch's current threads: at least ``repeats`` reads, and
    more until ``seconds`` have passed."""
    x = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    rates, end = [], time.perf_counter() + seconds
    while len(rates) < repeats or time.perf_counter() < end:
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0))
    return Bandwidth(tuple(rates))


@dataclass
class Speed:
    name: str
    ms_per_token: float  # median decode time per token
    tokens_per_s: float
    weight_gb: float
    bandwidth: float  # bytes/s: the median over prompts of the reads taken around each
    bound_ms: float  # weight bytes / that bandwidth
    ratio: float  # median over prompts of (time per token / the bound at the reads around that prompt)
    ratio_best: float  # ... against each reading's best

    def line(self) -> str:
        return (f"{self.name:8s} {self.tokens_per_s:6.2f} tok/s = {self.ms_per_token:6.1f} ms/token | weights read "
                f"per token {self.weight_gb:.3f} GB -> bandwidth bound {self.bound_ms:.1f} ms at "
                f"{self.bandwidth / 1e9:.1f} GB/s (median of 2 s reads before and after each prompt) | "
                f"{self.ratio:.2f}x the bound "
                f"({self.ratio_best:.2f}x against each reading's best)")


def ar_speed(model: LoadedModel, pipe: Pipeline, prompts: list[str], tokens: int, repeats: int,
             window_s: float = 2.0) -> Speed:
    """AR decoding of ``model``, each prompt held to the bandwidth read for ``window_s`` just before it and just
    after it: on a shared VM the bus share swings within seconds (see :class:`Bandwidth`), so one reading at the
    start, or one burst of reads, can hold a run to another moment's machine."""
    gb = model.backend.weight_bytes() / 1e9
    times, reads = [], []
    for _ in range(repeats):
        for text in prompts:
            before = read_bandwidth(seconds=window_s)
            r = generate(AREngine(model.backend), pipe.encode(text), GenerationConfig(max_new_tokens=tokens),
                         SamplingConfig(), eos_ids=())
            times.append(r.metrics.decode_time_s / r.metrics.new_tokens)
            reads.append(before + read_bandwidth(seconds=window_s))
    ms = statistics.median(times) * 1e3
    bandwidth = statistics.median(bw.median for bw in reads)
    return Speed(model.name, ms, 1e3 / ms, gb, bandwidth, gb * 1e9 / bandwidth * 1e3,
                 statistics.median(t * bw.median / (gb * 1e9) for t, bw in zip(times, reads)),
                 statistics.median(t * bw.best / (gb * 1e9) for t, bw in zip(times, reads)))


def roofline(models: ModelConfig, num_prompts: int = 3, tokens: int = 128, repeats: int = 1,
             window_s: float = 2.0) -> list[str]:
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
    speeds = [ar_speed(m, pipe, prompts, tokens, repeats, window_s) for m in (pipe.target, pipe.draft) if m]
    lines += [s.line() for s in speeds]
    if len(speeds) == 2:
        lines.append(f"draft/target per-token cost: {speeds[1].ms_per_token / speeds[0].ms_per_token:.2f}")
    return lines
