"""Native decoder vs transformers: logits parity, also across fork / select / rollback."""

from __future__ import annotations

import threading

import pytest
import torch

from specbranch.backend import NativeBackend, prefill, rollback
from specbranch.backend_hf import HFBackend
from specbranch.models.decoder import Decoder, DecoderConfig
from specbranch.models.loader import load_decoder

TOL = 1e-4


def pair(folder, model, precision="fp32"):
    return NativeBackend(load_decoder(folder, precision), max_len=256), HFBackend(model)


def close(a, b, tol=TOL):
    diff = (a.double() - b.double()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff}"


def test_prefill_and_decode_match(tiny_folder):
    _, folder, model = tiny_folder
    native, hf = pair(folder, model)
    prompt = torch.randint(0, 97, (17,)).tolist()
    close(prefill(native, prompt).logits, prefill(hf, prompt).logits)
    for tok in (5, 9, 33):
        x = torch.tensor([[tok]])
        close(native.forward(x).logits, hf.forward(x).logits)
    x = torch.tensor([[1, 2, 3, 4]])  # multi-token verify-style step
    close(native.forward(x).logits, hf.forward(x).logits)
    assert native.length == hf.length == 17 + 3 + 4


def test_both_backends_count_the_same_weight_bytes(tiny_folder):
    """What one forward streams (the bench's bytes per token): the full head, one embedding row; tied (qwen2 here)
    and untied (llama) heads alike."""
    _, folder, model = tiny_folder
    native, hf = pair(folder, model)
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    params, table, row = sum(p.numel() * 4 for p in model.parameters()), emb.numel() * 4, emb.shape[1] * 4
    assert native.weight_bytes() == hf.weight_bytes() == (params + row if tied else params - table + row)


def test_rollback_then_continue_matches_fresh(tiny_folder):
    _, folder, model = tiny_folder
    native, hf = pair(folder, model)
    prompt = [3, 14, 15, 92, 65]
    for b in (native, hf):
        prefill(b, prompt)
        b.forward(torch.tensor([[7, 8, 9]]))
        rollback(b, 2)  # keep 7
        assert b.length == 6
    x = torch.tensor([[11, 12]])
    got_native, got_hf = native.forward(x).logits, hf.forward(x).logits
    fresh = NativeBackend(load_decoder(folder), max_len=256)
    prefill(fresh, prompt)
    want = fresh.forward(torch.tensor([[7, 11, 12]])).logits[:, 1:]
    close(got_native, want, 1e-5)
    close(got_hf, want)


def test_fork_branches_match_independent_sequences(tiny_folder):
    _, folder, model = tiny_folder
    native, hf = pair(folder, model)
    prompt = torch.randint(0, 97, (12,)).tolist()
    branches = torch.tensor([[4, 40, 41], [5, 50, 51], [6, 60, 61]])  # [k, t]
    for b in (native, hf):
        prefill(b, prompt)
        b.fork(3)
    # extend all branches one token at a time, then two at once
    outs_n = [native.forward(branches[:, :1]).logits, native.forward(branches[:, 1:]).logits]
    outs_h = [hf.forward(branches[:, :1]).logits, hf.forward(branches[:, 1:]).logits]
    for a, b in zip(outs_n, outs_h):
        close(a, b)
    # each branch row equals running that continuation alone
    for i in range(3):
        solo = NativeBackend(load_decoder(folder), max_len=256)
        prefill(solo, prompt)
        want = solo.forward(branches[i : i + 1]).logits
        close(torch.cat([outs_n[0][i : i + 1], outs_n[1][i : i + 1]], 1), want, 1e-5)
    # select branch 1, then continue: equals the sequence prompt + branch 1
    native.select(1)
    hf.select(1)
    assert native.length == hf.length == 15
    x = torch.tensor([[77]])
    close(native.forward(x).logits, hf.forward(x).logits)


def test_rollback_into_trunk_drops_branches(tiny_folder):
    _, folder, model = tiny_folder
    native, hf = pair(folder, model)
    prompt = list(range(1, 11))
    for b in (native, hf):
        prefill(b, prompt)
        b.fork(2)
        b.forward(torch.tensor([[20, 21], [22, 23]]))
        b.truncate(8)  # into the shared prefix
        assert b.length == 8
    x = torch.tensor([[30, 31]])
    close(native.forward(x).logits, hf.forward(x).logits)


def test_hidden_states_match(tiny_folder):
    _, folder, model = tiny_folder
    native, hf = pair(folder, model)
    prompt = [1, 2, 3, 4, 5, 6]
    on, oh = prefill(native, prompt, hidden_layers=(1, 2)), prefill(hf, prompt, hidden_layers=(1, 2))
    assert on.hidden.shape == (2, 1, 6, 64)
    close(on.hidden, oh.hidden)


def test_float64_precision_is_tight(tiny_folder):
    _, folder, model = tiny_folder
    native = NativeBackend(load_decoder(folder, "fp64"), max_len=64)
    hf = HFBackend(model.double())
    prompt = [9, 8, 7, 6, 5]
    # transformers computes RoPE angles in float32 even for a float64 model, hence 1e-5, not 1e-12
    out = prefill(native, prompt).logits
    assert out.dtype == torch.float64
    close(out, prefill(hf, prompt).logits, 1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_stays_close(tiny_folder, precision):
    _, folder, model = tiny_folder
    native = NativeBackend(load_decoder(folder, precision), max_len=64)
    hf = HFBackend(model)
    prompt = [9, 8, 7, 6, 5, 4, 3]
    a, b = prefill(native, prompt).logits, prefill(hf, prompt).logits
    rel = (a - b).abs().max() / b.abs().max()
    # random Gaussian weights are a worst case for 8-bit activations; real-model quality is
    # checked on greedy text instead (scripts/check_native_vs_hf.py)
    assert rel < {"bf16": 0.03, "int8": 0.15}[precision], f"{precision} relative logit error {rel:.3f}"


def test_int8_cache_is_written_once_and_reused(tiny_folder):
    _, folder, model = tiny_folder
    from specbranch.models.loader import INT8_FILE

    first = NativeBackend(load_decoder(folder, "int8"), max_len=64)
    assert (folder / INT8_FILE).is_file()
    mtime = (folder / INT8_FILE).stat().st_mtime_ns
    second = NativeBackend(load_decoder(folder, "int8"), max_len=64)
    assert (folder / INT8_FILE).stat().st_mtime_ns == mtime
    prompt = [4, 5, 6, 7]
    assert torch.equal(prefill(first, prompt).logits, prefill(second, prompt).logits)


def test_verifying_a_block_is_bit_identical_to_decoding_it():
    """The lossless guarantee at T = 0 needs the target's logits for a verified block to equal, bit
    for bit, those of decoding it token by token (ar). int8 linears are batch-invariant by design;
    attention must be too (one fused call over the block rounded differently: real prompts then
    diverged from ar late in a generation)."""
    from conftest import make_tiny_hf

    model = make_tiny_hf("qwen2", seed=3, vocab_size=300, hidden_size=256, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=128, num_hidden_layers=2)
    dec = Decoder(DecoderConfig.from_hf(model.config.to_dict()), model.state_dict(), "int8")  # int8: fp32 MKL linears are not batch-invariant
    toks = torch.randint(0, 300, (1, 27), generator=torch.Generator().manual_seed(0))
    block, steps = dec.new_cache(64), dec.new_cache(64)
    for cache in (block, steps):
        dec.forward(toks[:, :20], cache)
    together = dec.forward(toks[:, 20:], block).logits[0]  # [7, V]
    alone = torch.cat([dec.forward(toks[:, i : i + 1], steps).logits[0] for i in range(20, 27)])
    assert torch.equal(together, alone)


def test_loading_reads_the_embedding_table_ahead(tiny_folder, monkeypatch):
    """The embedding table is used from the file's memory map; loading starts a background read of exactly its bytes
    (so each new token's first lookup does not wait for the disk)."""
    from specbranch.models import loader

    _, folder, _ = tiny_folder
    reads = []
    monkeypatch.setattr(loader, "_read_range", lambda path, start, end: reads.append((path, start, end)))
    decoder = load_decoder(folder, "fp32")
    for thread in threading.enumerate():
        if thread.name.startswith("read-ahead"):
            thread.join()
    [(path, start, end)] = reads
    assert path.read_bytes()[start:end] == decoder.embed.numpy().tobytes()
    loader.LazyWeights(folder).read_ahead("no.such.tensor")  # a name not in the checkpoint: nothing to read
    assert len(reads) == 1
