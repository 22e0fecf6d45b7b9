"""Incremental detokenisation with stop strings, for streaming text safely.

Text is released only when it can no longer change: not while the last bytes form an
incomplete UTF-8 character, and not while its tail could still become a stop string.

Each token decodes only a short window of recent tokens (the technique vLLM uses): the
text of `ids[prefix:]` minus the text of `ids[prefix:read]` is what the new tokens add.
Decoding the window, not the whole answer, keeps a token's cost constant however long the
stream gets, and decoding from `prefix` keeps tokenizers that drop a leading space at the
start of a decode (SentencePiece) exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = list(stops)
        self._ids: list[int] = []
        self._prefix = 0  # first token of the decode window
        self._read = 0  # tokens whose text is already in `_decoded`
        self._decoded = ""  # text of ids[:read]
        self._sent = 0  # characters released so far
        self.text = ""  # everything released

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance(self, force: bool) -> bool:
        """Fold the pending tokens' text into `_decoded`; False while a character is incomplete."""
        window = self._decode(self._ids[self._prefix :])
        if window.endswith("\ufffd") and not force:
            return False
        self._decoded += window[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._prefix, self._read = self._read, len(self._ids)
        return True

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (newly releasable text, whether a stop string ended the text)."""
        self._ids.append(token)
        if not self._advance(force=False):
            return "", False
        text = self._decoded
        for stop in self._stops:
            at = text.find(stop, max(0, self._sent - len(stop) + 1))
            if at >= 0:
                return self._release(at), True
        hold = max((n for stop in self._stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])), default=0)
        return self._release(len(text) - hold), False

    def flush(self) -> str:
        """Whatever is still held back, once no more tokens will come."""
        self._advance(force=True)
        return self._release(len(self._decoded))

    def _release(self, upto: int) -> str:
        delta = self._decoded[self._sent : upto]
        self._sent = max(self._sent, upto)
        self.text += delta
        return delta
