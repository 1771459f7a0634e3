"""The fused decode step (models/fused.py FusedLayer, kernels/layer.c): the same layer as the unfused path (the
same linears one call each, the C ops of test_native_ops between them): to float rounding for the int4 draft, bit
for bit for the int8 target, whose numbers decide the output; row by row independent of its batch and thread count,
and only where it applies."""

import pytest
import torch

from specbranch.backend import NativeBackend
from specbranch.kernels import unavailable
from specbranch.models.decoder import Decoder, DecoderConfig
from specbranch.models.fused import FusedLayer, FusedRun
from specbranch.models.linear import Int4Linear, Int8Linear

from conftest import make_tiny_hf, switched_off
from test_linear import kernel_isa, on_one_and_two_threads  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no native kernels: {unavailable()}")


def int4_decoder(tmp_path, model_type="qwen2", **overrides):
    """A tiny model as an int4 draft whose every linear is int4 (all inputs 64 or 128 wide), so every layer fuses."""
    from specbranch.models.loader import to_int4

    model = make_tiny_hf(model_type, seed=3, **{"intermediate_size": 128, **overrides})
    decoder = Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), "int8")
    return to_int4(decoder, tmp_path / "int4.safetensors")


def test_an_int4_cache_with_float32_scales_is_quantized_again(tmp_path):
    """Before the scales were fp16 the cache held float32 ones, and its nibbles were rounded against those: such a
    file must not be read as fp16 (the kernel would take its bytes for other numbers), nor its nibbles kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    fresh = int4_decoder(tmp_path)
    path = tmp_path / "int4.safetensors"
    with safe_open(str(path), framework="pt") as f:
        old = {n: f.get_tensor(n).float() if n.endswith(".scales") else f.get_tensor(n) for n in f.keys()}
    old = {n: t * 1.5 if n.endswith(".scales") else t for n, t in old.items()}  # other scales: a stale cache
    save_file(old, str(path))
    again = int4_decoder(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_slice(n).get_dtype() == "F16" for n in f.keys() if n.endswith(".scales"))  # rewritten
    for name, lin in again.linears().items():
        if isinstance(lin, Int4Linear):
            assert lin.dblk.dtype == torch.float16
            assert torch.equal(lin.scales, fresh.linears()[name].scales)  # quantized again, not read


def int8_decoder(model_type="qwen2") -> Decoder:
    """A tiny model at int8 with the native kernel's weights, as the loader builds the target."""
    model = make_tiny_hf(model_type, seed=3)
    decoder = Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), "int8")
    decoder.fuse_layers()
    return decoder


@pytest.fixture
def step_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """The input shape ``(rows, t, H)`` of every fused layer step taken during the test, in order."""
    calls = []
    fused_step = FusedRun.step

    def step(self, h, *args):
        calls.extend([tuple(h.shape)] * len(self.blocks))  # one entry per layer the run takes
        return fused_step(self, h, *args)

    monkeypatch.setattr(FusedRun, "step", step)
    return calls


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])  # q/k/v biases and none
def test_fused_step_is_the_unfused_layer(tmp_path, model_type, step_calls):
    decoder = int4_decoder(tmp_path, model_type)
    assert all(layer.block is not None for layer in decoder.layers)
    backend = NativeBackend(decoder, max_len=64)

    def steps():
        """Logits of a 7-token prompt (unfused either way: 7 rows), a 1-token step, a 2-token step, and two
        steps of 3 branch rows (the second attends to each row's own first branch token)."""
        backend.reset()
        out = [backend.forward(torch.tensor([[5, 9, 2, 7, 1, 3, 8]])).logits]
        out.append(backend.forward(torch.tensor([[4]])).logits)
        out.append(backend.forward(torch.tensor([[6, 11]])).logits)
        backend.fork(3)
        out.append(backend.forward(torch.tensor([[1], [2], [3]])).logits)
        out.append(backend.forward(torch.tensor([[4], [4], [4]])).logits)
        return out

    fused = steps()
    layers = len(decoder.layers)
    shapes = [(rows, t, decoder.cfg.hidden_size) for rows, t in [(1, 1), (1, 2), (3, 1), (3, 1)]]
    assert step_calls == [s for s in shapes for _ in range(layers)]  # every step but the prompt
    with switched_off(FusedLayer):  # decode steps through the linears one by one
        plain = steps()
    assert len(step_calls) == 4 * layers
    assert torch.equal(fused[0], plain[0])  # the prompt is not a fused step
    for got, want in zip(fused[1:], plain[1:]):
        assert got.shape == want.shape
        # the same sums up to float rounding (and the odd int8 activation rounded the other way)
        assert (got - want).abs().max() <= 2e-3 * want.abs().max(), (got - want).abs().max()
    assert not torch.equal(fused[-1][0], fused[-1][1])  # same token, but each row saw its own branch


def test_fused_step_is_batch_position_and_thread_invariant(tmp_path):
    decoder = int4_decoder(tmp_path)
    backend = NativeBackend(decoder, max_len=64)
    backend.forward(torch.tensor([[5, 9, 2, 7, 1, 3, 8]]))  # a trunk, through the torch path
    cache, trunk = backend.cache, backend.cache.length
    layer0 = FusedRun([decoder.layers[0].block], 0)
    h = torch.randn(3, 1, decoder.cfg.hidden_size)

    def branch_step(rows: int) -> torch.Tensor:
        """Layer 0 on the first ``rows`` rows of h as branch rows, then back to the trunk."""
        cache.fork(rows)
        cache.advance(1)
        out = layer0.step(h[:rows], *decoder._rope(trunk, 1), cache)[0]
        cache.select(0)
        cache.truncate(trunk)
        return out

    together = branch_step(3)
    assert torch.equal(together[:1], branch_step(1))  # a row's result does not depend on its batch
    one, two = on_one_and_two_threads(lambda _: branch_step(3), h)
    assert torch.equal(one, two) and torch.equal(one, together)
    # two tokens in one step = the same two tokens one step each (the second sees the first's key and value)
    cache.advance(2)
    both = layer0.step(h[:2].view(1, 2, -1), *decoder._rope(trunk, 2), cache)[0]
    cache.truncate(trunk)
    singles = []
    for j in range(2):
        cache.advance(1)
        singles.append(layer0.step(h[j : j + 1], *decoder._rope(trunk + j, 1), cache)[0])
    assert torch.equal(both, torch.cat(singles, dim=1))


def test_fused_step_applies_only_to_int4_layers_and_small_steps(tmp_path, step_calls):
    decoder = int4_decoder(tmp_path, intermediate_size=96)  # down is 96 wide: stays int8, so nothing fuses
    assert all(layer.block is None for layer in decoder.layers)
    (tmp_path / "b").mkdir()
    decoder = int4_decoder(tmp_path / "b")
    backend = NativeBackend(decoder, max_len=64)
    backend.forward(torch.tensor([[1] * (Int4Linear.MAX_ROWS + 1)]))  # more rows than the kernel takes
    backend.forward(torch.tensor([[1] * Int4Linear.MAX_ROWS]))
    assert step_calls == [(1, Int4Linear.MAX_ROWS, decoder.cfg.hidden_size)] * len(decoder.layers)
    block = decoder.layers[0].block
    assert [(first, end) for first, end, _ in decoder.runs] == [(0, len(decoder.layers))]
    decoder.set_linear("layers.1.qkv", decoder.layers[1].qkv.base)  # a layer whose linears change decides again
    assert decoder.layers[1].block is None and decoder.layers[0].block is block
    runs = [(first, end, run is None) for first, end, run in decoder.runs]
    assert runs == [(0, 1, False), (1, 2, True), (2, 3, False)]
    step_calls.clear()
    got = backend.forward(torch.tensor([[2]])).logits  # layers 0 and 2 fused, layer 1 through its linears
    assert step_calls == [(1, 1, decoder.cfg.hidden_size)] * 2
    backend.truncate(backend.length - 1)
    with switched_off(FusedLayer):
        want = backend.forward(torch.tensor([[2]])).logits
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    with pytest.raises(ValueError, match="fused int4 layer linear: 5 rows, the kernel takes 1..4"):
        FusedRun([block], 0).step(torch.randn(5, 1, decoder.cfg.hidden_size), *decoder._rope(0, 1), backend.cache)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])  # q/k/v biases and none
def test_fused_int8_step_is_the_unfused_layer_bit_for_bit(model_type, kernel_isa, step_calls):
    """The target's layers: decode steps, a verification of as many tokens as the int8 kernel takes, and branch
    rows give exactly the unfused path's logits (the same C calls in the same order), on the AVX2 and VNNI codes."""
    decoder = int8_decoder(model_type)
    assert all(layer.block is not None and layer.block.max_rows() == kernel_isa for layer in decoder.layers)
    backend = NativeBackend(decoder, max_len=64)

    def steps():
        """Logits and hidden states (H-RAD reads the target's: the embeddings, a middle layer, the last one)."""
        backend.reset()
        block = [6, 11, 3, 5, 7, 1, 2, 8][:kernel_isa]
        tokens = [[[5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 9]], [[4]], [block]]  # the prompt (11 tokens) runs unfused
        out = [backend.forward(torch.tensor(x), hidden_layers=(0, 2, -1)) for x in tokens]
        backend.fork(2)
        out.append(backend.forward(torch.tensor([[1], [2]]), hidden_layers=(0, 2, -1)))
        out.append(backend.forward(torch.tensor([[4], [4]]), hidden_layers=(0, 2, -1)))
        return [(o.logits, o.hidden) for o in out]

    fused = steps()
    layers, hidden = len(decoder.layers), decoder.cfg.hidden_size
    shapes = [(1, 1, hidden), (1, kernel_isa, hidden), (2, 1, hidden), (2, 1, hidden)]
    assert step_calls == [s for s in shapes for _ in range(layers)]  # every step but the prompt
    with switched_off(FusedLayer):
        plain = steps()
    assert len(step_calls) == 4 * layers
    for (logits, hidden), (want_logits, want_hidden) in zip(fused, plain):
        assert torch.equal(logits, want_logits) and torch.equal(hidden, want_hidden)
        assert hidden.shape[0] == 3 and not torch.equal(hidden[1], hidden[2])
    assert not torch.equal(fused[-1][0][0], fused[-1][0][1])  # same token, but each row saw its own branch


def test_fused_int8_step_follows_the_int8_kernel(monkeypatch, step_calls):
    """An int8 layer fuses only while its linears would run the native kernel: steps of more rows (prompts), or
    any step with the kernel switched off (FBGEMM for every call), go through the linears one by one."""
    decoder = int8_decoder()
    backend = NativeBackend(decoder, max_len=64)
    limit = decoder.layers[0].block.max_rows()
    backend.forward(torch.tensor([[1] * (limit + 1)]))
    rows = Int8Linear.KERNEL_ROWS
    monkeypatch.setattr(Int8Linear, "KERNEL_ROWS", 0)
    backend.forward(torch.tensor([[2]]))
    assert step_calls == []
    monkeypatch.setattr(Int8Linear, "KERNEL_ROWS", rows)
    backend.forward(torch.tensor([[3]]))
    assert len(step_calls) == len(decoder.layers)
    fp32 = Decoder(decoder.cfg, make_tiny_hf("qwen2", seed=3).state_dict(), "fp32")
    fp32.fuse_layers()
    assert all(layer.block is None for layer in fp32.layers)
