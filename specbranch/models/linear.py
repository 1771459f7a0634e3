"""Linear layers at each supported precision.

Why int8 is done this way: on our 2-core AMD CPUs fp32 GEMM (MKL) costs about 4x for 4 rows what
it costs for one, which kills verification; FBGEMM's dynamic int8 linear is several times faster
and nearly flat in the number of rows. But FBGEMM quantizes the *whole input* with one scale, so
a row's result would depend on the other rows in the batch, and verifying 5 tokens at once would
not reproduce decoding them one by one. We make it exactly batch-invariant: every row is divided
by its own absmax (so it lies in [-1, 1]) and two extra input columns holding -1 and +1 (with
zero weights) pin the tensor's min/max, hence FBGEMM's activation scale, to the same value for
any batch. Integer accumulation is exact, so each row's output is bit-identical however many
rows are computed together; the row scale is multiplied back afterwards.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..kernels import optional_library

PRECISIONS = ("fp32", "bf16", "int8", "q4k", "fp64")
# q4k: the GGUF file's Q4_K linears read as stored (Q4KLinear), the rest int8; built by the loader from the file
CPU_ONLY = ("int8", "int4", "q4k")  # precisions whose kernels run on the CPU only
# int4 is a draft-only precision (weight-only int4 decode steps over the int8 model): see Int4Linear
DRAFT_PRECISIONS = ("int4", *PRECISIONS)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class DenseLinear:
    """``y = x W^T + b`` with the weight stored in ``weight_dtype`` (fp32, bf16 or fp64)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype) -> None:
        self.weight = weight.to(weight_dtype).contiguous()
        self.bias = None if bias is None else bias.to(weight_dtype)
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def read_bytes(self) -> int:
        """Bytes one decode step reads from this layer (the roofline's numerator)."""
        return _nbytes(self.weight, self.bias)

    def to(self, device: torch.device) -> "DenseLinear":
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self


class Int8Linear:
    """Per-output-channel int8 weights, per-row int8 activations, FBGEMM kernel; batch-invariant.

    Built from a float weight (:meth:`from_float`) or from stored int8 weights and scales (the
    int8 cache, so a warm start skips quantization). FBGEMM's prepacking is the slow part of
    loading; :meth:`pack` is separate so a loader can pack many layers on a thread pool.
    """

    PAD = 8  # extra input columns: [-1, +1, 0, ...]; 8 keeps K a multiple of 8 for the kernel
    # FBGEMM's activation scale under that pinning: range [-1, 1] over reduce_range's 127 steps
    ACT_SCALE = torch.tensor(2.0 / 127.0, dtype=torch.float32)
    ACT_INV = float(1.0 / ACT_SCALE)  # computed in float32, as FBGEMM does (63.5)
    # Calls of up to this many rows run the native kernel (kernels/q8.c): bit-identical results, weights streamed
    # faster. The kernel itself reads each weight once for 1-2 rows on AVX2 (decode steps: beyond that its
    # multiplies, not memory, are the limit and FBGEMM is faster) and 1-8 on AVX-512 VNNI (verifying a drafted
    # block too); the rest (prompts) run FBGEMM, except while the draft worker's core is lent
    # (runtime/lending.py). Tests set 0 to force FBGEMM.
    KERNEL_ROWS = 8

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.qweight = qweight  # int8 [N, K + PAD]
        self.scale = scale  # fp32 [N]
        self.bias = None if bias is None else bias.float()
        self.out_features = qweight.shape[0]
        pad = torch.zeros(self.PAD)
        pad[0], pad[1] = -1.0, 1.0
        self.pad = pad
        self.packed = None
        self.blocked = self.wsum = self.mult = None  # the native kernel's weights (prepare_native)
        self.use_kernel = True  # False under an Int4Linear: it serves only prompts, so no blocked copy is built

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        n = weight.shape[0]
        w = torch.cat([weight.float(), weight.new_zeros(n, cls.PAD, dtype=torch.float32)], dim=1)
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(qweight, scale, bias)

    def pack(self) -> "Int8Linear":
        if self.packed is None:
            n = self.out_features
            with warnings.catch_warnings():  # quantized tensors are deprecated, but FBGEMM's prepack needs one
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.scale.double(), torch.zeros(n, dtype=torch.long), 0
                )
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        return self

    def read_bytes(self) -> int:
        return _nbytes(self.qweight, self.scale, self.bias)

    def rows(self, ids: torch.Tensor) -> "Int8Linear":
        """The same layer restricted to output rows ``ids`` (for a reduced LM head), packed."""
        return Int8Linear(self.qweight[ids].contiguous(), self.scale[ids].contiguous(),
                          None if self.bias is None else self.bias[ids]).pack()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        limit = self.kernel_rows()
        # Prompts (more rows) go to the kernel too while the other worker lends its core: FBGEMM is about as fast
        # on one core (0.86-1.0x measured at 64-160 rows), but only the kernel can share the work with the helper.
        if 0 < rows and (rows <= limit or (limit and _core_lent())) and self.prepare_native().blocked is not None:
            return self._native(x, rows)
        if self.packed is None:
            self.pack()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # [rows, K]
        s = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # [rows, 1]
        xn = torch.cat([x2 / s, self.pad.expand(x2.shape[0], -1)], dim=1)  # [rows, K + PAD]
        y = torch.ops.quantized.linear_dynamic(xn, self.packed, True) * s
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def kernel_rows(self) -> int:
        """Calls of up to this many rows run the native kernel (0: none do)."""
        return min(self.KERNEL_ROWS, _kernel_rows()) if self.use_kernel else 0

    def release(self) -> "Int8Linear":
        """Drop the copies built for computing (FBGEMM's prepacked weights, the native kernel's): a layer kept only to
        cut rows from (a reduced head's full head) needs just ``qweight``; both are rebuilt on next use."""
        self.packed = self.blocked = self.wsum = self.mult = None
        return self

    def prepare_native(self) -> "Int8Linear":
        """Build the native kernel's copy of the weights (kernels/q8.c: blocked layout, row sums, FBGEMM's
        output multipliers). Done on first use, or ahead by the loader; a no-op where the kernel cannot run."""
        lib = optional_library()
        if self.blocked is None and lib is not None:
            n, k = self.out_features, self.qweight.shape[1] - self.PAD
            blocked = torch.empty(lib.q8_packed_size(n, k), dtype=torch.int8)
            wsum = torch.empty(lib.q8_padded_rows(n), dtype=torch.int32)  # one per row of whole blocks
            lib.q8_pack(self.qweight.data_ptr(), n, k, self.qweight.shape[1], blocked.data_ptr(), wsum.data_ptr())
            self.mult = (self.ACT_SCALE * self.scale.double().float()).contiguous()  # what FBGEMM multiplies by
            self.bias = None if self.bias is None else self.bias.contiguous()
            self.blocked, self.wsum = blocked, wsum
        return self

    def _native(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The FBGEMM path's result, bit for bit, in one foreign call (see kernels/q8.c)."""
        lib, k, n = optional_library(), x.shape[-1], self.out_features
        return _kernel_linear("int8", x, rows, n, rows, lambda x2, y: lib.q8_linear_f32(
            x2, rows, k, self.blocked.data_ptr(), self.wsum.data_ptr(), self.mult.data_ptr(), self.ACT_INV,
            None if self.bias is None else self.bias.data_ptr(), n, y))


def _kernel_linear(kind: str, x: torch.Tensor, rows: int, n: int, max_rows: int, run) -> torch.Tensor:
    """``x [..., K]`` (``rows`` rows) -> ``[..., n]`` through a C kernel: ``run(x_ptr, y_ptr)`` reads a float32
    contiguous ``[rows, K]`` copy of x, writes ``[rows, n]`` and returns 0, -1 (out of memory) or -2 (a row count
    it has no code for; it takes 1..``max_rows``)."""
    k = x.shape[-1]
    x2 = x.reshape(rows, k)  # [rows, K]
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.empty(rows, n)
    err = run(x2.data_ptr(), y.data_ptr())
    if err:
        raise MemoryError(f"{kind} linear: no memory for {rows}x{k} activation scratch") if err == -1 else \
            ValueError(f"{kind} linear: {rows} rows, the kernel takes 1..{max_rows}")
    return y.view(*x.shape[:-1], n).to(x.dtype)


def _kernel_rows() -> int:
    """Most rows the int8 kernel computes per read of the weights on this CPU (0 where it cannot run): calls of
    up to this many rows (decode steps, verifications) always run the kernel."""
    lib = optional_library()
    return lib.q8_max_rows() if lib is not None else 0


def _core_lent() -> bool:
    """Whether this process now borrows the other worker's core (runtime/lending.py) with the AVX-512 VNNI
    code in use (the AVX2 code is far slower than FBGEMM on prompts)."""
    lib = optional_library()
    return lib is not None and bool(lib.lend_active()) and bool(lib.kernels_vnni())


class Int4Linear:
    """Group-wise int4 weights (groups of 64 along K, one fp16 scale each) for decode steps of up to
    :attr:`MAX_ROWS` rows, over an :class:`Int8Linear` that serves larger batches (the prompt).

    Why: a decode step is memory-bound, and int4 reads 0.53125 bytes per weight against int8's 1
    (the 0.5B draft's step: 69 -> 38 ms on 2 cores, 88 -> 61 ms on one). Batches above MAX_ROWS
    are compute-bound, where FBGEMM's int8 kernel is faster. For the **draft only**: its numbers
    never decide what is emitted (the target verifies), so mixing the two kernels and the coarser
    weights can cost acceptance but never change the output. The kernel (``kernels/q4.c``) is
    deterministic and batch-invariant.
    """

    GROUP = 64
    BLOCK = 16  # output rows per block of the kernel's layout (block_int4)
    MAX_ROWS = 4  # the kernel is specialized for 1-4 rows (decode steps, k <= 4 branch rows)

    def __init__(self, base: Int8Linear, packed: torch.Tensor, scales: torch.Tensor) -> None:
        from ..kernels import library

        self.lib = library()
        self.base = base
        base.use_kernel = False  # batches of up to MAX_ROWS are ours; the larger ones (prompts) stay on FBGEMM
        self.bias = None if base.bias is None else base.bias.float().contiguous()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.wblk, self.dblk = block_int4(packed, scales)  # what the kernel reads; the row-major form is not kept

    @property
    def packed(self) -> torch.Tensor:
        """The weights row-major, uint8 ``[N, K/2]`` (a copy: for saving, row subsets and tests)."""
        return unblock_int4(self.wblk, self.dblk, self.out_features)[0]

    @property
    def scales(self) -> torch.Tensor:
        """The group scales row-major, fp16 ``[N, K/64]`` (a copy)."""
        return unblock_int4(self.wblk, self.dblk, self.out_features)[1]

    @classmethod
    def from_int8(cls, base: Int8Linear) -> "Int4Linear":
        k = base.qweight.shape[1] - Int8Linear.PAD
        return cls(base, *quantize_int4(base.qweight[:, :k].float() * base.scale[:, None]))

    @classmethod
    def supports(cls, base) -> bool:
        return isinstance(base, Int8Linear) and (base.qweight.shape[1] - Int8Linear.PAD) % cls.GROUP == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        rows = x.numel() // k
        if rows > self.MAX_ROWS or rows == 0:
            return self.base(x)
        return _kernel_linear("int4", x, rows, n, self.MAX_ROWS, lambda x2, y: self.lib.q4_linear_f32(
            x2, rows, k, self.wblk.data_ptr(), self.dblk.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(), n, y))

    def read_bytes(self) -> int:
        """A decode step reads the int4 copy, not the int8 fallback."""
        return _nbytes(self.wblk, self.dblk, self.bias)

    def rows(self, ids: torch.Tensor) -> "Int4Linear":
        """The same layer restricted to output rows ``ids`` (for a reduced LM head). Only the blocks holding them are
        unpacked, so a few rows (the tokens a reduced head admits from the context) cost microseconds."""
        ids = ids.long()
        blocks, where = torch.unique(ids // self.BLOCK, return_inverse=True)  # the blocks used; each id's among them
        packed, scales = unblock_int4(self.wblk[blocks], self.dblk[blocks], len(blocks) * self.BLOCK)
        local = where * self.BLOCK + ids % self.BLOCK  # each id's row in the unpacked blocks
        return Int4Linear(self.base.rows(ids), packed[local].contiguous(), scales[local].contiguous())


class Q4KLinear:
    """A linear whose weight is GGUF Q4_K blocks, read as stored (``kernels/q4k.c``): the target's attention and MLP
    linears under precision ``q4k``. Every row count runs the kernel (decode steps, verifications and prompts), so a
    row's result never depends on its batch.

    Why: a forward reads every weight once, so it costs its bytes; Q4_K is 4.5 bits a weight against int8's 8, and
    it keeps the file's own weights instead of an int8 rounding of their dequantized values.
    """

    SUPER = 256  # weights per Q4_K super-block: the input width must be a multiple
    RAW = 144  # bytes per super-block in the file

    def __init__(self, raw: torch.Tensor, bias: torch.Tensor | None) -> None:
        """``raw``: uint8 ``[N, K/256*144]``, the GGUF tensor's rows of ``block_q4_K``."""
        from ..kernels import library

        self.lib = lib = library()
        n, row_bytes = raw.shape
        if row_bytes % self.RAW:
            raise ValueError(f"Q4_K rows of {row_bytes} bytes: not whole {self.RAW}-byte blocks")
        k = row_bytes // self.RAW * self.SUPER
        raw = raw.contiguous()
        self.out_features, self.in_features = n, k
        self.w = torch.empty(lib.q4k_quant_bytes(n, k), dtype=torch.uint8)
        self.sm = torch.empty(lib.q4k_sm_bytes(n, k), dtype=torch.uint8)
        self.dd = torch.empty(lib.q4k_dd_halves(n, k), dtype=torch.float16)
        lib.q4k_pack(raw.data_ptr(), n, k, row_bytes, self.w.data_ptr(), self.sm.data_ptr(), self.dd.data_ptr())
        self.bias = None if bias is None else bias.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        rows = x.numel() // k
        return _kernel_linear("Q4_K", x, rows, n, rows, lambda x2, y: self.lib.q4k_linear_f32(
            x2, rows, k, self.w.data_ptr(), self.sm.data_ptr(), self.dd.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(), n, y))

    def read_bytes(self) -> int:
        return _nbytes(self.w, self.sm, self.dd, self.bias)

    def kernel_rows(self) -> int:
        """Any row count runs the kernel; a fused step takes as many rows as the kernel does in one pass."""
        return 8


class RowConcat:
    """Two linears over the same input, their outputs side by side: ``[first(x), second(x)]``.

    Why: the decoder computes q, k and v in one linear, and the target's GGUF stores v as Q6_K in half its layers
    (q and k as Q4_K): there v stays int8 and the layer's qkv is this pair (the fused step runs both, layer.c)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second
        self.out_features = first.out_features + second.out_features
        self.bias = None  # each part adds its own

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.second(x)], dim=-1)

    def read_bytes(self) -> int:
        return self.first.read_bytes() + self.second.read_bytes()

    def kernel_rows(self) -> int:
        return min(self.first.kernel_rows(), self.second.kernel_rows())


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (packed uint8 ``[N, K/2]``, scales fp16 ``[N, K/64]``) in the layout of
    ``kernels/q4.c``: per group of 64 the value of largest magnitude maps to -8 (as GGUF's Q4_0), the
    rest round to [-8, 7] against the fp16 scale; stored as u = q + 8, byte j of a group holding u[j] low and
    u[32 + j] high. fp16 (as GGUF's Q4_0) because the scales are read every step: 4 bytes per 64 weights were
    11% of a step's bytes, 2 are 5.9%, and their rounding (2^-11) is far below the weights' (1/16)."""
    n, k = weight.shape
    g = weight.float().reshape(n, k // Int4Linear.GROUP, Int4Linear.GROUP)  # [N, G, 64]
    peak = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [N, G], signed
    scales = (peak / -8.0).half()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    u = (torch.round(g / safe[..., None]) + 8).clamp_(0, 15).to(torch.uint8)  # [N, G, 64]
    half = Int4Linear.GROUP // 2
    packed = (u[..., :half] | (u[..., half:] << 4)).reshape(n, k // 2)
    return packed.contiguous(), scales.contiguous()


def block_int4(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major int4 weights (:func:`quantize_int4`) -> the kernel's blocked layout (``kernels/q4.c``): blocks of
    :attr:`Int4Linear.BLOCK` rows, steps of 8 columns, in each step every row's 4 bytes holding columns 0-3 in their
    low nibbles and 4-7 in their high ones, so a 32-bit lane holds one row's 8 columns and a block is one sequential
    run of memory. Weights uint8 ``[B, K/8, 16, 4]``, scales fp16 ``[B, G, 16]``; N is padded with zero rows to B
    whole blocks."""
    n, half_k = packed.shape
    nb, half = Int4Linear.BLOCK, Int4Linear.GROUP // 2
    pad = -n % nb
    p = F.pad(packed, (0, 0, 0, pad)).view(n + pad, -1, half)  # [N', G, 32]: byte j = u[j] | u[32 + j] << 4
    u = torch.cat([p & 15, p >> 4], dim=-1).view(n + pad, -1, 2, 4)  # [N', K/8, 2, 4]: u per step of 8 columns
    steps = u[:, :, 0] | (u[:, :, 1] << 4)  # [N', K/8, 4]: byte b = u[8s + b] | u[8s + 4 + b] << 4
    blocks = (n + pad) // nb
    wblk = steps.view(blocks, nb, -1, 4).transpose(1, 2).contiguous()  # [B, K/8, 16, 4]
    dblk = F.pad(scales, (0, 0, 0, pad)).view(blocks, nb, -1).transpose(1, 2).contiguous()  # [B, G, 16]
    return wblk, dblk


def unblock_int4(wblk: torch.Tensor, dblk: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`block_int4`: (packed ``[n, K/2]``, scales ``[n, G]``), row-major and contiguous."""
    blocks, steps, nb, _ = wblk.shape
    b = wblk.transpose(1, 2).reshape(blocks * nb, steps, 1, 4)[:n]  # [n, K/8, 1, 4]
    u = torch.cat([b & 15, b >> 4], dim=2).reshape(n, -1, Int4Linear.GROUP)  # [n, G, 64]
    half = Int4Linear.GROUP // 2
    packed = (u[..., :half] | (u[..., half:] << 4)).reshape(n, -1).contiguous()  # [n, K/2]
    scales = dblk.transpose(1, 2).reshape(blocks * nb, -1)[:n].contiguous()  # [n, G]
    return packed, scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` (up to rounding): ``[N, K]`` float weights (tests, reference)."""
    n, half_k = packed.shape
    p = packed.reshape(n, -1, Int4Linear.GROUP // 2)  # [N, G, 32]
    q = torch.cat([p & 15, p >> 4], dim=-1).float() - 8  # [N, G, 64]
    return (q * scales.float()[..., None]).reshape(n, 2 * half_k)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, precision: str):
    """Build the linear layer for ``precision`` (one of :data:`PRECISIONS`)."""
    if precision in ("int8", "q4k"):  # q4k: the loader builds the Q4_K linears; any others are int8
        return Int8Linear.from_float(weight, bias)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[precision]
    return DenseLinear(weight, bias, dtype)


def activation_dtype(precision: str) -> torch.dtype:
    """Residual stream / KV cache dtype: fp64 only for exactness tests, fp32 otherwise."""
    return torch.float64 if precision == "fp64" else torch.float32


class VocabSubsetHead:
    """An LM head over a subset of the vocabulary, returning full-vocabulary logits with ``-inf``
    outside the subset, plus the tokens of the context it was told about (:meth:`admit`).

    Why: the draft's LM head over 151,936 tokens is about a quarter of a 0.5B draft's weight bytes,
    and decoding is memory-bound. A draft that only ever proposes frequent tokens reads far less per
    step. This is lossless: the draft may propose anything, the target still verifies over the full
    vocabulary, and under rule C ``q`` is simply zero outside the subset (tokens are drawn from ``q``).

    Why the context's tokens: a target token the draft cannot propose is a certain rejection, and the
    rare tokens a target emits are mostly copied from its prompt (identifiers, names, words of the task).
    Teacher-forced over 20 HumanEval completions of the default pair, 37 of the 2,360 target tokens lay
    outside the 32,768 ranked ones, all of them in their prompt: half of the int4 draft's 74 misses. So the
    backend admits every token it is fed (:class:`~specbranch.backend.NativeBackend`), a few rows a prompt,
    scored from the full head's own weights by the same kernel.
    """

    def __init__(self, inner, ids: torch.Tensor, vocab_size: int, source) -> None:
        self.inner = inner  # a linear over the subset rows: [.., H] -> [.., len(ids)]
        self.ids = ids.long()
        self.out_features = vocab_size
        self.source = source  # the full head, where admitted rows come from (not read by forwards)
        self.ranked = frozenset(self.ids.tolist())
        self.admitted: set[int] = set()  # tokens outside ``ids`` scored too (admit)
        self.extra_ids: torch.Tensor | None = None  # those tokens, sorted
        self.extra = None  # a linear over their rows

    def admit(self, tokens) -> None:
        """Score ``tokens`` (ids) too from now until :meth:`clear`."""
        new = {t for t in tokens if t not in self.ranked and t not in self.admitted and 0 <= t < self.out_features}
        if new:
            self.admitted |= new
            self.extra_ids = torch.tensor(sorted(self.admitted), dtype=torch.long)
            self.extra = _head_rows(self.source, self.extra_ids)

    def clear(self) -> None:
        """Back to the ranked subset alone (a new context)."""
        self.admitted = set()
        self.extra_ids = self.extra = None

    def read_bytes(self) -> int:
        return self.inner.read_bytes() + (0 if self.extra is None else self.extra.read_bytes())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.inner(x)  # [..., n]
        full = sub.new_full((*sub.shape[:-1], self.out_features), float("-inf"))  # [..., V]
        full.index_copy_(-1, self.ids.to(sub.device), sub)
        if self.extra is not None:
            full.index_copy_(-1, self.extra_ids.to(sub.device), self.extra(x).to(sub.dtype))
        return full


def _head_rows(head, ids: torch.Tensor):
    """``head`` (int4, int8 or dense) restricted to the rows ``ids`` (sorted, no repeats), reusing its weights."""
    if isinstance(head, (Int4Linear, Int8Linear)):
        return head.rows(ids)
    return DenseLinear(head.weight[ids], None if head.bias is None else head.bias[ids], head.weight.dtype)


def subset_head(head, ids: torch.Tensor, vocab_size: int) -> VocabSubsetHead:
    """Restrict an existing head (int4, int8 or dense) to the rows ``ids``, reusing its weights; the full head is
    kept (not read by forwards) for the rows of admitted tokens."""
    ids = torch.unique(ids.long())  # sorted, no repeats
    sub = VocabSubsetHead(_head_rows(head, ids), ids, vocab_size, head)
    int8 = head.base if isinstance(head, Int4Linear) else head
    if isinstance(int8, Int8Linear):
        int8.release()  # the draft's full head: 137 MB of FBGEMM's prepacked copy that no forward reads
    return sub
