"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into the native decoder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelError
from .decoder import Decoder, DecoderConfig
from .linear import PRECISIONS


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a model folder: config.json is missing")
    return json.loads(path.read_text())


class LazyWeights:
    """Name -> tensor lookup over one or more safetensors shards, reading each tensor on demand
    (so peak memory is one model's weights at the target precision, not two copies)."""

    def __init__(self, folder: Path) -> None:
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise ModelError(f"no *.safetensors weights in {folder}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def __call__(self, name: str) -> torch.Tensor | None:
        h = self._where.get(name)
        return None if h is None else h.get_tensor(name).float()


def load_decoder(folder: str | Path, precision: str = "fp32") -> Decoder:
    """Build the native decoder from a Hugging Face style folder at ``precision``."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    folder = Path(folder)
    cfg = DecoderConfig.from_hf(read_config(folder))
    weights = LazyWeights(folder)
    missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if weights(n) is None]
    if missing:
        raise ModelError(f"{folder}: weights {missing} not found (is this a Llama/Qwen2 checkpoint?)")
    return Decoder(cfg, weights, precision)
