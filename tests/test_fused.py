"""The int4 draft's fused decode step (models/fused.py, kernels/q4_layer.c): the same layer as the torch path
to float rounding, row by row independent of its batch and thread count, and only where it applies."""

from contextlib import contextmanager

import pytest
import torch

from specbranch.backend import NativeBackend
from specbranch.kernels import unavailable
from specbranch.models.decoder import Decoder, DecoderConfig
from specbranch.models.fused import Int4Block

from conftest import make_tiny_hf
from test_linear import on_one_and_two_threads

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no native kernels: {unavailable()}")


@contextmanager
def torch_path():
    """Decode steps through the torch ops instead of the fused kernels."""
    Int4Block.ENABLED = False
    try:
        yield
    finally:
        Int4Block.ENABLED = True


def int4_decoder(tmp_path, model_type="qwen2", **overrides):
    """A tiny model as an int4 draft whose every linear is int4 (all inputs 64 or 128 wide), so every layer fuses."""
    from specbranch.models.loader import to_int4

    model = make_tiny_hf(model_type, seed=3, **{"intermediate_size": 128, **overrides})
    decoder = Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), "int8")
    return to_int4(decoder, tmp_path / "int4.safetensors")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])  # q/k/v biases and none
def test_fused_step_is_the_torch_layer(tmp_path, model_type, monkeypatch):
    decoder = int4_decoder(tmp_path, model_type)
    calls = []
    fused_in = Int4Block.attn_in
    monkeypatch.setattr(Int4Block, "attn_in", lambda self, h, *a: calls.append(h.shape[:2]) or fused_in(self, h, *a))
    assert all(layer.block is not None for layer in decoder.layers)
    backend = NativeBackend(decoder, max_len=64)

    def steps():
        """Logits of a 7-token prompt (torch path either way: 7 rows), a 1-token step, a 2-token step and a
        3-branch step, each from the same cache state."""
        backend.reset()
        out = [backend.forward(torch.tensor([[5, 9, 2, 7, 1, 3, 8]])).logits]
        out.append(backend.forward(torch.tensor([[4]])).logits)
        out.append(backend.forward(torch.tensor([[6, 11]])).logits)
        backend.fork(3)
        out.append(backend.forward(torch.tensor([[1], [2], [3]])).logits)
        return out

    fused = steps()
    layers = len(decoder.layers)
    assert calls == [(1, 1)] * layers + [(1, 2)] * layers + [(3, 1)] * layers  # every step but the prompt's
    with torch_path():
        plain = steps()
    assert len(calls) == 3 * layers
    assert torch.equal(fused[0], plain[0])  # the prompt is not a fused step
    for got, want in zip(fused[1:], plain[1:]):
        assert got.shape == want.shape
        # the same sums up to float rounding (and the odd int8 activation rounded the other way)
        assert (got - want).abs().max() <= 2e-3 * want.abs().max(), (got - want).abs().max()


def test_fused_kernels_are_batch_and_thread_invariant(tmp_path):
    decoder = int4_decoder(tmp_path)
    block, c = decoder.layers[0].block, decoder.cfg
    cos, sin = decoder._rope(5, 1)
    h = torch.randn(4, 1, c.hidden_size)  # 4 rows, one token each (branch rows)
    attn = torch.randn(4, 1, c.num_heads * c.head_dim)
    for run in (lambda x: block.attn_in(x, cos, sin), lambda x: block.attn_out(x, attn[: x.shape[0]])):
        together = run(h)
        assert torch.equal(together[:1], run(h[:1]))  # a row's result does not depend on its batch
        one, two = on_one_and_two_threads(run, h)
        assert torch.equal(one, two) and torch.equal(one, together)
    cos2, sin2 = decoder._rope(5, 2)  # one row of 2 tokens: each token at its own position
    two_tokens = block.attn_in(h[:2].view(1, 2, -1), cos2, sin2)
    assert torch.equal(two_tokens[:, :1], block.attn_in(h[:1], cos, sin))
    assert not torch.equal(two_tokens[0, 1], block.attn_in(h[1:2], cos, sin)[0, 0])  # position 6, not 5


def test_fused_step_applies_only_to_int4_layers_and_small_steps(tmp_path):
    decoder = int4_decoder(tmp_path, intermediate_size=96)  # down is 96 wide: stays int8, so nothing fuses
    assert all(layer.block is None for layer in decoder.layers)
    (tmp_path / "b").mkdir()
    decoder = int4_decoder(tmp_path / "b")
    calls = []
    block = decoder.layers[0].block
    block.attn_out = lambda h, a, f=block.attn_out: calls.append(h.shape) or f(h, a)
    backend = NativeBackend(decoder, max_len=64)
    backend.forward(torch.tensor([[1] * (Int4Block.MAX_ROWS + 1)]))  # more rows than the kernels take
    backend.forward(torch.tensor([[1] * Int4Block.MAX_ROWS]))
    assert calls == [(1, Int4Block.MAX_ROWS, decoder.cfg.hidden_size)]
    lin = decoder.layers[1].qkv
    decoder.set_linear("layers.1.qkv", lin.base)  # a layer whose linears change decides again
    assert decoder.layers[1].block is None and decoder.layers[0].block is block
    with pytest.raises(ValueError, match="fused int4 q/k/v linear: 5 rows, the kernel takes 1..4"):
        block.attn_in(torch.randn(5, 1, decoder.cfg.hidden_size), *decoder._rope(0, 1))
