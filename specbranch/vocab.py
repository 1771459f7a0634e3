"""Frequency-ranked vocabularies for the draft's reduced LM head (``--draft-vocab N``).

Why: the draft's LM head over 151,936 tokens is about a quarter of a 0.5B draft's weight bytes, and
decoding reads every byte per token. A head over the N tokens that real text actually uses reads
N/V of that. *Which* N tokens matters: a drafted token outside the subset can never be proposed, so
every target token outside it is a guaranteed rejection. Ranking by token id (BPE merge order) is
a rough proxy; ranking by counts over a real corpus keeps far more of what the target emits.

The default corpus is the running Python's standard library (code, docstrings and comments, so
both code and English prose), which every machine that runs specbranch has: the shipped ranking
can be rebuilt anywhere with ``specbranch rank-vocab``.

File format: safetensors with ``ids`` (int32 token ids seen in the corpus, most frequent first)
and ``weights`` (float32, same order: counts, or with several corpora the mean of their frequencies);
metadata ``fingerprint`` (of the tokenizer's vocabulary, so a ranking is only ever applied to the
tokenizer it was counted with) and ``corpus``.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError
from .models.tokenizer import Tokenizer

SHIPPED = Path(__file__).parent / "data"
CORPUS_SUFFIXES = (".py", ".md", ".rst", ".txt", ".jsonl")


def fingerprint(tok: Tokenizer) -> str:
    """sha256 of the vocabulary (token strings in id order): equal fingerprints = same token ids."""
    vocab = sorted(tok._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def default_corpus() -> list[Path]:
    """The running Python's standard library folder."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files under ``paths`` (folders are searched recursively for .py/.md/.rst/.txt files)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in CORPUS_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"corpus path {p} does not exist: pass files or folders of text/code")
    if not files:
        raise ConfigError(f"no {'/'.join(CORPUS_SUFFIXES)} files under {', '.join(map(str, paths))}")
    return files


def file_text(path: Path, skip_records: int = 0) -> str:
    """A corpus file's text; for JSONL, every string value of each record after the first
    ``skip_records`` (e.g. a dataset's questions and worked answers, past its evaluation prompts)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return text

    def strings(v) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, dict):
            v = list(v.values())
        return [s for x in v for s in strings(x)] if isinstance(v, list) else []

    lines = [line for line in text.splitlines() if line.strip()][skip_records:]
    return "\n\n".join(s for line in lines for s in strings(json.loads(line)))


def count_tokens(tok: Tokenizer, files: Iterable[Path], progress: bool = True, skip_records: int = 0) -> torch.Tensor:
    """Occurrences of every token id over the files -> ``[vocab_size]`` int64 (``skip_records``:
    see :func:`file_text`)."""
    from tqdm import tqdm

    files = list(files)
    counts = torch.zeros(tok.vocab_size, dtype=torch.int64)
    batch: list[str] = []

    def flush() -> None:
        for enc in tok._tok.encode_batch(batch, add_special_tokens=False):
            counts.add_(torch.bincount(torch.tensor(enc.ids, dtype=torch.int64), minlength=len(counts)))
        batch.clear()

    for f in tqdm(files, desc="count tokens", unit="file", disable=not progress):
        batch.append(file_text(f, skip_records))
        if len(batch) == 64:
            flush()
    flush()
    return counts


def save_ranking(path: str | Path, counts: torch.Tensor, tok: Tokenizer, corpus: str) -> Path:
    """Write the ranking of ``counts [V]`` (any non-negative weights; zero = never seen)."""
    order = torch.argsort(counts, descending=True, stable=True)  # ties: lower id (earlier BPE merge) first
    ids = order[counts[order] > 0]
    path = Path(path).with_suffix(".safetensors")
    meta = {"fingerprint": fingerprint(tok), "corpus": corpus}
    save_file({"ids": ids.int().contiguous(), "weights": counts[ids].float().contiguous()}, str(path), metadata=meta)
    return path


def ranking_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def find_ranking(tok: Tokenizer, ranking: str = "") -> Path | None:
    """The ranking to use for this tokenizer: ``ranking`` (checked against it), else the one shipped
    inside the package for it, else None. The fingerprint (~0.3 s for a 152k vocabulary) is
    computed once."""
    fp = fingerprint(tok)
    if ranking:
        path = Path(ranking)
        if not path.is_file():
            raise ConfigError(f"token ranking {path} does not exist: build one with `specbranch rank-vocab`")
        if ranking_metadata(path).get("fingerprint") != fp:
            raise ConfigError(f"token ranking {path} was counted with another tokenizer than the draft's: "
                              "rebuild it with `specbranch rank-vocab --model <draft>`")
        return path
    for path in sorted(SHIPPED.glob("token-ranks-*.safetensors")):
        if ranking_metadata(path).get("fingerprint") == fp:
            return path
    return None


AUTO_SIZE = 32768  # HumanEval, 5 prompts, sd: 32768 ranked tokens 1.62x ar vs 1.51x full; 16384 fell to 1.33x


def draft_vocab_ids(tok: Tokenizer, n: int, vocab_size: int, ranking: str = "") -> torch.Tensor | None:
    """The ``n`` most frequent token ids (by ``ranking``, else the shipped ranking for this tokenizer,
    else the lowest ids, i.e. BPE merge order) plus every special token, sorted, all < vocab_size;
    None for the full vocabulary. ``n = -1`` (auto) is :data:`AUTO_SIZE` where a ranking exists,
    else the full vocabulary (token-id order costs too much acceptance)."""
    path = find_ranking(tok, ranking)
    if n < 0:
        n = AUTO_SIZE if path is not None else 0
    if not 0 < n < vocab_size:
        return None
    if path is None:
        ranked = torch.arange(n)
    else:
        with safe_open(str(path), framework="pt") as f:
            ranked = f.get_tensor("ids").long()
        ranked = ranked[ranked < vocab_size][:n]
        if len(ranked) < n:  # fewer tokens seen in the corpus than asked for: fill up in id order
            unseen = torch.ones(vocab_size, dtype=torch.bool)
            unseen[ranked] = False
            ranked = torch.cat([ranked, unseen.nonzero().flatten()[: n - len(ranked)]])
    ids = torch.unique(torch.cat([ranked, torch.tensor(tok.special_ids, dtype=torch.long)]))
    return ids[ids < vocab_size]
