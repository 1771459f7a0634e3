"""Precision q4k: GGUF Q4_K linears read as stored (kernels/q4k.c), on random Q4_K blocks and on a tiny GGUF model.

The kernel's oracle is gguf-py's own Q4_K dequantization: the kernel must compute per-row int8 activations times
exactly those weights. The model's: the same engines at T = 0 give `ar`'s tokens, and the fused layer step the
unfused one's bits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf, perturbed
from test_linear import assert_same_bits_on_avx2_and_vnni, kernel_isa, on_one_and_two_threads  # noqa: F401
from test_registry import gguf_name

from specbranch.errors import ModelError
from specbranch.kernels import unavailable

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"the native kernels cannot run here: {unavailable()}")

Q4_K = gguf.GGMLQuantizationType.Q4_K


def random_q4k(n: int, k: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """``[n, k/256 * 144]`` uint8: random block_q4_K rows (random 6-bit scales and mins, nibbles; finite fp16 d and
    dmin, so the weights lie within about +-scale)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
    d = (rng.random((n, k // 256, 2)) * scale / 63 / 15 * np.array([2.0, 15.0])).astype(np.float16)
    raw[:, :, :4] = d.view(np.uint8).reshape(n, k // 256, 4)
    return raw.reshape(n, -1)


def dequantized(raw: np.ndarray) -> torch.Tensor:
    n = raw.shape[0]
    return torch.from_numpy(gguf.quants.dequantize(raw, Q4_K).reshape(n, -1))


def q4k_layer(n: int = 37, k: int = 512, bias: bool = True, seed: int = 0):
    from specbranch.models.linear import Q4KLinear

    raw = random_q4k(n, k, seed)
    return Q4KLinear(torch.from_numpy(raw), torch.randn(n) if bias else None), raw


def test_q4k_kernel_matches_gguf_dequantization(kernel_isa):
    """The documented sum, in float64 over gguf-py's dequantized weights: N = 37 (a partial block of 16 rows), rows
    of very different sizes, and 70 rows (two passes of the prompt code)."""
    lin, raw = q4k_layer()
    w = dequantized(raw).double()
    for m in (1, 3, 9, 70):
        x = torch.randn(m, 512) * torch.logspace(-2, 2, m)[:, None]
        amax = x.abs().amax(dim=1, keepdim=True)
        xq = torch.round(x * (127 / amax)).double()  # the kernel's int8 activations
        want = (xq @ w.T) * (amax.double() / 127) + lin.bias.double()
        got = lin(x)
        assert got.shape == (m, 37) and got.dtype == torch.float32
        size = (xq.abs() @ w.abs().T) * (amax.double() / 127)  # the sum's own scale, per element
        assert ((got.double() - want).abs() <= 1e-5 * size + 1e-6).all(), m
    with pytest.raises(ValueError, match="block"):
        type(lin)(torch.zeros(4, 100, dtype=torch.uint8), None)


def test_q4k_kernel_fails_on_a_wrong_scale_index():
    """The test above can fail: the same weights with two sub-blocks' scales swapped give other results."""
    from specbranch.models.linear import Q4KLinear

    raw = random_q4k(16, 256, seed=1)
    swapped = raw.copy()
    swapped[:, 4], swapped[:, 5] = raw[:, 5], raw[:, 4]  # sub-blocks 0 and 1: scale bytes
    x = torch.randn(2, 256)
    assert not torch.allclose(Q4KLinear(torch.from_numpy(raw), None)(x), Q4KLinear(torch.from_numpy(swapped), None)(x))


def test_q4k_linear_is_batch_and_thread_invariant(kernel_isa):
    lin, _ = q4k_layer(n=50, k=768, seed=2)
    x = torch.randn(70, 768)
    together = lin(x)
    assert torch.equal(together, torch.cat([lin(x[i : i + 1]) for i in range(70)]))  # each row alone
    for m in (2, 8, 9, 64):
        assert torch.equal(together[:m], lin(x[:m])), f"{m} rows differ from the same rows among 70"
    one, two = on_one_and_two_threads(lin, x[:9])
    assert torch.equal(one, two) and torch.equal(one, together[:9])


def test_q4k_kernel_gives_the_same_bits_with_avx2_and_vnni():
    lin, _ = q4k_layer(n=45, k=512, seed=3)
    assert_same_bits_on_avx2_and_vnni(lin, torch.randn(10, 512) * torch.logspace(-2, 2, 10)[:, None])


# ---------------------------------------------------------------- a tiny GGUF model at precision q4k

SIZE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=300)
# Layer 0 as the real target's odd layers (v and down Q6_K, here Q8_0: stay int8); layer 1 all Q4_K.
Q4K_TENSORS = {f"blk.{i}.{kind}.weight" for i in (0, 1) for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate",
                                                                       "ffn_up")} | {"blk.1.attn_v.weight",
                                                                                     "blk.1.ffn_down.weight"}
Q8_TENSORS = {"blk.0.attn_v.weight", "blk.0.ffn_down.weight"}


def write_q4k_gguf(path, model) -> None:
    """``model`` as a qwen2 GGUF with the tensors above as random Q4_K blocks (the model's weights set to their
    dequantized values) or Q8_0, the rest float32; with the conftest tokenizer."""
    from test_registry import gguf_writer, tiny_tokenizer_meta

    w = gguf_writer(path, model.config, "qwen2", tiny_tokenizer_meta(path.parent / "tok"))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            gname = gguf_name(name)
            if gname in Q4K_TENSORS:
                raw = random_q4k(p.shape[0], p.shape[1], seed=i, scale=0.15)
                w.add_tensor(gname, raw, raw_dtype=Q4_K)
                p.copy_(dequantized(raw))
            elif gname in Q8_TENSORS:
                q = gguf.quants.quantize(p.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            else:
                w.add_tensor(gname, np.ascontiguousarray(p.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def q4k_model(tmp_path_factory):
    """(converted folder of the tiny GGUF, the transformers model with its weights)."""
    from specbranch.models import registry

    root = tmp_path_factory.mktemp("q4k")
    model = make_tiny_hf("qwen2", seed=7, tie=True, **SIZE)
    write_q4k_gguf(root / "tiny-q4k.gguf", model)
    return registry.resolve_model(str(root / "tiny-q4k.gguf"), progress=False, cache_dir=root / "cache"), model


def test_q4k_precision_reads_the_q4k_tensors_and_matches_the_model(q4k_model):
    from specbranch.models.linear import Int8Linear, Q4KLinear, RowConcat
    from specbranch.models.loader import load_decoder

    folder, model = q4k_model
    dec = load_decoder(folder, "q4k")
    lin = dec.linears()
    assert isinstance(lin["layers.0.qkv"], RowConcat) and isinstance(lin["layers.0.qkv"].first, Q4KLinear)
    assert isinstance(lin["layers.0.qkv"].second, Int8Linear) and isinstance(lin["layers.0.down"], Int8Linear)
    assert all(isinstance(lin[f"layers.1.{n}"], Q4KLinear) for n in ("qkv", "o", "gate_up", "down"))
    assert isinstance(lin["layers.0.gate_up"], Q4KLinear) and isinstance(lin["lm_head"], Int8Linear)
    assert dec.read_bytes() < load_decoder(folder, "int8").read_bytes()
    assert all(run is not None for _, _, run in dec.runs)  # every layer fuses
    from specbranch.backend import NativeBackend

    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits.double()
    err = (NativeBackend(dec, max_len=64).forward(ids).logits.double() - want).abs().max().item()
    err_int8 = (NativeBackend(load_decoder(folder, "int8"), max_len=64).forward(ids).logits.double() - want).abs().max()
    # Both quantize activations to int8 (on this tiny random model that alone moves logits by several percent); q4k
    # keeps the Q4_K weights exact where int8 rounds them again, so it lands closer.
    assert err <= 0.1 * want.abs().max().item() and err < err_int8.item()


def test_fused_q4k_step_is_the_unfused_layer_bit_for_bit(q4k_model, kernel_isa):
    from conftest import switched_off

    from specbranch.backend import NativeBackend
    from specbranch.models.fused import FusedLayer
    from specbranch.models.loader import load_decoder

    folder, _ = q4k_model
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))

    def steps():
        backend = NativeBackend(load_decoder(folder, "q4k"), max_len=64)
        out = [backend.forward(ids[:, :6]).logits]
        out += [backend.forward(ids[:, 6 + j : 7 + j]).logits for j in range(3)]  # 1-row steps
        out.append(backend.forward(ids[:, 9:12]).logits)  # a 3-row verification
        return out

    fused = steps()
    with switched_off(FusedLayer):
        unfused = steps()
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))


@pytest.mark.parametrize("name", ("sd", "pearl", "specbranch"))
def test_engines_at_q4k_equal_ar(q4k_model, name):
    """Lossless at T = 0 with a Q4_K target: every engine emits ar's tokens (the target's verifications give the
    bits its one-token steps give)."""
    from specbranch.backend import NativeBackend
    from specbranch.config import GenerationConfig, SamplingConfig, SpeculationConfig
    from specbranch.engines import ENGINE_CLASSES, AREngine, generate
    from specbranch.models.decoder import Decoder, DecoderConfig
    from specbranch.models.loader import load_decoder

    folder, model = q4k_model
    draft_model = perturbed(model, seed=8, scale=0.05)
    cfg = DecoderConfig.from_hf(draft_model.config.to_dict())
    target = NativeBackend(load_decoder(folder, "q4k"), max_len=256)
    draft = NativeBackend(Decoder(cfg, draft_model.state_dict(), "fp32"), max_len=256)
    engine = ENGINE_CLASSES[name](target, draft, SpeculationConfig(gamma=4, branches=3, tau=0.2))
    ar = AREngine(NativeBackend(load_decoder(folder, "q4k"), max_len=256))
    accepted = 0
    for seed, length in itertools.product(range(2), (1, 7)):
        prompt = torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = generate(ar, prompt, GenerationConfig(max_new_tokens=30), SamplingConfig())
        got = generate(engine, prompt, GenerationConfig(max_new_tokens=30), SamplingConfig())
        assert got.tokens == want.tokens, (seed, length)
        accepted += got.metrics.num_accepted_tokens
    assert accepted > 0


def test_q4k_precision_needs_the_gguf_file(tiny_folder):
    from specbranch.models.loader import load_decoder

    _, folder, _ = tiny_folder
    with pytest.raises(ModelError, match="--precision int8"):
        load_decoder(folder, "q4k")


def test_auto_precision_takes_q4k_only_where_the_gguf_has_q4k(q4k_model, tiny_folder, monkeypatch):
    """auto: q4k for a target converted from a GGUF with Q4_K linears, int8 for a Hugging Face folder; the index of
    Q4_K tensors is read from the GGUF once, then from its cache in the folder (gguf-py's reader is slow)."""
    import gguf as gguf_module

    from specbranch.config import ModelConfig
    from specbranch.models.loader import Q4K_INDEX, has_q4k
    from specbranch.pipeline import target_precision

    folder, _ = q4k_model
    assert target_precision(ModelConfig(), folder) == "q4k"
    assert (folder / Q4K_INDEX).is_file()
    monkeypatch.setattr(gguf_module, "GGUFReader", lambda *a: pytest.fail("the cached index was not used"))
    assert has_q4k(folder)
    _, hf_folder, _ = tiny_folder
    assert target_precision(ModelConfig(), hf_folder) == "int8"
    assert target_precision(ModelConfig(precision="bf16"), hf_folder) == "bf16"
    assert target_precision(ModelConfig(), hf_folder, device="cuda") == "bf16"
    assert target_precision(ModelConfig(backend="hf"), hf_folder) == "fp32"
