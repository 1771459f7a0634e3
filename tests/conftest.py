"""Shared fixtures: tiny random Llama / Qwen2 checkpoints built in-process (no downloads)."""

from __future__ import annotations

import math
import os
from collections import Counter
from contextlib import contextmanager

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


def perturbed(model, seed: int, scale: float):
    """A copy of ``model`` with noise on every matrix: a draft that mostly agrees with its target."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * p.std())
    return draft


@pytest.fixture(params=["llama", "qwen2"])
def tiny_folder(request, tmp_path):
    """(model_type, folder, hf_model) for a saved tiny checkpoint."""
    model = make_tiny_hf(request.param, tie=request.param == "qwen2")
    folder = tmp_path / request.param
    model.save_pretrained(folder)
    return request.param, folder, model


def write_tiny_tokenizer(folder, vocab_size: int = 300, eos: str = "<|end|>") -> None:
    """A byte-level BPE tokenizer trained on a few sentences, plus a chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["def add(a, b):\n    return a + b\n", "Hello world, speculative decoding is lossless."] * 20
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": eos}))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Folders of a tiny Qwen2 target and a smaller Qwen2 draft sharing one tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    paths = {}
    for role, seed, layers in (("target", 1, 3), ("draft", 2, 1)):
        model = make_tiny_hf("qwen2", seed=seed, tie=True, vocab_size=300, num_hidden_layers=layers)
        model.save_pretrained(root / role)
        write_tiny_tokenizer(root / role)
        paths[role] = root / role
    return paths


# ---------------------------------------------------------------- statistics shared by the Monte Carlo tests


def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of chi-square (Wilson-Hilferty; plenty accurate at the 1e-6 level we test)."""
    h = 2.0 / (9.0 * df)
    z = ((stat / df) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def assert_matches(counts: Counter, expected: dict, draws: int, alpha: float = 1e-6) -> None:
    """Chi-square goodness of fit; a sample in a zero-probability cell fails outright."""
    impossible = [c for c in counts if expected.get(c, 0.0) <= 0.0]
    assert not impossible, f"sampled impossible outcomes {impossible}"
    cells = [c for c, e in expected.items() if e > 0]
    stat = sum((counts.get(c, 0) - draws * expected[c]) ** 2 / (draws * expected[c]) for c in cells)
    assert len(cells) == 1 or chi2_pvalue(stat, len(cells) - 1) > alpha, (stat, len(cells) - 1)


@pytest.fixture(scope="session")
def close_pair(tmp_path_factory):
    """A tiny target and a perturbed copy as its draft (they mostly agree, so blocks are accepted
    and branches are hit), saved with one tokenizer; run in fp64 so argmax ties cannot flip."""
    from specbranch.config import ModelConfig

    root = tmp_path_factory.mktemp("close_pair")
    target = make_tiny_hf("qwen2", seed=5, tie=True, vocab_size=300, num_hidden_layers=2)
    for role, model in (("target", target), ("draft", perturbed(target, seed=6, scale=0.05))):
        model.save_pretrained(root / role)
        write_tiny_tokenizer(root / role)
    # one thread: tiny models gain nothing from more, and a busy 2-core machine makes a second
    # thread spin (the parallel runtime pins itself to one thread per worker anyway)
    return ModelConfig(target=str(root / "target"), draft=str(root / "draft"), precision="fp64", max_len=512, threads=1)


@contextmanager
def torch_threads(n: int):
    """torch (and the kernels' OpenMP) on ``n`` threads for the block, then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def switched_off(cls):
    """``cls.ENABLED = False`` for the block (a fast path's switch: models/fused.py), then on again."""
    cls.ENABLED = False
    try:
        yield
    finally:
        cls.ENABLED = True
