"""`specbranch` command line: generate, bench, roofline, serve, train-hrad, rank-vocab, models.

Flags are derived from the config dataclasses (:mod:`specbranch.config`), so defaults and help
texts exist once. User mistakes print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

from .config import (
    GAMMA_DEFAULTS, BenchConfig, GenerationConfig, ModelConfig, RuntimeConfig, SamplingConfig, ServeConfig,
    SpeculationConfig, field_specs,
)
from .errors import SpecBranchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    group = parser.add_argument_group(cls.__name__.replace("Config", "").lower() + " options")
    for name, default, meta in field_specs(cls):
        flag = "--" + name.replace("_", "-")
        help_text = meta["help"]
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif meta.get("action") == "append":
            group.add_argument(flag, action="append", default=None, help=help_text)
        else:
            group.add_argument(
                flag,
                type=type(default),
                default=default,
                choices=meta.get("choices"),
                help=help_text + ("" if default == "" else " (default: %(default)s)"),  # "" = unset
            )


def config_from_args(cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    if "stop" in values:
        values["stop"] = tuple(values["stop"] or ())
    return cls(**values)


def read_prompt(args: argparse.Namespace) -> str:
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise SpecBranchError(f"prompt file {path} does not exist: check the path given to --file")
        return path.read_text()
    if args.prompt not in (None, "-"):
        return args.prompt
    if args.prompt == "-" or not sys.stdin.isatty():
        return sys.stdin.read()
    raise SpecBranchError("no prompt: pass it as an argument, with --file PATH, or on standard input")


def cmd_generate(args: argparse.Namespace) -> int:
    models = config_from_args(ModelConfig, args)
    gen = config_from_args(GenerationConfig, args)
    sampling = config_from_args(SamplingConfig, args)
    spec = config_from_args(SpeculationConfig, args)
    runtime = config_from_args(RuntimeConfig, args)
    prompt = read_prompt(args)
    if not prompt.strip():
        raise SpecBranchError("the prompt is empty: pass some text")
    if gen.engine == "ar" and models.has_draft and args.draft == ModelConfig.draft:
        models = ModelConfig(**{**models.__dict__, "draft": "none"})  # ar never reads the default draft
    if gen.engine not in ("pearl", "specbranch"):  # only these two have a parallel form
        runtime = replace(runtime, runtime="sequential")

    from .pipeline import Pipeline
    from .profiling import ENV, profiled

    if args.profile:  # set before the pipeline starts the draft worker, which inherits it
        os.environ[ENV] = str(Path(args.profile).resolve())
    with Pipeline(models, progress=not args.quiet, runtime=runtime) as pipe:
        err = sys.stderr
        if not args.quiet:
            print(f"[loaded in {pipe.load_time_s:.1f}s: target {models.target}"
                  + (f", draft {models.draft}" if pipe.draft else "") + f", {pipe.precision_line()}, "
                  f"{runtime.runtime} runtime]", file=err)

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        role = "target" if runtime.runtime == "parallel" else "sequential"
        with profiled(role, lambda: result.metrics.target_forwards - 1):  # minus the prefill
            result = pipe.generate(prompt, gen, sampling, on_text=show, spec=spec)
    sys.stdout.write("\n")
    if args.profile:
        print(f"[operator profiles written to {args.profile}/: {role}.txt"
              + (", draft.txt" if role == "target" else "") + "]", file=sys.stderr)
    print(f"[{gen.engine}] {result.metrics.line()} | finish: {result.finish_reason}", file=err)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.report import write_report
    from .bench.runner import run_bench

    bench = config_from_args(BenchConfig, args)
    result = run_bench(
        config_from_args(ModelConfig, args), bench, config_from_args(SamplingConfig, args),
        config_from_args(SpeculationConfig, args), config_from_args(RuntimeConfig, args), progress=not args.quiet,
    )
    md, plot_paths = write_report(result, Path(bench.out))
    print(md)
    print(f"wrote {Path(bench.out) / 'results.json'}, {Path(bench.out) / 'report.md'}, "
          + ", ".join(str(p) for p in plot_paths), file=sys.stderr)
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from .bench.roofline import roofline

    for line in roofline(config_from_args(ModelConfig, args), args.num_prompts, args.max_new_tokens, args.repeats):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    models = config_from_args(ModelConfig, args)
    spec = config_from_args(SpeculationConfig, args)
    cfg = config_from_args(ServeConfig, args)
    if not cfg.api_key and os.environ.get("SPECBRANCH_API_KEY"):
        cfg = ServeConfig(**{**cfg.__dict__, "api_key": os.environ["SPECBRANCH_API_KEY"]})
    try:
        from .server import build_server
    except ImportError as e:
        raise SpecBranchError(f"the server needs the 'serve' extra ({e.name} is missing): "
                              "pip install 'specbranch[serve]'") from None
    from .pipeline import Pipeline

    pipe = Pipeline(models, progress=True, runtime=config_from_args(RuntimeConfig, args))
    server = build_server(pipe, cfg, spec)
    svc = server.config.app.state.service
    print(f"[loaded in {pipe.load_time_s:.1f}s: target {models.target}"
          + (f", draft {models.draft}" if pipe.draft else "") + f", {pipe.precision_line()}; default engine "
          f"{svc.default_engine}; model id {svc.model!r}; API key {'required' if cfg.api_key else 'off'}]",
          file=sys.stderr)
    print(f"[OpenAI API at http://{cfg.host}:{cfg.port}/v1 ; metrics at /metrics]", file=sys.stderr)
    server.run()
    return 0


def cmd_train_hrad(args: argparse.Namespace) -> int:
    from .train_hrad import main as train_main

    return train_main(args)


def cmd_rank_vocab(args: argparse.Namespace) -> int:
    from .pipeline import resolve
    from .models.tokenizer import Tokenizer
    from . import vocab

    tok = Tokenizer(resolve(args.model))
    paths = args.paths or vocab.default_corpus()
    # each path is one corpus with equal weight, so a small prose set is not drowned by a large code one
    parts = [vocab.count_tokens(tok, vocab.corpus_files([p]), progress=not args.quiet, skip_records=args.skip_records)
             for p in paths]
    counts = sum(c.double() / max(1, int(c.sum())) for c in parts)  # [V] mean of per-corpus frequencies
    corpus = args.corpus_name or ", ".join(map(str, paths))
    out = vocab.save_ranking(args.out or vocab.SHIPPED / f"token-ranks-{vocab.fingerprint(tok)[:12]}", counts, tok, corpus)
    seen = int((counts > 0).sum())
    total = sum(int(c.sum()) for c in parts)
    print(f"{total:,} tokens counted in {len(parts)} corpora, {seen:,} distinct of {tok.vocab_size:,}; "
          f"ranking saved to {out}")
    ranked = counts.sort(descending=True).values  # [V]
    for n in (8192, 16384, 32768, 65536):
        if n < seen:
            share = ranked[:n].sum() / counts.sum()
            print(f"  top {n:>6,} tokens cover {share:.2%} of the (equally weighted) corpora")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import registry

    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.action == "prepare":
        for name in args.names or [ModelConfig.target, ModelConfig.draft]:
            print(f"{name}: {registry.prepare_model(name, cache_dir=cache, progress=True)}")
        return 0
    for info in registry.list_models(cache):
        print(info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specbranch", description="Lossless speculative decoding: SpecBranch, PEARL, classic SD and plain AR."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it to the terminal")
    g.add_argument("prompt", nargs="?", help="the prompt text; '-' or omitted reads standard input")
    g.add_argument("-f", "--file", help="read the prompt from this file")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or load message")
    g.add_argument("--profile", metavar="DIR", default="", help="write a torch profiler table per worker to DIR "
                   "(target.txt and draft.txt in the parallel runtime, sequential.txt otherwise): operators and "
                   "the phases of a round (forward, settle, wait)")
    for cls in (GenerationConfig, SamplingConfig, SpeculationConfig, ModelConfig, RuntimeConfig):
        add_config_flags(g, cls)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="compare engines on HumanEval / GSM8K / MT-bench prompts: speed, "
                       "acceptance, losslessness and pass@1, as JSON, Markdown and plots")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    for cls in (BenchConfig, SamplingConfig, SpeculationConfig, ModelConfig, RuntimeConfig):
        add_config_flags(b, cls)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("roofline", help="AR decode speed of target and draft vs the memory-bandwidth bound")
    r.add_argument("--num-prompts", type=int, default=3, help="HumanEval prompts to decode (default: %(default)s)")
    r.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generation (default: %(default)s)")
    r.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default: %(default)s)")
    add_config_flags(r, ModelConfig)
    r.set_defaults(func=cmd_roofline)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                                     "/v1/models, /metrics, /health)")
    for cls in (ServeConfig, SpeculationConfig, ModelConfig, RuntimeConfig):
        add_config_flags(s, cls)
    s.set_defaults(func=cmd_serve)

    h = sub.add_parser("train-hrad", help="collect decoding traces of a model pair and train its H-RAD predictor")
    hs = h.add_subparsers(dest="action", required=True)
    c = hs.add_parser("collect", help="run the pair over prompts and record target features + acceptance labels")
    c.add_argument("--prompts", default="", help="comma-separated JSONL prompt files (default: the coding prompts "
                   "shipped for this; never HumanEval, an evaluation set)")
    c.add_argument("--num-prompts", type=int, default=40, help="prompts per file (default: %(default)s)")
    c.add_argument("--skip", type=int, default=0, help="skip the first N prompts of each file, e.g. the ones the "
                   "benchmark evaluates on (default: %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generation (default: %(default)s)")
    c.add_argument("--layers", type=int, default=4, help="last N target layers whose hidden states are features "
                   "(default: %(default)s)")
    c.add_argument("--out", default="traces/hrad", help="trace folder (default: %(default)s)")
    c.add_argument("--gamma", type=int, default=0, help="draft length the labels are bucketed for: blocks of "
                   "gamma - 1 tokens; the predictor drafts at this gamma (default: specbranch's, %s)"
                   % GAMMA_DEFAULTS["specbranch"])
    for name in ("target", "draft", "precision"):
        model_field = next(f for f in fields(ModelConfig) if f.name == name)
        c.add_argument("--" + name, default=model_field.default, help=model_field.metadata["help"] + " (default: %(default)s)")
    c.set_defaults(func=cmd_train_hrad)
    f = hs.add_parser("fit", help="train the predictor on collected traces and save it (safetensors + JSON)")
    f.add_argument("--traces", default="traces/hrad", help="comma-separated trace folders from `collect` (default: %(default)s)")
    f.add_argument("--out", default="", help="predictor path without suffix (default: the file shipped for the "
                   "pair inside the package, loaded automatically for it)")
    f.add_argument("--epochs", type=int, default=200, help="most epochs; early stopping usually ends sooner "
                   "(default: %(default)s)")
    f.add_argument("--seed", type=int, default=0, help="seed of the split and the initialisation (default: %(default)s)")
    f.set_defaults(func=cmd_train_hrad)

    v = sub.add_parser("rank-vocab", help="count token frequencies over a corpus: the ranking --draft-vocab uses")
    v.add_argument("paths", nargs="*", help="files or folders (.py/.md/.rst/.txt/.jsonl searched recursively) to "
                   "count over; JSONL records count by their string values (default: this Python's standard library)")
    v.add_argument("--model", default=ModelConfig.draft, help="model whose tokenizer counts (default: %(default)s)")
    v.add_argument("--out", default="", help="output .safetensors (default: the ranking shipped inside the package "
                   "for this tokenizer, found automatically by --draft-vocab)")
    v.add_argument("--skip-records", type=int, default=0, help="skip the first N records of each .jsonl file, "
                   "e.g. the prompts a benchmark evaluates on (default: %(default)s)")
    v.add_argument("--corpus-name", default="", help="description of the corpus stored in the file (default: the paths)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_rank_vocab)

    m = sub.add_parser("models", help="list the default models or prepare (assemble + convert) them")
    m.add_argument("action", nargs="?", choices=["list", "prepare"], default="list",
                   help="list: show status; prepare: assemble and convert now (default: list)")
    m.add_argument("names", nargs="*", help="registry names to prepare (default: the default target and draft)")
    m.add_argument("--cache-dir", help="model cache folder (default: $SPECBRANCH_CACHE or the user cache dir)")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecBranchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
