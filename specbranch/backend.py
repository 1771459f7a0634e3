"""One protocol over a model: prefill, forward, rollback, fork, select.

Engines only talk to this protocol, so the native decoder (fast path) and a Hugging Face
``transformers`` model (any ``AutoModelForCausalLM``; also the numerical oracle in tests) are
interchangeable.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from .models.decoder import Decoder, ForwardOutput
from .models.linear import VocabSubsetHead
from .kvcache import KVCache


@runtime_checkable
class Backend(Protocol):
    vocab_size: int

    @property
    def length(self) -> int:
        """Positions in the cache (trunk plus branch suffix)."""

    def reset(self) -> None: ...

    def forward(
        self, tokens: torch.Tensor, hidden_layers: tuple[int, ...] = (), last_only: bool = False
    ) -> ForwardOutput:
        """Run ``tokens [rows, t]`` after the cached positions; rows = branches when forked."""

    def truncate(self, length: int) -> None: ...

    def fork(self, k: int) -> None: ...

    def embed(self, token: int) -> torch.Tensor:
        """The model's input embedding of ``token`` ``[H]`` (an H-RAD feature)."""

    def select(self, b: int) -> None: ...

    def weight_bytes(self) -> int:
        """Bytes of weights one forward streams from memory: on a CPU the cost of a decode step."""


def prefill(backend: Backend, tokens: Sequence[int], hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
    """Reset the cache and run the prompt; returns the last position's output only."""
    backend.reset()
    return backend.forward(torch.tensor([list(tokens)]), hidden_layers=hidden_layers, last_only=True)


def rollback(backend: Backend, n: int) -> None:
    """Drop the last ``n`` cached positions."""
    backend.truncate(backend.length - n)


class NativeBackend:
    """The native decoder with its preallocated, branchable KV cache."""

    def __init__(self, decoder: Decoder, max_len: int = 4096, max_branches: int = 8, max_branch_len: int = 32):
        self.decoder = decoder
        self.vocab_size = decoder.cfg.vocab_size
        self.cache: KVCache = decoder.new_cache(max_len, max_branches, max_branch_len)

    @property
    def length(self) -> int:
        return self.cache.total_length

    def reset(self) -> None:
        self.cache.reset()
        if isinstance(self.decoder.lm_head, VocabSubsetHead):
            self.decoder.lm_head.clear()

    def forward(self, tokens, hidden_layers=(), last_only=False) -> ForwardOutput:
        # A reduced head (a draft's) scores every token of its context since reset: a token the target copies from
        # the prompt, or emitted once already, can then be proposed (VocabSubsetHead explains why)
        if isinstance(self.decoder.lm_head, VocabSubsetHead):
            self.decoder.lm_head.admit(tokens.flatten().tolist())
        return self.decoder.forward(tokens, self.cache, hidden_layers, last_only)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    def embed(self, token: int) -> torch.Tensor:
        return self.decoder.embed[token]

    def fork(self, k: int) -> None:
        self.cache.fork(k)

    def select(self, b: int) -> None:
        self.cache.select(b)

    def weight_bytes(self) -> int:
        return self.decoder.read_bytes()
