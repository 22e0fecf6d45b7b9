"""Incremental detokenisation with stop strings, for streaming text safely.

Text is released only when it can no longer change: not while the last bytes form an
incomplete UTF-8 character, and not while its tail could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = list(stops)
        self._ids: list[int] = []
        self._sent = 0  # characters released so far
        self.text = ""  # everything released

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (newly releasable text, whether a stop string ended the text)."""
        self._ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return "", False
        for stop in self._stops:
            at = text.find(stop, max(0, self._sent - len(stop) + 1))
            if at >= 0:
                return self._release(text[:at]), True
        hold = max((n for stop in self._stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])), default=0)
        return self._release(text[: len(text) - hold]), False

    def flush(self) -> str:
        """Whatever is still held back, once no more tokens will come."""
        return self._release(self._decode())

    def _release(self, upto: str) -> str:
        delta = upto[self._sent :]
        self._sent = max(self._sent, len(upto))
        self.text += delta
        return delta
