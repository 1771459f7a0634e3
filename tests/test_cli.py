"""The `specbranch` command line on tiny local models: output, streaming, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from specbranch.cli import main


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "specbranch.cli", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def tiny_args(tiny_pair, *extra):
    return ["generate", "--target", str(tiny_pair["target"]), "--draft", str(tiny_pair["draft"]), "-q", *extra]


def test_generate_prints_text_and_stats(tiny_pair):
    r = run(*tiny_args(tiny_pair, "def add(a, b):", "--max-new-tokens", "12", "--no-chat-template", "--precision", "fp32"))
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "12 tokens" in r.stderr
    assert r.stdout.strip()  # some decoded text


def test_prompt_from_stdin_and_file(tiny_pair, tmp_path):
    r = run(*tiny_args(tiny_pair, "--max-new-tokens", "4"), stdin="Hello world")
    assert r.returncode == 0, r.stderr
    f = tmp_path / "p.txt"
    f.write_text("Hello world")
    r2 = run(*tiny_args(tiny_pair, "--file", str(f), "--max-new-tokens", "4"))
    assert r2.returncode == 0 and r2.stdout == r.stdout  # same prompt, greedy: same text


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--file", "/no/such/prompt.txt"], "does not exist"),
        (["x", "--max-new-tokens", "-3"], "max_new_tokens must be >= 1"),
        (["x", "--temperature", "-1"], "temperature must be >= 0"),
        (["x", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["x", "--gamma", "-1"], "gamma must be in 1..16, or 0"),
        (["x", "--draft-vocab", "-2"], "draft_vocab must be >= -1"),
        (["x", "--draft-precision", "int4", "--backend", "hf"], "int4 needs the native backend"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_pair, extra, needle, capsys):
    code = main(["generate", "--target", str(tiny_pair["target"]), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_gamma_zero_means_each_engines_default():
    from specbranch.config import GAMMA_DEFAULTS, SpeculationConfig

    assert SpeculationConfig().gamma_for("sd") == GAMMA_DEFAULTS["sd"] == 6
    assert SpeculationConfig().gamma_for("specbranch") == GAMMA_DEFAULTS["specbranch"] == 7
    assert SpeculationConfig(gamma=3).gamma_for("sd") == 3  # an explicit gamma pins every engine


def test_unknown_model_path_is_an_error(capsys):
    code = main(["generate", "hi", "--target", "/no/such/model", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "/no/such/model" in err and "Traceback" not in err


def test_incompatible_vocabularies_are_refused(tiny_pair, tmp_path, capsys):
    from conftest import make_tiny_hf, write_tiny_tokenizer

    other = tmp_path / "other"
    make_tiny_hf("qwen2", seed=3, tie=True, vocab_size=280, num_hidden_layers=1).save_pretrained(other)
    write_tiny_tokenizer(other, vocab_size=280)
    code = main(["generate", "hi", "--target", str(tiny_pair["target"]), "--draft", str(other), "--engine", "ar", "-q"])
    # a draft given explicitly is loaded and checked even for ar
    err = capsys.readouterr().err
    assert code == 2 and "vocabular" in err


def test_profile_writes_one_table_per_worker(tiny_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECBRANCH_PROFILE", "")  # main() sets it; monkeypatch removes it afterwards
    out = tmp_path / "prof"
    args = [*tiny_args(tiny_pair, "def add(a, b):", "--max-new-tokens", "12", "--no-chat-template", "--precision",
                       "fp32", "--engine", "specbranch", "--runtime", "parallel", "--profile", str(out))]
    assert main(args) == 0
    target, draft = (out / "target.txt").read_text(), (out / "draft.txt").read_text()
    assert "rounds" in target.splitlines()[0] and "rounds" in draft.splitlines()[0]
    for needle in ("target.forward", "target.settle", "target.wait"):
        assert needle in target
    for needle in ("draft.forward", "draft.wait"):
        assert needle in draft
    assert "operator profiles written" in capsys.readouterr().err


def test_draft_precision_auto_is_int4_only_for_an_int8_or_q4k_pair_on_cpu():
    from specbranch.config import ModelConfig
    from specbranch.errors import ConfigError
    from specbranch.pipeline import draft_precision

    assert draft_precision(ModelConfig()) == "int4"  # this machine builds the kernel (AVX2 + gcc)
    assert draft_precision(ModelConfig(precision="fp64")) == "fp64"
    assert draft_precision(ModelConfig(), device="cuda") == "bf16"  # auto on a GPU
    assert draft_precision(ModelConfig(precision="int8"), device="cuda") == "int8"
    assert draft_precision(ModelConfig(precision="q4k")) == "int4"
    assert draft_precision(ModelConfig(draft_precision="bf16")) == "bf16"
    with pytest.raises(ConfigError, match="CPU only"):
        draft_precision(ModelConfig(draft_precision="int4"), device="cuda")


def test_generate_with_an_int4_draft_matches_ar(tiny_pair):
    """Through the CLI: the tiny pair at int8 with an int4 draft gives ar's exact text."""
    args = ["--precision", "int8", "--max-new-tokens", "24", "--no-chat-template", "def add"]
    ar = run(*tiny_args(tiny_pair, "--engine", "ar", *args))
    sd = run(*tiny_args(tiny_pair, "--engine", "sd", "--draft-precision", "int4", *args))
    assert ar.returncode == 0 and sd.returncode == 0, sd.stderr
    assert sd.stdout == ar.stdout and ar.stdout.strip()
