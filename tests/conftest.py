"""Shared fixtures: tiny random Llama / Qwen2 checkpoints built in-process (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def make_tiny_hf(model_type: str, seed: int = 0, tie: bool = False, dtype=torch.float32, **overrides):
    """A tiny random transformers model of the given family, weights scaled up a little so the
    logits are not all near zero (argmax ties would make greedy tests meaningless)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[model_type]
    cfg = cls_cfg(**{**TINY, **overrides}, tie_word_embeddings=tie, rope_theta=10000.0)
    model = cls_model(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in name:
                p.normal_(0.0, 0.15 if p.dim() == 2 else 0.05)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def tiny_folder(request, tmp_path):
    """(model_type, folder, hf_model) for a saved tiny checkpoint."""
    model = make_tiny_hf(request.param, tie=request.param == "qwen2")
    folder = tmp_path / request.param
    model.save_pretrained(folder)
    return request.param, folder, model
