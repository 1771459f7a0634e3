"""`specbranch` command line: generate, models.

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

from .config import GenerationConfig, ModelConfig, RuntimeConfig, SamplingConfig, SpeculationConfig, field_specs
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
                help=help_text + " (default: %(default)s)",
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

    with Pipeline(models, progress=not args.quiet, runtime=runtime) as pipe:
        err = sys.stderr
        if not args.quiet:
            print(f"[loaded in {pipe.load_time_s:.1f}s: target {models.target}"
                  + (f", draft {models.draft}" if pipe.draft else "") + f", {models.precision}, "
                  f"{runtime.runtime} runtime]", file=err)

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = pipe.generate(prompt, gen, sampling, on_text=show, spec=spec)
    sys.stdout.write("\n")
    print(f"[{gen.engine}] {result.metrics.line()} | finish: {result.finish_reason}", file=err)
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
    for cls in (GenerationConfig, SamplingConfig, SpeculationConfig, ModelConfig, RuntimeConfig):
        add_config_flags(g, cls)
    g.set_defaults(func=cmd_generate)

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
