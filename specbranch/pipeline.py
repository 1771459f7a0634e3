"""The Python API: load a target (and draft) once, then generate text with any engine.

    from specbranch import Pipeline
    pipe = Pipeline()                        # default Qwen2.5-Coder 1.5B target + 0.5B draft
    result = pipe.generate("Write a Python function that reverses a string.")
    print(result.text, result.metrics.tokens_per_s)

With ``Pipeline(runtime=RuntimeConfig(runtime="parallel"))`` the draft runs in a worker process
that is started once, serves every generation, and is shut down by :meth:`Pipeline.close`
(or ``with Pipeline(...) as pipe:``, or at interpreter exit).
"""

from __future__ import annotations

import json
import os
import time
import weakref
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from .backend import Backend, NativeBackend
from .config import GenerationConfig, ModelConfig, RuntimeConfig, SamplingConfig, SpeculationConfig
from .engines import ENGINE_CLASSES, Engine, GenerationResult, generate
from .errors import ConfigError, ModelError, SpecBranchError
from .hrad import HRADPredictor, find_shipped
from .models.linear import CPU_ONLY, subset_head
from .models.tokenizer import Tokenizer
from .policy import resolve_drafting
from .vocab import draft_vocab_ids


class LoadedModel:
    """A converted model folder with its tokenizer; the weights load on first use of ``backend``
    (in the parallel runtime this process never needs the draft's weights unless ``sd`` runs)."""

    def __init__(self, name: str, folder: Path, tokenizer: Tokenizer, cfg: ModelConfig, device: str = "cpu",
                 vocab_subset: int = 0, precision: str | None = None) -> None:
        self.name, self.folder, self.tokenizer, self.cfg, self.device = name, folder, tokenizer, cfg, device
        self.vocab_subset = vocab_subset
        self.precision = precision or target_precision(cfg, folder, device)
        self.load_time_s = 0.0
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            t0 = time.perf_counter()
            self._backend = load_backend(self.folder, self.cfg, self.device, self.vocab_subset, self.precision)
            self.load_time_s += time.perf_counter() - t0
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding (from config.json: no need to load the weights)."""
        return json.loads((self.folder / "config.json").read_text())["vocab_size"]


def resolve(spec: str, progress: bool = True) -> Path:
    """A registry name, a Hugging Face folder or a .gguf file -> a converted model folder."""
    from .models.registry import resolve_model

    return resolve_model(spec, progress=progress)


def draft_precision(cfg: ModelConfig, device: str = "cpu") -> str:
    """The draft's weight precision: ``cfg.draft_precision``, with ``auto`` resolved to int4 where it
    can run (an int8 or q4k pair, or auto, on a CPU with the int4 kernel), else the target's precision."""
    from .kernels import unavailable

    if cfg.draft_precision == "int4":
        reason = unavailable() if device == "cpu" else f"int4 weights run on the CPU only, not on {device}"
        if reason:
            raise ConfigError(f"--draft-precision int4 is not available: {reason}; use --draft-precision int8")
        return "int4"
    if cfg.draft_precision != "auto":
        return cfg.draft_precision
    usable = cfg.precision in ("auto", "int8", "q4k") and cfg.backend == "native" and device == "cpu" \
        and unavailable() is None
    return "int4" if usable else _dense_or_int8(cfg, device)


def _dense_or_int8(cfg: ModelConfig, device: str) -> str:
    """``cfg.precision``, or for auto what it means without the native kernels' quantized formats: bf16 on a GPU,
    fp32 through transformers, int8 on a CPU."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device != "cpu" else "fp32" if cfg.backend != "native" else "int8"


def target_precision(cfg: ModelConfig, folder: Path, device: str = "cpu") -> str:
    """``cfg.precision`` with ``auto`` resolved for the model in ``folder``: q4k where its GGUF has Q4_K linears and
    the native kernels run (the fewest bytes a step), int8 on other CPUs, bf16 on a GPU, fp32 through transformers."""
    from .kernels import unavailable
    from .models.loader import has_q4k

    precision = _dense_or_int8(cfg, device)
    if cfg.precision == "auto" and precision == "int8" and unavailable() is None and has_q4k(folder):
        return "q4k"
    return precision


def load_backend(folder: Path, cfg: ModelConfig, device: str = "cpu", vocab_subset: int = 0,
                 precision: str | None = None) -> Backend:
    """The model in a converted folder, on ``device``, behind the Backend protocol, at ``precision``
    (default ``cfg.precision``; drafts pass :func:`draft_precision`). ``vocab_subset > 0``
    restricts the LM head to that many of the most frequent tokens plus the special ones, -1 picks
    the size automatically (drafts only: see :class:`~.models.linear.VocabSubsetHead` and
    :func:`specbranch.vocab.draft_vocab_ids`)."""
    precision = precision or target_precision(cfg, folder, device)
    if device != "cpu" and precision in CPU_ONLY:
        raise ConfigError(f"{precision} weights run on the CPU only: use --precision bf16 or fp32 on {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but this torch build sees no CUDA GPU: use cpu")
    if cfg.backend == "hf":
        from transformers import AutoModelForCausalLM

        from .backend_hf import HFBackend

        dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(precision, torch.float32)
        return HFBackend(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device))
    from .models.loader import load_decoder

    decoder = load_decoder(folder, precision).to(device)
    ids = draft_vocab_ids(Tokenizer(folder), vocab_subset, decoder.cfg.vocab_size, cfg.draft_vocab_ranks) \
        if vocab_subset else None
    if ids is not None:
        decoder.lm_head = subset_head(decoder.lm_head, ids, decoder.cfg.vocab_size)
    return NativeBackend(decoder, max_len=cfg.max_len)


def load_model(spec: str, cfg: ModelConfig, progress: bool = True, device: str = "cpu", lazy: bool = False,
               vocab_subset: int = 0, precision: str | None = None) -> LoadedModel:
    """Resolve and load a model (its weights only on first use when ``lazy``)."""
    folder = resolve(spec, progress)
    t0 = time.perf_counter()
    model = LoadedModel(spec, folder, Tokenizer(folder), cfg, device, vocab_subset, precision)
    model.load_time_s = time.perf_counter() - t0
    if not lazy:
        model.backend
    return model


def check_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    if target.vocab_size != draft.vocab_size or target.tokenizer.vocab_size != draft.tokenizer.vocab_size:
        raise ModelError(
            f"draft {draft.name!r} and target {target.name!r} have different vocabularies "
            f"({draft.tokenizer.vocab_size} vs {target.tokenizer.vocab_size} tokens): choose a draft "
            "from the same model family (same tokenizer)"
        )
    if target.tokenizer._tok.get_vocab() != draft.tokenizer._tok.get_vocab():
        raise ModelError(
            f"draft {draft.name!r} and target {target.name!r} use different tokenizers: choose a draft "
            "from the same model family"
        )


class Pipeline:
    """A loaded target/draft pair plus the engines that decode with it."""

    def __init__(
        self, models: ModelConfig | None = None, progress: bool = True, runtime: RuntimeConfig | None = None
    ) -> None:
        self.cfg = models or ModelConfig()
        self.runtime = runtime or RuntimeConfig()
        torch.set_num_threads(self.cfg.threads or os.cpu_count() or 1)
        self.worker = None
        self.closed = False
        self._predictors: dict[str, HRADPredictor | None] = {}
        self._close = lambda: None
        t0 = time.perf_counter()
        # resolved once here, so the draft worker loads what this process reports
        self.cfg = replace(self.cfg, precision=target_precision(self.cfg, resolve(self.cfg.target, progress),
                                                                self.runtime.target_device))
        self.draft_precision = draft_precision(self.cfg, self.runtime.draft_device) if self.cfg.has_draft else None
        try:
            if self.runtime.parallel and self.cfg.has_draft:
                self._start_worker(progress)  # the worker loads the draft while we load the target
            self.target = load_model(self.cfg.target, self.cfg, progress, self.runtime.target_device)
            self.draft = None
            if self.cfg.has_draft:
                self.draft = load_model(self.cfg.draft, self.cfg, progress, self.runtime.draft_device,
                                        lazy=self.worker is not None, vocab_subset=self.cfg.draft_vocab,
                                        precision=self.draft_precision)
                check_compatible(self.target, self.draft)
            if self.worker is not None:
                self.worker.wait_ready()
                if self.worker.vocab_size != self.target.backend.vocab_size:
                    raise ModelError(f"the draft worker's model has {self.worker.vocab_size} token rows, the "
                                     f"target {self.target.backend.vocab_size}: choose a draft of the same family")
        except BaseException:
            self.close()
            raise
        self._load_wall_s = time.perf_counter() - t0
        self.tokenizer = self.target.tokenizer

    def _start_worker(self, progress: bool) -> None:
        from .runtime.lending import CoreLender, CoreOffer, lending_unavailable
        from .runtime.placement import worker_placements
        from .runtime.process import DraftWorker

        self.target_placement, draft_placement = worker_placements(self.runtime)
        folder = resolve(self.cfg.draft, progress)
        lender = offer = None
        if lending_unavailable(self.target_placement, draft_placement) is None:
            if self.runtime.lend_draft_cores:  # our helper on the draft's cores, for our linears
                lender = CoreLender(draft_placement.cores)
            if self.runtime.lend_target_cores:  # the worker's helper on our cores, for its linears
                offer = CoreOffer.create(self.target_placement.cores, wake=False)
        self.worker = DraftWorker(folder, replace(self.cfg, draft_precision=self.draft_precision), draft_placement,
                                  self.runtime.worker_timeout, lender, offer)
        self.worker.start()
        # Shut the worker down when the pipeline is closed, collected, or at interpreter exit.
        self._close = weakref.finalize(self, self.worker.close)

    def model_settings(self) -> dict:
        """The model configuration with the draft precision resolved (what a report should state)."""
        return {**asdict(self.cfg), "draft_precision": self.draft_precision}

    def weight_bytes(self) -> dict[str, int | None]:
        """Bytes of weights one forward of each model streams (the draft's as its worker loaded it)."""
        draft = None
        if self.worker is not None:
            draft = self.worker.weight_bytes
        elif self.draft is not None:
            draft = self.draft.backend.weight_bytes()
        return {"target": self.target.backend.weight_bytes(), "draft": draft}

    def precision_line(self) -> str:
        """e.g. ``int8 (draft int4)``."""
        draft = self.draft_precision or self.cfg.precision
        return self.cfg.precision + (f" (draft {draft})" if draft != self.cfg.precision else "")

    def close(self) -> None:
        """Stop the draft worker process, if any (idempotent). In-process engines stay usable."""
        self.closed = True
        self._close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def load_time_s(self) -> float:
        if self.worker is not None:  # the two models load concurrently
            return self._load_wall_s
        return self.target.load_time_s + (self.draft.load_time_s if self.draft else 0.0)

    def engine(self, name: str, spec: SpeculationConfig | None = None) -> Engine:
        cls = ENGINE_CLASSES.get(name)
        if cls is None:
            raise ConfigError(f"engine {name!r} is not available; choose one of {', '.join(ENGINE_CLASSES)}")
        if name == "ar":
            return cls(self.target.backend)
        if self.draft is None:
            raise ConfigError(f"engine {name!r} needs a draft model: pass --draft")
        if name == "sd":
            return cls(self.target.backend, self.draft.backend, spec)
        spec, predictor = self.speculation(spec if name == "specbranch" else replace(spec or SpeculationConfig(),
                                                                                      drafting="confidence"))
        if self.worker is not None:
            from .runtime.parallel import ParallelEngine

            if self.closed:
                raise SpecBranchError("this Pipeline was closed (its draft worker is stopped): create a new one")
            return ParallelEngine(name, self.target.backend, self.worker, self.runtime, self.target_placement, spec,
                                  predictor)
        return cls(self.target.backend, self.draft.backend, spec, predictor=predictor)

    def speculation(self, spec: SpeculationConfig | None) -> tuple[SpeculationConfig, HRADPredictor | None]:
        """Resolve ``drafting=auto`` (:func:`~.policy.resolve_drafting`: hybrid where a predictor
        exists for this pair) and load the predictor the drafting mode needs (once per file)."""
        spec = spec or SpeculationConfig()
        predictor = None
        if spec.drafting in ("auto", "hrad", "hybrid"):
            key = spec.hrad_predictor or "shipped"
            if key not in self._predictors:
                if spec.hrad_predictor:
                    self._predictors[key] = HRADPredictor.load(spec.hrad_predictor)
                else:
                    self._predictors[key] = find_shipped(self.target.name, self.draft.name)
            predictor = self._predictors[key]
            if predictor is not None:
                predictor.check_pair(self.target.name, self.draft.name, self.target_hidden_size)
        drafting = resolve_drafting(spec.drafting, predictor is not None)
        if drafting in ("hrad", "hybrid") and predictor is None:
            raise ConfigError(f"drafting {drafting!r} needs an H-RAD predictor and none is shipped for "
                              f"{self.target.name} + {self.draft.name}: train one (`specbranch train-hrad`) and "
                              "pass --hrad-predictor, or use --drafting confidence")
        if drafting not in ("hrad", "hybrid"):
            return replace(spec, drafting=drafting), None
        # the predictor's classes are buckets of gamma - 1 tokens for the gamma it was trained at
        return replace(spec, drafting=drafting, gamma=spec.gamma or predictor.cfg.gamma), predictor

    @property
    def target_hidden_size(self) -> int:
        return json.loads((self.target.folder / "config.json").read_text())["hidden_size"]

    def room(self, prompt_tokens: int) -> int:
        """How many new tokens fit in the KV cache after a prompt of this length. The 64 spare
        positions hold what a speculative round drafts beyond the last committed token."""
        return self.cfg.max_len - 64 - prompt_tokens

    def encode(self, prompt: str, chat_template: bool = True) -> list[int]:
        if chat_template:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ConfigError("the prompt is empty: pass some text")
        return ids

    def generate(
        self,
        prompt: str | list[int],
        gen: GenerationConfig | None = None,
        sampling: SamplingConfig | None = None,
        on_text: Callable[[str], None] | None = None,
        spec: SpeculationConfig | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate from a prompt (text, wrapped in the chat template if ``gen.chat_template``) or
        from token ids (used as they are). ``on_text`` gets text pieces, ``on_tokens`` the committed
        token ids of each round; ``should_stop`` is polled once per round to abandon generation."""
        gen, sampling = gen or GenerationConfig(), sampling or SamplingConfig()
        ids = self.encode(prompt, gen.chat_template) if isinstance(prompt, str) else list(prompt)
        if gen.max_new_tokens > self.room(len(ids)):
            raise ConfigError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({gen.max_new_tokens}) exceed the KV cache "
                f"({self.cfg.max_len} tokens): shorten the prompt, lower --max-new-tokens or raise --max-len"
            )
        return generate(
            self.engine(gen.engine, spec),
            ids,
            gen,
            sampling,
            eos_ids=self.tokenizer.eos_token_ids,
            decode=self.tokenizer.decode,
            on_text=on_text,
            on_tokens=on_tokens,
            should_stop=should_stop,
        )
