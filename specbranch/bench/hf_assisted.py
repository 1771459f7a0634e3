"""The peer baseline: transformers' own assisted generation (``generate(assistant_model=...)``) on
the same draft/target pair, so our speedups are compared with what users already have."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ..config import SamplingConfig


def load_hf(folder: Path, precision: str):
    """An ``AutoModelForCausalLM`` at ``precision``; int8 = torch dynamic quantization of every
    ``nn.Linear`` (FBGEMM, the fastest transformers path on these CPUs)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


class HFAssisted:
    def __init__(self, target_folder: Path, draft_folder: Path, precision: str, eos_ids: Sequence[int]) -> None:
        self.target = load_hf(target_folder, precision)
        self.draft = load_hf(draft_folder, precision)
        self.eos_ids = list(eos_ids)

    @torch.inference_mode()
    def generate(self, ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig) -> tuple[list[int], float]:
        """New tokens (EOS excluded) and wall seconds."""
        kwargs = dict(do_sample=False)
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)  # transformers samples from the global generator
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                          top_p=sampling.top_p)
        inputs = torch.tensor([list(ids)])
        t0 = time.perf_counter()
        out = self.target.generate(
            inputs, attention_mask=torch.ones_like(inputs), assistant_model=self.draft,
            max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0], **kwargs,
        )
        wall = time.perf_counter() - t0
        new = out[0, inputs.shape[1]:].tolist()
        for i, tok in enumerate(new):
            if tok in self.eos_ids:
                return new[:i], wall
        return new, wall
