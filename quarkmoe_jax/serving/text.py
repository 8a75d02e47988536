"""Text out of a token stream: incremental detokenization and stop strings.

:class:`TextStream` turns a request's new token ids into text pieces as they come: a token that ends inside a
multi-byte UTF-8 character (the tokenizer decodes it to U+FFFD) yields nothing until the character is whole,
and text that may be the start of a stop string is held back until it is known not to be one. The text of all
pieces equals ``tokenizer.decode(all ids)`` cut before the first stop string.
"""

from __future__ import annotations

__all__ = ["TextStream"]

_INCOMPLETE = "\ufffd"


class TextStream:
    """The text of one request's output, piece by piece.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      stop: strings that end the output (not included in it).
      skip_special_tokens: leave special tokens (EOS, chat markers) out of the text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read] decoded already gave the text so far's tail
        self.text = ""  # decoded so far (whole characters only)
        self._emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: list[int]) -> str:
        """The new text that ``token_ids`` complete (possibly ""); after a stop string, always ""."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def finish(self) -> str:
        """The text held back at the end of the output (a partial stop string that never completed)."""
        if self.stopped:
            return ""
        rest = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
        self.text += rest  # ids whose text never ended on a whole character (invalid UTF-8 at the end)
        self._prefix = self._read = len(self._ids)
        piece = self._release()
        if self.stopped:
            return piece
        piece += self.text[self._emitted :]
        self._emitted = len(self.text)
        return piece

    def _release(self) -> str:
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            end = min(found)
            self.text = self.text[:end]
            self.stopped = True
        else:
            end = len(self.text) - self._held_back()
        piece = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
