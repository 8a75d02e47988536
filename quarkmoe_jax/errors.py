"""The one base class of every error this library raises about what a user gave it.

A checkpoint file, ``config.json``, Quark ``quantization_config``, scheme or array that is missing,
malformed or unsupported raises a subclass of :class:`QuarkMoEError` whose message names the file or key,
what was expected and what was found (one line; ``quarkmoe`` prints it as its error). So does an argument of a
call that this library refuses (token ids, lengths, sampling values, a KV cache: :class:`InputError`). It derives
from ``ValueError``, so code that caught ``ValueError`` keeps working, and one ``except QuarkMoEError`` catches
every refusal.
"""

from __future__ import annotations

__all__ = ["QuarkMoEError", "CheckpointError", "SchemeError", "InputError"]


class QuarkMoEError(ValueError):
    """Bad user input: a checkpoint, config, scheme or array this library refuses (the message says why)."""


class CheckpointError(QuarkMoEError):
    """A checkpoint file, tensor or key is missing or malformed."""


class SchemeError(QuarkMoEError):
    """A quantization config that no scheme accepts, or that is incoherent; names the scheme and the key."""


class InputError(QuarkMoEError):
    """An argument of a model call or of generation that is refused (token ids out of the vocabulary, a prompt
    or generation longer than the model's context, a sampling value out of range, a KV cache or ``start`` that
    does not match, a bad PRNG key); the message names the argument, what was expected and what was found."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field
        """The refused argument's name where one argument is to blame (``"max_new_tokens"``, ``"prompt_ids"``,
        ``"top_p"``, ...): what a server maps to its own request field."""
