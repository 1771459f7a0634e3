"""The int4 draft's decode step: each layer in one foreign call (``kernels/q4_layer.c``).

Why: a 1-row step of the 0.5B int4 draft took 24 ms on one core, of which its int4 linears were 10 ms.
Most of the rest was the ~50 small torch ops per layer around them (norms, rope, SwiGLU, residual adds,
KV cache writes, attention, each linear's wrapper), each costing microseconds whatever its size.
:class:`Int4Block` hands the whole layer, KV cache included, to one C call.

Draft only, like the int4 weights: the draft's numbers never decide what is emitted, so its float sums
need not match the torch path's bit for bit (they agree to float rounding; tests check that, and that
rows are independent of their batch and of the thread count).
"""

from __future__ import annotations

import ctypes
import math

import torch

from ..kvcache import KVCache
from .linear import Int4Linear, _kernel_linear

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class LayerWeights(ctypes.Structure):
    """``q4_layer`` in q4_layer.c: one layer's shapes and weight addresses."""

    _fields_ = [(n, _i64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter")] + [
        ("eps", _f32), ("scale", _f32), ("ln_attn", _p), ("ln_mlp", _p),
        ("w_qkv", _p), ("d_qkv", _p), ("b_qkv", _p), ("w_o", _p), ("d_o", _p), ("b_o", _p),
        ("w_gu", _p), ("d_gu", _p), ("w_d", _p), ("d_d", _p)]


class CacheStep(ctypes.Structure):
    """``q4_cache`` in q4_layer.c: where a layer's keys and values live and how many are live."""

    _fields_ = [(n, _p) for n in ("k", "v", "bk", "bv")] + [
        (n, _i64) for n in ("max_len", "trunk_len", "max_branch_len", "branch_len", "branches")]


class Int4Block:
    """A layer whose four linears are all :class:`Int4Linear`, run by the fused kernel for steps of up to
    :attr:`MAX_ROWS` tokens (rows x t); :meth:`of` gives None for any other layer."""

    MAX_ROWS = Int4Linear.MAX_ROWS
    ENABLED = True  # tests set False to compare with the torch path

    def __init__(self, layer, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> None:
        self.layer = layer  # keeps the weights, whose addresses the kernel holds, alive
        self.lib = layer.qkv.lib
        self.ln = layer.ln_attn.float().contiguous(), layer.ln_mlp.float().contiguous()
        qkv, o, gu, down = layer.qkv, layer.o, layer.gate_up, layer.down
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.weights = LayerWeights(
            o.out_features, num_heads, num_kv_heads, head_dim, down.in_features, eps, 1.0 / math.sqrt(head_dim),
            ptr(self.ln[0]), ptr(self.ln[1]), ptr(qkv.packed), ptr(qkv.scales), ptr(qkv.bias),
            ptr(o.packed), ptr(o.scales), ptr(o.bias), ptr(gu.packed), ptr(gu.scales), ptr(down.packed), ptr(down.scales))

    @classmethod
    def of(cls, layer, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> "Int4Block | None":
        if not all(isinstance(lin, Int4Linear) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            return None
        if layer.gate_up.bias is not None or layer.down.bias is not None or head_dim % 8:
            return None  # the kernel has no MLP biases (Qwen2 and Llama have none) and reads heads 8 floats at a time
        return cls(layer, num_heads, num_kv_heads, head_dim, eps)

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
        """Layer ``i`` on ``h [rows, t, H]`` (``cos``/``sin [t, D]``: the step's positions, after ``cache.advance``)
        -> ``[rows, t, H]``, with the step's keys and values written into ``cache``."""
        rows, t, hidden = h.shape
        k, v, bk, bv = cache.layer_buffers(i)
        where = CacheStep(k.data_ptr(), v.data_ptr(), bk.data_ptr(), bv.data_ptr(), cache.max_len, cache.length,
                          cache.max_branch_len, cache.branch_length, cache.num_branches)
        cos, sin = cos.contiguous(), sin.contiguous()
        return _kernel_linear("fused int4 layer", h, rows * t, hidden, self.MAX_ROWS, lambda x, y: self.lib.q4_layer_step(
            ctypes.byref(self.weights), x, rows, t, cos.data_ptr(), sin.data_ptr(), ctypes.byref(where), y))
