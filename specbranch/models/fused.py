"""The int4 draft's decode step: each layer in two foreign calls around attention (``kernels/q4_layer.c``).

Why: a 1-row step of the 0.5B int4 draft took 24 ms on one core, of which its int4 linears were 10 ms.
Most of the rest was the ~40 small torch ops per layer around them (norms, rope, SwiGLU, residual adds,
each linear's wrapper), each costing microseconds whatever its size. :class:`Int4Block` does a layer's
norm, q/k/v projection and rope in one call, and its output projection, residual adds, norm and MLP in
another; attention stays in torch (``decoder.attend``), with the KV cache and its branches.

Draft only, like the int4 weights: the draft's numbers never decide what is emitted, so its float sums
need not match the torch path's bit for bit (they agree to float rounding; tests check that and that
rows are independent of their batch).
"""

from __future__ import annotations

import torch

from .linear import Int4Linear, _kernel_linear


class Int4Block:
    """A layer whose four linears are all :class:`Int4Linear`, run by the fused kernels for steps of up to
    :attr:`MAX_ROWS` tokens (rows x t); :meth:`of` gives None for any other layer."""

    MAX_ROWS = Int4Linear.MAX_ROWS
    ENABLED = True  # tests set False to compare with the torch path

    def __init__(self, layer, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> None:
        self.layer = layer  # keeps the weights (whose addresses are taken below) alive
        self.lib = layer.qkv.lib
        self.rot_heads = num_heads + num_kv_heads  # q and k are rotated, v is not
        self.head_dim, self.eps = head_dim, eps
        self.ln_attn, self.ln_mlp = layer.ln_attn.float().contiguous(), layer.ln_mlp.float().contiguous()
        self.inter = layer.down.in_features
        self.w_qkv, self.w_o, self.w_gate_up, self.w_down = map(self._weights, (layer.qkv, layer.o, layer.gate_up, layer.down))

    @classmethod
    def of(cls, layer, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> "Int4Block | None":
        if not all(isinstance(lin, Int4Linear) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            return None
        if layer.gate_up.bias is not None or layer.down.bias is not None:
            return None  # the MLP kernel has no bias terms (Qwen2 and Llama have none)
        return cls(layer, num_heads, num_kv_heads, head_dim, eps)

    @staticmethod
    def _weights(lin: Int4Linear) -> tuple[int, int, int | None]:
        return lin.packed.data_ptr(), lin.scales.data_ptr(), None if lin.bias is None else lin.bias.data_ptr()

    def attn_in(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``h [rows, t, H]`` -> ``[rows, t, (Hq + 2 Hkv) * D]``: q, k (rotated with ``cos``/``sin [t, D]``) and v."""
        rows, t, hidden = h.shape
        n = self.layer.qkv.out_features
        cos, sin = cos.contiguous(), sin.contiguous()
        return _kernel_linear("fused int4 q/k/v", h, rows * t, n, self.MAX_ROWS, lambda x, y: self.lib.q4_attn_in(
            x, rows * t, hidden, self.ln_attn.data_ptr(), self.eps, *self.w_qkv, n, cos.data_ptr(), sin.data_ptr(), t,
            self.head_dim, self.rot_heads, y))

    def attn_out(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``h [rows, t, H]`` and attention's output ``attn [rows, t, Hq * D]`` -> the layer's output ``[rows, t, H]``."""
        rows, t, hidden = h.shape
        h = h.float().contiguous()
        return _kernel_linear("fused int4 o/MLP", attn, rows * t, hidden, self.MAX_ROWS, lambda x, y: self.lib.q4_attn_out(
            h.data_ptr(), x, rows * t, hidden, attn.shape[-1], *self.w_o, self.ln_mlp.data_ptr(), self.eps,
            *self.w_gate_up[:2], self.inter, *self.w_down[:2], y))
