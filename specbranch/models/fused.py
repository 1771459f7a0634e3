"""A layer's work between its linears in C (``kernels/layer.c``): :class:`NativeOps` for every float32 CPU
forward, :class:`Int4Block` for the int4 draft's decode steps (the whole layer, linears included).

Why NativeOps: in torch, the norms, rope, KV cache writes, attention and SwiGLU of one layer are about fifty
small ops, each costing microseconds whatever its size, and attention ran one query at a time to stay
batch-invariant. On the 1.5B target, verifying 8 tokens spent 25 of its 105 ms there (one core, Zen 4).
NativeOps does them in four C calls per layer, computing every row and every (token, head) on its own in one
fixed order: a token's numbers do not depend on how many tokens came with it or on the thread count, so a
verified block gives exactly the tokens decoding it one by one gives. The sums are ordered differently from
torch's, so a decoder takes this path for all of its forwards or for none.

Why Int4Block: a 1-row step of the 0.5B int4 draft took 24 ms on one core, of which its int4 linears were 10 ms;
the small ops around them were most of the rest. :class:`Int4Block` hands the whole layer, linears and KV cache
included, to one C call; even against NativeOps' eight calls per layer it is 1.10-1.13x faster per 1-row step
(1.07-1.11x at 3 branch rows). Draft only, like the int4 weights: the draft's numbers never decide what is
emitted, so its sums need not match the unfused path's bit for bit (they agree to float rounding; tests check
that, and that rows are independent of their batch and of the thread count).
"""

from __future__ import annotations

import ctypes
import math

import torch

from ..kvcache import KVCache
from ..kernels import optional_library
from .linear import Int4Linear, _kernel_linear

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def fits_vectors(cfg) -> bool:
    """Whether layer.c can run a layer of ``cfg``: it reads rows, MLP activations and heads 8 floats at a time."""
    return not (cfg.hidden_size % 8 or cfg.intermediate_size % 8 or cfg.head_dim % 8)


class LayerShape(ctypes.Structure):
    """``layer_shape`` in layer.c."""

    _fields_ = [(n, _i64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter")] + [
        ("eps", _f32), ("scale", _f32)]

    @classmethod
    def of(cls, cfg) -> "LayerShape":
        """From a :class:`~specbranch.models.decoder.DecoderConfig`."""
        return cls(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                   cfg.rms_norm_eps, 1.0 / math.sqrt(cfg.head_dim))


class LayerWeights(ctypes.Structure):
    """``q4_layer`` in layer.c: an int4 layer's shape and weight addresses."""

    _fields_ = [("shape", LayerShape), ("ln_attn", _p), ("ln_mlp", _p),
                ("w_qkv", _p), ("d_qkv", _p), ("b_qkv", _p), ("w_o", _p), ("d_o", _p), ("b_o", _p),
                ("w_gu", _p), ("d_gu", _p), ("w_d", _p), ("d_d", _p)]


class CacheStep(ctypes.Structure):
    """``kv_step`` in layer.c: where a layer's keys and values live and how many are live."""

    _fields_ = [(n, _p) for n in ("k", "v", "bk", "bv")] + [
        (n, _i64) for n in ("max_len", "trunk_len", "max_branch_len", "branch_len", "branches")]

    @classmethod
    def of(cls, cache: KVCache, i: int) -> "CacheStep":
        """Layer ``i`` of ``cache``, after the step's ``cache.advance``."""
        k, v, bk, bv = cache.layer_buffers(i)
        return cls(k.data_ptr(), v.data_ptr(), bk.data_ptr(), bv.data_ptr(), cache.max_len, cache.length,
                   cache.max_branch_len, cache.branch_length, cache.num_branches)


class NativeOps:
    """The C calls between a float32 CPU layer's linears; :meth:`of` gives None where they cannot run."""

    ENABLED = True  # tests set False to compare with the torch path

    def __init__(self, lib: ctypes.CDLL, cfg) -> None:
        self.lib = lib
        self.shape = LayerShape.of(cfg)
        self.eps = cfg.rms_norm_eps

    @classmethod
    def of(cls, cfg, dtype: torch.dtype, device: torch.device) -> "NativeOps | None":
        if dtype != torch.float32 or device.type != "cpu" or not fits_vectors(cfg):
            return None
        lib = optional_library()
        return None if lib is None else cls(lib, cfg)

    def norm(self, x: torch.Tensor, weight: torch.Tensor, res: torch.Tensor | None = None):
        """RMSNorm of ``x [..., H]`` (contiguous) times ``weight``; with ``res``: of ``x + res``, returning
        ``(x + res, its norm)``."""
        out = torch.empty_like(x)
        rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
        total = None if res is None else torch.empty_like(x)
        self.lib.layer_rms_norm(x.data_ptr(), None if res is None else res.data_ptr(),
                                None if total is None else total.data_ptr(), rows, hidden, weight.data_ptr(),
                                self.eps, out.data_ptr())
        return out if res is None else (total, out)

    def attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
        """``qkv [rows, t, (Hq + 2 Hkv) D]`` (the qkv linear's output, rotated in place) -> attention's output
        ``[rows, t, Hq D]``, with the step's keys and values written into layer ``i`` of ``cache``."""
        rows, t, _ = qkv.shape
        o = qkv.new_empty(rows, t, self.shape.heads * self.shape.head_dim)
        where = CacheStep.of(cache, i)
        if self.lib.layer_attention(ctypes.byref(self.shape), qkv.data_ptr(), rows, t, cos.data_ptr(), sin.data_ptr(),
                                    ctypes.byref(where), o.data_ptr()):
            raise MemoryError(f"attention: no memory for the scores of {rows}x{t} tokens over {cache.total_length} keys")
        return o

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``[..., 2I]`` (gate then up) -> ``silu(gate) * up [..., I]``."""
        inter = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], inter)
        self.lib.layer_silu_mul(gate_up.data_ptr(), out.numel() // inter, inter, out.data_ptr())
        return out


class Int4Block:
    """A layer whose four linears are all :class:`Int4Linear`, run by the fused kernel for steps of up to
    :attr:`MAX_ROWS` tokens (rows x t); :meth:`of` gives None for any other layer."""

    MAX_ROWS = Int4Linear.MAX_ROWS
    ENABLED = True  # tests set False to compare with the unfused path

    def __init__(self, layer, cfg) -> None:
        self.layer = layer  # keeps the weights, whose addresses the kernel holds, alive
        self.lib = layer.qkv.lib
        qkv, o, gu, down = layer.qkv, layer.o, layer.gate_up, layer.down
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.weights = LayerWeights(  # the norm weights: float32 and contiguous (decoder.Layer)
            LayerShape.of(cfg), ptr(layer.ln_attn), ptr(layer.ln_mlp), ptr(qkv.wblk), ptr(qkv.dblk), ptr(qkv.bias),
            ptr(o.wblk), ptr(o.dblk), ptr(o.bias), ptr(gu.wblk), ptr(gu.dblk), ptr(down.wblk), ptr(down.dblk))

    @classmethod
    def of(cls, layer, cfg) -> "Int4Block | None":
        """``layer``'s fused step, for a :class:`~specbranch.models.decoder.DecoderConfig` ``cfg``."""
        if not all(isinstance(lin, Int4Linear) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            return None
        if layer.gate_up.bias is not None or layer.down.bias is not None:
            return None  # the kernel has no MLP biases (Qwen2 and Llama have none)
        if not fits_vectors(cfg):
            return None
        return cls(layer, cfg)

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
        """Layer ``i`` on ``h [rows, t, H]`` (``cos``/``sin [t, D]``: the step's positions, after ``cache.advance``)
        -> ``[rows, t, H]``, with the step's keys and values written into ``cache``."""
        rows, t, hidden = h.shape
        where = CacheStep.of(cache, i)
        cos, sin = cos.contiguous(), sin.contiguous()
        return _kernel_linear("fused int4 layer", h, rows * t, hidden, self.MAX_ROWS, lambda x, y: self.lib.q4_layer_step(
            ctypes.byref(self.weights), x, rows, t, cos.data_ptr(), sin.data_ptr(), ctypes.byref(where), y))
