"""The precision-specific linear layers."""

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from conftest import torch_threads
from specbranch.models.linear import Int8Linear, make_linear


def test_int8_linear_is_exactly_batch_invariant():
    torch.manual_seed(0)
    w, b = torch.randn(300, 200) * 0.05, torch.randn(300)
    lin = Int8Linear.from_float(w, b)
    x = torch.randn(7, 200) * torch.logspace(-2, 2, 7)[:, None]  # rows of very different scale
    together = lin(x)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(7)])
    assert torch.equal(together, alone)  # bit-identical, not just close
    assert torch.equal(lin(x[2:5]), together[2:5])


def test_int8_linear_is_accurate_and_keeps_shape():
    torch.manual_seed(1)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64)
    x = torch.randn(2, 3, 128)
    got, want = Int8Linear.from_float(w, b)(x), torch.nn.functional.linear(x, w, b)
    assert got.shape == (2, 3, 64)
    assert (got - want).abs().max() / want.abs().max() < 0.03


def fbgemm_only(lin: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer through FBGEMM alone (the path prompts take)."""
    rows = Int8Linear.KERNEL_ROWS
    try:
        Int8Linear.KERNEL_ROWS = 0
        return lin(x)
    finally:
        Int8Linear.KERNEL_ROWS = rows


def near_ties(k: int) -> torch.Tensor:
    """A row of absmax 1 whose values lie within a few ulps of FBGEMM's rounding ties (x * 63.5 = j + 0.5), where
    its fused multiply-add rounds otherwise than a multiply and an add would."""
    ties = (torch.arange(-63, 63, dtype=torch.float32) + 0.5) / 63.5  # [126]
    up, down = [ties], [ties]
    for _ in range(3):  # 1-3 ulps either side
        up.append(torch.nextafter(up[-1], torch.tensor(2.0)))
        down.append(torch.nextafter(down[-1], torch.tensor(-2.0)))
    near = up + down[1:]
    row = torch.cat(near).repeat(k // (126 * 7) + 1)[:k].clone()
    row[0] = 1.0
    return row


@contextmanager
def pinned_isa(vnni: bool):
    """The kernels' AVX-512 VNNI code (where the CPU has it) or their AVX2 code (int8 and int4 alike), inside the
    block; yields the code in use (True: VNNI). Afterwards the best code the CPU has again."""
    from specbranch.kernels import library

    lib = library()
    try:
        yield bool(lib.kernels_select_isa(vnni))
    finally:
        lib.kernels_select_isa(1)


@pytest.fixture(params=["avx2", "vnni"])
def kernel_isa(request):
    """Run a test once with the kernels' AVX2 code and once with their AVX-512 VNNI code (skipped where the
    CPU lacks VNNI); yields the most rows the int8 kernel then takes."""
    from specbranch.kernels import library

    with pinned_isa(request.param == "vnni") as vnni:
        if vnni != (request.param == "vnni"):
            pytest.skip("this CPU has no AVX-512 VNNI")
        yield library().q8_max_rows()


def test_kernel_isa_environment_variable_pins_avx2_in_a_new_process():
    """$SPECBRANCH_KERNEL_ISA=avx2 reaches every process that loads the kernels (the parallel runtime's draft worker
    too): the library starts on its AVX2 code; a misspelt value is refused with what to write instead."""
    from specbranch.kernels import ISA_ENV, unavailable

    if unavailable() is not None:
        pytest.skip(f"the native kernels cannot run here: {unavailable()}")
    code = "from specbranch.kernels import code_in_use; print(code_in_use())"

    def run(value: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, ISA_ENV: value}, capture_output=True,
                              text=True, timeout=120)

    assert run("avx2").stdout.strip() == "AVX2"
    assert run("auto").stdout.strip() in ("AVX2", "AVX-512 VNNI")
    bad = run("avx9")
    assert bad.returncode != 0 and "use 'avx2'" in bad.stderr


@pytest.mark.parametrize("n,k,bias", [(300, 200, True), (129, 1536, False), (66, 650, True)])
def test_int8_kernel_is_bit_identical_to_fbgemm(n, k, bias, kernel_isa):
    """Decode steps and verifications (up to the kernel's row limit) run kernels/q8.c, prompts run FBGEMM: both
    must be one model, so the kernel must reproduce FBGEMM bit for bit. K = 200 and 650 leave a partial column
    chunk, N = 129 and 66 a partial block of rows; each row's absmax lands exactly on a rounding tie (+-63.5)."""
    torch.manual_seed(n)
    lin = Int8Linear.from_float(torch.randn(n, k) * 0.05, torch.randn(n) if bias else None)
    assert kernel_isa in (2, 8)
    for rows in range(1, kernel_isa + 3):
        x = torch.randn(rows, k) * torch.logspace(-3, 3, rows)[:, None]
        x[0] = near_ties(k)
        got = lin(x)
        assert got.shape == (rows, n)
        assert torch.equal(got, fbgemm_only(lin, x)), f"{rows} rows differ from FBGEMM"
    assert lin.blocked is not None  # the kernel did serve the small batches


def on_one_and_two_threads(lin, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lin(x)`` computed with one torch/OpenMP thread and with two."""
    with torch_threads(1):
        one = lin(x)
    with torch_threads(2):
        return one, lin(x)


def test_int8_kernel_is_thread_invariant_and_takes_prompts(kernel_isa):
    torch.manual_seed(3)
    lin = Int8Linear.from_float(torch.randn(257, 320) * 0.05, torch.randn(257))
    x = torch.randn(kernel_isa, 320)
    one, two = on_one_and_two_threads(lin, x)
    assert torch.equal(one, two) and torch.equal(one, torch.cat([lin(x[i : i + 1]) for i in range(kernel_isa)]))
    from specbranch.kernels import library

    # Beyond its group size the kernel makes several groups per pass and several passes of 64 rows (prompts on a
    # lent core): still FBGEMM's bits, on one thread and two.
    for m in (kernel_isa + 1, 64, 64 + kernel_isa + 3):
        x = torch.randn(m, 320) * torch.logspace(-2, 2, m)[:, None]
        want = fbgemm_only(lin, x)
        for threads in (1, 2):
            with torch_threads(threads):
                y = torch.empty(m, 257)
                assert library().q8_linear_f32(x.data_ptr(), m, 320, lin.blocked.data_ptr(), lin.wsum.data_ptr(),
                                               lin.mult.data_ptr(), lin.ACT_INV, lin.bias.data_ptr(), 257,
                                               y.data_ptr()) == 0
                assert torch.equal(y, want), f"{m} rows on {threads} thread(s) differ from FBGEMM"


def test_int8_kernel_gives_the_same_bits_with_avx2_and_vnni():
    """The AVX-512 VNNI code sums the same integers as the AVX2 code, so a target step gives the same result
    whichever the CPU runs (both are also compared with FBGEMM above; this holds them to each other directly)."""
    lin = Int8Linear.from_float(torch.randn(131, 650) * 0.05, torch.randn(131))
    x = torch.randn(2, 650)
    x[0] = near_ties(650)
    with pinned_isa(True) as vnni:
        if not vnni:
            pytest.skip("this CPU has no AVX-512 VNNI")
        on_vnni = lin(x)
    with pinned_isa(False):
        on_avx2 = lin(x)
    assert torch.equal(on_vnni, on_avx2)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("fp64", torch.float64), ("bf16", torch.float32)])
def test_dense_linear_returns_the_input_dtype(precision, dtype):
    lin = make_linear(torch.randn(8, 4), None, precision)
    assert lin(torch.randn(3, 4, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vocab_subset_head_keeps_rows_and_masks_the_rest(precision):
    from specbranch.models.linear import make_linear, subset_head

    torch.manual_seed(0)
    weight = torch.randn(50, 16)
    head = make_linear(weight, None, precision)
    ids = torch.tensor([7, 0, 3, 49, 3])  # unsorted, with a repeat
    sub = subset_head(head, ids, 50)
    x = torch.randn(2, 3, 16)
    full, got = head(x), sub(x)  # [2, 3, 50] each
    keep = torch.tensor([0, 3, 7, 49])
    assert got.shape == full.shape
    assert torch.allclose(got[..., keep], full[..., keep], atol=1e-5)
    rest = torch.ones(50, dtype=torch.bool)
    rest[keep] = False
    assert torch.isinf(got[..., rest]).all() and (got[..., rest] < 0).all()


# ---------------------------------------------------------------- int4 (draft-only) weights


def int4_layer(n=200, k=192, bias=True, seed=0):
    from specbranch.models.linear import Int4Linear

    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    return Int4Linear.from_int8(Int8Linear.from_float(w, torch.randn(n) if bias else None).pack()), w


def test_int4_quantization_round_trip_is_within_one_step():
    from specbranch.models.linear import dequantize_int4, quantize_int4

    torch.manual_seed(0)
    w = torch.randn(33, 128) * torch.logspace(-3, 1, 33)[:, None]  # rows of very different scale
    packed, scales = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (33, 64) and scales.shape == (33, 2)
    assert scales.dtype == torch.float16  # 2 bytes per 64 weights: what a draft step reads besides the nibbles
    step = scales.float().abs()[..., None]
    err = (dequantize_int4(packed, scales) - w).abs().view(33, 2, 64)
    assert (err <= step * 0.5 + 1e-9).float().mean() > 0.99  # rounding: half a step
    assert (err <= step + 1e-9).all()  # only +8 clamps to +7: one step at most
    peak = w.view(33, 2, 64).abs().amax(-1)
    # the largest magnitude maps to -8 steps, exact up to the fp16 rounding of its scale
    assert torch.allclose(scales.float().abs() * 8, peak, rtol=2**-11, atol=0)


def test_int4_blocked_layout_round_trips():
    """The kernel reads blocks of 16 rows in steps of 8 columns: row r's 4 bytes of step s hold its columns
    8s..8s+3 in their low nibbles and 8s+4..8s+7 in their high ones. N = 21 leaves a padded block."""
    from specbranch.models.linear import block_int4, quantize_int4, unblock_int4

    packed, scales = quantize_int4(torch.randn(21, 128))
    u = torch.cat([packed.view(21, 2, 32) & 15, packed.view(21, 2, 32) >> 4], dim=-1).view(21, 128)  # [N, K]
    wblk, dblk = block_int4(packed, scales)
    assert wblk.shape == (2, 16, 16, 4) and dblk.shape == (2, 2, 16)
    for block, row, step in ((0, 3, 0), (1, 4, 9), (1, 0, 15)):
        n = 16 * block + row
        assert torch.equal(wblk[block, step, row] & 15, u[n, 8 * step : 8 * step + 4])
        assert torch.equal(wblk[block, step, row] >> 4, u[n, 8 * step + 4 : 8 * step + 8])
    assert dblk[1, 0, 4] == scales[20, 0] and dblk[0, 1, 3] == scales[3, 1]
    assert (wblk[1, :, 5:] == 0).all() and (dblk[1, :, 5:] == 0).all()  # the padding rows
    back = unblock_int4(wblk, dblk, 21)
    assert torch.equal(back[0], packed) and torch.equal(back[1], scales)


def test_int4_kernel_matches_the_dequantized_reference(kernel_isa):
    """The C kernel computes exactly the documented sum: per-row int8 activations times the int4
    weights, per group scaled; checked against the same sum in float64. N = 203: a partial block."""
    from specbranch.models.linear import dequantize_int4

    lin, _ = int4_layer(n=203)
    x = torch.randn(3, 192) * torch.tensor([[0.01], [1.0], [100.0]])
    amax = x.abs().amax(dim=1, keepdim=True)
    xq = torch.round(x * (127 / amax))  # what the kernel feeds the integer dot
    want = (xq.double() @ dequantize_int4(lin.packed, lin.scales).double().T) * (amax.double() / 127) + lin.bias.double()
    got = lin(x)
    assert got.shape == (3, 203) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


def test_int4_linear_is_batch_and_thread_invariant(kernel_isa):
    lin, _ = int4_layer(bias=False)
    x = torch.randn(4, 192)
    together = lin(x)
    assert torch.equal(together, torch.cat([lin(x[i : i + 1]) for i in range(4)]))  # each row alone
    for m in (2, 3):
        assert torch.equal(together[:m], lin(x[:m])), f"{m} rows differ from the same rows among 4"
    one, two = on_one_and_two_threads(lin, x)
    assert torch.equal(one, two) and torch.equal(one, together)


@pytest.mark.parametrize("n", [201, 250])
def test_int4_kernel_gives_the_same_bits_with_avx2_and_vnni(n):
    """The VNNI code forms the AVX2 code's integer partial sums and does the same float operations on them, so a
    draft step gives the same result whichever the CPU runs; 1-4 rows (AVX2 takes 3-4 rows in two half-block
    passes). At one row VNNI runs quads of blocks a quarter of the matrix apart: N = 201 is 13 blocks (3 quads
    and the partial block alone), N = 250 is 16 (4 quads, the partial block in the last)."""
    lin, _ = int4_layer(n=n, k=320)
    assert_same_bits_on_avx2_and_vnni(lin, torch.randn(4, 320) * torch.logspace(-2, 2, 4)[:, None])


def assert_same_bits_on_avx2_and_vnni(lin, x: torch.Tensor) -> None:
    """``lin`` on the first 1, 2, ... rows of ``x`` gives the same bits with the VNNI code and the AVX2 code
    (skipped where the CPU lacks VNNI)."""
    for m in range(1, x.shape[0] + 1):
        with pinned_isa(True) as vnni:
            if not vnni:
                pytest.skip("this CPU has no AVX-512 VNNI")
            on_vnni = lin(x[:m])
        with pinned_isa(False):
            on_avx2 = lin(x[:m])
        assert torch.equal(on_vnni, on_avx2), f"{m} rows differ"


def test_int4_linear_falls_back_to_int8_for_large_batches():
    lin, w = int4_layer()
    x = torch.randn(2, lin.MAX_ROWS + 1, 192)  # 10 rows: the prompt-sized path
    assert torch.equal(lin(x), lin.base(x))
    assert lin(x[:0]).shape == (0, lin.MAX_ROWS + 1, lin.out_features)
    y = torch.empty(lin.MAX_ROWS + 1, lin.out_features)  # the kernel itself refuses what it has no code for
    assert lin.lib.q4_linear_f32(x[0].contiguous().data_ptr(), lin.MAX_ROWS + 1, 192, lin.wblk.data_ptr(),
                                 lin.dblk.data_ptr(), None, lin.out_features, y.data_ptr()) == -2
    six = torch.randn(6, 192)  # within the int8 kernel's rows on VNNI, but an int4 layer's base stays on FBGEMM
    assert torch.equal(lin(six), fbgemm_only(lin.base, six)) and lin.base.blocked is None
    small = x[0, :2]
    assert not torch.equal(lin(small), lin.base(small))  # below the limit the int4 weights serve
    want = torch.nn.functional.linear(small, w, lin.bias)
    assert (lin(small) - want).abs().max() / want.abs().max() < 0.1  # int4: coarse, but the same layer


def test_int4_subset_head_keeps_its_rows():
    from specbranch.models.linear import subset_head

    lin, _ = int4_layer(n=50, bias=False)
    ids = torch.tensor([7, 0, 3, 49])
    sub = subset_head(lin, ids, 50)
    x = torch.randn(1, 2, 192)
    got, full = sub(x), lin(x)
    keep = torch.tensor([0, 3, 7, 49])
    assert torch.equal(got[..., keep], full[..., keep])
    assert torch.isinf(got).sum() == 2 * 46


def test_int4_rows_in_any_order_score_as_the_full_layer():
    """rows() unpacks only the blocks it needs (admitting a few tokens must be cheap): ids from several blocks,
    unsorted, score exactly as the full layer's columns, at the kernel's row counts and on the int8 fallback."""
    lin, _ = int4_layer(n=70, bias=True)
    ids = torch.tensor([69, 3, 40, 17, 16, 0])  # blocks 4, 0, 2, 1, 1, 0 of 16 rows (the last one partial)
    sub = lin.rows(ids)
    for rows in (1, 3, 9):
        x = torch.randn(rows, 192)
        assert torch.equal(sub(x), lin(x)[:, ids])


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_vocab_subset_head_admits_context_tokens_until_cleared(precision):
    from specbranch.models.linear import make_linear, subset_head

    torch.manual_seed(0)
    head = int4_layer(n=50, bias=False)[0] if precision == "int4" else make_linear(torch.randn(50, 192), None, precision)
    sub = subset_head(head, torch.arange(0, 50, 2), 50)  # the even tokens
    if precision != "fp32":  # the full head is kept to cut rows from, without its prepacked copy (rebuilt if called)
        assert (head.base if precision == "int4" else head).packed is None
    # the kernels score a row alike in any subset; fp32 GEMM may round differently for another width
    same = (lambda a, b: torch.allclose(a, b, atol=1e-5)) if precision == "fp32" else torch.equal
    x = torch.randn(2, 192)
    full = head(x)
    assert torch.isinf(sub(x)[:, 1::2]).all()
    sub.admit([7, 4, 31, 7, 99])  # 4 is ranked already, 99 lies outside the vocabulary
    got = sub(x)
    assert same(got[:, [7, 31]], full[:, [7, 31]]) and same(got[:, ::2], full[:, ::2])
    odd = [t for t in range(1, 50, 2) if t not in (7, 31)]
    assert torch.isinf(got[:, odd]).all()
    extra, size = sub.extra, sub.read_bytes()
    sub.admit([7, 2])
    assert sub.extra is extra  # nothing new: no rebuild
    sub.admit([9])
    assert sub.read_bytes() >= size and same(sub(x)[:, 9], full[:, 9])  # int4 pads rows to blocks of 16
    sub.clear()
    assert torch.isinf(sub(x)[:, 1::2]).all() and sub.read_bytes() < size


def test_missing_compiler_is_a_clear_reason(monkeypatch, tmp_path):
    from specbranch import kernels

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPECBRANCH_CACHE", str(tmp_path))  # no kernel built here yet
    kernels.library.cache_clear()
    try:
        reason = kernels.unavailable()
        assert reason and "compil" in reason
    finally:
        kernels.library.cache_clear()
