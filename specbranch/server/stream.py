"""Server-sent events: token-by-token text pieces and the SSE wire format.

A speculative round commits several tokens at once; a streaming client still expects one chunk
per token. ``TokenTextStream`` feeds the committed tokens one at a time through the generation
loop's own ``StopChecker`` and ``TextStreamer`` (the same stop-string cut, the same hold-back of a
tail that may still become a stop string or is an incomplete UTF-8 character), so the pieces
always concatenate to the non-streamed text.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

from ..engines.base import StopChecker, TextStreamer

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class TokenTextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        # The budget is enforced by the generation loop itself; this checker only cuts the text.
        self._stopper = StopChecker(max_new_tokens=1 << 62, stop=stop, decode=decode)
        self._pieces: list[str] = []
        self._streamer = TextStreamer(decode, self._pieces.append, stop)

    def push(self, token: int) -> str:
        """The text that ``token`` releases ("" while it is held back)."""
        self._stopper.push([token])
        self._streamer.update(self._stopper.text())
        return self._take()

    def finish(self, text: str) -> str:
        """The rest of the final ``text`` (the generation's own, cut before any stop string)."""
        self._streamer.update(text, final=True)
        return self._take()

    def _take(self) -> str:
        out = "".join(self._pieces)
        self._pieces.clear()
        return out
