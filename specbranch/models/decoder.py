"""A native decoder-only transformer for the Llama / Qwen2 / Mistral family.

RMSNorm, rotary embeddings (Hugging Face "rotate half" layout), grouped-query attention with
optional q/k/v biases (Qwen2), SwiGLU MLP, tied or untied LM head. No nn.Module machinery on the
hot path: weights live in plain linear objects (see :mod:`specbranch.models.linear`), q/k/v and
gate/up are fused into one matmul each, and the KV cache is the position-indexed one of
:mod:`specbranch.kvcache`, so a decode step is a short, fixed sequence of tensor ops per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..kvcache import CacheView, KVCache
from .fused import FusedLayer, FusedRun, NativeOps
from .linear import CPU_ONLY, activation_dtype, make_linear

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class DecoderConfig:
    """The architecture numbers of one checkpoint (read from a Hugging Face config.json)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "DecoderConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"unsupported model_type {model_type!r}: the native backend runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}; use --backend hf for other architectures"
            )
        rope_scaling = cfg.get("rope_scaling") or {}
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind not in ("default", None):
            raise ModelError(f"rope_scaling type {kind!r} is not supported by the native backend yet")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = cfg.get("rope_parameters") or {}
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral say so in attention_bias.
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        )


@dataclass
class ForwardOutput:
    """logits ``[rows, t, vocab]`` (or ``[rows, 1, vocab]`` with last_only); hidden
    ``[n_layers, rows, t, hidden]`` for the requested layers (None if none asked)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's "rotate half" layout, ``x * cos + rotate_half(x) * sin``
    with ``rotate_half(x) = cat(-x2, x1)``. Here the minus sign lives in ``signed_sin`` (first half
    negated), so rotate_half is one ``roll``: two ops fewer per call, and bit-identical, since
    ``(-a) * b == a * (-b)`` exactly."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def causal_mask(t: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask ``[t, length]`` for t new queries that are the last t of ``length`` keys."""
    return torch.full((t, length), float("-inf"), dtype=dtype, device=device).triu(length - t + 1)


def _stacked(a: torch.Tensor) -> torch.Tensor:
    """``[rows, Hkv, n, X] -> [1, Hkv, rows*n, X]``: every branch row's queries become extra query
    rows of one batch, so the shared trunk is multiplied once instead of being expanded (copied)
    per row."""
    rows, hkv, n, x = a.shape
    return a.transpose(0, 1).reshape(1, hkv, rows * n, x)


def _unstacked(s: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of :func:`_stacked`: ``[1, Hkv, rows*n, X] -> [rows, Hkv, n, X]``."""
    _, hkv, m, x = s.shape
    return s.view(hkv, rows, m // rows, x).transpose(0, 1)


EXACT_ROWS = 32  # forwards up to this long (verification) attend query by query, see attend; a prompt runs once,
# the same way for every engine, so it keeps the one fused call


def attend(q: torch.Tensor, view: CacheView, scale: float) -> torch.Tensor:
    """Grouped-query attention of ``q [rows, Hq, t, D]`` over the cache view -> ``[rows, Hq, t, D]``.

    Not forked (rows == 1): one segment, the trunk, whose last t keys are the new tokens
    (causal among themselves). Forked: the trunk is fully visible to every branch row and the
    branch suffix is causal. Query heads sharing a kv head are folded into the query axis
    (``g*t`` rows), so grouped-query attention needs no repeated keys.
    """
    rows, hq, t, d = q.shape
    hkv = view.trunk_k.shape[1]
    g = hq // hkv
    trunk_len = view.trunk_k.shape[2]
    if view.branch_k is None and 1 < t <= EXACT_ROWS:
        # Query i sees exactly its own trunk_len - t + i + 1 keys, through the same kernels (same
        # shapes, same reduction lengths) as when it is decoded alone: verifying a block then gives
        # bit-identical logits to decoding it token by token. One call for all t queries does not:
        # BLAS picks kernels by shape and the softmax / p @ V reductions run over the padded length,
        # which rounds differently (seen as late greedy divergences from ar on real prompts).
        return torch.cat([attend(q[:, :, i : i + 1], CacheView(view.trunk_k[:, :, : trunk_len - t + i + 1],
                                                                 view.trunk_v[:, :, : trunk_len - t + i + 1], None, None),
                                 scale) for i in range(t)], dim=2)
    qg = q.reshape(rows, hkv, g * t, d)  # [rows, Hkv, g*t, D]
    if view.branch_k is None:
        s = (qg @ view.trunk_k.transpose(-1, -2)).view(1, hkv, g, t, trunk_len) * scale
        if t > 1:
            s = s + causal_mask(t, trunk_len, s.dtype, s.device)
        p = torch.softmax(s, dim=-1).view(1, hkv, g * t, trunk_len)
        return (p @ view.trunk_v).view(1, hq, t, d)
    branch_len = view.branch_k.shape[2]
    s_trunk = _unstacked(_stacked(qg) @ view.trunk_k.transpose(-1, -2), rows)  # [rows, Hkv, g*t, Lt]
    s_branch = qg @ view.branch_k.transpose(-1, -2)  # [rows, Hkv, g*t, Lb]
    s = torch.cat([s_trunk, s_branch], dim=-1).view(rows, hkv, g, t, trunk_len + branch_len) * scale
    s[..., trunk_len:] += causal_mask(t, branch_len, s.dtype, s.device)
    p = torch.softmax(s, dim=-1).view(rows, hkv, g * t, trunk_len + branch_len)
    out = _unstacked(_stacked(p[..., :trunk_len]) @ view.trunk_v, rows) + p[..., trunk_len:] @ view.branch_v
    return out.reshape(rows, hq, t, d)


LinearFactory = Callable[[str, Callable[[], torch.Tensor], "torch.Tensor | None"], Any]


class Layer:
    """One pre-norm transformer block; weights only, state lives in the KV cache."""

    def __init__(self, cfg: DecoderConfig, get: Callable[[str], torch.Tensor | None], i: int, dtype, lin: LinearFactory):
        p = f"model.layers.{i}."
        att = p + "self_attn."
        # q/k/v and gate/up are fused: one matmul each instead of three / two per token
        qkv_b = torch.cat([get(att + f"{n}_proj.bias") for n in "qkv"]) if cfg.attention_bias else None
        self.qkv = lin(f"layers.{i}.qkv", lambda: torch.cat([get(att + f"{n}_proj.weight") for n in "qkv"]), qkv_b)
        self.o = lin(f"layers.{i}.o", lambda: get(att + "o_proj.weight"), get(att + "o_proj.bias"))
        self.gate_up = lin(
            f"layers.{i}.gate_up",
            lambda: torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
            None,
        )
        self.down = lin(f"layers.{i}.down", lambda: get(p + "mlp.down_proj.weight"), None)
        self.ln_attn = get(p + "input_layernorm.weight").to(dtype).contiguous()
        self.ln_mlp = get(p + "post_attention_layernorm.weight").to(dtype).contiguous()
        self.block: FusedLayer | None = None  # the whole layer in one C call, for decode steps (fuse_layers)

    def linears(self, i: int) -> dict[str, Any]:
        return {f"layers.{i}.{n}": getattr(self, n) for n in ("qkv", "o", "gate_up", "down")}


class Decoder:
    """Weights plus the forward pass; the KV cache is passed in so several can be kept."""

    def __init__(
        self,
        cfg: DecoderConfig,
        state: Mapping[str, torch.Tensor] | Callable,
        precision: str = "fp32",
        lin: LinearFactory | None = None,
    ):
        """``state`` maps Hugging Face tensor names to weights; ``lin(name, weight_fn, bias)``
        builds each linear layer (default: from the float weight at ``precision``; the loader
        passes one that serves stored int8 weights instead)."""
        get = state if callable(state) else state.get
        lin = lin or (lambda name, weight_fn, bias: make_linear(weight_fn(), bias, precision))
        self.cfg = cfg
        self.precision = precision
        self.dtype = activation_dtype(precision)
        self.embed = get("model.embed_tokens.weight").to(self.dtype)
        self.layers = [Layer(cfg, get, i, self.dtype, lin) for i in range(cfg.num_layers)]
        self.norm = get("model.norm.weight").to(self.dtype).contiguous()
        head = (lambda: self.embed) if cfg.tie_word_embeddings else (lambda: get("lm_head.weight"))
        self.lm_head = lin("lm_head", head, None)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self._rope_len = 0
        self._cos = self._signed_sin = torch.empty(0)
        self.device = torch.device("cpu")
        self.native = NativeOps.of(cfg, self.dtype, self.device)  # the C path between the linears, or None
        self.runs: list[tuple[int, int, FusedRun | None]] = []  # layers [first, end) and their fused run (_plan)
        self._plan()

    def to(self, device: str | torch.device) -> "Decoder":
        """Move the weights to ``device`` (dense precisions only: the int8 kernel is FBGEMM's, CPU only)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if self.precision in CPU_ONLY:
            raise ModelError(f"{self.precision} weights run on the CPU only: use precision bf16 or fp32 on {device}")
        tied = self.lm_head.weight is self.embed  # fp32 tied head: one tensor, keep it shared
        self.embed = self.embed.to(device)
        self.norm = self.norm.to(device)
        for layer in self.layers:
            layer.ln_attn, layer.ln_mlp = layer.ln_attn.to(device), layer.ln_mlp.to(device)
        for lin in self.linears().values():
            if not (tied and lin is self.lm_head):
                lin.to(device)
        if tied:
            self.lm_head.weight = self.embed
        self._rope_len = 0  # rebuilt on the new device
        self.device = device
        self.native = NativeOps.of(self.cfg, self.dtype, device)
        return self

    def linears(self) -> dict[str, Any]:
        """Every linear layer by a stable name (what the int8 cache stores)."""
        out = {"lm_head": self.lm_head}
        for i, layer in enumerate(self.layers):
            out.update(layer.linears(i))
        return out

    def read_bytes(self) -> int:
        """Bytes one forward must read from memory whatever its row count: every linear's weights (int4 or
        int8 + scales, or dense) and the norms; the embedding table contributes one row per token."""
        total = self.embed.shape[1] * self.embed.element_size() + self.norm.numel() * self.norm.element_size()
        total += sum(lin.read_bytes() for lin in self.linears().values())
        for layer in self.layers:
            total += (layer.ln_attn.numel() + layer.ln_mlp.numel()) * layer.ln_attn.element_size()
        return total

    def set_linear(self, name: str, linear: Any) -> None:
        """Replace the linear layer called ``name`` in :meth:`linears` (e.g. with its int4 version)."""
        if name == "lm_head":
            self.lm_head = linear
            return
        _, i, attr = name.split(".")
        setattr(self.layers[int(i)], attr, linear)
        self.layers[int(i)].block = None  # its linears changed: fuse_layers decides again
        self._plan()

    def fuse_layers(self) -> None:
        """Give every layer whose linears are all int4, or all int8 with the native kernel's weights, its fused
        decode step (:class:`FusedLayer`); consecutive ones of a kind run in one C call (:class:`FusedRun`)."""
        for layer in self.layers:
            layer.block = FusedLayer.of(layer, self.cfg)
        self._plan()

    def _plan(self) -> None:
        """Split the layers into runs: consecutive fused layers of one kind, and the unfused ones between them."""
        self.runs, first = [], 0
        kind = lambda i: None if self.layers[i].block is None else self.layers[i].block.int8  # noqa: E731
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or kind(i) != kind(first):
                blocks = [layer.block for layer in self.layers[first:i]]
                self.runs.append((first, i, None if blocks[0] is None else FusedRun(blocks, first)))
                first = i

    def new_cache(self, max_len: int, max_branches: int = 4, max_branch_len: int = 32) -> KVCache:
        c = self.cfg
        return KVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, max_len, max_branches, max_branch_len, self.dtype, self.device
        )

    def _rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see :func:`rope`) ``[t, head_dim]`` for positions ``start .. start+t-1``
        (table grown on demand)."""
        need = start + t
        if need > self._rope_len:
            n = max(need, 2 * self._rope_len, 1024)
            d = self.cfg.head_dim
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv)  # [n, d/2]
            emb = torch.cat([freqs, freqs], dim=-1)  # [n, d]
            sin = emb.sin()
            sin[:, : d // 2] *= -1
            self._cos, self._signed_sin = emb.cos().to(self.device, self.dtype), sin.to(self.device, self.dtype)
            self._rope_len = n
        return self._cos[start:need], self._signed_sin[start:need]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        hidden_layers: tuple[int, ...] = (),
        last_only: bool = False,
    ) -> ForwardOutput:
        """Run ``tokens [rows, t]`` at the cache's next positions; rows = number of branches
        when the cache is forked, else 1. ``hidden_layers`` are indices into the per-layer
        outputs (0 = embeddings, num_layers = final pre-norm output, negatives allowed)."""
        c = self.cfg
        hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        rows, t = tokens.shape
        if rows != cache.rows():
            raise ValueError(f"forward got {rows} rows but the cache expects {cache.rows()}")
        start = cache.total_length
        cache.advance(t)
        cos, sin = self._rope(start, t)
        h = self.embed[tokens.to(self.device)]  # [rows, t, H]
        want = {i % (c.num_layers + 1) for i in hidden_layers}
        kept = [h] if 0 in want else []
        ops = self.native if NativeOps.ENABLED else None
        step_rows = rows * t if FusedLayer.ENABLED and ops is not None else 0  # activation rows (0: none fused)
        for first, end, run in self.runs:
            if run is not None and 0 < step_rows <= run.max_rows():  # decode steps, not prompts
                # the whole run in one foreign call (models/fused.py)
                h, outs = run.step(h, cos, sin, cache, tuple(i - first for i in range(first, end) if i + 1 in want))
                kept += outs
                continue
            for i in range(first, end):
                layer = self.layers[i]
                if ops is not None:  # float32 on the CPU: everything between the linears in C (models/fused.py)
                    qkv = layer.qkv(ops.norm(h, layer.ln_attn))  # [rows, t, (Hq + 2 Hkv) D]
                    h1, m = ops.norm(layer.o(ops.attention(qkv, cos, sin, cache, i)), layer.ln_mlp, res=h)
                    h = layer.down(ops.silu_mul(layer.gate_up(m))).add_(h1)
                else:
                    a = rms_norm(h, layer.ln_attn, c.rms_norm_eps)
                    qkv = layer.qkv(a).view(rows, t, hq + 2 * hkv, d).transpose(1, 2)  # [rows, Hq + 2 Hkv, t, D]
                    q, k = rope(qkv[:, : hq + hkv], cos, sin).split([hq, hkv], 1)  # q and k rotated in one go
                    v = qkv[:, hq + hkv :]  # [rows, Hkv, t, D]
                    o = attend(q, cache.write(i, k, v), self.scale)  # [rows, Hq, t, D]
                    h = h + layer.o(o.transpose(1, 2).reshape(rows, t, hq * d))
                    m = rms_norm(h, layer.ln_mlp, c.rms_norm_eps)
                    gate, up = layer.gate_up(m).chunk(2, dim=-1)  # [rows, t, I] each
                    h = h + layer.down(F.silu(gate) * up)
                if i + 1 in want:
                    kept.append(h)
        x = h[:, -1:] if last_only else h
        x = rms_norm(x, self.norm, c.rms_norm_eps) if ops is None else ops.norm(x.contiguous(), self.norm)
        logits = self.lm_head(x)
        hidden = torch.stack(kept) if kept else None
        return ForwardOutput(logits=logits, hidden=hidden)
