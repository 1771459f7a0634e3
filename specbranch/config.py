"""The one source of configuration: frozen dataclasses that validate themselves.

CLI flags (and later server fields) are derived from these fields, so every default and help
text exists exactly once. Invalid values raise :class:`ConfigError` with a fix in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .models.linear import PRECISIONS

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
ENGINES = ("ar", "sd", "pearl", "specbranch")
DRAFT_SAMPLING = ("sample", "greedy")
BACKENDS = ("native", "hf")
RUNTIMES = ("sequential", "parallel")
ON_WORKER_FAILURE = ("error", "ar")


def _help(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text (and optional CLI metadata)."""
    default = kw.pop("default")
    return field(default=default, metadata={"help": text, **kw})


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = _help("sampling temperature; 0 = greedy (exactly the target's argmax tokens)", default=0.0)
    top_k: int = _help("keep only the k most likely tokens (0 = off); applied to target and draft alike", default=0)
    top_p: float = _help("nucleus sampling mass in (0, 1] (1 = off); applied to target and draft alike", default=1.0)
    seed: int = _help("random seed: the verification stream is seeded with it and the draft stream with a "
                      "hash of it (see specbranch.sampling.draft_generator)", default=0)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (got {self.temperature}); use 0 for greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (got {self.top_k}); use 0 to disable it")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p}); use 1 to disable it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ModelConfig:
    target: str = _help("target model: a registry name, a Hugging Face folder or a .gguf file", default=DEFAULT_TARGET)
    draft: str = _help("draft model (same forms as --target); 'none' for engines that need no draft", default=DEFAULT_DRAFT)
    precision: str = _help(
        "weight precision of the native backend: int8 (fastest on CPU), bf16, fp32, fp64",
        default="int8",
        choices=PRECISIONS,
    )
    backend: str = _help("native (fast, branchable KV cache) or hf (transformers reference)", default="native", choices=BACKENDS)
    max_len: int = _help("KV cache capacity in tokens (prompt + generated)", default=4096)
    threads: int = _help("CPU threads for torch (0 = all cores)", default=0)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.max_len < 16:
            raise ConfigError(f"max_len must be >= 16 (got {self.max_len})")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (got {self.threads})")

    @property
    def has_draft(self) -> bool:
        return self.draft.lower() != "none"


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = _help("stop after this many new tokens", default=128)
    stop: tuple[str, ...] = _help("stop when the output contains this string (repeatable)", default=(), action="append")
    chat_template: bool = _help("wrap the prompt in the model's chat template as a user message", default=True)
    engine: str = _help("decoding engine: " + ", ".join(ENGINES), default="ar", choices=ENGINES)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


@dataclass(frozen=True)
class SpeculationConfig:
    """How the speculative engines draft; none of these can change the output, only the speed."""

    gamma: int = _help("draft tokens per round (sd: block length; pearl/specbranch: tokens drafted "
                       "while the target verifies)", default=4)
    branches: int = _help("specbranch: candidate tokens (k) forked at a branch point", default=3)
    tau: float = _help("specbranch: draft top-1 probability at or below which a block is cut and the "
                       "position becomes a branch point (0 = never cut)", default=0.4)
    draft_sampling: str = _help(
        "at temperature > 0: 'sample' drafts from q (verified by rejection sampling), 'greedy' drafts "
        "argmax/top-k tokens (verified by match sampling)",
        default="sample",
        choices=DRAFT_SAMPLING,
    )

    def __post_init__(self) -> None:
        if not 1 <= self.gamma <= 16:
            raise ConfigError(f"gamma must be in 1..16 (got {self.gamma})")
        if not 1 <= self.branches <= 8:
            raise ConfigError(f"branches must be in 1..8 (got {self.branches})")
        if not 0 <= self.tau < 1:
            raise ConfigError(f"tau must be in [0, 1) (got {self.tau}); use 0 to never cut blocks")
        if self.draft_sampling not in DRAFT_SAMPLING:
            raise ConfigError(f"draft_sampling must be one of {', '.join(DRAFT_SAMPLING)} (got {self.draft_sampling!r})")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the draft and the target run (DESIGN.md §3, runtime). None of these change the output:
    the parallel runtime gives the same tokens as the sequential one, seed for seed."""

    runtime: str = _help(
        "sequential: draft and target take turns in this process; parallel: the draft runs in its own "
        "worker process, concurrently with the target (engines pearl and specbranch; ar and sd always "
        "run in this process)",
        default="sequential",
        choices=RUNTIMES,
    )
    target_device: str = _help("device of the target model: cpu, cuda or cuda:N", default="cpu")
    draft_device: str = _help("device of the draft model: cpu, cuda or cuda:N", default="cpu")
    target_cores: str = _help(
        "parallel runtime: CPU cores the target worker is pinned to, e.g. '0' or '0-3,8' "
        "(empty = the first half of the cores this process may use)",
        default="",
    )
    draft_cores: str = _help(
        "parallel runtime: CPU cores the draft worker is pinned to (empty = the other half)", default=""
    )
    target_threads: int = _help("parallel runtime: torch threads of the target worker (0 = one per pinned core)", default=0)
    draft_threads: int = _help("parallel runtime: torch threads of the draft worker (0 = one per pinned core)", default=0)
    worker_timeout: float = _help(
        "parallel runtime: seconds to wait for the draft worker at a meeting point before declaring it hung "
        "(model loading at start-up is waited for while the worker lives, up to 10 minutes)",
        default=120.0,
    )
    on_worker_failure: str = _help(
        "parallel runtime: when the draft worker dies or hangs, 'error' raises, 'ar' finishes the generation "
        "with plain decoding on the target and a warning",
        default="error",
        choices=ON_WORKER_FAILURE,
    )

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        for name in ("target_device", "draft_device"):
            dev = getattr(self, name)
            kind, _, index = dev.partition(":")
            if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
                raise ConfigError(f"{name} must be cpu, cuda or cuda:N (got {dev!r})")
        for name in ("target_cores", "draft_cores"):
            parse_cores(getattr(self, name), name)
        for name in ("target_threads", "draft_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)}); use 0 for one per pinned core")
        if not self.worker_timeout > 0:
            raise ConfigError(f"worker_timeout must be > 0 seconds (got {self.worker_timeout})")
        if self.on_worker_failure not in ON_WORKER_FAILURE:
            raise ConfigError(f"on_worker_failure must be one of {', '.join(ON_WORKER_FAILURE)} "
                              f"(got {self.on_worker_failure!r})")

    @property
    def parallel(self) -> bool:
        return self.runtime == "parallel"


def parse_cores(spec: str, name: str = "cores") -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; ``""`` -> ``[]`` (automatic)."""
    cores: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ConfigError(f"{name}: {part!r} is not a core number or range (write e.g. '0' or '0-3,8')")
        cores.update(range(int(lo), int(hi if sep else lo) + 1))
    return sorted(cores)


def field_specs(cls: type) -> list[tuple[str, Any, dict]]:
    """(name, default, metadata) of every field: what the CLI builds its flags from."""
    return [(f.name, f.default, dict(f.metadata)) for f in fields(cls)]
