"""Run engines side by side: interleaved per prompt (A B C A B C ...) so machine drift hits all of
them alike, each speedup computed against `ar` on the same prompt in the same run."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import BenchConfig, BenchEngine, GenerationConfig, ModelConfig, RuntimeConfig, SamplingConfig, SpeculationConfig
from ..kernels import code_in_use, cpu_model
from ..metrics import Metrics
from ..pipeline import Pipeline
from .datasets import Prompt, load_prompts
from .hf_assisted import HFAssisted
from .humaneval import pass_at_1


@dataclass
class Run:
    """One timed generation."""

    dataset: str
    prompt_id: str
    engine: str
    repeat: int
    tokens: list[int]
    text: str
    metrics: dict  # Metrics.summary(); for hf-assisted only tokens and times
    matches_ar: bool | None = None  # T = 0 only: identical tokens to ar's on this prompt
    passed: bool | None = None  # HumanEval only: the completion passes the unit tests

    @property
    def tokens_per_s(self) -> float:
        return self.metrics["tokens_per_s"]


@dataclass
class BenchResult:
    config: dict
    environment: dict
    runs: list[Run] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"config": self.config, "environment": self.environment, "runs": [asdict(r) for r in self.runs]}


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except OSError:
        commit = ""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "int8_kernel": code_in_use(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class Bench:
    def __init__(self, pipe: Pipeline, bench: BenchConfig, sampling: SamplingConfig, spec: SpeculationConfig) -> None:
        self.pipe, self.bench, self.sampling, self.spec = pipe, bench, sampling, spec
        self.hf: HFAssisted | None = None
        if "hf-assisted" in bench.engine_list:
            self.hf = HFAssisted(pipe.target.folder, pipe.draft.folder, bench.hf_precision, pipe.tokenizer.eos_token_ids)

    def generate(self, engine: str, ids: list[int], max_new_tokens: int) -> tuple[list[int], str, dict]:
        if engine == "hf-assisted":
            tokens, wall = self.hf.generate(ids, max_new_tokens, self.sampling)
            m = Metrics(new_tokens=len(tokens), prompt_tokens=len(ids), wall_time_s=wall)
            return tokens, self.pipe.tokenizer.decode(tokens), m.summary()
        entry = BenchEngine.parse(engine)  # e.g. specbranch:hybrid or pearl@gamma=5: ablations and sweeps
        r = self.pipe.generate(ids, GenerationConfig(max_new_tokens=max_new_tokens, engine=entry.name), self.sampling,
                               spec=entry.speculation(self.spec))
        return r.tokens, r.text, r.metrics.summary()

    def run(self, progress: bool = True) -> BenchResult:
        from tqdm import tqdm

        b = self.bench
        datasets = [load_prompts(d, b.num_prompts) for d in b.dataset_list]
        result = BenchResult(
            config={"bench": asdict(b), "sampling": asdict(self.sampling), "speculation": asdict(self.spec),
                    "models": self.pipe.model_settings(), "runtime": asdict(self.pipe.runtime),
                    "weight_bytes": self.pipe.weight_bytes()},
            environment=environment(),
        )
        encoded = {(name, p.id): self.pipe.encode(p.text) for name, prompts in datasets for p in prompts}
        first = next(iter(encoded.values()))
        for engine in b.engine_list:  # warm-up: first-call allocations, caches, lazy packing
            for _ in range(b.warmup):
                self.generate(engine, first, min(16, b.max_new_tokens))
        total = sum(len(p) for _, p in datasets) * b.repeats * len(b.engine_list)
        with tqdm(total=total, desc="bench", unit="gen", disable=not progress) as bar:
            for name, prompts in datasets:
                for prompt in prompts:
                    for repeat in range(b.repeats):
                        result.runs += self._interleaved(name, prompt, encoded[(name, prompt.id)], repeat, bar)
        if b.pass_at_1:
            self._check_humaneval(result.runs, {p.id: p for name, ps in datasets if name == "humaneval" for p in ps})
        return result

    def _interleaved(self, dataset: str, prompt: Prompt, ids: list[int], repeat: int, bar) -> list[Run]:
        runs = []
        for engine in self.bench.engine_list:
            tokens, text, metrics = self.generate(engine, ids, self.bench.max_new_tokens)
            runs.append(Run(dataset, prompt.id, engine, repeat, tokens, text, metrics))
            bar.set_postfix_str(f"{engine} {metrics['tokens_per_s']:.1f} tok/s")
            bar.update()
        if self.sampling.greedy:  # lossless engines must reproduce ar token for token
            for r in runs:
                r.matches_ar = r.tokens == runs[0].tokens
        return runs

    def _check_humaneval(self, runs: list[Run], problems: dict[str, Prompt]) -> None:
        todo = [r for r in runs if r.dataset == "humaneval"]
        for r, ok in zip(todo, pass_at_1([(problems[r.prompt_id].problem, r.text) for r in todo])):
            r.passed = ok


def run_bench(models: ModelConfig, bench: BenchConfig, sampling: SamplingConfig, spec: SpeculationConfig,
              runtime: RuntimeConfig | None = None, progress: bool = True) -> BenchResult:
    with Pipeline(models, progress=progress, runtime=runtime) as pipe:
        return Bench(pipe, bench.resolved(), sampling, spec).run(progress)
