"""Convert a GGUF file (llama.cpp) into a Hugging Face style folder.

The folder holds config.json, generation_config.json, fp32 ``model.safetensors`` and the
tokenizer files, so the native decoder, transformers and :class:`~.tokenizer.Tokenizer` all load
it like any checkpoint, in seconds, instead of paying ~1 min of dequantization on every load.
Weights are dequantized with the ``gguf`` package one tensor at a time and streamed to disk, so
peak memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

WEIGHTS_FILE = "model.safetensors"
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# GGUF tensor name -> Hugging Face name (llama.cpp's names, see gguf.constants.TENSOR_NAMES)
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tokens that end a turn (a subset of llama.cpp's end-of-generation list): instruct chat templates
# end an answer with one of these, while the GGUF's eos_token_id names only one of them.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
_CONTROL = 3  # gguf.TokenType.CONTROL


@dataclass(frozen=True)
class ConversionResult:
    folder: Path
    tensors: int
    weight_bytes: int
    weights_s: float  # reading metadata + dequantizing + writing the weights
    tokenizer_s: float
    total_s: float

    def summary(self) -> str:
        return (
            f"converted {self.tensors} tensors ({self.weight_bytes / 1e9:.2f} GB fp32) in {self.total_s:.1f} s "
            f"(weights {self.weights_s:.1f} s, tokenizer {self.tokenizer_s:.1f} s) -> {self.folder}"
        )


def hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")  # ["blk", layer, kind, "weight" | "bias"]
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return None


def convert_gguf(path: str | Path, folder: str | Path, progress: bool = True, tokenizer: bool = True) -> ConversionResult:
    """Write the converted model to ``folder`` (which should not exist yet).

    Everything is written to a temporary sibling folder that is renamed into place at the end, so
    an interrupted conversion never leaves a folder that looks finished. ``tokenizer=False`` skips
    the tokenizer (it is also skipped, with a warning, when the file carries none).
    """
    import gguf

    path, folder = Path(path), Path(folder)
    t0 = time.perf_counter()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a truncated or non-GGUF file fails inside numpy / struct
        raise ModelError(f"{path}: not a readable GGUF file ({e}); check the file or convert it again") from e
    config = hf_config(reader, path)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids(reader, config["eos_token_id"])}
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        count, nbytes = write_weights(reader, config, tmp / WEIGHTS_FILE, progress)
        has_tokenizer = "tokenizer.ggml.tokens" in reader.fields
        del reader  # unmap the file before the tokenizer maps it again
        t1 = time.perf_counter()
        if tokenizer and has_tokenizer:
            write_tokenizer(path, tmp)
        elif tokenizer:
            print(f"warning: {path.name} carries no tokenizer; {folder} gets none", file=sys.stderr)
        t2 = time.perf_counter()
        _publish(tmp, folder)
    except BaseException:  # also Ctrl-C: never leave the temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(folder, count, nbytes, t1 - t0, t2 - t1, time.perf_counter() - t0)


# ---------------------------------------------------------------- config


def _get(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-6 reads back as 9.99999997e-07. The shortest decimal that
    is the same float32 gives the value the original config.json had (and the same float32)."""
    return float(str(np.float32(value)))


def hf_config(reader: Any, path: Path | str = "GGUF") -> dict[str, Any]:
    """A transformers config.json for the architecture described by the GGUF metadata."""
    arch = _get(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
            "(or pass a Hugging Face folder)"
        )

    def need(key: str) -> Any:
        value = _get(reader, f"{arch}.{key}")
        if value is None or isinstance(value, list):  # per-layer lists: not a Llama/Qwen2 layout
            raise ModelError(f"{path}: GGUF metadata {arch}.{key} is missing or per-layer; cannot convert")
        return value

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ModelError(f"{path}: no token_embd.weight tensor; not a Llama/Qwen2 GGUF")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_get(reader, f"{arch}.attention.head_count_kv", heads))
    layers = int(need("block_count"))
    theta = _f32(_get(reader, f"{arch}.rope.freq_base", 10000.0))
    # The vocabulary size is the embedding's row count (GGUF dims are [hidden, vocab]); the token
    # list may differ by padding, but the weights are what the config must describe.
    vocab = int(names["token_embd.weight"].shape[1])
    bos, eos = _get(reader, "tokenizer.ggml.bos_token_id"), _get(reader, "tokenizer.ggml.eos_token_id")
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_get(reader, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_get(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": _f32(_get(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "hidden_act": "silu",
        # transformers 5 reads rope_parameters; rope_theta is the key older readers know
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp omits output.weight when tied
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": _get(reader, "tokenizer.ggml.padding_token_id"),
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
    }
    scaling = _get(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        # passed on, not applied here: the native decoder refuses it with a clear message and
        # transformers implements it
        cfg["rope_parameters"] = {
            "rope_type": scaling,
            "rope_theta": theta,
            "factor": float(_get(reader, f"{arch}.rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": _get(reader, f"{arch}.rope.scaling.original_context_length"),
        }
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    else:
        cfg.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias=False)
    return cfg


def eos_ids(reader: Any, eos: int | None) -> list[int]:
    """The GGUF eos id first, then every control token that ends a turn (see END_TOKENS)."""
    ids = [] if eos is None else [int(eos)]
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return ids
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    types = types_field.contents() if types_field is not None else None
    for i, idx in enumerate(field.data):
        token = bytes(field.parts[idx]).decode("utf-8", errors="replace")
        if token in END_TOKENS and (types is None or types[i] == _CONTROL) and i not in ids:
            ids.append(i)
    return ids


# ---------------------------------------------------------------- weights


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for ``llama`` GGUFs.

    llama.cpp's rope rotates adjacent pairs (x0, x1), (x2, x3)... while Hugging Face Llama rotates
    the two halves of each head, so its converter reorders each head's rows from
    [first half | second half] to interleaved pairs. Qwen2 GGUFs use the halves layout already.
    """
    rows = w.shape[0]
    # [rows, ...] -> [heads, d/2, 2, ...] -> [heads, 2, d/2, ...] -> [rows, ...]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_weights(reader: Any, config: dict[str, Any], out: Path, progress: bool = True) -> tuple[int, int]:
    """Dequantize every tensor to fp32 and stream it into a safetensors file at ``out``.

    The safetensors header is computed from the shapes up front, so each tensor can be written as
    soon as it is dequantized (``safetensors.torch.save_file`` would need all tensors in memory
    plus a bytes copy of each). Returns (tensor count, data bytes).
    """
    from gguf.quants import dequantize
    from tqdm import tqdm

    plan, unknown = [], []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        plan.append((t, name, shape))
    if unknown:
        raise ModelError(
            f"GGUF tensors {unknown[:5]} have no Llama/Qwen2 equivalent; this model is not supported"
        )
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, name, shape in plan:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad with spaces so the data starts 8-byte aligned, as safetensors does
    permuted = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t, name, shape in tqdm(plan, desc="convert", unit="tensor", disable=not progress):
            w = dequantize(t.data, t.tensor_type)
            if tuple(w.shape) != shape:
                raise ModelError(f"GGUF tensor {t.name}: dequantized shape {w.shape}, expected {shape}")
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if config["model_type"] == "llama" and kind in permuted:
                w = unpermute(w, permuted[kind])
            f.write(np.ascontiguousarray(w, dtype="<f4").data)  # a buffer view: no bytes copy
    return len(plan), offset


# ---------------------------------------------------------------- tokenizer


def write_tokenizer(path: Path, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) built by transformers from
    the GGUF tokenizer metadata."""
    import transformers
    from transformers import AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its GGUF notes are noise to our users
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(str(folder))
    except Exception as e:
        raise ModelError(f"{path}: could not build the tokenizer from the GGUF metadata ({e})") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{path}: transformers wrote no tokenizer.json for this GGUF tokenizer")


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished temporary folder into place; if another process got there first, keep
    its folder and drop ours."""
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
