"""Fast tokenizer from tokenizer.json, chat template and streaming detokenization.

Uses the `tokenizers` library directly (sub-second load) rather than transformers' AutoTokenizer
(seconds of import time); the chat template is rendered with jinja2 the way transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import ModelError


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{folder}: tokenizer.json is missing")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = self.config.get("chat_template")
        tpl_file = folder / "chat_template.jinja"
        if template is None and tpl_file.is_file():
            template = tpl_file.read_text()
        self.chat_template: str | None = template
        self.eos_token_ids = self._eos_ids(folder)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the added/special tokens (chat markers, EOS, ...)."""
        return sorted(set(self._tok.get_added_tokens_decoder()) | set(self.eos_token_ids))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _eos_ids(self, folder: Path) -> tuple[int, ...]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            p = folder / name
            if p.is_file():
                eos = json.loads(p.read_text()).get("eos_token_id")
                ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        tok = self.config.get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok and self._tok.token_to_id(tok) is not None:
            ids.append(self._tok.token_to_id(tok))
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ModelError("this model has no chat template; pass --no-chat-template to use the raw prompt")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None
        )


def _raise(message: str) -> None:
    raise ModelError(f"chat template error: {message}")


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
