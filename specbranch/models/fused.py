"""A layer's work between its linears in C (``kernels/layer.c``): :class:`NativeOps` for every float32 CPU
forward, :class:`FusedLayer` for decode steps and verifications (the whole layer, linears included, in one call).

Why NativeOps: in torch, the norms, rope, KV cache writes, attention and SwiGLU of one layer are about fifty
small ops, each costing microseconds whatever its size, and attention ran one query at a time to stay
batch-invariant. On the 1.5B target, verifying 8 tokens spent 25 of its 105 ms there (one core, Zen 4).
NativeOps does them in four C calls per layer, computing every row and every (token, head) on its own in one
fixed order: a token's numbers do not depend on how many tokens came with it or on the thread count, so a
verified block gives exactly the tokens decoding it one by one gives. The sums are ordered differently from
torch's, so a decoder takes this path for all of its forwards or for none.

Why FusedLayer: a 1-row step of the 0.5B int4 draft took 24 ms on one core, of which its int4 linears were 10 ms;
the small ops around them were most of the rest. :class:`FusedLayer` hands the whole layer, linears and KV cache
included, to one C call; even against NativeOps' eight calls per layer it is 1.10-1.13x faster per 1-row step
(1.07-1.11x at 3 branch rows). The int4 draft's numbers never decide what is emitted, so its fused step need not
match the unfused path's bit for bit (its tests allow float rounding, and check that rows are independent of their
batch and of the thread count). The int8 target's layers fuse too, for steps of up to as many rows as its int8
kernel takes (8 with AVX-512 VNNI): there the C calls are the unfused path's, in its order, so the bits are the same
(tests check), and the step loses the eight ctypes calls, their torch allocations and the OpenMP hand-offs between
them. On the 1.5B target (Zen 4, interleaved, medians of 48-120 steps, the same logits both ways): 1 row on two
threads 42.8 -> 40.6 ms, 8 rows 64.2 -> 62.5 ms; on one thread 54.2 -> 53.7 and 61.1 -> 59.4 ms. Consecutive fused
layers then run in one call per forward (:class:`FusedRun`), not one per layer: besides some 30 us of Python per
layer, the pauses between calls cost streaming time. Interleaved, the same logits both ways: the int4 draft's 1-row
step 8.86 -> 7.94 ms on one thread (9.55 -> 8.41 on two; 3 rows 12.48 -> 11.18), the target's 45.7 -> 42.6 ms on one
thread and 52.0 -> 46.6 on two.
"""

from __future__ import annotations

import ctypes
import math

import torch

from ..kvcache import KVCache
from ..kernels import optional_library
from .linear import Int4Linear, Int8Linear, Q4KLinear, RowConcat, _kernel_linear

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


class LinearRef(ctypes.Structure):
    """``layer_linear`` in layer.c: one int4, int8 or Q4_K linear's weights, as its kernel reads them, or a
    :class:`RowConcat` of two (``next`` points to the second's, which this one keeps alive)."""

    _fields_ = [("bits", _i64), ("w", _p), ("aux", _p), ("mult", _p), ("bias", _p), ("inv", _f32), ("next", _p),
                ("n_first", _i64)]

    @classmethod
    def of(cls, lin: "Int4Linear | Int8Linear | Q4KLinear | RowConcat") -> "LinearRef":
        if isinstance(lin, RowConcat):
            ref, second = cls.of(lin.first), cls.of(lin.second)
            ref.second = second  # alive as long as ref is (FusedLayer keeps it): layer.c holds its address
            ref.next, ref.n_first = ctypes.addressof(second), lin.first.out_features
            return ref
        bias = None if lin.bias is None else lin.bias.data_ptr()  # float32 and contiguous in every class
        if isinstance(lin, Int4Linear):
            return cls(4, lin.wblk.data_ptr(), lin.dblk.data_ptr(), None, bias, 0.0)
        if isinstance(lin, Q4KLinear):
            return cls(45, lin.w.data_ptr(), lin.sm.data_ptr(), lin.dd.data_ptr(), bias, 0.0)
        return cls(8, lin.blocked.data_ptr(), lin.wsum.data_ptr(), lin.mult.data_ptr(), bias, lin.ACT_INV)


class LayerWeights(ctypes.Structure):
    """``layer_weights`` in layer.c: a layer's shape, norm weights and linears."""

    _fields_ = [("shape", LayerShape), ("ln_attn", _p), ("ln_mlp", _p)] + [
        (n, LinearRef) for n in ("qkv", "o", "gu", "down")]


class CacheStep(ctypes.Structure):
    """``kv_step`` in layer.c: where a layer's keys and values live and how many are live."""

    _fields_ = [(n, _p) for n in ("k", "v", "bk", "bv")] + [
        (n, _i64) for n in ("max_len", "trunk_len", "max_branch_len", "branch_len", "branches", "max_branches")]

    @classmethod
    def of(cls, cache: KVCache, i: int) -> "CacheStep":
        """Layer ``i`` of ``cache``, after the step's ``cache.advance``."""
        k, v, bk, bv = cache.layer_buffers(i)
        return cls(k.data_ptr(), v.data_ptr(), bk.data_ptr(), bv.data_ptr(), cache.max_len, cache.length,
                   cache.max_branch_len, cache.branch_length, cache.num_branches, cache.max_branches)


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


class FusedLayer:
    """A layer that runs whole in C (``layer_step``, through :class:`FusedRun`) for steps of up to :meth:`max_rows`
    tokens (rows x t): one whose four linears are all :class:`Int4Linear` (the draft) or all target linears
    (:class:`Int8Linear` with the native kernel's weights built, :class:`Q4KLinear`, or a :class:`RowConcat` of
    those); :meth:`of` gives None for any other layer."""

    ENABLED = True  # tests set False to compare with the unfused path

    def __init__(self, layer, cfg) -> None:
        self.layer = layer  # keeps the weights, whose addresses the kernel holds, alive
        self.int8 = not isinstance(layer.qkv, Int4Linear)  # the target's kind (int8 and Q4_K linears)
        self.lib = optional_library()
        # the refs are copied into the struct; kept here for a pair's second ref, whose address the copy holds
        self.refs = [LinearRef.of(lin) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.weights = LayerWeights(  # the norm weights: float32 and contiguous (decoder.Layer)
            LayerShape.of(cfg), layer.ln_attn.data_ptr(), layer.ln_mlp.data_ptr(), *self.refs)

    @classmethod
    def of(cls, layer, cfg) -> "FusedLayer | None":
        """``layer``'s fused step, for a :class:`~specbranch.models.decoder.DecoderConfig` ``cfg``."""
        linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
        if not fits_vectors(cfg) or optional_library() is None or layer.ln_attn.dtype != torch.float32:
            return None
        if all(isinstance(lin, Int4Linear) for lin in linears):
            return cls(layer, cfg)
        if all(_target_native(lin) for lin in linears):
            return cls(layer, cfg)
        return None

    def max_rows(self) -> int:
        """Most tokens per step: what the linears' kernels take in one pass over their weights (int8: as
        :class:`Int8Linear` decides, so both paths run the same kernel). Larger steps (prompts) go unfused."""
        if not self.int8:
            return Int4Linear.MAX_ROWS
        layer = self.layer
        return min(lin.kernel_rows() for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))


def _target_native(lin) -> bool:
    """Whether a target linear runs in C: Q4_K always, int8 once its native weights are built, a pair if both do."""
    if isinstance(lin, RowConcat):
        return _target_native(lin.first) and _target_native(lin.second)
    if isinstance(lin, Q4KLinear):
        return True
    return type(lin) is Int8Linear and lin.use_kernel and lin.prepare_native().blocked is not None


class FusedRun:
    """Consecutive layers ``first`` .. ``first + len(blocks) - 1`` that all fuse, of one kind (int4 or int8), run by
    one C call per forward (``layers_step``): the per-layer Python around a call cost some 30 us, about a tenth of
    the int4 draft's 1-row step."""

    def __init__(self, blocks: list[FusedLayer], first: int) -> None:
        self.blocks, self.first = blocks, first
        self.int8, self.lib = blocks[0].int8, blocks[0].lib
        self.weights = (LayerWeights * len(blocks))(*(b.weights for b in blocks))  # copies: the addresses only

    def max_rows(self) -> int:
        """Most tokens per step (:meth:`FusedLayer.max_rows`, the same for every layer of the run)."""
        return self.blocks[0].max_rows()

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
             keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The run's layers on ``h [rows, t, H]`` (``cos``/``sin [t, D]``: the step's positions, after
        ``cache.advance``) -> (``[rows, t, H]``, the outputs of the run's layers ``keep`` (indices into the run)),
        with the step's keys and values written into ``cache``."""
        rows, t, hidden = h.shape
        where = CacheStep.of(cache, self.first)
        cos, sin = cos.contiguous(), sin.contiguous()
        kept, slots = [], None  # the kept layers' outputs [rows, t, H] each, and where layers_step writes them
        if keep:
            kept = list(torch.empty(len(keep), rows, t, hidden))
            slots = (_p * len(self.blocks))()
            for j, i in enumerate(keep):
                slots[i] = kept[j].data_ptr()
        kind = "fused target layer" if self.int8 else "fused int4 layer"
        out = _kernel_linear(kind, h, rows * t, hidden, self.max_rows(), lambda x, y: self.lib.layers_step(
            self.weights, len(self.blocks), x, rows, t, cos.data_ptr(), sin.data_ptr(), ctypes.byref(where), slots, y))
        return out, kept
