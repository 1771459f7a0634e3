"""The Backend protocol over a Hugging Face ``transformers`` causal LM.

Slower than the native decoder (per-layer Python overhead, a cache that grows by
concatenation, forks that copy the prefix), but it runs any architecture transformers knows and
is the reference the native decoder is tested against.
"""

from __future__ import annotations

import torch

from .models.decoder import ForwardOutput


class HFBackend:
    def __init__(self, model) -> None:
        from transformers import DynamicCache

        self.model = model.eval()
        self._cache_cls = DynamicCache
        self.vocab_size = model.config.vocab_size
        self.reset()

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        self.cache = self._cache_cls(config=self.model.config)
        self._length = 0
        self._rows = 1
        self._trunk = 0  # trunk length at the last fork

    def weight_bytes(self) -> int:
        """Every parameter once, but the input embedding only as the one row a token looks up, unless it is
        also the output head (tied), which reads all of it: what the native decoder counts."""
        emb = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied tensors once
        row = emb.shape[1] * emb.element_size()
        return total + row if head is not None and head.weight is emb else total - emb.shape[0] * row + row

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    @torch.inference_mode()
    def embed(self, token: int) -> torch.Tensor:
        return self.model.get_input_embeddings().weight[token]

    @torch.inference_mode()
    def forward(self, tokens, hidden_layers=(), last_only=False) -> ForwardOutput:
        rows, t = tokens.shape
        if rows != self._rows:
            raise ValueError(f"forward got {rows} rows but the cache expects {self._rows}")
        tokens = tokens.to(self.model.device)
        positions = torch.arange(self._length, self._length + t, device=tokens.device).expand(rows, t)
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=bool(hidden_layers),
        )
        self._length += t
        logits = out.logits[:, -1:] if last_only else out.logits
        hidden = torch.stack([out.hidden_states[i] for i in hidden_layers]) if hidden_layers else None
        return ForwardOutput(logits=logits, hidden=hidden)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self._length} positions")
        if self._rows > 1 and length < self._trunk:  # cutting into the shared prefix drops branches
            self.select(0)
        for layer in self._layers():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
        self._length = length

    def fork(self, k: int) -> None:
        if self._rows > 1:
            raise RuntimeError("cache is already forked; select() a branch first")
        for layer in self._layers():  # the HF cache has no shared prefix: copy it k times
            layer.keys = layer.keys.repeat_interleave(k, dim=0)
            layer.values = layer.values.repeat_interleave(k, dim=0)
        self._rows, self._trunk = k, self._length

    def select(self, b: int) -> None:
        if not 0 <= b < self._rows:
            raise ValueError(f"select({b}): cache has {self._rows} branches")
        for layer in self._layers():
            layer.keys = layer.keys[b : b + 1]
            layer.values = layer.values[b : b + 1]
        self._rows = 1
