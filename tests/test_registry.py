"""GGUF conversion and the model registry, on tiny GGUF files written in-process (no real models).

The oracle for conversion is the tiny transformers model the GGUF was written from: after
conversion the native decoder and transformers must both reproduce its logits.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf, write_tiny_tokenizer

from specbranch.errors import ModelError
from specbranch.models import gguf as gg
from specbranch.models import registry
from specbranch.models.loader import load_decoder
from specbranch.models.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
Q8 = ("blk.0.ffn_down.weight", "blk.1.attn_q.weight")  # stored as Q8_0 (rows of 64 / 96 = whole blocks of 32)


def gguf_name(hf: str) -> str:
    """Inverse of :func:`gg.hf_name` (what llama.cpp's converter does)."""
    top = {v: k for k, v in gg._TOP.items()}
    if hf in top:
        return top[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    assert m, hf
    return f"blk.{m[1]}.{ {v: k for k, v in gg._BLOCK.items()}[m[2]] }.{m[3]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama Q/K rows (halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer_meta(tmp: Path) -> dict:
    """Vocabulary, merges and special ids of the conftest BPE tokenizer, as GGUF metadata wants them."""
    write_tiny_tokenizer(tmp, eos="<|endoftext|>")  # Qwen's name: transformers' Qwen2Tokenizer adds it if missing
    model = json.loads((tmp / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    eos = tokens.index("<|endoftext|>")
    types = [gg._CONTROL if i == eos else 1 for i in range(len(tokens))]
    return {"tokens": tokens, "merges": merges, "types": types, "eos": eos}


def gguf_writer(path: Path, cfg, arch: str, tok: dict | None = None):
    """A GGUFWriter with the metadata of a model of config ``cfg`` (and of the tokenizer ``tok``) added: the tensors
    come next."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if tok:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        w.add_eos_token_id(tok["eos"])
        w.add_chat_template(TEMPLATE)
    return w


def write_gguf(path: Path, model, arch: str, tok: dict | None = None) -> dict[str, torch.Tensor]:
    """Write ``model`` as a GGUF the way llama.cpp would (Q/K permuted for llama, tied head
    omitted, the tensors in Q8 quantized). Sets the model's weights to their dequantized values and
    returns them by Hugging Face name: exactly what the conversion must produce."""
    cfg = model.config
    w = gguf_writer(path, cfg, arch, tok)
    expected = {}
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is not a separate parameter
            gname = gguf_name(name)
            data = p.detach().float().numpy()
            kind = gname.split(".")[2] if gname.startswith("blk.") else ""
            if arch == "llama" and kind in heads:
                data = permute(data, heads[kind])
            if gname in Q8:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
                assert not np.array_equal(deq, data)  # the test really exercises a lossy type
                p.copy_(torch.from_numpy(gg.unpermute(deq, heads[kind]) if arch == "llama" and kind in heads else deq))
            else:
                w.add_tensor(gname, np.ascontiguousarray(data))
            expected[name] = p.detach().clone()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    """(gguf path, tiny qwen2 model with the GGUF's weights, expected tensors, tokenizer meta)."""
    root = tmp_path_factory.mktemp("qwen_gguf")
    tok = tiny_tokenizer_meta(root / "tok")
    model = make_tiny_hf("qwen2", tie=True, vocab_size=len(tok["tokens"]))
    expected = write_gguf(root / "tiny-qwen.gguf", model, "qwen2", tok)
    return root / "tiny-qwen.gguf", model, expected, tok


@pytest.fixture(scope="module")
def qwen_converted(qwen_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_conv") / "hf"
    result = gg.convert_gguf(qwen_gguf[0], folder, progress=False)
    assert result.folder == folder and result.tensors == len(qwen_gguf[2])
    return folder


def logits_close(folder: Path, model, tol: float = 1e-4) -> None:
    """Native decoder (fp32) and transformers, both loading ``folder``, reproduce ``model``."""
    from transformers import AutoModelForCausalLM

    from specbranch.backend import NativeBackend

    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits.double()
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        got_hf = reloaded(ids).logits.double()
    native = NativeBackend(load_decoder(folder, "fp32"), max_len=64)
    got_native = native.forward(ids).logits.double()
    assert (got_hf - want).abs().max().item() <= 1e-5
    assert (got_native - want).abs().max().item() <= tol


# ---------------------------------------------------------------- conversion


def test_names_round_trip():
    assert gg.hf_name("blk.7.attn_k.bias") == "model.layers.7.self_attn.k_proj.bias"
    assert gg.hf_name("output.weight") == "lm_head.weight"
    assert gg.hf_name("rope_freqs.weight") is None
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert gg.hf_name(gguf_name(name)) == name


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(4 * 16, 8)).astype(np.float32)  # 4 heads of dim 16
    assert np.array_equal(gg.unpermute(permute(w, 4), 4), w)
    assert not np.array_equal(permute(w, 4), w)


def test_qwen2_conversion_weights_config_logits(qwen_gguf, qwen_converted):
    _, model, expected, tok = qwen_gguf
    folder = qwen_converted
    from safetensors import safe_open

    with safe_open(str(folder / gg.WEIGHTS_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(expected)  # tied: no lm_head.weight
        for name, want in expected.items():
            assert torch.equal(f.get_tensor(name), want), name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["vocab_size"] == len(tok["tokens"])
    assert cfg["eos_token_id"] == tok["eos"]
    logits_close(folder, model)


def test_qwen2_tokenizer_from_gguf_metadata(qwen_gguf, qwen_converted):
    tok = Tokenizer(qwen_converted)
    text = "def add(a, b):\n    return a + b\n"
    ids = tok.encode(text)
    assert len(ids) < len(text) and tok.decode(ids) == text  # merges applied, lossless
    assert qwen_gguf[3]["eos"] in tok.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi\n<assistant>"
    gen = json.loads((qwen_converted / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == qwen_gguf[3]["eos"]


def test_llama_conversion_undoes_permutation(tmp_path, capsys):
    """Untied Llama with Q/K permuted as llama.cpp stores them, and no tokenizer in the file."""
    model = make_tiny_hf("llama", seed=3, tie=False)
    expected = write_gguf(tmp_path / "tiny-llama.gguf", model, "llama")
    folder = tmp_path / "hf"
    gg.convert_gguf(tmp_path / "tiny-llama.gguf", folder, progress=False)
    assert "carries no tokenizer" in capsys.readouterr().err
    assert not (folder / "tokenizer.json").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert "lm_head.weight" in expected
    logits_close(folder, model)


def test_unsupported_gguf_leaves_nothing(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="architecture 'mamba' is not supported"):
        gg.convert_gguf(tmp_path / "x.gguf", tmp_path / "hf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        gg.convert_gguf(tmp_path / "bad.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "x.gguf"]


def test_interrupted_conversion_leaves_no_folder(qwen_gguf, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # e.g. Ctrl-C during the tokenizer step, after the weights

    monkeypatch.setattr(gg, "write_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        gg.convert_gguf(qwen_gguf[0], tmp_path / "hf", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- resolve_model


def test_resolve_hf_folder_is_returned_as_is(tiny_folder, tmp_path):
    _, folder, _ = tiny_folder
    assert registry.resolve_model(str(folder), cache_dir=tmp_path) == folder


def test_resolve_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ModelError) as e:
        registry.resolve_model(str(tmp_path / "nope"), cache_dir=tmp_path)
    msg = str(e.value)
    assert "nope" in msg and "config.json" in msg and ".gguf" in msg and all(n in msg for n in registry.REGISTRY)
    with pytest.raises(ModelError, match="neither a registry model nor an existing path"):
        registry.resolve_model("qwen9-unknown", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"config.json and \*.safetensors"):
        registry.resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        registry.resolve_model(str(tmp_path / "w.bin"), cache_dir=tmp_path)
    with pytest.raises(ModelError, match="known models"):
        registry.prepare_model("qwen9-unknown", cache_dir=tmp_path)


def test_resolve_gguf_file_converts_once(qwen_gguf, tmp_path, monkeypatch):
    calls = []
    real = registry.convert_gguf
    monkeypatch.setattr(registry, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    folder = registry.resolve_model(str(qwen_gguf[0]), progress=False, cache_dir=tmp_path)
    assert folder.is_relative_to(tmp_path / "gguf") and folder.name == registry.HF_DIR
    assert Tokenizer(folder).vocab_size == len(qwen_gguf[3]["tokens"])
    assert registry.resolve_model(str(qwen_gguf[0]), progress=False, cache_dir=tmp_path) == folder
    assert len(calls) == 1
    assert not list((tmp_path / "gguf").glob("*/.*.tmp-*"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECBRANCH_CACHE", str(tmp_path))
    assert registry.default_cache_dir() == tmp_path
    monkeypatch.delenv("SPECBRANCH_CACHE")
    assert registry.default_cache_dir().name.lower() == "specbranch"


# ---------------------------------------------------------------- assembly from part packages


@pytest.fixture
def fake_registry(qwen_gguf, tmp_path, monkeypatch):
    """A registry model "fake" whose 3 parts are slices of the tiny GGUF in tmp files; returns
    (model, part paths, the whole file's bytes)."""
    data = qwen_gguf[0].read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        p = tmp_path / "site" / f"fake_part{i + 1}" / "data" / f"part{i + 1:02d}.bin"
        p.parent.mkdir(parents=True)
        p.write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append(p)
    model = registry.RegistryModel("fake", "draft", "a tiny test model", "fake-part", "1.0", 3, len(data))
    monkeypatch.setitem(registry.REGISTRY, "fake", model)
    real = registry._find_part

    def find(m, i):
        if m.name != "fake":
            return real(m, i)
        return parts[i - 1] if parts[i - 1].exists() else None

    monkeypatch.setattr(registry, "_find_part", find)
    return model, parts, data


def test_prepare_assembles_converts_and_is_idempotent(fake_registry, tmp_path, monkeypatch):
    _, _, data = fake_registry
    cache = tmp_path / "cache"
    folder = registry.prepare_model("fake", cache_dir=cache, progress=False)
    assert folder == cache / "fake" / registry.HF_DIR
    assert (cache / "fake" / registry.GGUF_FILE).read_bytes() == data
    source = json.loads((cache / "fake" / registry.SOURCE_FILE).read_text())
    assert source["size"] == len(data) and source["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list((cache / "fake").glob("*.partial")) and not list((cache / "fake").glob(".*.tmp-*"))
    load_decoder(folder, "fp32")
    # done: neither step runs again, and resolve_model goes through the same path
    monkeypatch.setattr(registry, "assemble", lambda *a, **k: pytest.fail("assembled twice"))
    monkeypatch.setattr(registry, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert registry.resolve_model("fake", progress=False, cache_dir=cache) == folder
    [info] = [i for i in registry.list_models(cache) if i.name == "fake"]
    assert info.prepared and info.assembled and info.parts_installed and info.size > len(data)
    assert "prepared" in str(info)


def test_truncated_part_is_refused(fake_registry, tmp_path):
    _, parts, data = fake_registry
    parts[1].write_bytes(parts[1].read_bytes()[:-10])
    with pytest.raises(ModelError, match=f"expected {len(data):,}.*reinstall"):
        registry.prepare_model("fake", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "fake" / registry.GGUF_FILE).exists()
    assert not list((tmp_path / "cache" / "fake").glob("*.partial"))


def test_checksum_mismatch_is_refused(fake_registry, tmp_path, monkeypatch):
    model, _, _ = fake_registry
    monkeypatch.setitem(registry.REGISTRY, "fake", registry.RegistryModel(**{**model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.prepare_model("fake", cache_dir=tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache" / "fake").iterdir() if not p.name.startswith(".")] == []


def test_missing_part_package_says_pip_install(fake_registry, tmp_path):
    _, parts, _ = fake_registry
    parts[2].unlink()
    with pytest.raises(ModelError) as e:
        registry.prepare_model("fake", cache_dir=tmp_path / "cache", progress=False)
    assert 'pip install -e ".[models]"' in str(e.value) and "fake-part3==1.0" in str(e.value)
    [info] = [i for i in registry.list_models(tmp_path / "cache") if i.name == "fake"]
    assert not info.parts_installed and not info.prepared and registry.INSTALL_HINT in str(info)


def test_assembled_file_of_wrong_size_is_refused(fake_registry, tmp_path):
    root = tmp_path / "cache" / "fake"
    root.mkdir(parents=True)
    (root / registry.GGUF_FILE).write_bytes(b"truncated")
    with pytest.raises(ModelError, match="delete .* and run `specbranch models prepare` again"):
        registry.prepare_model("fake", cache_dir=tmp_path / "cache", progress=False)


def test_real_part_packages_have_the_registered_sizes():
    """Cheap (stat only); skipped where the [models] extra is not installed."""
    for model in registry.REGISTRY.values():
        try:
            paths = registry.part_paths(model)
        except ModelError:
            pytest.skip("part packages not installed")
        assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, model.parts + 1)]
        assert sum(p.stat().st_size for p in paths) == model.size
