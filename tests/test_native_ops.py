"""The C path between a float32 layer's linears (models/fused.py NativeOps, kernels/layer.c): the same model as the
torch path to float rounding, and exactly batch- and thread-invariant, so that verifying a block gives the tokens
decoding it one by one gives."""

import pytest
import torch

from specbranch.backend import NativeBackend
from specbranch.config import GenerationConfig, SamplingConfig, SpeculationConfig
from specbranch.engines import ENGINE_CLASSES, AREngine, generate
from specbranch.kernels import unavailable
from specbranch.models import fused
from specbranch.models.decoder import Decoder, DecoderConfig
from specbranch.models.fused import NativeOps
from specbranch.models.linear import Int8Linear

from conftest import make_tiny_hf, perturbed, switched_off
from test_linear import on_one_and_two_threads

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no native kernels: {unavailable()}")


@pytest.fixture
def attention_calls(monkeypatch) -> list[tuple[int, int]]:
    """``(rows, t)`` of every C attention call taken during the test."""
    calls = []
    attention = NativeOps.attention
    monkeypatch.setattr(NativeOps, "attention",
                        lambda self, qkv, *a: calls.append(tuple(qkv.shape[:2])) or attention(self, qkv, *a))
    return calls


def decoder(model, precision: str = "fp32") -> Decoder:
    return Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), precision)


# head_dim 16, and 64: the C attention sums values 64 floats at a time in registers, other sizes a key at a time
HEAD_DIM_64 = dict(hidden_size=256, num_attention_heads=4, intermediate_size=192)
PROMPT = [(7 * i + 5) % 97 for i in range(40)]  # 40 keys: more than one block of 32 in the C attention


@pytest.mark.parametrize("model_type,overrides", [("qwen2", {}), ("llama", {}), ("qwen2", HEAD_DIM_64)],
                         ids=["qwen2", "llama", "head_dim_64"])  # q/k/v biases and none
def test_native_ops_are_the_torch_layer(model_type, overrides, attention_calls):
    model = make_tiny_hf(model_type, seed=4, **overrides)
    backend = NativeBackend(decoder(model), max_len=64)

    def steps():
        """Logits and hidden states of a prompt, a 1-token and a 2-token step, and two steps of 3 branch rows
        (the second attends to each row's own first branch token)."""
        backend.reset()
        out = [backend.forward(torch.tensor([PROMPT]), hidden_layers=(1, -1))]
        out.append(backend.forward(torch.tensor([[4]]), hidden_layers=(1, -1)))
        out.append(backend.forward(torch.tensor([[6, 11]]), hidden_layers=(1, -1)))
        backend.fork(3)
        out.append(backend.forward(torch.tensor([[1], [2], [3]]), hidden_layers=(1, -1)))
        out.append(backend.forward(torch.tensor([[4], [4], [4]]), hidden_layers=(1, -1)))
        return out

    native = steps()
    layers = model.config.num_hidden_layers
    assert attention_calls == [s for s in [(1, 40), (1, 1), (1, 2), (3, 1), (3, 1)] for _ in range(layers)]
    with switched_off(NativeOps):  # the torch ops instead of the C ones
        plain = steps()
    assert len(attention_calls) == 5 * layers  # none in the torch path
    for got, want in zip(native, plain):
        for a, b in ((got.logits, want.logits), (got.hidden, want.hidden)):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()  # float rounding only
    assert not torch.equal(native[-1].logits[0], native[-1].logits[1])  # same token, each row saw its own branch


@pytest.mark.parametrize("overrides", [{}, HEAD_DIM_64], ids=["head_dim_16", "head_dim_64"])
def test_a_verified_block_is_bit_identical_to_decoding_it(overrides, attention_calls):
    """int8, float32 activations: the target's precision. Logits of a block of 6 tokens (more than the C attention's
    4 per task) equal those of the same tokens one step each, bit for bit, on one thread and on two, through the int8
    kernel and through FBGEMM; and a branch row's step does not depend on the other branch rows."""
    backend = NativeBackend(decoder(make_tiny_hf("qwen2", seed=4, **overrides), "int8"), max_len=64)
    prompt, block = PROMPT[:30], [4, 6, 11, 1, 2, 90]  # the block crosses key 32

    def one_by_one(_=None) -> torch.Tensor:
        backend.reset()
        backend.forward(torch.tensor([prompt]))
        return torch.cat([backend.forward(torch.tensor([[x]])).logits for x in block], dim=1)

    def at_once(_=None) -> torch.Tensor:
        backend.reset()
        backend.forward(torch.tensor([prompt]))
        return backend.forward(torch.tensor([block])).logits

    want = one_by_one()
    assert torch.equal(at_once(), want)
    assert all(torch.equal(a, want) for a in on_one_and_two_threads(at_once, None))
    rows = Int8Linear.KERNEL_ROWS
    try:
        Int8Linear.KERNEL_ROWS = 0  # every linear through FBGEMM
        assert torch.equal(at_once(), want)
    finally:
        Int8Linear.KERNEL_ROWS = rows
    assert (1, len(block)) in attention_calls

    def branches(k: int) -> torch.Tensor:
        backend.reset()
        backend.forward(torch.tensor([prompt]))
        backend.fork(k)
        backend.forward(torch.tensor([[4], [6], [11]][:k]))
        return backend.forward(torch.tensor([[1], [2], [3]][:k])).logits

    assert torch.equal(branches(3)[:1], branches(1))


def test_engines_on_an_int8_target_emit_ar_tokens():
    """With the target at int8 (float32 activations, the C path), every engine's verified blocks reproduce ar."""
    target_model = make_tiny_hf("qwen2", seed=5, tie=True, vocab_size=64)
    draft_model = perturbed(target_model, seed=6, scale=0.05)

    def backend(model):
        return NativeBackend(decoder(model, "int8"), max_len=256)

    prompt, gen = [3, 1, 4, 1, 5], GenerationConfig(max_new_tokens=40)
    want = generate(AREngine(backend(target_model)), prompt, gen, SamplingConfig()).tokens
    for name in ("sd", "pearl", "specbranch"):
        engine = ENGINE_CLASSES[name](backend(target_model), backend(draft_model), SpeculationConfig(4, 3, 0.3))
        got = generate(engine, prompt, gen, SamplingConfig())
        assert got.tokens == want, name
        assert got.metrics.num_accepted_tokens > 0, name  # blocks were verified, not just single tokens


def test_native_ops_apply_only_to_float32_on_the_cpu(monkeypatch):
    model = make_tiny_hf("llama", seed=4)
    assert decoder(model).native is not None and decoder(model, "int8").native is not None
    assert decoder(model, "fp64").native is None  # exactness tests keep float64 throughout
    assert decoder(make_tiny_hf("llama", seed=4, hidden_size=48)).native is None  # head_dim 12
    monkeypatch.setattr(fused, "optional_library", lambda: None)  # no C compiler here
    plain = decoder(model)
    assert plain.native is None
    out = NativeBackend(plain, max_len=16).forward(torch.tensor([[1, 2]])).logits  # the torch path still runs
    assert out.shape == (1, 2, model.config.vocab_size)
