"""Frequency-ranked draft vocabularies: counting, the file, the fingerprint check, the CLI, and that a
draft restricted to the ranked subset keeps its output exact."""

from __future__ import annotations

import pytest
import torch

from specbranch.cli import main
from specbranch.errors import ConfigError
from specbranch.models.tokenizer import Tokenizer
from specbranch.vocab import count_tokens, draft_vocab_ids, fingerprint, ranking_metadata, save_ranking

from conftest import write_tiny_tokenizer


def test_counts_rank_and_file_round_trip(tiny_pair, tmp_path):
    tok = Tokenizer(tiny_pair["draft"])
    corpus = tmp_path / "c.py"
    corpus.write_text("return a + b\n" * 50 + "Hello world\n")
    counts = count_tokens(tok, [corpus], progress=False)
    assert int(counts.sum()) == 50 * len(tok.encode("return a + b\n")) + len(tok.encode("Hello world\n"))
    path = save_ranking(tmp_path / "ranks", counts, tok, "test corpus")
    assert ranking_metadata(path)["fingerprint"] == fingerprint(tok)
    ids = draft_vocab_ids(tok, 3, 300, str(path))
    frequent = set(torch.argsort(counts, descending=True, stable=True)[:3].tolist())
    assert frequent | set(tok.special_ids) == set(ids.tolist())
    # asking for more than the corpus saw fills up in id order, never repeats, stays in range
    many = draft_vocab_ids(tok, 250, 260, str(path))
    assert len(many) == len(set(many.tolist())) and int(many.max()) < 260 and len(many) >= 250


def test_ranking_of_another_tokenizer_is_refused(tiny_pair, tmp_path):
    tok = Tokenizer(tiny_pair["draft"])
    other = tmp_path / "other"
    write_tiny_tokenizer(other, vocab_size=280)
    path = save_ranking(tmp_path / "ranks", count_tokens(Tokenizer(other), [], progress=False), Tokenizer(other), "x")
    with pytest.raises(ConfigError, match="another tokenizer"):
        draft_vocab_ids(tok, 10, 300, str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        draft_vocab_ids(tok, 10, 300, str(tmp_path / "missing.safetensors"))


def test_rank_vocab_command_then_generate_with_it(tiny_pair, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "ranks.safetensors"
    assert main(["rank-vocab", str(corpus), "--model", str(tiny_pair["draft"]), "--out", str(out), "-q"]) == 0
    assert out.is_file() and "tokens counted" in capsys.readouterr().out
    args = ["generate", "def add(a, b):", "--target", str(tiny_pair["target"]), "--draft", str(tiny_pair["draft"]),
            "-q", "--no-chat-template", "--precision", "fp64", "--max-new-tokens", "12"]
    assert main([*args, "--engine", "ar", "--draft", "none"]) == 0
    ar_text = capsys.readouterr().out
    assert main([*args, "--engine", "sd", "--draft-vocab", "20", "--draft-vocab-ranks", str(out)]) == 0
    assert capsys.readouterr().out == ar_text  # the reduced draft head never changes the output
    assert main(["rank-vocab", str(tmp_path / "nothing-here"), "--model", str(tiny_pair["draft"]), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_jsonl_records_count_by_their_strings_after_the_skipped_ones(tiny_pair, tmp_path):
    import json

    from specbranch.vocab import file_text

    path = tmp_path / "d.jsonl"
    rows = [{"question": "eval prompt", "answer": "kept out"}, {"question": "Hello", "turns": ["world", "again"], "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert file_text(path, skip_records=1) == "Hello\n\nworld\n\nagain"
    assert "eval prompt" in file_text(path)
