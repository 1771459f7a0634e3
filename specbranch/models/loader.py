"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into the native decoder."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelError
from .decoder import Decoder, DecoderConfig
from .linear import DRAFT_PRECISIONS, Int4Linear, Int8Linear, Q4KLinear, RowConcat

INT8_FILE = "int8.safetensors"  # quantized linears cached next to the float weights
INT4_FILE = "int4.safetensors"  # the int4 draft weights, made from the int8 ones


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a model folder: config.json is missing")
    return json.loads(path.read_text())


class LazyWeights:
    """Name -> tensor lookup over one or more safetensors shards, reading each tensor on demand
    (so peak memory is one model's weights at the target precision, not two copies)."""

    def __init__(self, folder: Path) -> None:
        files = sorted(f for f in Path(folder).glob("*.safetensors") if f.name not in (INT8_FILE, INT4_FILE))
        if not files:
            raise ModelError(f"no *.safetensors weights in {folder}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}
        self._files = {name: f for f, h in zip(files, self._handles) for name in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __call__(self, name: str) -> torch.Tensor | None:
        h = self._where.get(name)
        return None if h is None else h.get_tensor(name).float()

    def read_ahead(self, name: str) -> None:
        """Start reading tensor ``name``'s bytes in a background thread, so that the OS holds them in its page cache.

        Why: a float32 tensor is used straight from the file's memory map, and the embedding table is read row by
        row: each new token's first lookup waited for the disk (measured after a cache drop: p90 18 ms, up to 35 ms,
        on the 1.5B target's 0.9 GB table), and in a benchmark the first engine to meet a token paid for every
        engine. posix_fadvise(WILLNEED) reads ahead only a few hundred KB on Linux, hence the thread."""
        path = self._files.get(name)
        if path is None:
            return
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")  # safetensors: u64 header size, JSON header, then the data
            start, end = json.loads(f.read(header))[name]["data_offsets"]
        threading.Thread(target=_read_range, args=(path, 8 + header + start, 8 + header + end), daemon=True,
                         name=f"read-ahead {name}").start()


def _read_range(path: Path, start: int, end: int, chunk: int = 4 << 20) -> None:
    """Read bytes ``start .. end`` of ``path`` and drop them (the point is the page cache); errors are ignored: the
    tensor is still read on demand."""
    buf = bytearray(chunk)
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            while start < end and f.readinto(memoryview(buf)[: min(chunk, end - start)]):
                start += chunk
    except OSError:
        pass


def load_decoder(folder: str | Path, precision: str = "fp32", threads: int | None = None,
                 decode_kernel: bool = True) -> Decoder:
    """Build the native decoder from a Hugging Face style folder at ``precision``.

    For int8 the quantized linears are stored once next to the weights (``int8.safetensors``)
    so later loads skip quantization, and FBGEMM prepacking runs on a thread pool, as does the
    layout of the decode-step kernel's weights (``decode_kernel``; int4 drafts decode with their own).
    """
    if precision not in DRAFT_PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose one of {', '.join(DRAFT_PRECISIONS)}")
    folder = Path(folder)
    if precision == "int4":
        return to_int4(load_decoder(folder, "int8", threads, decode_kernel=False), folder / INT4_FILE)
    cfg = DecoderConfig.from_hf(read_config(folder))
    weights = LazyWeights(folder)
    missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in weights]
    if missing:
        raise ModelError(f"{folder}: weights {missing} not found (is this a Llama/Qwen2 checkpoint?)")
    weights.read_ahead("model.embed_tokens.weight")
    if precision not in ("int8", "q4k"):
        return Decoder(cfg, weights, precision)
    q4k = q4k_tensors(folder, cfg.num_layers) if precision == "q4k" else {}
    qfile = folder / INT8_FILE
    stored = safe_open(str(qfile), framework="pt") if qfile.is_file() else None

    def int8(name, weight_fn, bias):
        if stored is not None:
            return Int8Linear(stored.get_tensor(name + ".qweight"), stored.get_tensor(name + ".scale"), bias)
        return Int8Linear.from_float(weight_fn(), bias)

    def lin(name, weight_fn, bias):
        parts, whole = q4k.get(name, ([], False))  # the Q4_K tensors that make up its first output rows; all of it?
        if not parts:
            return int8(name, weight_fn, bias)
        n1 = sum(raw.shape[0] for raw in parts)
        first = Q4KLinear(torch.from_numpy(np.concatenate(parts)), None if bias is None else bias[:n1])
        if whole:
            return first
        rest = int8(name, weight_fn, bias)  # per-row scales: its rows are the int8 precision's rows exactly
        return RowConcat(first, rest.rows(torch.arange(n1, rest.out_features)))

    decoder = Decoder(cfg, weights, precision, lin)
    if stored is None and precision == "int8":
        save_int8(decoder, qfile)
    int8s = _int8_linears(decoder)
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # prepack and ctypes calls release the GIL
        list(pool.map(Int8Linear.pack, int8s))
        if decode_kernel:
            list(pool.map(Int8Linear.prepare_native, int8s))
    if decode_kernel:
        decoder.fuse_layers()
    return decoder


# The GGUF tensors of each of the decoder's linears, in the order its output rows stack them (decoder.Layer).
_PARTS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
          "down": ("ffn_down",)}


Q4K_INDEX = "q4k-index.json"  # where the GGUF's Q4_K layer tensors lie, cached next to the converted weights


def q4k_index(folder: Path) -> dict | None:
    """Where the layer linears stored as Q4_K lie in the GGUF ``folder`` was converted from: ``{"tensors": {name:
    [offset, rows, row bytes]}, "model_type", "heads"}``, or None without a GGUF file. Cached in the folder (keyed by
    the file's path, size and mtime) because gguf-py's reader parses the whole metadata, the 151,936-token
    vocabulary included: some 7 s a read for the default target."""
    from .registry import gguf_source

    path = gguf_source(folder)
    if path is None:
        return None
    st = path.stat()
    source = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cached = Path(folder) / Q4K_INDEX
    try:
        index = json.loads(cached.read_text())
        if index.get("source") == source:
            return index
    except (OSError, ValueError):
        pass
    from gguf import GGMLQuantizationType, GGUFReader

    from .gguf import hf_config

    reader = GGUFReader(path)
    config = hf_config(reader, path)
    kinds = {kind for kinds in _PARTS.values() for kind in kinds}
    index = {"source": source, "model_type": config["model_type"],
             "heads": {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]},
             "tensors": {t.name: [int(t.data_offset), *map(int, t.data.shape)] for t in reader.tensors
                         if t.tensor_type == GGMLQuantizationType.Q4_K and t.name.startswith("blk.")
                         and t.name.split(".")[2] in kinds}}
    tmp = cached.with_suffix(".partial")
    try:
        tmp.write_text(json.dumps(index))
        tmp.replace(cached)
    except OSError:  # a read-only model folder: read the GGUF again next time
        tmp.unlink(missing_ok=True)
    return index


def has_q4k(folder: Path) -> bool:
    """Whether ``folder`` was converted from a GGUF file, still there, with Q4_K layer linears (precision q4k pays)."""
    index = q4k_index(folder)
    return bool(index and index["tensors"])


def q4k_tensors(folder: Path, num_layers: int) -> dict[str, tuple[list[np.ndarray], bool]]:
    """For precision q4k: each layer linear's leading GGUF parts stored as Q4_K (raw ``block_q4_K`` rows, memory-mapped
    from the GGUF the folder was converted from) and whether that is all of it; linears with none are left out."""
    from .gguf import unpermute
    from .registry import gguf_source

    index = q4k_index(folder)
    if index is None:
        raise ModelError(f"precision q4k reads the GGUF file's Q4_K weights, and {folder} was not converted from a "
                         "GGUF file that is still there: use --precision int8, or pass the .gguf file as the model")
    data = np.memmap(gguf_source(folder), dtype=np.uint8, mode="r")
    out = {}
    for i in range(num_layers):
        for name, kinds in _PARTS.items():
            parts = []
            for kind in kinds:
                where = index["tensors"].get(f"blk.{i}.{kind}.weight")
                if where is None:
                    break
                offset, rows, row_bytes = where
                raw = data[offset : offset + rows * row_bytes].reshape(rows, row_bytes)  # [N, K/256 * 144]
                if index["model_type"] == "llama" and kind in index["heads"]:  # the rows, as the converter orders them
                    raw = unpermute(raw, index["heads"][kind])
                parts.append(raw)
            if parts:
                out[f"layers.{i}.{name}"] = (parts, len(parts) == len(kinds))
    return out


def _int8_linears(decoder: Decoder) -> list[Int8Linear]:
    """The decoder's int8 linears, the second halves of row pairs included."""
    found = []
    for lin in decoder.linears().values():
        found += [part for part in ((lin.first, lin.second) if isinstance(lin, RowConcat) else (lin,))
                  if isinstance(part, Int8Linear)]
    return found


def to_int4(decoder: Decoder, path: Path) -> Decoder:
    """Give every int8 linear whose input width is a multiple of 64 int4 weights for decode steps
    (:class:`Int4Linear`; it keeps the int8 layer for larger batches). The int4 weights are stored
    once in ``path`` so later loads skip the quantization (about 7 s for the 0.5B draft); a file from before the
    scales were fp16 is made again."""
    stored = safe_open(str(path), framework="pt") if path.is_file() else None
    scales = [n for n in stored.keys() if n.endswith(".scales")] if stored is not None else []
    if any(stored.get_slice(n).get_dtype() != "F16" for n in scales):
        stored = None  # float32 scales: its nibbles were rounded against other scales, so quantize again
    names = set(stored.keys()) if stored is not None else set()
    made = {}
    for name, linear in decoder.linears().items():
        if not Int4Linear.supports(linear):
            continue  # stays int8
        if name + ".packed" in names:
            made[name] = Int4Linear(linear, stored.get_tensor(name + ".packed"), stored.get_tensor(name + ".scales"))
        else:
            made[name] = Int4Linear.from_int8(linear)
    for name, linear in made.items():
        decoder.set_linear(name, linear)
    decoder.fuse_layers()
    decoder.precision = "int4"
    if stored is None and made:
        _save({t: getattr(lin, a) for n, lin in made.items() for t, a in ((n + ".packed", "packed"), (n + ".scales", "scales"))}, path)
    return decoder


def save_int8(decoder: Decoder, path: Path) -> None:
    """Write the int8 weights and scales of every linear (atomically: temp file + rename)."""
    tensors = {}
    for name, linear in decoder.linears().items():
        tensors[name + ".qweight"] = linear.qweight
        tensors[name + ".scale"] = linear.scale
    _save(tensors, path)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".partial")
    try:
        save_file(tensors, str(tmp))
        tmp.replace(path)
    except OSError:  # a read-only model folder: just quantize again next time
        tmp.unlink(missing_ok=True)
