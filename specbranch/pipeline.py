"""The Python API: load a target (and draft) once, then generate text with any engine.

    from specbranch import Pipeline
    pipe = Pipeline()                        # default Qwen2.5-Coder 1.5B target + 0.5B draft
    result = pipe.generate("Write a Python function that reverses a string.")
    print(result.text, result.metrics.tokens_per_s)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .backend import Backend, NativeBackend
from .config import GenerationConfig, ModelConfig, SamplingConfig, SpeculationConfig
from .engines import ENGINE_CLASSES, Engine, GenerationResult, generate
from .errors import ConfigError, ModelError
from .models.linear import subset_head
from .models.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    name: str
    folder: Path
    backend: Backend
    tokenizer: Tokenizer
    load_time_s: float


def resolve(spec: str, progress: bool = True) -> Path:
    """A registry name, a Hugging Face folder or a .gguf file -> a converted model folder."""
    from .models.registry import resolve_model

    return resolve_model(spec, progress=progress)


def load_model(spec: str, cfg: ModelConfig, progress: bool = True, vocab_subset: int = 0) -> LoadedModel:
    """Load one model; ``vocab_subset > 0`` restricts its LM head to that many of the most frequent
    tokens plus the special ones (for the draft only: see :class:`~.models.linear.VocabSubsetHead`)."""
    folder = resolve(spec, progress)
    t0 = time.perf_counter()
    tokenizer = Tokenizer(folder)
    if cfg.backend == "hf":
        from transformers import AutoModelForCausalLM

        from .backend_hf import HFBackend

        dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(cfg.precision, torch.float32)
        backend: Backend = HFBackend(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
    else:
        from .models.loader import load_decoder

        decoder = load_decoder(folder, cfg.precision)
        if 0 < vocab_subset < decoder.cfg.vocab_size:
            ids = torch.tensor(sorted(set(range(vocab_subset)) | set(tokenizer.special_ids)))
            decoder.lm_head = subset_head(decoder.lm_head, ids[ids < decoder.cfg.vocab_size], decoder.cfg.vocab_size)
        backend = NativeBackend(decoder, max_len=cfg.max_len)
    return LoadedModel(spec, folder, backend, tokenizer, time.perf_counter() - t0)


def check_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    if target.backend.vocab_size != draft.backend.vocab_size or target.tokenizer.vocab_size != draft.tokenizer.vocab_size:
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

    def __init__(self, models: ModelConfig | None = None, progress: bool = True) -> None:
        self.cfg = models or ModelConfig()
        torch.set_num_threads(self.cfg.threads or os.cpu_count() or 1)
        self.target = load_model(self.cfg.target, self.cfg, progress)
        self.draft = load_model(self.cfg.draft, self.cfg, progress, self.cfg.draft_vocab) if self.cfg.has_draft else None
        if self.draft is not None:
            check_compatible(self.target, self.draft)
        self.tokenizer = self.target.tokenizer

    @property
    def load_time_s(self) -> float:
        return self.target.load_time_s + (self.draft.load_time_s if self.draft else 0.0)

    def engine(self, name: str, spec: SpeculationConfig | None = None) -> Engine:
        cls = ENGINE_CLASSES.get(name)
        if cls is None:
            raise ConfigError(f"engine {name!r} is not available; choose one of {', '.join(ENGINE_CLASSES)}")
        if name == "ar":
            return cls(self.target.backend)
        if self.draft is None:
            raise ConfigError(f"engine {name!r} needs a draft model: pass --draft")
        return cls(self.target.backend, self.draft.backend, spec)

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
